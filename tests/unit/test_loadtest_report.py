"""The report (JSON, table, PNG plots) and the command line, end to end in-process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from services import cli as top_level_cli
from services.loadtest import cli
from services.loadtest.mock_server import MockServerConfig, create_app
from services.loadtest.report import SCHEMA, load_report, recompute_summary

RECORD_FIELDS = {
    "index", "warmup", "start_s", "end_s", "latency_ms", "outcome", "images", "reused_images", "request_bytes",
    "image_ids", "scheduled_s", "status_code", "error_type", "error_message", "ttft_ms", "output_tokens",
    "output_tokens_source", "prompt_tokens", "server_timings_ms",
}
SUMMARY_FIELDS = {
    "requests", "window_s", "throughput", "latency_ms", "ttft_ms", "tpot_ms", "output_tokens", "images",
    "errors_by_type", "errors_by_status", "error_examples", "server_timings_ms", "schedule_lag_ms",
}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--url", "http://mock", "--no-progress", "--image-kind", "noise",
                              "--image-size", "8", *argv])


def _run(tmp_path: Path, *argv: str, mock: MockServerConfig | None = None,
         transport: httpx.AsyncBaseTransport | None = None) -> tuple[int, dict | None]:
    transport = transport or httpx.ASGITransport(create_app(mock or MockServerConfig(tokens=3)))
    status = cli.run(_args("--out", str(tmp_path), *argv), transport=transport)
    report_path = tmp_path / "report.json"
    return status, (load_report(report_path) if report_path.exists() else None)


def test_report_json_plots_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = _run(tmp_path, "--concurrency", "1,2", "--requests", "8", "--warmup", "1", "--stream",
                          "--reuse", "0.5", mock=MockServerConfig(tokens=3, fail_every=4))
    assert status == 0 and report is not None
    assert report["schema"] == SCHEMA
    assert set(report) == {"schema", "created_at", "interrupted", "environment", "target", "settings",
                           "workload", "points"}
    assert report["target"] == {"url": "http://mock/v1/chat/completions", "endpoint": "chat", "model": "mock-model"}
    assert report["settings"]["api_key"] is None and report["interrupted"] is False
    assert report["workload"]["images"]["kind"] == "noise" and report["workload"]["stream"] is True
    assert [point["load"]["concurrency"] for point in report["points"]] == [1, 2]
    for point in report["points"]:
        assert set(point) == {"load", "started_at", "deadline_hit", "workload_waits", "summary", "records"}
        assert set(point["summary"]) == SUMMARY_FIELDS
        assert len(point["records"]) == 8 + 1
        assert all(set(record) == RECORD_FIELDS for record in point["records"])
        requests = point["summary"]["requests"]
        assert requests["ok"] + requests["error"] + requests["timeout"] == requests["sent"] == 8
        assert requests["error"] > 0  # the mock failed every fourth request
        # The summary is a function of the saved records, nothing else.
        assert recompute_summary(point) == point["summary"]

    for name in ("latency_cdf.png", "load_curves.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300
    table = capsys.readouterr().out
    assert "concurrency=1" in table and "concurrency=2" in table and "p99" in table and "ttft p50" in table
    assert "server timings" in table and "HTTPStatus" in table


def test_rate_sweep_on_the_captions_endpoint(tmp_path: Path) -> None:
    status, report = _run(tmp_path, "--endpoint", "captions", "--rate", "200,inf", "--max-concurrency", "2",
                          "--requests", "4", "--warmup", "0", "--images-per-request", "2", "--no-plots")
    assert status == 0 and report is not None
    assert [point["load"]["label"] for point in report["points"]] == ["rate=200/s (max 2)", "rate=inf/s (max 2)"]
    assert report["points"][1]["load"]["burst"] is True and report["points"][1]["load"]["rate_per_s"] is None
    assert report["target"]["model"] is None  # the captions endpoint takes no model
    assert all(point["summary"]["images"]["sent"] == 8 for point in report["points"])
    assert not (tmp_path / "latency_cdf.png").exists()


def test_model_discovery_failure_is_reported_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = create_app(MockServerConfig())

    async def no_models_endpoint(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(404, json={"detail": "Not Found"})
        return await httpx.ASGITransport(app).handle_async_request(request)

    status, report = _run(tmp_path, "--requests", "2", "--no-plots", transport=httpx.MockTransport(no_models_endpoint))
    assert status == 0 and report is not None and report["target"]["model"] is None
    assert "could not list models" in capsys.readouterr().err


def test_exit_status_says_when_nothing_succeeded(tmp_path: Path) -> None:
    status, report = _run(tmp_path, "--requests", "3", "--no-plots", "--model", "m",
                          mock=MockServerConfig(fail_every=1))
    assert status == 1 and report is not None
    assert report["points"][0]["summary"]["errors_by_status"] == {"500": 3}


@pytest.mark.parametrize("argv", [["--max-concurrency", "2"], ["--images-dir", "/nonexistent"],
                                  ["--reuse", "1.5"], ["--concurrency", "0"]])
def test_impossible_settings_exit_with_status_2(tmp_path: Path, argv: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    status, report = _run(tmp_path, *argv)
    assert status == 2 and report is None
    assert "step37-serve loadtest:" in capsys.readouterr().err


def test_registered_as_a_step37_serve_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        top_level_cli.main(["loadtest", "--help"])
    assert exit_info.value.code == 0
    assert "--concurrency" in capsys.readouterr().out


def test_runnable_as_a_plain_module() -> None:
    completed = subprocess.run([sys.executable, "-m", "services.loadtest", "--help"], capture_output=True,
                               text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "--rate" in completed.stdout and "report.json" in completed.stdout


def test_load_report_refuses_another_schema(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"schema": "something-else/1"}))
    with pytest.raises(ValueError, match="schema"):
        load_report(path)


def test_public_names_are_locked() -> None:
    import services.loadtest as loadtest

    assert loadtest.__all__ == [
        "ConfigError", "DirectoryImages", "GeneratedImages", "LoadPoint", "LoadTestError", "LoadTester",
        "PointResult", "RequestRecord", "RunSettings", "Workload", "WorkloadConfig", "summarize",
    ]
    assert all(hasattr(loadtest, name) for name in loadtest.__all__)
