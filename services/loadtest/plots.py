"""PNG plots of a load-test report: latency CDFs, and throughput and latency against load.

Drawn from the report JSON (not from live objects), so a committed report can be
re-plotted later. Uses matplotlib's object API on the Agg canvas, never ``pyplot``: no
global figure state, no display needed, safe inside a server or a test. matplotlib is
imported when plotting, so the load test itself does not pay for it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["plot_latency_cdf", "plot_load_curves", "write_plots"]


def _figure(width: float, height: float, columns: int) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _ok_values(point: dict[str, Any], key: str) -> list[float]:
    return sorted(record[key] for record in point["records"]
                  if not record["warmup"] and record["outcome"] == "ok" and record[key] is not None)


def plot_latency_cdf(report: dict[str, Any], path: str | Path) -> Path:
    """Empirical CDF of latency per load point (and of TTFT, when streamed), log x axis:
    tails are what a CDF is for, and they span decades."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    has_ttft = any(_ok_values(point, "ttft_ms") for point in report["points"])
    figure, axes = _figure(11 if has_ttft else 6.5, 4.5, 2 if has_ttft else 1)
    for axis, key, title in zip(axes, ("latency_ms", "ttft_ms"), ("request latency", "time to first token"),
                                strict=False):
        for point in report["points"]:
            values = _ok_values(point, key)
            if values:
                fractions = [(rank + 1) / len(values) for rank in range(len(values))]
                axis.step(values, fractions, where="post", label=point["load"]["label"])
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel(f"{title} (ms, successful requests)")
        axis.set_ylabel("fraction of requests")
        axis.set_ylim(0, 1.01)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
        axis.set_title(f"{title} CDF — {report['target']['endpoint']}")
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def _load_value(load: dict[str, Any]) -> float:
    if load["mode"] == "concurrency":
        return float(load["concurrency"])
    return math.inf if load["burst"] else float(load["rate_per_s"])


def plot_load_curves(report: dict[str, Any], path: str | Path) -> Path:
    """Throughput, and p50/p99 latency, against the swept concurrency or request rate."""
    # One x axis: the first point's mode (the CLI never mixes modes); a burst has no x.
    mode = report["points"][0]["load"]["mode"] if report["points"] else "concurrency"
    points = sorted((p for p in report["points"]
                     if p["load"]["mode"] == mode and math.isfinite(_load_value(p["load"]))),
                    key=lambda p: _load_value(p["load"]))
    loads = [_load_value(point["load"]) for point in points]
    figure, (throughput_axis, latency_axis) = _figure(11, 4.5, 2)

    def series(section: str, key: str) -> list[float]:
        return [math.nan if (values := point["summary"][section]) is None or values[key] is None else values[key]
                for point in points]

    throughput_axis.plot(loads, series("throughput", "requests_per_s"), "o-", label="requests/s")
    throughput_axis.plot(loads, series("throughput", "images_per_s"), "s--", label="images/s")
    tokens_axis = throughput_axis.twinx()
    tokens_axis.plot(loads, series("throughput", "output_tokens_per_s"), "^:", color="tab:green",
                     label="output tokens/s")
    tokens_axis.set_ylabel("output tokens/s")
    throughput_axis.set_ylabel("requests/s, images/s")
    throughput_axis.set_title("throughput")
    handles = throughput_axis.get_legend_handles_labels()
    extra = tokens_axis.get_legend_handles_labels()
    throughput_axis.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize="small")
    for percentile in ("p50", "p99"):
        latency_axis.plot(loads, series("latency_ms", percentile), "o-", label=f"latency {percentile}")
    if any(point["summary"]["ttft_ms"] for point in points):
        latency_axis.plot(loads, series("ttft_ms", "p99"), "^:", label="TTFT p99")
    latency_axis.set_ylabel("ms (successful requests)")
    latency_axis.set_title("latency")
    latency_axis.legend(fontsize="small")
    for axis in (throughput_axis, latency_axis):
        axis.set_xlabel("concurrency" if mode == "concurrency" else "offered rate (requests/s)")
        if len(loads) > 1 and loads[0] > 0 and loads[-1] / loads[0] >= 8:
            axis.set_xscale("log", base=2)
        axis.set_xticks(loads, [f"{load:g}" for load in loads])
        axis.grid(True, alpha=0.3)
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def write_plots(report: dict[str, Any], directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [plot_latency_cdf(report, directory / "latency_cdf.png"),
            plot_load_curves(report, directory / "load_curves.png")]
