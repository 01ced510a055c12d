"""The load tester over real loopback HTTP, against the mock server under uvicorn.

In-process ASGI buffers whole responses, so only a real socket shows whether time to
first token is really measured at the first token. The mock sleeps a known minimum
before its first token and between tokens; sleeps only ever run long, so the checks
are lower bounds (with slack where the client's own reading time enters).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from threaded_server import serve_in_thread

from services import cli as top_level_cli
from services.common.server import find_free_port
from services.loadtest.mock_server import MockServerConfig, create_app
from services.loadtest.report import load_report


@pytest.fixture
def mock_server() -> Iterator[tuple[str, MockServerConfig]]:
    config = MockServerConfig(tokens=5, first_token_delay_s=0.05, token_interval_s=0.02, hang_every=4, hang_s=30.0)
    with serve_in_thread(create_app(config), "mock-openai-server") as url:
        yield url, config


def test_streamed_ttft_timeouts_and_report_over_a_socket(mock_server: tuple[str, MockServerConfig],
                                                         tmp_path: Path) -> None:
    url, config = mock_server
    status = top_level_cli.main(["loadtest", "--url", url, "--concurrency", "1,2", "--requests", "6", "--warmup", "1",
                                 "--stream", "--timeout-s", "0.5", "--image-kind", "noise", "--image-size", "16",
                                 "--no-progress", "--no-plots", "--out", str(tmp_path)])
    assert status == 0
    report = load_report(tmp_path / "report.json")
    assert report["target"]["model"] == config.model  # discovered through GET /v1/models
    assert sum(config.answered.values()) == 2 * (6 + 1)
    for point in report["points"]:
        requests = point["summary"]["requests"]
        assert requests["ok"] + requests["error"] + requests["timeout"] == requests["sent"] == 6
        measured = [record for record in point["records"] if not record["warmup"]]
        timed_out = [record for record in point["records"] if record["outcome"] == "timeout"]
        assert timed_out and all(record["error_type"] == "RequestTimeout" for record in timed_out)
        for record in measured:
            if record["outcome"] != "ok":
                continue
            assert record["output_tokens"] == 5 and record["output_tokens_source"] == "usage"
            assert record["ttft_ms"] >= 50.0  # the first token really came after its delay...
            assert record["latency_ms"] >= 50.0 + 4 * 20.0  # the stream spans every sleep
            # ...and the other tokens came well after the first (the server sleeps 4 x 20 ms
            # between them; the client may read the first a little late on a busy machine).
            assert record["latency_ms"] - record["ttft_ms"] >= 4 * 20.0 / 2


def test_a_refused_connection_is_an_error_per_request(tmp_path: Path) -> None:
    closed_port = find_free_port()
    status = top_level_cli.main(["loadtest", "--url", f"http://127.0.0.1:{closed_port}", "--model", "m",
                                 "--requests", "3", "--warmup", "0", "--no-progress", "--no-plots",
                                 "--image-kind", "noise", "--image-size", "8", "--out", str(tmp_path)])
    assert status == 1
    summary = load_report(tmp_path / "report.json")["points"][0]["summary"]
    assert summary["requests"]["error"] == summary["requests"]["sent"] == 3
    assert summary["errors_by_type"] == {"ConnectError": 3}
