"""The real ``step37-serve lm-worker`` process on a free port, fed msgpack
``GenerateRequest``s whose ``ImageForInsert``s carry features from the seeded tiny
vision tower: greedy outputs equal an in-process run of the same checkpoint, streaming
works, and a client that goes away mid-generation gets its slot freed, over HTTP and
over the call channel alike (streams included)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import proto
from encoder_server.model import load_vision_model
from lm_worker.serving import LMWorkerService
from lm_worker.settings import LMWorkerSettings
from proto import GenerateRequest, GenerateResponse, ImageForInsert, SamplingParams
from services.common.procs import ServiceProcess
from services.common.rpc import RpcClient, RpcFailed
from services.demo.checkpoint import random_checkpoint, read_token_ids

MAX_BATCH_SIZE = 4
HEADERS = {"content-type": proto.CONTENT_TYPE}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=0)


@pytest.fixture(scope="module")
def worker(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    # Module-scoped (one start-up for all tests), so not the function-scoped start_service.
    log = tmp_path_factory.mktemp("logs") / "lm-worker.log"
    service = ServiceProcess("lm-worker", ["lm-worker", "--model", str(checkpoint), "--device", "cpu",
                                           "--max-batch-size", str(MAX_BATCH_SIZE)], log_path=str(log))
    try:
        yield service.start().wait_ready(timeout_s=120)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def requests(checkpoint: Path) -> list[GenerateRequest]:
    """Four requests, one to three images each, features as they come off the wire (bf16)."""
    vision = load_vision_model(checkpoint, device="cpu")
    im_start = read_token_ids(checkpoint)["im_start_token_id"]
    gen = torch.Generator().manual_seed(0)
    out = []
    for index, count in enumerate([1, 2, 1, 3]):
        pixels = torch.rand(count, 3, 224, 224, generator=gen) * 2 - 1
        with torch.inference_mode():
            image_features = vision(pixels).to(torch.bfloat16)  # [N, 16, 256]
        prompt = " and ".join(["<image>"] * count) + " describe" * (index + 1)
        out.append(GenerateRequest(
            request_id=f"it-{index}", prompt=prompt,
            images=[ImageForInsert(im_start, image_features=image_features)],
            sampling=SamplingParams(max_new_tokens=8 + 4 * index, ignore_eos=True),
        ))
    return out


@pytest.fixture(scope="module")
def expected(checkpoint: Path, requests: list[GenerateRequest]) -> list[GenerateResponse]:
    """The same requests through an in-process service, one at a time."""
    service = LMWorkerService.from_settings(LMWorkerSettings(model=str(checkpoint), device="cpu",
                                                             max_batch_size=1))

    async def run() -> list[GenerateResponse]:
        service.start()
        try:
            return [await service.generate(service.prepare(proto.encode(r))[1]) for r in requests]
        finally:
            await asyncio.to_thread(service.stop)

    return asyncio.run(run())


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v
                                                               for k, v in labels.items())):
                return sample.value
    return 0.0


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_concurrent_greedy_outputs_equal_the_in_process_run(worker, requests, expected) -> None:
    async def send_all() -> list[GenerateResponse]:
        async with httpx.AsyncClient(base_url=worker.url, timeout=60) as client:
            responses = await asyncio.gather(*(
                client.post("/v1/generate", content=proto.encode(r), headers=HEADERS) for r in requests))
        for response in responses:
            assert response.status_code == 200, response.text
        return [proto.decode(r.content, expect=GenerateResponse) for r in responses]

    first = asyncio.run(send_all())
    for got, want, request in zip(first, expected, requests, strict=True):
        assert got.request_id == request.request_id
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.prompt_tokens == want.prompt_tokens and got.finish_reason == "length"
        assert {"queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "tokens_per_s"} <= set(got.timings)
    assert metric(worker.url, "lm_worker_decode_batch_size_count") > 0
    # Again: every prompt now starts from its own cached prefix (the same images, the same
    # text), and decodes the same tokens as when it was prefilled whole.
    again = asyncio.run(send_all())
    assert [r.token_ids for r in again] == [r.token_ids for r in first]
    assert all(r.cached_tokens == 0 for r in first) and all(r.cached_tokens > 0 for r in again)
    assert metric(worker.url, "lm_worker_prefix_cache_hit_tokens_total") == sum(r.cached_tokens for r in again)


def test_streamed_response_matches_the_whole_one(worker, requests, expected) -> None:
    request = dataclasses.replace(requests[1], stream=True)
    with httpx.stream("POST", worker.url + "/v1/generate", content=proto.encode(request),
                      headers=HEADERS, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                  if line.startswith("data: ")]
    chunks, final = events[:-1], events[-1]
    assert [t for chunk in chunks for t in chunk["token_ids"]] == expected[1].token_ids
    assert "".join(chunk["text"] for chunk in chunks) == expected[1].text
    assert final["finish_reason"] == "length" and final["completion_tokens"] == len(expected[1].token_ids)
    assert final["prompt_tokens"] == expected[1].prompt_tokens and "ttft_ms" in final["timings"]


def long_request(requests: list[GenerateRequest], *, stream: bool) -> GenerateRequest:
    return dataclasses.replace(requests[0], stream=stream,
                               sampling=SamplingParams(max_new_tokens=400, ignore_eos=True))


def test_a_stream_cancelled_midway_frees_its_slot(worker, requests) -> None:
    aborted = metric(worker.url, "lm_worker_requests_total", {"finish_reason": "abort"})
    with httpx.stream("POST", worker.url + "/v1/generate", content=proto.encode(long_request(requests, stream=True)),
                      headers=HEADERS, timeout=60) as response:
        assert response.status_code == 200
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break  # leaving the block closes the connection mid-stream
    wait_until(lambda: metric(worker.url, "lm_worker_requests_total", {"finish_reason": "abort"}) == aborted + 1)
    wait_until(lambda: metric(worker.url, "lm_worker_running_sequences") == 0)
    assert metric(worker.url, "lm_worker_kv_cache_free_slots") == MAX_BATCH_SIZE
    assert httpx.get(worker.url + "/ready", timeout=10).status_code == 200


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(worker, requests) -> None:
    aborted = metric(worker.url, "lm_worker_requests_total", {"finish_reason": "abort"})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(worker.url + "/v1/generate", content=proto.encode(long_request(requests, stream=False)),
                   headers=HEADERS, timeout=httpx.Timeout(10, read=0.3))
    wait_until(lambda: metric(worker.url, "lm_worker_requests_total", {"finish_reason": "abort"}) == aborted + 1)
    wait_until(lambda: metric(worker.url, "lm_worker_kv_cache_free_slots") == MAX_BATCH_SIZE)


def test_bad_input_over_the_socket_is_a_4xx_and_the_worker_keeps_serving(worker, requests, expected) -> None:
    bad = GenerateRequest(prompt="<image> describe", images=[ImageForInsert(requests[0].images[0].insert_start_token)])
    response = httpx.post(worker.url + "/v1/generate", content=proto.encode(bad), headers=HEADERS, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "images[0].image_features"
    ok = httpx.post(worker.url + "/v1/generate", content=proto.encode(requests[0]), headers=HEADERS, timeout=60)
    assert proto.decode(ok.content, expect=GenerateResponse).token_ids == expected[0].token_ids


def rpc_address(url: str) -> tuple[str, int]:
    """The call channel the service reports in /ready."""
    port = httpx.get(url + "/ready", timeout=10).json()["rpc_port"]
    return "127.0.0.1", port


def test_generates_over_the_call_channel_equal_the_in_process_run(worker, requests, expected) -> None:
    async def send_all() -> list[GenerateResponse]:
        client = RpcClient()
        try:
            replies = await asyncio.gather(*(client.call(rpc_address(worker.url), "generate", proto.encode_chunks(r))
                                             for r in requests))
        finally:
            await client.aclose()
        return [proto.decode(reply, expect=GenerateResponse) for reply in replies]

    for got, want, request in zip(asyncio.run(send_all()), expected, requests, strict=True):
        assert got.request_id == request.request_id
        assert got.token_ids == want.token_ids and got.text == want.text


def test_the_call_channel_refuses_bad_input_and_frees_a_cancelled_calls_slot(worker, requests) -> None:
    address = rpc_address(worker.url)
    aborted = metric(worker.url, "lm_worker_requests_total", {"finish_reason": "abort"})

    async def scenario() -> None:
        client = RpcClient()
        try:
            bad = GenerateRequest(prompt="<image> describe",
                                  images=[ImageForInsert(requests[0].images[0].insert_start_token)])
            with pytest.raises(RpcFailed) as refused:
                await client.call(address, "generate", proto.encode_chunks(bad))
            assert refused.value.status == 400
            assert json.loads(refused.value.body)["error"]["field"] == "images[0].image_features"
            call = asyncio.ensure_future(client.call(address, "generate",
                                                     proto.encode_chunks(long_request(requests, stream=False))))
            await asyncio.sleep(0.5)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
        finally:
            await client.aclose()

    asyncio.run(scenario())
    wait_until(lambda: metric(worker.url, "lm_worker_requests_total", {"finish_reason": "abort"}) == aborted + 1)
    wait_until(lambda: metric(worker.url, "lm_worker_kv_cache_free_slots") == MAX_BATCH_SIZE)


def test_a_stream_over_the_call_channel_matches_the_http_one_and_closing_it_frees_its_slot(
        worker, requests, expected) -> None:
    address = rpc_address(worker.url)
    aborted = metric(worker.url, "lm_worker_requests_total", {"finish_reason": "abort"})

    async def scenario() -> list[dict]:
        client = RpcClient()
        try:
            stream = await client.open_stream(address, "generate",
                                              proto.encode_chunks(dataclasses.replace(requests[2], stream=True)))
            events = [json.loads(item) async for item in stream.chunks()]
            long = await client.open_stream(address, "generate",
                                            proto.encode_chunks(long_request(requests, stream=True)))
            received = 0
            async for _ in long.chunks():
                received += 1
                if received == 3:
                    break
            await long.aclose()  # cancels the call: the worker aborts the sequence
            return events
        finally:
            await client.aclose()

    events = asyncio.run(scenario())
    chunks, final = events[:-1], events[-1]
    assert [t for chunk in chunks for t in chunk["token_ids"]] == expected[2].token_ids
    assert "".join(chunk["text"] for chunk in chunks) == expected[2].text
    assert final["finish_reason"] == "length" and final["completion_tokens"] == len(expected[2].token_ids)
    assert final["prompt_tokens"] == expected[2].prompt_tokens and "ttft_ms" in final["timings"]
    wait_until(lambda: metric(worker.url, "lm_worker_requests_total", {"finish_reason": "abort"}) == aborted + 1)
    wait_until(lambda: metric(worker.url, "lm_worker_kv_cache_free_slots") == MAX_BATCH_SIZE)
