"""The load test's report: JSON with every record, and a table for the terminal.

JSON schema (``schema: "step37-serve/loadtest-report/1"``)::

    {
      "schema": str, "created_at": ISO-8601 UTC, "interrupted": bool,
      "environment": {"tool", "version", "python", "platform", "machine", "hostname", "cpu_count"},
      "target": {"url", "endpoint", "model"},
      "settings": RunSettings fields (api_key redacted),
      "workload": WorkloadConfig fields + {"images": the image source},
      "points": [{
        "load": {"mode", "label", "concurrency", "rate_per_s", "burst", "max_concurrency"},
        "started_at": ISO-8601 UTC, "deadline_hit": bool, "workload_waits": int,
        "summary": services.loadtest.stats.summarize(records),
        "records": [RequestRecord.to_wire(), ...]   # warm-up included, flagged
      }, ...]
    }

``summary`` is derived from ``records`` only; ``recompute_summary`` does it again from
the JSON, and the tests hold the two equal.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from services.loadtest.records import RequestRecord
from services.loadtest.runner import PointResult, RunSettings
from services.loadtest.stats import summarize
from services.loadtest.workload import Workload

__all__ = ["SCHEMA", "build_report", "format_table", "load_report", "recompute_summary", "write_json"]

SCHEMA = "step37-serve/loadtest-report/1"


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, tz=timezone.utc).isoformat(timespec="milliseconds")


def _environment() -> dict[str, Any]:
    try:
        version = metadata.version("step37-serve")
    except metadata.PackageNotFoundError:
        version = None  # running from a checkout that was never installed
    return {"tool": "step37-serve loadtest", "version": version, "python": sys.version.split()[0],
            "platform": platform.platform(), "machine": platform.machine(), "hostname": platform.node(),
            "cpu_count": os.cpu_count()}


def build_report(results: Sequence[PointResult], settings: RunSettings, workload: Workload, *,
                 model: str | None, interrupted: bool = False) -> dict[str, Any]:
    now = datetime.now(tz=timezone.utc).timestamp()
    return {
        "schema": SCHEMA,
        "created_at": _iso(now),
        "interrupted": interrupted,
        "environment": _environment(),
        "target": {"url": settings.url, "endpoint": settings.endpoint, "model": model},
        "settings": settings.describe(),
        "workload": workload.describe(),
        "points": [
            {
                "load": result.point.describe(),
                "started_at": _iso(result.started_at_unix_s),
                "deadline_hit": result.deadline_hit,
                "workload_waits": result.workload_waits,
                "summary": summarize(result.records, not_sent=result.not_sent),
                "records": [record.to_wire() for record in result.records],
            }
            for result in results
        ],
    }


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    return path


def load_report(path: str | Path) -> dict[str, Any]:
    report = json.loads(Path(path).read_text())
    if report.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {report.get('schema')!r}, expected {SCHEMA!r}")
    return report


def recompute_summary(point: dict[str, Any]) -> dict[str, Any]:
    """A point's summary computed again from its JSON records."""
    records = [RequestRecord.from_wire(wire) for wire in point["records"]]
    return summarize(records, not_sent=point["summary"]["requests"]["not_sent"])


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _get(summary: dict[str, Any], section: str, key: str) -> float | None:
    values = summary.get(section)
    return None if values is None else values.get(key)


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
             for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def format_table(report: dict[str, Any]) -> str:
    """Load points as rows: outcomes, throughput, latency and TTFT percentiles (ms);
    then per-stage server timings and errors, where there are any."""
    header = ["load", "sent", "ok", "err", "t/o", "req/s", "img/s", "tok/s",
              "mean", "p50", "p90", "p95", "p99", "ttft p50", "ttft p99"]
    rows = []
    for point in report["points"]:
        summary = point["summary"]
        counts, throughput = summary["requests"], summary["throughput"]
        rows.append([
            point["load"]["label"], str(counts["sent"]), str(counts["ok"]), str(counts["error"]),
            str(counts["timeout"]), _number(throughput["requests_per_s"], 2), _number(throughput["images_per_s"], 2),
            _number(throughput["output_tokens_per_s"], 1),
            *(_number(_get(summary, "latency_ms", key)) for key in ("mean", "p50", "p90", "p95", "p99")),
            _number(_get(summary, "ttft_ms", "p50")), _number(_get(summary, "ttft_ms", "p99")),
        ])
    sections = [f"{report['target']['endpoint']} at {report['target']['url']}  (latencies in ms)",
                _render(header, rows)]

    stages = sorted({stage for point in report["points"] for stage in point["summary"]["server_timings_ms"]})
    if stages:
        stage_rows = [[point["load"]["label"],
                       *(_number(_get(point["summary"]["server_timings_ms"], stage, "mean")) for stage in stages)]
                      for point in report["points"]]
        sections += ["\nserver timings, mean ms per successful request", _render(["load", *stages], stage_rows)]

    error_lines = []
    for point in report["points"]:
        summary = point["summary"]
        for error_type, count in summary["errors_by_type"].items():
            example = summary["error_examples"].get(error_type, "")[:120]
            error_lines.append(f"  {point['load']['label']}: {count} x {error_type}: {example}")
        if summary["errors_by_status"]:
            error_lines.append(f"  {point['load']['label']}: by status {summary['errors_by_status']}")
        if point["deadline_hit"]:
            error_lines.append(f"  {point['load']['label']}: hard deadline reached "
                               f"({summary['requests']['not_sent']} requests not sent)")
    if error_lines:
        sections += ["\nfailures", *error_lines]
    return "\n".join(sections)
