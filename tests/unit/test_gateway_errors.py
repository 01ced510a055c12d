"""Every way a gateway request can fail: status, OpenAI error shape, the field named."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from gateway_fakes import (
    FakeEncoder,
    FakeLM,
    chat_body,
    data_url,
    harness,
    png,
    png_bomb,
    sse_payloads,
)


def run(coro):
    return asyncio.run(coro)


def assert_openai_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


async def post_chat(h, body: dict, **kwargs) -> httpx.Response:
    return await h.client.post("/v1/chat/completions", json=body, **kwargs)


# ---- downstream failures ------------------------------------------------------------

def test_encoder_5xx_is_retried_on_the_other_endpoint():
    async def scenario():
        for failure in (500, 503, httpx.ConnectError, httpx.RemoteProtocolError):
            encoder = FakeEncoder(behaviours={"http://encoder-a": failure})
            h = harness(encoder)
            h.state.encoder_pool.endpoints[1].outstanding = 1  # make encoder-a the first choice
            response = await post_chat(h, chat_body(png()))
            assert response.status_code == 200, (failure, response.text)
            assert [host for host, _ in encoder.calls] == ["http://encoder-a", "http://encoder-b"], failure
            assert 'service="encoder"' in (await h.client.get("/metrics")).text

    run(scenario())


def test_a_lost_connection_to_the_only_encoder_is_retried_on_a_new_one():
    """A server may close a kept-alive connection just as it is reused; with no other
    endpoint the encode goes again to the same one. Other failures are not repeated there."""
    async def scenario():
        for failure in (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
            encoder = FakeEncoder(once={"http://encoder-a": failure})
            h = harness(encoder, encoder_urls=["http://encoder-a"])
            response = await post_chat(h, chat_body(png()))
            assert response.status_code == 200, (failure, response.text)
            assert [host for host, _ in encoder.calls] == ["http://encoder-a", "http://encoder-a"], failure
        encoder = FakeEncoder(once={"http://encoder-a": 503})
        h = harness(encoder, encoder_urls=["http://encoder-a"])
        assert_openai_error(await post_chat(h, chat_body(png())), 503, "service_unavailable")
        assert len(encoder.calls) == 1
        encoder = FakeEncoder(behaviours={"http://encoder-a": httpx.RemoteProtocolError})
        h = harness(encoder, encoder_urls=["http://encoder-a"])
        error = assert_openai_error(await post_chat(h, chat_body(png())), 502, "upstream_error")
        assert "connection to the encoder was lost" in error["message"] and len(encoder.calls) == 2

    run(scenario())


def test_encoder_failure_on_every_endpoint_is_a_5xx():
    async def scenario():
        down = {"http://encoder-a": httpx.ConnectError, "http://encoder-b": httpx.ConnectError}
        h = harness(FakeEncoder(behaviours=down))
        error = assert_openai_error(await post_chat(h, chat_body(png())), 503, "service_unavailable")
        assert "could not connect to the encoder" in error["message"]
        busy = {"http://encoder-a": 503, "http://encoder-b": 503}
        h = harness(FakeEncoder(behaviours=busy))
        response = await post_chat(h, chat_body(png()))
        assert_openai_error(response, 503, "service_unavailable")
        assert response.headers["retry-after"] == "1"

    run(scenario())


def test_encoder_timeout_is_504_and_not_retried():
    async def scenario():
        encoder = FakeEncoder(behaviours={"http://encoder-a": "hang", "http://encoder-b": "hang"})
        h = harness(encoder, encoder_timeout_s=0.2)
        h.state.encoder_pool.endpoints[1].outstanding = 1
        assert_openai_error(await post_chat(h, chat_body(png())), 504, "upstream_timeout")
        assert encoder.calls == [("http://encoder-a", 0)]  # not retried
        assert h.state.encoder_pool.endpoints[0].outstanding == 0

    run(scenario())


def test_encoder_rejecting_the_image_is_the_clients_error():
    async def scenario():
        h = harness(FakeEncoder(behaviours={"http://encoder-a": 400, "http://encoder-b": 400}))
        error = assert_openai_error(await post_chat(h, chat_body(png())), 400, "invalid_request")
        assert "encoder refused" in error["message"]
        assert len(h.encoder.calls) == 1  # a 4xx is not retried

    run(scenario())


def test_lm_worker_down_is_503_before_and_after_it_is_ejected():
    async def scenario():
        h = harness(lm=FakeLM(behaviours={"http://lm-a": httpx.ConnectError}), eject_after_failures=2)
        for _ in range(2):
            error = assert_openai_error(await post_chat(h, chat_body(png())), 503, "service_unavailable")
            assert "could not connect to the LM worker" in error["message"]
        error = assert_openai_error(await post_chat(h, chat_body(png())), 503, "service_unavailable")
        assert "no ready lm endpoint" in error["message"]
        # a stream fails the same way, before any byte is sent
        assert_openai_error(await post_chat(h, chat_body(png(), stream=True)), 503, "service_unavailable")

    run(scenario())


def test_lm_worker_busy_and_timeout():
    async def scenario():
        h = harness(lm=FakeLM(behaviours={"http://lm-a": 503}))
        assert_openai_error(await post_chat(h, chat_body(png())), 503, "service_unavailable")
        h = harness(lm=FakeLM(behaviours={"http://lm-a": httpx.ReadTimeout}))
        assert_openai_error(await post_chat(h, chat_body(png())), 504, "upstream_timeout")
        h = harness(lm=FakeLM(generate_delay_s=30), lm_timeout_s=0.3)
        error = assert_openai_error(await post_chat(h, chat_body(png())), 504, "upstream_timeout")
        assert "LM worker did not answer" in error["message"]
        h = harness(lm=FakeLM(generate_delay_s=30), request_timeout_s=0.3)
        error = assert_openai_error(await post_chat(h, chat_body(png())), 504, "upstream_timeout")
        assert "the request took longer" in error["message"]
        assert h.lm.cancelled == 1 and h.state.lm_pool.endpoints[0].outstanding == 0

    run(scenario())


def test_lm_worker_abort_is_503():
    async def scenario():
        h = harness(lm=FakeLM(finish_reason="abort"))
        assert_openai_error(await post_chat(h, chat_body(png())), 503, "service_unavailable")

    run(scenario())


def test_failure_mid_stream_is_an_error_event_then_done():
    async def scenario():
        h = harness(lm=FakeLM(fail_after_tokens=2))
        response = await post_chat(h, chat_body(png(), stream=True))
        assert response.status_code == 200
        payloads = sse_payloads(response.text)
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "upstream_error" and "device lost" in error["message"]
        assert len(h.lm.requests) == 1  # never retried once tokens were streamed

    run(scenario())


# ---- bad requests -------------------------------------------------------------------

def test_bad_images():
    async def scenario():
        h = harness(max_pixels=10_000)
        cases = [
            ("data:image/png;base64,@@@not-base64@@@", 400, "invalid_image"),
            ("data:text/plain;base64," + base64.b64encode(png()).decode(), 400, "invalid_image"),
            ("data:image/png," + "abc", 400, "invalid_image"),  # not base64-encoded
            (data_url(b"GIF89a-but-not-really"), 400, "invalid_image"),
            (data_url(b"%PDF-1.4 hello"), 400, "invalid_image"),
            (data_url(png_bomb()), 422, "limit_exceeded"),  # refused from the header alone
            (data_url(png(200, 100)), 422, "limit_exceeded"),  # 20 000 px > 10 000
            ("ftp://example.com/a.png", 400, "invalid_image"),
        ]
        for url, status, code in cases:
            body = {"model": "step37-tiny", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]}
            assert_openai_error(await post_chat(h, body), status, code, "messages[0].content[1].image_url.url")
        assert h.encoder.calls == [] and h.lm.requests == []

    run(scenario())


def test_image_url_hosts_are_refused_unless_allow_listed():
    async def scenario():
        h = harness()
        body = {"model": "step37-tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]}
        error = assert_openai_error(await post_chat(h, body), 400, "image_url_not_allowed")
        assert "allow-list is empty" in error["message"]

        fetched: list[str] = []

        def images_host(request: httpx.Request) -> httpx.Response:
            fetched.append(str(request.url))
            if request.url.path == "/moved":
                return httpx.Response(302, headers={"location": "http://169.254.169.254/"})
            return httpx.Response(200, content=png(), headers={"content-type": "image/png"})

        h = harness(fetch=images_host, allowed_url_hosts=("images.example.com",))
        body["messages"][0]["content"][0]["image_url"]["url"] = "https://images.example.com/cat.png"
        assert (await post_chat(h, body)).status_code == 200
        body["messages"][0]["content"][0]["image_url"]["url"] = "https://images.example.com/moved"
        assert_openai_error(await post_chat(h, body), 400, "invalid_image")
        body["messages"][0]["content"][0]["image_url"]["url"] = "https://evil.example.com/cat.png"
        assert_openai_error(await post_chat(h, body), 400, "image_url_not_allowed")
        assert fetched == ["https://images.example.com/cat.png", "https://images.example.com/moved"]

    run(scenario())


def test_oversized_fields_and_limits():
    async def scenario():
        h = harness(max_body_bytes=4096, max_images=2, max_tokens=64, max_prompt_chars=100, max_image_bytes=2000)
        big = png(64, 64, fmt="BMP")  # not even a format we accept; size is what fails first
        assert_openai_error(await post_chat(h, chat_body(big)), 413, "payload_too_large")
        assert_openai_error(await post_chat(h, chat_body(png(), png(), png())), 422, "limit_exceeded", "messages")
        assert_openai_error(await post_chat(h, chat_body(png(), max_tokens=65)), 422, "limit_exceeded", "max_tokens")
        assert_openai_error(await post_chat(h, chat_body(png(), text="x" * 200)), 422, "limit_exceeded")
        noise = png(40, 40).ljust(2100, b"\0")
        assert_openai_error(await post_chat(h, chat_body(noise)), 413, "payload_too_large")
        files = [("file", ("a.png", png(), "image/png"))] * 3
        assert_openai_error(await h.client.post("/v1/captions", files=files), 422, "limit_exceeded")

    run(scenario())


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"model": "step37-tiny", "messages": []}, 400, "invalid_request", "messages"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", "model"),
    ({"model": "step37-tiny", "n": 2, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request", "n"),
    ({"model": "step37-tiny", "temperature": 3, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "invalid_request", "temperature"),
    ({"model": "step37-tiny", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400,
     "invalid_request", "messages[0].content[0].type"),
    ({"model": "step37-tiny", "messages": [{"role": "user", "content": "look: <image>"}]}, 400,
     "invalid_request", "messages[0].content"),
    ({"model": "step37-tiny", "messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "invalid_request",
     "messages[0].content[0]"),
    ({"model": "step37-tiny", "stop": ["a", "b", "c", "d", "e"], "messages": [{"role": "user", "content": "x"}]},
     400, "invalid_request", "stop"),
    ({"model": "step37-tiny", "cache_salt": "", "messages": [{"role": "user", "content": "x"}]},
     400, "invalid_request", "cache_salt"),
    ({"model": "step37-tiny", "cache_salt": "s" * 257, "messages": [{"role": "user", "content": "x"}]},
     400, "invalid_request", "cache_salt"),
])
def test_invalid_chat_requests(body, status, code, param):
    async def scenario():
        h = harness()
        assert_openai_error(await post_chat(h, body), status, code, param)

    run(scenario())


def test_malformed_json_and_bad_captions_requests():
    async def scenario():
        h = harness()
        response = await h.client.post("/v1/chat/completions", content=b"{not json",
                                       headers={"content-type": "application/json"})
        assert_openai_error(response, 400, "invalid_request")
        assert_openai_error(await h.client.post("/v1/captions", json={}), 400, "invalid_request")
        both = {"image": "AAAA", "images": ["AAAA"]}
        assert_openai_error(await h.client.post("/v1/captions", json=both), 400, "invalid_request")
        assert_openai_error(await h.client.post("/v1/captions", json={"image": "%%%"}), 400, "invalid_image", "image")
        response = await h.client.post("/v1/captions", json={"image": "AAAA", "prompt": "<image> and <image>"})
        assert_openai_error(response, 400, "invalid_request", "prompt")
        response = await h.client.post("/v1/captions", data={"prompt": "no files"},
                                       files={"x": ("", b"", "text/plain")})
        assert_openai_error(response, 400, "invalid_request", "images")
        assert (await h.client.get("/v1/nope")).status_code == 404

    run(scenario())


# ---- auth and admission -------------------------------------------------------------

def test_api_key():
    async def scenario():
        h = harness(api_key="sk-right")
        body = chat_body(png())
        error = assert_openai_error(await post_chat(h, body), 401, "invalid_api_key")
        assert "missing" in error["message"]
        assert_openai_error(await post_chat(h, body, headers={"authorization": "Bearer sk-wrong"}), 401,
                            "invalid_api_key")
        assert_openai_error(await post_chat(h, body, headers={"authorization": "Basic sk-right"}), 401,
                            "invalid_api_key")
        assert (await post_chat(h, body, headers={"authorization": "Bearer sk-right"})).status_code == 200
        assert (await h.client.get("/v1/models")).status_code == 401
        assert (await h.client.get("/health")).status_code == 200  # probes stay open
        assert h.lm.requests and len(h.lm.requests) == 1

    run(scenario())


def test_requests_beyond_the_concurrency_limit_get_503_with_retry_after():
    async def scenario():
        h = harness(lm=FakeLM(generate_delay_s=0.5), max_concurrent_requests=1)
        first = asyncio.ensure_future(post_chat(h, chat_body(png())))
        while not h.lm.requests:
            await asyncio.sleep(0.01)
        response = await post_chat(h, chat_body(png()))
        error = assert_openai_error(response, 503, "service_unavailable")
        assert "overloaded" in error["message"] and response.headers["retry-after"] == "1"
        assert (await first).status_code == 200

    run(scenario())


def test_an_unexpected_error_is_a_generic_500_and_logged(caplog):
    async def scenario():
        h = harness()

        async def broken(*args, **kwargs):
            raise RuntimeError("secret internal detail")

        h.state.chat.complete = broken
        transport = httpx.ASGITransport(h.app, raise_app_exceptions=False)  # Starlette re-raises after the 500
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            response = await client.post("/v1/chat/completions", json=chat_body(png()))
        error = assert_openai_error(response, 500, "internal_error")
        assert "secret" not in error["message"]

    run(scenario())
    assert "secret internal detail" in caplog.text  # the traceback is in the log, not in the answer


def test_garbage_from_a_downstream_is_502():
    async def scenario():
        h = harness(lm=FakeLM(behaviours={"http://lm-a": b"\x93not a message"}))
        error = assert_openai_error(await post_chat(h, chat_body(png())), 502, "upstream_error")
        assert "invalid GenerateResponse" in error["message"]
        h = harness(FakeEncoder(behaviours={"http://encoder-a": b"\x00", "http://encoder-b": b"\x00"}))
        error = assert_openai_error(await post_chat(h, chat_body(png())), 502, "upstream_error")
        assert "invalid EncodeResponse" in error["message"] and len(h.encoder.calls) == 2  # retried

    run(scenario())
