"""Reading responses: Server-Timing, body timings, chat JSON, SSE streams, captions."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from services.loadtest.errors import (
    HTTPStatusError,
    InvalidResponse,
    StreamError,
    classify_failure,
)
from services.loadtest.protocol import (
    ChatStreamParser,
    parse_captions_response,
    parse_chat_response,
    parse_server_timing,
    timings_from_body,
)


def test_server_timing_of_this_gateway() -> None:
    header = "decode;dur=1.2, cache;dur=0.1, encode;dur=30.5, transfer;dur=2.0, generate;dur=120.4"
    assert parse_server_timing(header) == {"decode": 1.2, "cache": 0.1, "encode": 30.5, "transfer": 2.0,
                                           "generate": 120.4}


def test_server_timing_is_read_like_a_browser_reads_it() -> None:
    header = 'miss, db;desc="a, b; c";dur=53, app;DUR="47.2", bad;dur=abc, inf;dur=inf, ;dur=1, x y;dur=2'
    assert parse_server_timing(header) == {"db": 53.0, "app": 47.2}
    assert parse_server_timing(None) == {}
    assert parse_server_timing("") == {}


def test_body_timings_drop_the_ms_suffix_and_non_numbers() -> None:
    body = {"timings": {"encode_ms": 3, "decode": 1.5, "note": "x", "flag": True, "nan_ms": float("nan")}}
    assert timings_from_body(body) == {"encode": 3.0, "decode": 1.5}
    assert timings_from_body({"timings": [1, 2]}) == {}
    assert timings_from_body([]) == {}


def test_chat_response_usage_and_timings() -> None:
    body = json.dumps({"choices": [{"message": {"content": "a cat"}}],
                       "usage": {"prompt_tokens": 70, "completion_tokens": 4},
                       "timings": {"generate_ms": 9.0}}).encode()
    summary = parse_chat_response(body, {"encode": 5.0, "generate": 1.0}, 200)
    assert (summary.output_tokens, summary.output_tokens_source, summary.prompt_tokens) == (4, "usage", 70)
    assert summary.server_timings_ms == {"encode": 5.0, "generate": 9.0}  # the body's value wins
    no_usage = parse_chat_response(b'{"choices": [{"message": {"content": "x"}}]}', {}, 200)
    assert no_usage.output_tokens is None and no_usage.output_tokens_source is None


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"choices": []}', b'{"choices": [{"text": "x"}]}'])
def test_chat_response_without_a_message_is_invalid(body: bytes) -> None:
    with pytest.raises(InvalidResponse) as caught:
        parse_chat_response(body, {}, 200)
    assert caught.value.status_code == 200


def test_captions_response_needs_one_caption_per_image() -> None:
    body = json.dumps({"captions": ["a", "b"], "timings": {"encode_ms": 2.0}}).encode()
    assert parse_captions_response(body, {}, 200, images=2).server_timings_ms == {"encode": 2.0}
    with pytest.raises(InvalidResponse, match="captions"):
        parse_captions_response(body, {}, 200, images=3)


def _feed(parser: ChatStreamParser, events: list[str], start_s: float = 0.0) -> float:
    """Feeds SSE events one per 'second' of fake clock; returns the last clock reading."""
    now = start_s
    for event in events:
        now += 1.0
        for line in event.split("\n"):
            parser.feed_line(line, now)
    return now


def _chunk(**delta: object) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]}) + "\n"


def test_stream_ttft_is_the_first_text_not_the_role_chunk() -> None:
    parser = ChatStreamParser({"encode": 3.0}, 200)
    usage = "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 9}}) + "\n"
    end = _feed(parser, [_chunk(role="assistant"), ": keep-alive comment\n", _chunk(content=""),
                         _chunk(content="a"), _chunk(content=" cat"), _chunk(content="!"), usage, "data: [DONE]\n"])
    summary = parser.finish(end)
    assert summary.first_token_s == 4.0  # the fourth event is the first with text
    assert (summary.output_tokens, summary.output_tokens_source, summary.prompt_tokens) == (3, "usage", 9)
    assert summary.server_timings_ms == {"encode": 3.0}


def test_stream_without_usage_counts_text_chunks_and_reads_multiline_data() -> None:
    parser = ChatStreamParser({}, 200)
    multiline = 'data: {"choices": [{"delta":\ndata:  {"content": "b"}}]}\n'
    end = _feed(parser, [_chunk(content="a"), multiline, _chunk(reasoning_content="hm"), "data: [DONE]"])
    summary = parser.finish(end)  # the last event had no blank line after it
    assert (summary.output_tokens, summary.output_tokens_source) == (3, "chunks")


def test_stream_that_ends_early_or_reports_an_error_fails() -> None:
    truncated = ChatStreamParser({}, 200)
    end = _feed(truncated, [_chunk(content="a")])
    with pytest.raises(InvalidResponse, match=r"\[DONE\]"):
        truncated.finish(end)
    failing = ChatStreamParser({}, 200)
    with pytest.raises(StreamError, match="out of memory"):
        _feed(failing, [_chunk(content="a"), 'data: {"error": {"message": "out of memory"}}\n'])
    garbage = ChatStreamParser({}, 200)
    with pytest.raises(InvalidResponse, match="stream chunk"):
        _feed(garbage, ["data: {oops\n"])


def test_failures_are_classified_into_outcomes() -> None:
    request = httpx.Request("POST", "http://x")
    assert classify_failure(asyncio.TimeoutError()) == ("timeout", "RequestTimeout")
    assert classify_failure(httpx.ReadTimeout("slow", request=request)) == ("timeout", "ReadTimeout")
    assert classify_failure(httpx.ConnectError("refused", request=request)) == ("error", "ConnectError")
    assert classify_failure(HTTPStatusError(503, "busy")) == ("error", "HTTPStatus")
    assert classify_failure(InvalidResponse("body", "bad")) == ("error", "InvalidResponse")
    assert classify_failure(StreamError("boom")) == ("error", "StreamError")
    assert classify_failure(KeyError("x")) == ("error", "KeyError")
