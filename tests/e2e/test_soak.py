"""A short soak: bench/soak.py's run, CI-sized. The long one is `python bench/soak.py`."""

from __future__ import annotations

from bench.soak import SoakConfig, run_with_stack


def test_a_short_soak_loses_nothing_and_holds_its_memory(model_dir, tmp_path) -> None:
    config = SoakConfig(duration_s=30, concurrency=4, warmup_s=8, sample_s=1.0, cache_bytes=256 << 10,
                        model=str(model_dir))
    report = run_with_stack(config, log_dir=str(tmp_path))
    failures = [r for r in report["records"] if r[2] == 0 or (not r[1].startswith("invalid:") and r[2] != 200)]
    assert report["requests"] >= 20, "the soak sent almost nothing"
    assert report["valid"] and report["invalid"], report["by_kind"]
    assert report["targets"] == {"no_lost_requests": True, "no_5xx_for_valid_requests": True,
                                 "every_invalid_request_4xx": True, "rss_growth_at_most_10_percent": True}, (
        report["rss"], failures[:5])
    assert set(report["rss"]) == {"encoder-0", "lm-worker-0", "gateway"}
