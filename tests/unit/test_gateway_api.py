"""The gateway's public API in-process, against fake encoder and LM worker transports."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import openai
from gateway_fakes import (
    IM_START,
    FakeLM,
    asgi_request,
    caption_of,
    chat_body,
    harness,
    png,
    sse_payloads,
)


def run(coro):
    return asyncio.run(coro)


def test_chat_completion_builds_the_prompt_and_reports_usage_and_timings():
    async def scenario():
        h = harness()
        first, second = png(colour=(255, 0, 0)), png(colour=(0, 0, 255))
        body = chat_body(first, second, text="compare", max_tokens=32, temperature=0.5, top_p=0.9, seed=7,
                         stop=["."])
        response = await h.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        (generate,) = h.lm.requests
        assert generate.prompt == "compare <image> <image>"
        assert generate.sampling.max_new_tokens == 32 and generate.sampling.seed == 7
        assert generate.sampling.temperature == 0.5 and generate.sampling.top_p == 0.9
        assert generate.sampling.stop == ["."]
        (item,) = generate.images
        assert item.insert_start_token == IM_START
        assert list(item.image_features.shape) == [2, 4, 8]  # [N, L, C], in prompt order
        assert item.image_features.dtype.is_floating_point
        assert item.rope_cu_seqlens.tolist() == [0, 16, 32] and item.rope_max_seq_len == 16
        assert result["object"] == "chat.completion" and result["model"] == "step37-tiny"
        choice = result["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": caption_of(generate)}
        assert choice["finish_reason"] == "stop"
        usage = result["usage"]
        assert usage["completion_tokens"] == len(caption_of(generate).split(" "))
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        for stage in ("decode", "cache", "encode", "transfer", "generate", "total", "encoder.forward", "lm.prefill"):
            assert stage in result["timings"], stage
        assert "encode;dur=" in response.headers["server-timing"]
        assert response.headers["x-request-id"]
        assert h.encoder.calls == [("http://encoder-a", 2)] or h.encoder.calls == [("http://encoder-b", 2)]

    run(scenario())


def test_greedy_by_default_and_max_tokens_has_a_default():
    async def scenario():
        h = harness(max_tokens=400, default_max_tokens=40)
        body = {"model": "step37-tiny", "messages": [{"role": "user", "content": "hello there"}]}
        response = await h.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        (generate,) = h.lm.requests
        assert generate.sampling.temperature == 0.0 and generate.sampling.max_new_tokens == 40
        assert generate.images == [] and generate.prompt == "hello there"
        assert h.encoder.calls == []

    run(scenario())


def test_max_completion_tokens_wins_over_max_tokens():
    async def scenario():
        h = harness()
        response = await h.client.post("/v1/chat/completions",
                                       json=chat_body(png(), max_tokens=50, max_completion_tokens=9))
        assert response.status_code == 200, response.text
        assert h.lm.requests[0].sampling.max_new_tokens == 9

    run(scenario())


def test_streaming_follows_openai_chunks_and_ends_with_done():
    async def scenario():
        h = harness()
        body = chat_body(png(), stream=True, stream_options={"include_usage": True})
        response = await h.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "encode;dur=" in response.headers["server-timing"]
        payloads = sse_payloads(response.text)
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all("usage" in c for c in chunks)  # include_usage: null until the last chunk
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == caption_of(h.lm.requests[0])
        finish = chunks[-2]
        assert finish["choices"][0]["finish_reason"] == "stop" and "generate" in finish["timings"]
        usage_chunk = chunks[-1]
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"]["completion_tokens"] == len(text.split(" "))

    run(scenario())


def test_streaming_without_include_usage_has_no_usage_key():
    async def scenario():
        h = harness()
        response = await h.client.post("/v1/chat/completions", json=chat_body(png(), stream=True))
        chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
        assert chunks and all("usage" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    run(scenario())


def test_captions_multipart_one_call_per_image_and_one_encode_for_all():
    async def scenario():
        h = harness()
        images = [png(colour=(i * 40, 10, 10)) for i in range(3)]
        files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        response = await h.client.post("/v1/captions", files=files, data={"max_tokens": "12"})
        assert response.status_code == 200, response.text
        result = response.json()
        assert len(result["captions"]) == 3 and len(set(result["captions"])) == 3
        assert [r.prompt for r in h.lm.requests] == ["<image>"] * 3
        assert all(r.images[0].num_images == 1 and r.sampling.max_new_tokens == 12 for r in h.lm.requests)
        assert h.encoder.images_encoded == 3 and len(h.encoder.calls) == 1
        by_id = {r.request_id: caption_of(r) for r in h.lm.requests}
        assert result["captions"] == [by_id[k] for k in sorted(by_id)]  # request order kept
        assert result["usage"]["completion_tokens"] > 0 and "generate" in result["timings"]

    run(scenario())


def test_captions_json_single_and_many_with_a_prompt():
    async def scenario():
        h = harness()
        one = base64.b64encode(png()).decode()
        response = await h.client.post("/v1/captions", json={"image": one})
        assert response.status_code == 200, response.text
        assert len(response.json()["captions"]) == 1
        many = [base64.b64encode(png(colour=(0, i * 50, 0))).decode() for i in range(2)]
        response = await h.client.post("/v1/captions", json={"images": many, "prompt": "describe the image <image>"})
        assert response.status_code == 200, response.text
        assert len(response.json()["captions"]) == 2
        assert h.lm.requests[-1].prompt == "describe the image <image>"

    run(scenario())


def test_a_cache_salt_keeps_cached_features_to_its_own_requests():
    async def scenario():
        h = harness()
        await h.state.probe()  # the workers' /ready say they honour cache_salt
        data = base64.b64encode(png(colour=(9, 99, 199))).decode()

        async def caption(**extra):
            response = await h.client.post("/v1/captions", json={"image": data, **extra})
            assert response.status_code == 200, response.text
            return h.lm.requests[-1]

        assert (await caption()).cache_salt is None
        assert h.encoder.images_encoded == 1
        assert (await caption(cache_salt="tenant-a")).cache_salt == "tenant-a"  # not the unsalted features
        assert h.encoder.images_encoded == 2
        await caption(cache_salt="tenant-a")
        await caption()
        assert h.encoder.images_encoded == 2  # each found its own
        chat = chat_body(png(colour=(9, 99, 199)), cache_salt="tenant-b")
        response = await h.client.post("/v1/chat/completions", json=chat)
        assert response.status_code == 200, response.text
        assert h.lm.requests[-1].cache_salt == "tenant-b" and h.encoder.images_encoded == 3
        form = await h.client.post("/v1/captions", files={"file": ("a.png", png(colour=(9, 99, 199)), "image/png")},
                                   data={"cache_salt": "tenant-b"})
        assert form.status_code == 200, form.text
        assert h.lm.requests[-1].cache_salt == "tenant-b" and h.encoder.images_encoded == 3

    run(scenario())


def test_a_salted_request_is_served_from_the_first_moment_the_gateway_serves():
    async def scenario():
        h = harness()
        async with h.app.router.lifespan_context(h.app):  # its first probe round runs before it serves
            response = await h.client.post("/v1/chat/completions", json=chat_body(png(), cache_salt="tenant-a"))
            assert response.status_code == 200, response.text

    run(scenario())


def test_a_salted_request_is_refused_rather_than_sent_to_a_worker_that_would_ignore_the_salt():
    async def scenario():
        h = harness(lm=FakeLM(honours_cache_salt=False))  # an LM worker from before cache_salt
        await h.state.probe()
        body = chat_body(png(), cache_salt="tenant-a")
        response = await h.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 503, response.text
        assert "cache_salt" in response.json()["error"]["message"] and not h.lm.requests
        del body["cache_salt"]
        assert (await h.client.post("/v1/chat/completions", json=body)).status_code == 200

    run(scenario())


def test_models_health_ready_and_metrics():
    async def scenario():
        h = harness()
        models = (await h.client.get("/v1/models")).json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["step37-tiny"]
        assert (await h.client.get("/v1/models/step37-tiny")).status_code == 200
        assert (await h.client.get("/health")).json() == {"status": "ok"}
        ready = await h.client.get("/ready")
        assert ready.status_code == 200 and ready.json()["encoder"]["ready"] == 2
        h.lm.ready["http://lm-a"] = False
        assert (await h.client.get("/ready")).status_code == 503
        await h.client.post("/v1/captions", files={"file": ("a.png", png(), "image/png")})
        text = (await h.client.get("/metrics")).text
        assert 'step37_gateway_requests_total{route="/v1/captions",status="200"} 1.0' in text
        assert "step37_gateway_cache_misses_total 1.0" in text
        assert 'step37_gateway_stage_duration_seconds_count{stage="encode"} 1.0' in text
        assert "step37_gateway_in_flight_requests" in text

    run(scenario())


def test_official_openai_client_against_the_app():
    async def scenario():
        h = harness(api_key="sk-test")
        http_client = httpx.AsyncClient(transport=httpx.ASGITransport(h.app))
        client = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="sk-test", http_client=http_client,
                                    max_retries=0)
        messages = chat_body(png())["messages"]
        completion = await client.chat.completions.create(model="step37-tiny", messages=messages, max_tokens=16)
        expected = caption_of(h.lm.requests[0])
        assert completion.choices[0].message.content == expected
        assert completion.usage.completion_tokens == len(expected.split(" "))
        stream = await client.chat.completions.create(model="step37-tiny", messages=messages, max_tokens=16,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
        assert h.encoder.images_encoded == 1  # the second request's image came from the cache
        models = await client.models.list()
        assert [m.id for m in models.data] == ["step37-tiny"]

    run(scenario())


def test_client_disconnect_closes_the_upstream_stream():
    async def scenario():
        lm = FakeLM(token_delay_s=0.02, stream_closed=asyncio.Event())
        h = harness(lm=lm)
        hang_up = asyncio.Event()
        scope, receive = asgi_request("/v1/chat/completions", chat_body(png(), text="a b c d e f g h", stream=True),
                                      disconnect=hang_up)
        bodies: list[bytes] = []

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                bodies.append(message["body"])
                if len(bodies) == 2:
                    hang_up.set()  # the client reads two events, then goes away

        await asyncio.wait_for(h.app(scope, receive, send), 5)
        await asyncio.wait_for(lm.stream_closed.wait(), 5)
        assert len(bodies) < 6 and b"[DONE]" not in b"".join(bodies)
        assert h.state.lm_pool.endpoints[0].outstanding == 0

    run(scenario())


def test_client_disconnect_cancels_a_non_streaming_generate():
    async def scenario():
        lm = FakeLM(generate_delay_s=30)
        h = harness(lm=lm)
        hang_up = asyncio.Event()
        scope, receive = asgi_request("/v1/chat/completions", chat_body(png()), disconnect=hang_up)
        statuses: list[int] = []

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        app_call = asyncio.ensure_future(h.app(scope, receive, send))
        while not lm.requests:  # the generate reached the worker
            await asyncio.sleep(0.01)
        hang_up.set()
        await asyncio.wait_for(app_call, 5)
        assert lm.cancelled == 1 and statuses == [499]
        assert h.state.lm_pool.endpoints[0].outstanding == 0

    run(scenario())
