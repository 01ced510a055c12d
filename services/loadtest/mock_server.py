"""A mock OpenAI-compatible server: chat completions (JSON and SSE), ``/v1/captions``,
``/v1/models``, with scripted latency and scripted failures.

Two uses: the load tester's own tests (in-process through ``httpx.ASGITransport``, or
on a loopback port), and measuring the client's ceiling — run the load test against
this server with zero delays and the result is how fast the client can go on this
machine, which bounds what it can claim about a real server (aiperf ships a mock
server for the same reason).

Failures are scripted by arrival number (1-based, counted over all POSTs) so a test
knows exactly how many of each it caused: every ``hang_every``-th request stalls for
``hang_s`` (a timeout for the client), every ``fail_every``-th answers 500, every
``reject_every``-th 429, every ``malformed_every``-th a 200 with a broken body; the
first rule that matches wins, in that order. ``answered`` logs what each arrival got.

Run it: ``python -m services.loadtest.mock_server --port 8100 --token-interval-s 0.01``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

__all__ = ["MockServerConfig", "create_app"]


@dataclass
class MockServerConfig:
    model: str = "mock-model"
    tokens: int = 8  # output tokens per answer (at most max_tokens)
    first_token_delay_s: float = 0.0
    token_interval_s: float = 0.0
    hang_every: int = 0
    hang_s: float = 30.0
    fail_every: int = 0
    reject_every: int = 0
    malformed_every: int = 0
    server_timing: bool = True
    # How many arrivals got each behaviour: "ok", "hang", "500", "429", "malformed".
    answered: Counter[str] = field(default_factory=Counter)

    def behaviour(self, arrival: int) -> str:
        for name, every in (("hang", self.hang_every), ("500", self.fail_every),
                            ("429", self.reject_every), ("malformed", self.malformed_every)):
            if every and arrival % every == 0:
                return name
        return "ok"


def _count_images(messages: Any) -> int:
    return sum(1 for message in messages if isinstance(message.get("content"), list)
               for part in message["content"] if part.get("type") == "image_url")


def create_app(config: MockServerConfig | None = None) -> FastAPI:
    config = config or MockServerConfig()
    app = FastAPI(title="step37-serve loadtest mock server")
    app.state.config = config

    async def scripted() -> Response | None:
        """Applies the failure script; None means: answer normally."""
        behaviour = config.behaviour(sum(config.answered.values()) + 1)
        config.answered[behaviour] += 1
        if behaviour == "hang":
            await asyncio.sleep(config.hang_s)
        elif behaviour in ("500", "429"):
            return JSONResponse({"error": {"message": f"scripted {behaviour}", "type": "mock"}},
                                status_code=int(behaviour))
        elif behaviour == "malformed":
            return Response(b'{"choices": ', media_type="application/json")
        return None

    def timing_header(images: int, generate_ms: float) -> dict[str, str]:
        if not config.server_timing:
            return {}
        return {"server-timing": f"decode;dur={0.5 * images:.3f}, cache;dur=0.1, encode;dur={2.0 * images:.3f}, "
                                 f"transfer;dur=0.2, generate;dur={generate_ms:.3f}"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        if (failure := await scripted()) is not None:
            return failure
        images = _count_images(body.get("messages", []))
        tokens = min(config.tokens, int(body.get("max_tokens") or config.tokens))
        started = time.perf_counter()
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_chunks(config, tokens, images, include_usage), media_type="text/event-stream",
                                     headers=timing_header(images, 0.0))
        await asyncio.sleep(config.first_token_delay_s + config.token_interval_s * max(0, tokens - 1))
        generate_ms = (time.perf_counter() - started) * 1000
        return JSONResponse({
            "id": "chatcmpl-mock", "object": "chat.completion", "model": config.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(["tok"] * tokens)},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10 + images, "completion_tokens": tokens, "total_tokens": 10 + images + tokens},
            "timings": {"generate_ms": generate_ms},
        }, headers=timing_header(images, generate_ms))

    @app.post("/v1/captions")
    async def captions(request: Request) -> Response:
        if request.headers.get("content-type", "").startswith("multipart/"):
            images = len((await request.form()).getlist("file"))
        else:
            images = len((await request.json()).get("images", []))
        if (failure := await scripted()) is not None:
            return failure
        await asyncio.sleep(config.first_token_delay_s)
        return JSONResponse({"captions": ["a mock caption"] * images,
                             "timings": {"decode_ms": 0.5 * images, "encode_ms": 2.0 * images, "generate_ms": 1.0}},
                            headers=timing_header(images, 1.0))

    return app


async def _chunks(config: MockServerConfig, tokens: int, images: int, include_usage: bool) -> AsyncIterator[bytes]:
    def event(payload: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()

    base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": config.model}
    # A role-only chunk first, as vLLM and OpenAI send: not a token, must not count for TTFT.
    yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
    await asyncio.sleep(config.first_token_delay_s)
    for position in range(tokens):
        if position:
            await asyncio.sleep(config.token_interval_s)
        yield event({**base, "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]})
    yield event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    if include_usage:
        yield event({**base, "choices": [], "usage": {"prompt_tokens": 10 + images, "completion_tokens": tokens,
                                                       "total_tokens": 10 + images + tokens}})
    yield b"data: [DONE]\n\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.loadtest.mock_server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    for name, default in vars(MockServerConfig()).items():
        if isinstance(default, (int, float, str)) and not isinstance(default, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    settings = {name: getattr(args, name) for name in vars(MockServerConfig()) if hasattr(args, name)}
    import uvicorn

    uvicorn.run(create_app(MockServerConfig(**settings)), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
