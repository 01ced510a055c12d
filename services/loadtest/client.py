"""Sending one request and turning whatever happens into a ``RequestRecord``.

The whole request (connection, upload, every byte of the answer) runs under one
budget, ``min(timeout_s, time left before the load point's hard deadline)``, enforced
with ``asyncio.wait_for``. httpx's own timeouts are per operation (a slow trickle of
SSE chunks never trips a read timeout), so they cannot bound a request; they are
switched off in the client this module's callers build.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from services.loadtest.errors import (
    OUTCOME_ERROR,
    OUTCOME_OK,
    REQUEST_TIMEOUT,
    RUN_DEADLINE,
    HTTPStatusError,
    InvalidResponse,
    ResponseError,
    classify_failure,
)
from services.loadtest.protocol import (
    ChatStreamParser,
    ResponseSummary,
    parse_captions_response,
    parse_chat_response,
    parse_server_timing,
)
from services.loadtest.records import RequestRecord
from services.loadtest.workload import RequestSpec

__all__ = ["RequestSender", "discover_model"]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
_EXPECTED_FAILURES = (httpx.HTTPError, ResponseError, TimeoutError, asyncio.TimeoutError)


class RequestSender:
    """Sends ``RequestSpec``s to one endpoint and records each one, whatever happens.

    Every call to ``send`` hands exactly one record to ``sink``, also when the request
    is cancelled (a Ctrl-C mid-run), so the records always add up to what was sent.
    """

    def __init__(self, client: httpx.AsyncClient, url: str, endpoint: str, *, timeout_s: float,
                 sink: Callable[[RequestRecord], None], clock: Clock = time.perf_counter) -> None:
        self.client = client
        self.url = url
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.sink = sink
        self.clock = clock
        self._unexpected_logged: set[str] = set()

    async def send(self, spec: RequestSpec, *, origin_s: float, deadline_s: float, warmup: bool,
                   scheduled_s: float | None = None) -> RequestRecord:
        start = self.clock()
        budget_s = max(0.0, min(self.timeout_s, deadline_s - start))
        record = RequestRecord(
            index=spec.index, warmup=warmup, start_s=start - origin_s, end_s=start - origin_s,
            outcome=OUTCOME_OK, images=spec.images, reused_images=spec.reused_images,
            request_bytes=len(spec.body), image_ids=list(spec.image_ids), scheduled_s=scheduled_s,
        )
        try:
            summary = await asyncio.wait_for(self._exchange(spec, record), budget_s)
        except asyncio.CancelledError:
            self._fail(record, origin_s, OUTCOME_ERROR, "Cancelled", "cancelled before it completed")
            self.sink(record)
            raise
        except Exception as exc:  # every failure becomes the record's error; none is dropped
            outcome, error_type = classify_failure(exc)
            if error_type == REQUEST_TIMEOUT and budget_s < self.timeout_s:
                error_type = RUN_DEADLINE
            if not isinstance(exc, _EXPECTED_FAILURES) and error_type not in self._unexpected_logged:
                # Probably a bug here rather than the server's fault: show the traceback once.
                self._unexpected_logged.add(error_type)
                logger.warning("unexpected %s while sending request %d", error_type, spec.index, exc_info=exc)
            # A status the exception knows wins; else keep what the headers said (a stream
            # can fail after its 200), if they came at all.
            record.status_code = getattr(exc, "status_code", None) or record.status_code
            message = str(exc) or type(exc).__name__
            if error_type in (REQUEST_TIMEOUT, RUN_DEADLINE):
                message = f"no complete response within {budget_s:.3g} s"
            self._fail(record, origin_s, outcome, error_type, message)
        else:
            record.end_s = self.clock() - origin_s
            if summary.first_token_s is not None:
                record.ttft_ms = (summary.first_token_s - start) * 1000.0
            record.output_tokens = summary.output_tokens
            record.output_tokens_source = summary.output_tokens_source
            record.prompt_tokens = summary.prompt_tokens
            record.server_timings_ms = summary.server_timings_ms
        self.sink(record)
        return record

    def _fail(self, record: RequestRecord, origin_s: float, outcome: str, error_type: str, message: str) -> None:
        record.end_s = self.clock() - origin_s
        record.outcome = outcome
        record.error_type = error_type
        record.error_message = message[:500]

    async def _exchange(self, spec: RequestSpec, record: RequestRecord) -> ResponseSummary:
        headers = {"content-type": spec.content_type}
        if spec.stream:
            headers["accept"] = "text/event-stream"
        async with self.client.stream("POST", self.url, content=spec.body, headers=headers) as response:
            status = record.status_code = response.status_code
            header_timings = parse_server_timing(response.headers.get("server-timing"))
            if not 200 <= status < 300:
                body = await response.aread()
                raise HTTPStatusError(status, body[:300].decode("utf-8", errors="replace"))
            if spec.stream:
                parser = ChatStreamParser(header_timings, status)
                async for line in response.aiter_lines():
                    parser.feed_line(line, self.clock())
                return parser.finish(self.clock())
            body = await response.aread()
        if self.endpoint == "chat":
            return parse_chat_response(body, header_timings, status)
        return parse_captions_response(body, header_timings, status, spec.images)


async def discover_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id ``GET /v1/models`` lists: what OpenAI-compatible servers such
    as vLLM require in ``model`` when the user did not name one."""
    response = await client.get(f"{base_url.rstrip('/')}/v1/models")
    if response.status_code != 200:
        raise HTTPStatusError(response.status_code, response.text[:300])
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise InvalidResponse("/v1/models", "expected {data: [{id: ...}]}", response.text[:200]) from exc
