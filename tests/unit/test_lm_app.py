"""The LM worker's HTTP API in-process (ASGI transport, no sockets): generate, stream,
health/ready/metrics, and every bad input of issue 4 §5 answered with a 4xx JSON error
naming the problem, after which the worker still serves the next request."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import proto
from lm_worker import cli
from lm_worker.app import create_app
from lm_worker.feature_store import FeaturesNotKept
from lm_worker.serving import LMWorkerService, RequestPreparer
from lm_worker.settings import LMWorkerSettings
from proto import EncodeRequest, GenerateRequest, GenerateResponse, ImageForInsert, SamplingParams
from services.demo.checkpoint import random_checkpoint
from services.gateway.lm_client import LMClient, TokenDelta
from services.gateway.pool import EndpointPool

MAX_BODY_BYTES = 256 * 1024
TOKENS_PER_IMAGE, FEATURE_DIM = 16, 256  # the tiny vision tower's output


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=0)


@pytest.fixture(scope="module")
def service(checkpoint: Path) -> Iterator[LMWorkerService]:
    settings = LMWorkerSettings(model=str(checkpoint), device="cpu", max_batch_size=4,
                                max_body_bytes=MAX_BODY_BYTES)
    service = LMWorkerService.from_settings(settings)
    service.start()
    yield service
    service.stop()


@pytest.fixture
async def client(service: LMWorkerService) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(service)  # the module's service is started and stopped by the fixture
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://lm") as client:
        yield client


def features(images: int = 1, *, seed: int = 0, dim: int = FEATURE_DIM) -> torch.Tensor:
    return torch.randn(images, TOKENS_PER_IMAGE, dim, generator=torch.Generator().manual_seed(seed))


def good_request(service: LMWorkerService, **overrides) -> GenerateRequest:
    fields = dict(prompt="describe <image>",
                  images=[ImageForInsert(service.model.tokenizer.ids.im_start, image_features=features())],
                  sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))
    return GenerateRequest(**{**fields, **overrides})


async def post(client: httpx.AsyncClient, body: GenerateRequest | bytes,
               content_type: str = proto.CONTENT_TYPE) -> httpx.Response:
    content = body if isinstance(body, bytes) else proto.encode(body)
    return await client.post("/v1/generate", content=content, headers={"content-type": content_type})


async def generate(client: httpx.AsyncClient, request: GenerateRequest) -> GenerateResponse:
    response = await post(client, request)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == proto.CONTENT_TYPE
    return proto.decode(response.content, expect=GenerateResponse)


def parse_sse(text: str) -> list[tuple[str, dict]]:
    frames = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        frames.append((lines.get("event", "message"), json.loads(lines["data"])))
    return frames


# ---- happy paths ------------------------------------------------------------------------
@pytest.mark.anyio
async def test_generate_returns_a_deterministic_greedy_response(client, service) -> None:
    request = good_request(service, request_id="req-1")
    first = await generate(client, request)
    assert first.request_id == "req-1" and first.finish_reason == "length"
    assert len(first.token_ids) == 6
    assert first.prompt_tokens == 1 + 1 + TOKENS_PER_IMAGE + 2  # <s> describe <im_start> ... <im_end>
    assert first.text == service.model.tokenizer.decode(first.token_ids)
    for stage in ("preprocess_ms", "queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "tokens_per_s"):
        assert first.timings[stage] >= 0
    second = await generate(client, good_request(service))
    assert second.token_ids == first.token_ids


@pytest.mark.anyio
async def test_raw_input_ids_and_bf16_features_work_like_a_prompt(client, service) -> None:
    tokenizer = service.model.tokenizer
    by_prompt = await generate(client, good_request(service))
    input_ids = tokenizer.build_prompt_ids("describe <image>", [TOKENS_PER_IMAGE])
    by_ids = await generate(client, good_request(service, prompt=None, input_ids=input_ids))
    assert by_ids.token_ids == by_prompt.token_ids
    bf16 = ImageForInsert(tokenizer.ids.im_start, image_features=features().bfloat16())
    assert len((await generate(client, good_request(service, images=[bf16]))).token_ids) == 6


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.mark.anyio
async def test_features_sent_once_with_a_name_can_then_be_named_alone(client, service) -> None:
    ready = (await client.get("/ready")).json()
    assert ready["feature_store_bytes"] == service.settings.feature_store_mb * 2**20 and ready["cache_salt"] is True
    start = service.model.tokenizer.ids.im_start
    named = good_request(service, images=[ImageForInsert(start, image_features=features(seed=7))],
                         feature_refs=["img-7"])
    first = await generate(client, named)
    by_name = good_request(service, images=[ImageForInsert(start)], feature_refs=["img-7"])
    again = await generate(client, by_name)
    assert again.token_ids == first.token_ids
    assert again.cached_tokens > 0  # the prefix cache found it by the kept features' digests
    text = (await client.get("/metrics")).text
    assert metric(text, "lm_worker_feature_refs_total", result="kept") >= 1
    assert metric(text, "lm_worker_feature_refs_total", result="hit") >= 1

    service.features.clear()  # evicted: the caller hears which name to send again
    response = await post(client, by_name)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["field"] == "feature_refs[0]" and error["type"] == "features_not_kept", error
    assert metric((await client.get("/metrics")).text, "lm_worker_feature_refs_total", result="miss") >= 1
    assert (await generate(client, named)).token_ids == first.token_ids  # sent again: served, kept again
    assert len(service.features) == 1

    # A worker that keeps no features says which name it cannot resolve, as one that forgot it.
    storeless = RequestPreparer(service.preparer.validator, service.preparer.wire_limits)
    with pytest.raises(FeaturesNotKept) as info:
        storeless(proto.encode(by_name))
    assert info.value.field == "feature_refs[0]"


@pytest.mark.anyio
async def test_the_gateway_sends_features_whole_once_then_by_name(service) -> None:
    sizes: list[int] = []

    class Recording(httpx.ASGITransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/generate":
                sizes.append(len(request.content))
            return await super().handle_async_request(request)

    async with httpx.AsyncClient(transport=Recording(create_app(service)), base_url="http://lm") as http:
        pool = EndpointPool("lm", ["http://lm"])
        await pool.probe_once(http)
        endpoint = pool.endpoints[0]
        assert endpoint.feature_store_bytes > 0 and endpoint.honours_cache_salt
        sends: list[str] = []
        lm = LMClient(pool, http, on_features=sends.append)
        start = service.model.tokenizer.ids.im_start

        def request() -> GenerateRequest:
            return good_request(service, images=[ImageForInsert(start, image_features=features(seed=11))],
                                feature_refs=["img-11"])

        first = await lm.generate(request())
        second = await lm.generate(request())
        stream = await lm.open_stream(request())
        streamed = [event async for event in stream.events()]
        await stream.aclose()
        service.features.clear()  # the worker forgot them: 400, then sent whole again
        fourth = await lm.generate(request())
        # Features larger than the worker keeps are not named: whole every time, no 400 first.
        endpoint.feature_store_bytes, endpoint.named_features = 1024, type(endpoint.named_features)()
        for _ in range(2):
            await lm.generate(request())
    assert first.token_ids == second.token_ids == fourth.token_ids
    assert [t for event in streamed if isinstance(event, TokenDelta) for t in event.token_ids] == first.token_ids
    whole, by_name = sizes[0], sizes[1]
    assert by_name < whole - TOKENS_PER_IMAGE * FEATURE_DIM * 4 + 512  # the float32 features stayed behind
    assert sizes == [whole, by_name, by_name, by_name, whole, whole, whole]
    assert sends == ["whole", "by_name", "by_name", "resent", "whole", "whole"]


@pytest.mark.anyio
async def test_stream_sends_token_chunks_then_a_final_event(client, service) -> None:
    whole = await generate(client, good_request(service))
    response = await post(client, good_request(service, stream=True, request_id="s-1"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(response.text)
    assert all(kind == "message" for kind, _ in frames)
    chunks, final = [data for _, data in frames[:-1]], frames[-1][1]
    assert [t for chunk in chunks for t in chunk["token_ids"]] == whole.token_ids
    assert "".join(chunk["text"] for chunk in chunks) == whole.text
    assert final["request_id"] == "s-1" and final["finish_reason"] == "length"
    assert final["prompt_tokens"] == whole.prompt_tokens and final["completion_tokens"] == 6
    assert final["timings"]["ttft_ms"] > 0


@pytest.mark.anyio
async def test_health_ready_and_metrics(client, service) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["free_slots"] == 4
    await generate(client, good_request(service))
    await post(client, b"not msgpack")
    text = (await client.get("/metrics")).text
    for name in ("lm_worker_running_sequences 0.0", "lm_worker_waiting_sequences 0.0",
                 "lm_worker_kv_cache_free_slots 4.0", "lm_worker_decode_batch_size_bucket",
                 "lm_worker_generated_tokens_total", "lm_worker_generation_tokens_per_second",
                 'lm_worker_request_stage_seconds_bucket{le="0.001",stage="ttft"}',
                 'lm_worker_requests_total{finish_reason="length"}',
                 'lm_worker_errors_total{kind="malformed_message"}'):
        assert name in text, name


# ---- bad input: 4xx naming the problem, and the worker keeps serving --------------------
BadBody = Callable[[LMWorkerService], bytes]


def encoded(**overrides) -> BadBody:
    return lambda service: proto.encode(good_request(service, **overrides))


def with_sampling(**fields) -> BadBody:
    # SamplingParams validates on decode only, so a client can send anything.
    return encoded(sampling=SamplingParams(**{"max_new_tokens": 6, **fields}))


def with_features(make: Callable[[], torch.Tensor]) -> BadBody:
    return lambda service: proto.encode(good_request(service, images=[
        ImageForInsert(service.model.tokenizer.ids.im_start, image_features=make())]))


def with_input_ids(build: Callable[[object], list[int]], images: int = 1) -> BadBody:
    def body(service: LMWorkerService) -> bytes:
        item = ImageForInsert(service.model.tokenizer.ids.im_start, image_features=features(images))
        return proto.encode(good_request(service, prompt=None, input_ids=build(service.model.tokenizer.ids),
                                         images=[item]))
    return body


def raw_message(**fields) -> BadBody:
    return lambda service: msgpack.packb({"v": 1, "type": "GenerateRequest", "prompt": "describe", **fields})


def inf_features() -> torch.Tensor:
    block = features()
    block[0, 3, 7] = float("inf")
    return block


def nan_features() -> torch.Tensor:
    block = features()
    block[0, 0, 0] = float("nan")
    return block


BLOCK = lambda ids: [ids.im_start, *[ids.im_patch] * TOKENS_PER_IMAGE, ids.im_end]  # noqa: E731

BAD_INPUTS: dict[str, tuple[BadBody, int, str, str, str]] = {
    # name: (body, status, error type, field contains, message contains)
    "features_missing": (
        lambda s: proto.encode(good_request(s, images=[ImageForInsert(s.model.tokenizer.ids.im_start)])),
        400, "invalid_value", "images[0].image_features", "required"),
    "pixels_instead_of_features": (
        lambda s: proto.encode(good_request(s, images=[ImageForInsert(
            s.model.tokenizer.ids.im_start, images=torch.zeros(1, 3, 28, 28))])),
        400, "invalid_value", "images[0].image_features", "run the vision tower first"),
    "wrong_feature_dim": (with_features(lambda: features(dim=128)), 400, "image_insert_error",
                          "images[0].image_features", "feature dim 128 != the projector's input dim 256"),
    "nan_features": (with_features(nan_features), 400, "bad_tensor", "images[0].image_features", "NaN or Inf"),
    "inf_features": (with_features(inf_features), 400, "bad_tensor", "images[0].image_features", "NaN or Inf"),
    "more_images_than_placeholders": (
        lambda s: proto.encode(good_request(s, images=[
            ImageForInsert(s.model.tokenizer.ids.im_start, image_features=features(2))])),
        400, "token_layout_error", "prompt", "1 <image> placeholder(s) but 2 image(s)"),
    "fewer_images_than_placeholders": (encoded(prompt="describe <image> and <image>"), 400,
                                       "token_layout_error", "prompt", "2 <image> placeholder(s) but 1 image(s)"),
    "more_start_tokens_than_images": (with_input_ids(lambda ids: [ids.bos, *BLOCK(ids), *BLOCK(ids)]),
                                      400, "token_layout_error", "input_ids", "2 <im_start> but 1 image(s)"),
    "fewer_start_tokens_than_images": (with_input_ids(lambda ids: [ids.bos, *BLOCK(ids)], images=2),
                                       400, "token_layout_error", "input_ids", "1 <im_start> but 2 image(s)"),
    "span_past_the_end": (with_input_ids(lambda ids: [ids.bos, ids.im_start, *[ids.im_patch] * 5]),
                          400, "token_layout_error", "input_ids[7]", "expected 16 <im_patch>"),
    "max_new_tokens_past_context": (with_sampling(max_new_tokens=1000), 400, "context_length_exceeded",
                                    "sampling.max_new_tokens", "exceed the context length 512"),
    "prompt_past_context": (encoded(prompt="describe " + "a " * 600 + "<image>"), 400,
                            "context_length_exceeded", "prompt", "leave no room"),
    "negative_temperature": (with_sampling(temperature=-0.5), 400, "invalid_value",
                             "sampling.temperature", "must be in [0, 100]"),
    "top_p_zero": (with_sampling(top_p=0.0), 400, "invalid_value", "sampling.top_p", "(0, 1]"),
    "top_p_above_one": (with_sampling(top_p=1.5), 400, "invalid_value", "sampling.top_p", "(0, 1]"),
    "negative_top_k": (with_sampling(top_k=-1), 400, "invalid_value", "sampling.top_k", ">= 0"),
    "zero_max_new_tokens": (with_sampling(max_new_tokens=0), 400, "invalid_value",
                            "sampling.max_new_tokens", ">= 1"),
    "empty_stop_string": (with_sampling(stop=[""]), 400, "invalid_request", "sampling.stop[0]", "empty"),
    "stop_token_outside_vocab": (with_sampling(stop_token_ids=[10_000]), 400, "invalid_request",
                                 "sampling.stop_token_ids[0]", "vocabulary"),
    "unknown_version": (lambda s: msgpack.packb({"v": 99, "type": "GenerateRequest", "prompt": "x"}),
                        400, "unsupported_version", "v", "version not supported"),
    "missing_version": (lambda s: msgpack.packb({"type": "GenerateRequest", "prompt": "x"}),
                        400, "unsupported_version", "v", "missing version"),
    "wrong_message_type": (lambda s: proto.encode(EncodeRequest(images=[b"png"])), 400,
                           "unknown_message_type", "type", "takes GenerateRequest"),
    "not_msgpack": (lambda s: b"\xc1 definitely not msgpack", 400, "malformed_message", "message", "msgpack"),
    "prompt_and_input_ids": (encoded(input_ids=[1, 2]), 400, "invalid_value", "prompt", "exactly one"),
    "prompt_is_not_a_string": (raw_message(prompt=5), 400, "wrong_type", "prompt", "expected a string"),
    "special_token_in_prompt": (encoded(prompt="describe <im_patch> <image>"), 400,
                                "token_layout_error", "prompt", "special tokens"),
    "unknown_start_token": (
        lambda s: proto.encode(good_request(s, images=[ImageForInsert(3, image_features=features())])),
        400, "invalid_request", "images[0].insert_start_token", "must be <im_start>"),
    "patches_with_a_prompt": (
        lambda s: proto.encode(good_request(s, images=[
            ImageForInsert(s.model.tokenizer.ids.im_start, image_features=features()),
            ImageForInsert(s.model.tokenizer.ids.patch_start, image_features=features())])),
        400, "token_layout_error", "images", "multicrop patches"),
    "body_over_the_limit": (lambda s: proto.encode(good_request(s, images=[ImageForInsert(
        s.model.tokenizer.ids.im_start, image_features=features(20))])),
        413, "limit_exceeded", "body", f"exceeds the limit of {MAX_BODY_BYTES}"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_bad_input_is_a_4xx_naming_the_problem(client, service, case: str) -> None:
    make_body, status, kind, field, message = BAD_INPUTS[case]
    response = await post(client, make_body(service))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind
    assert field in error["field"]
    assert message in error["message"]
    assert len((await generate(client, good_request(service))).token_ids) == 6  # still serving


@pytest.mark.anyio
@pytest.mark.parametrize("content_type", ["application/json", "text/plain", ""])
async def test_wrong_content_type_is_415(client, service, content_type: str) -> None:
    response = await post(client, good_request(service), content_type=content_type)
    assert response.status_code == 415
    assert response.json()["error"]["type"] == "unsupported_media_type"
    assert response.json()["error"]["field"] == "content-type"
    assert (await post(client, good_request(service), "application/x-msgpack; charset=binary")).status_code == 200


@pytest.mark.anyio
async def test_a_step_failing_mid_stream_ends_with_an_error_event(client, service, monkeypatch) -> None:
    def broken_decode(*args, **kwargs):
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(service.scheduler.runner, "decode", broken_decode)
    response = await post(client, good_request(service, stream=True))
    assert response.status_code == 200  # the first token (from prefill) had been sent
    frames = parse_sse(response.text)
    assert frames[0][0] == "message" and len(frames[0][1]["token_ids"]) == 1
    assert frames[-1][0] == "error"
    assert frames[-1][1]["error"]["type"] == "engine_error"
    monkeypatch.undo()
    assert len((await generate(client, good_request(service))).token_ids) == 6


# ---- engine states --------------------------------------------------------------------
@pytest.mark.anyio
async def test_full_queue_is_503_and_stopped_engine_is_not_ready(checkpoint: Path) -> None:
    settings = LMWorkerSettings(model=str(checkpoint), device="cpu", max_waiting=1)
    service = LMWorkerService.from_settings(settings)  # engine never started: nothing drains
    app = create_app(service)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://lm") as client:
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == "engine not running"
        queued = asyncio.ensure_future(post(client, good_request(service)))
        while service.scheduler.num_waiting == 0:
            await asyncio.sleep(0.01)
        response = await post(client, good_request(service))
        assert response.status_code == 503 and response.json()["error"]["type"] == "overloaded"
        service.stop()
        response = await queued
        assert response.status_code == 503 and response.json()["error"]["type"] == "engine_unavailable"


@pytest.mark.anyio
async def test_lifespan_starts_and_stops_the_engine(checkpoint: Path) -> None:
    app = create_app(LMWorkerSettings(model=str(checkpoint), device="cpu", max_batch_size=2))
    service: LMWorkerService = app.state.service
    async with app.router.lifespan_context(app):
        assert service.scheduler.is_running
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://lm") as client:
            assert (await client.get("/ready")).status_code == 200
            assert len((await generate(client, good_request(service))).token_ids) == 6
    assert not service.scheduler.is_running


@pytest.mark.anyio
async def test_internal_token_guards_generate_but_not_health(checkpoint: Path) -> None:
    settings = LMWorkerSettings(model=str(checkpoint), device="cpu", internal_token="s3cret")
    assert "s3cret" not in repr(settings)
    app = create_app(settings)
    service: LMWorkerService = app.state.service
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://lm") as client:
            assert (await client.get("/ready")).status_code == 200
            denied = await post(client, good_request(service))
            assert denied.status_code == 401 and denied.json()["error"]["field"] == "x-internal-token"
            allowed = await client.post("/v1/generate", content=proto.encode(good_request(service)),
                                        headers={"content-type": proto.CONTENT_TYPE, "x-internal-token": "s3cret"})
            assert allowed.status_code == 200


# ---- settings and start-up --------------------------------------------------------------
@pytest.mark.anyio
async def test_a_preset_with_seeded_random_weights_serves(checkpoint: Path) -> None:
    settings = LMWorkerSettings(preset="step37-tiny", tokenizer=str(checkpoint / "tokenizer.json"), seed=3)
    outputs = []
    for _ in range(2):  # the same seed gives the same weights, so the same greedy tokens
        service = LMWorkerService.from_settings(settings)
        service.start()
        try:
            outputs.append((await service.generate(service.prepare(proto.encode(good_request(service)))[1])).token_ids)
        finally:
            service.stop()
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "exactly one of model"),
    ({"model": "m", "preset": "step37-tiny"}, "exactly one of model"),
    ({"preset": "step37-tiny"}, "needs a tokenizer"),
    ({"model": "m", "dtype": "int8"}, "dtype must be"),
    ({"model": "m", "max_batch_size": 0}, "max_batch_size must be >= 1"),
    ({"model": "m", "internal_token": ""}, "must not be empty"),
])
def test_settings_refuse_incomplete_configurations(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LMWorkerSettings(**fields)


def test_cli_flags_override_environment(monkeypatch) -> None:
    monkeypatch.setenv("STEP37_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("STEP37_MAX_WAITING", "9")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--model", "ckpt", "--max-waiting", "3"])
    settings = LMWorkerSettings.from_args(args)
    assert (settings.model, settings.max_batch_size, settings.max_waiting) == ("ckpt", 7, 3)
    assert args.host == "127.0.0.1"  # internal service: loopback unless told otherwise
