"""Compare NVIDIA aiperf's numbers with the bundled load tester's on the same workload.

Both clients ran twice against the same running gateway (`step37-serve up --port 18000`),
chat completions, streaming, one 224×224 PNG per request, concurrency 4, 48 requests
after 4 warm-up requests, max 48 output tokens:

    aiperf profile --model step37-tiny --url http://127.0.0.1:18000 --endpoint-type chat \\
        --streaming --concurrency 4 --request-count 48 --warmup-request-count 4 \\
        --image-batch-size 1 --image-width-mean 224 --image-height-mean 224 --image-format png \\
        --tokenizer models/step37-tiny --synthetic-input-tokens-mean 8 --output-tokens-mean 48
    step37-serve loadtest --url http://127.0.0.1:18000 --endpoint chat --concurrency 4 \\
        --requests 48 --warmup 4 --image-kind noise --image-size 224 --stream --max-tokens 48

This script reads the four result files in bench/results/aiperf-crosscheck/ and writes
the comparison next to them: each client's runs, and whether this client's figures
fall within the spread of aiperf's two runs.

    python bench/crosscheck_aiperf.py
"""

from __future__ import annotations

import json
from pathlib import Path

DIR = Path(__file__).resolve().parent / "results" / "aiperf-crosscheck"


def aiperf_run(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    return {"requests_per_s": data["request_throughput"]["avg"], "latency_p50_ms": data["request_latency"]["p50"],
            "latency_mean_ms": data["request_latency"]["avg"], "ttft_p50_ms": data["time_to_first_token"]["p50"]}


def loadtest_run(path: Path) -> dict[str, float]:
    (point,) = json.loads(path.read_text())["points"]
    summary = point["summary"]
    return {"requests_per_s": summary["throughput"]["requests_per_s"], "latency_p50_ms": summary["latency_ms"]["p50"],
            "latency_mean_ms": summary["latency_ms"]["mean"], "ttft_p50_ms": summary["ttft_ms"]["p50"]}


def main() -> None:
    aiperf = [aiperf_run(p) for p in sorted(DIR.glob("aiperf-run*.json"))]
    ours = [loadtest_run(p) for p in sorted(DIR.glob("loadtest-run*.json"))]
    verdict = {}
    for metric in aiperf[0]:
        low, high = min(r[metric] for r in aiperf), max(r[metric] for r in aiperf)
        values = [r[metric] for r in ours]
        verdict[metric] = {"aiperf_range": [low, high], "loadtest": values,
                           "loadtest_within_aiperf_range": all(low <= v <= high for v in values)}
    result = {"aiperf_runs": aiperf, "loadtest_runs": ours, "comparison": verdict}
    (DIR / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    for metric, row in verdict.items():
        print(f"{metric:<16} aiperf {row['aiperf_range'][0]:8.1f} .. {row['aiperf_range'][1]:8.1f}   "
              f"loadtest {', '.join(f'{v:.1f}' for v in row['loadtest'])}   "
              f"within: {row['loadtest_within_aiperf_range']}")


if __name__ == "__main__":
    main()
