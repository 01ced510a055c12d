"""Reading responses: OpenAI chat completions (JSON or SSE), ``/v1/captions``, and the
server timings a response may carry.

Strict about what decides success (a completion with choices, one caption per image, a
stream that ends with ``data: [DONE]``) and lenient about diagnostics: server timings
are optional (vLLM and SGLang send none), and a malformed ``Server-Timing`` entry is
skipped, as the W3C specification tells user agents to do, rather than turning a good
completion into an error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from services.loadtest.errors import InvalidResponse, StreamError

__all__ = [
    "ChatStreamParser",
    "ResponseSummary",
    "parse_captions_response",
    "parse_chat_response",
    "parse_server_timing",
    "timings_from_body",
]

# Commas and semicolons inside a quoted desc="a, b" do not separate metrics or parameters.
_OUTSIDE_QUOTES = r'(?=(?:[^"]*"[^"]*")*[^"]*$)'
_METRIC_SEPARATOR = re.compile("," + _OUTSIDE_QUOTES)
_PARAM_SEPARATOR = re.compile(";" + _OUTSIDE_QUOTES)
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def parse_server_timing(header: str | None) -> dict[str, float]:
    """``{"decode": 1.2, ...}`` (milliseconds) from a ``Server-Timing`` header value,
    e.g. ``decode;dur=1.2, cache;desc="hit", encode;dur=30.5``. Metrics without a
    duration (``cache;desc="hit"``) carry nothing to time and are left out."""
    timings: dict[str, float] = {}
    for metric in _METRIC_SEPARATOR.split(header or ""):
        name, *params = (part.strip() for part in _PARAM_SEPARATOR.split(metric))
        if not _TOKEN.match(name):
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() != "dur":
                continue
            try:
                duration_ms = float(value.strip().strip('"'))
            except ValueError:
                duration_ms = math.nan  # "dur=abc": skipped like a browser would (module docstring)
            if math.isfinite(duration_ms):
                timings[name] = duration_ms
            break
    return timings


def timings_from_body(body: Any) -> dict[str, float]:
    """Numeric entries of a body's ``timings`` object, with any ``_ms`` suffix removed so
    that ``encode_ms`` (JSON) and ``encode`` (header) name the same stage."""
    timings = body.get("timings") if isinstance(body, dict) else None
    if not isinstance(timings, dict):
        return {}
    return {str(name).removesuffix("_ms"): float(value) for name, value in timings.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


@dataclass
class ResponseSummary:
    """What one successful response told us. ``first_token_s`` is a clock reading."""

    output_tokens: int | None = None
    output_tokens_source: str | None = None
    prompt_tokens: int | None = None
    server_timings_ms: dict[str, float] = field(default_factory=dict)
    first_token_s: float | None = None


def _load_json(body: bytes, where: str, status_code: int | None) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidResponse(where, f"not JSON: {exc}", body[:200], status_code) from exc


def _usage(summary: ResponseSummary, usage: Any) -> None:
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            summary.output_tokens = usage["completion_tokens"]
            summary.output_tokens_source = "usage"
        if isinstance(usage.get("prompt_tokens"), int):
            summary.prompt_tokens = usage["prompt_tokens"]


def parse_chat_response(body: bytes, header_timings: dict[str, float], status_code: int) -> ResponseSummary:
    payload = _load_json(body, "body", status_code)
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
            or not isinstance(choices[0].get("message"), dict):
        raise InvalidResponse("choices", "expected a non-empty list of {message: ...}", choices, status_code)
    summary = ResponseSummary(server_timings_ms={**header_timings, **timings_from_body(payload)})
    _usage(summary, payload.get("usage"))
    return summary


def parse_captions_response(body: bytes, header_timings: dict[str, float], status_code: int,
                            images: int) -> ResponseSummary:
    payload = _load_json(body, "body", status_code)
    captions = payload.get("captions") if isinstance(payload, dict) else None
    if not isinstance(captions, list) or len(captions) != images:
        raise InvalidResponse("captions", f"expected a list of {images} captions", captions, status_code)
    return ResponseSummary(server_timings_ms={**header_timings, **timings_from_body(payload)})


class ChatStreamParser:
    """Consumes the lines of an SSE chat-completion stream.

    Time to first token is the arrival of the first event carrying generated text
    (``content`` or ``reasoning_content``); servers commonly send a role-only chunk
    first, which is not a token. Without a ``usage`` chunk, output tokens are estimated
    as the number of text-carrying chunks, and the record says so.
    """

    def __init__(self, header_timings: dict[str, float], status_code: int) -> None:
        self.summary = ResponseSummary(server_timings_ms=dict(header_timings))
        self.status_code = status_code
        self.text_chunks = 0
        self.done = False
        self._data_lines: list[str] = []

    def feed_line(self, line: str, now_s: float) -> None:
        if line == "":
            self._dispatch(now_s)
        elif line.startswith("data:"):
            data = line[5:]
            self._data_lines.append(data[1:] if data.startswith(" ") else data)
        # Comments (":") and other fields (event:, id:, retry:) carry nothing we time.

    def _dispatch(self, now_s: float) -> None:
        if not self._data_lines:
            return
        data, self._data_lines = "\n".join(self._data_lines), []
        if self.done:
            raise InvalidResponse("stream", "data after [DONE]", data, self.status_code)
        if data.strip() == "[DONE]":
            self.done = True
            return
        chunk = _load_json(data.encode(), "stream chunk", self.status_code)
        if not isinstance(chunk, dict):
            raise InvalidResponse("stream chunk", "expected a JSON object", chunk, self.status_code)
        if "error" in chunk:
            raise StreamError(f"error in stream: {json.dumps(chunk['error'])[:300]}", self.status_code)
        if chunk.get("usage"):
            _usage(self.summary, chunk["usage"])
        self.summary.server_timings_ms.update(timings_from_body(chunk))
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
                self.text_chunks += 1
                if self.summary.first_token_s is None:
                    self.summary.first_token_s = now_s
                break

    def finish(self, now_s: float) -> ResponseSummary:
        self._dispatch(now_s)  # a last event not followed by a blank line
        if not self.done:
            raise InvalidResponse("stream", "ended without data: [DONE]", None, self.status_code)
        if self.summary.output_tokens_source is None:
            self.summary.output_tokens = self.text_chunks
            self.summary.output_tokens_source = "chunks"
        return self.summary
