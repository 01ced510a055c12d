"""Continuous batching: requests join and leave between steps, outputs equal one-at-a-time
greedy decoding, the queue is bounded, cancellation frees slots, failures stay local."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lm_worker.errors import (
    ContextLengthExceeded,
    EngineError,
    EngineUnavailable,
    FeatureCountMismatch,
    Overloaded,
)
from lm_worker.image_insert_embedding import ImageInsertEmbedding
from lm_worker.model import DecoderConfig, LocalDecoderBackend, Step37Decoder
from lm_worker.prefix_cache import PrefixCache, prefix_block_keys
from lm_worker.runner import ModelRunner
from lm_worker.scheduler import Scheduler
from lm_worker.sequence import GenerationStream, NullObserver, SequenceRequest
from lm_worker.tokens import Step37Tokenizer, build_word_tokenizer
from proto import GenerateResponse, ImageForInsert, SamplingParams

WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "and", "describe", "."]
FEATURES_PER_IMAGE = 4


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Model:
    tokenizer: Step37Tokenizer
    decoder: Step37Decoder
    fusion: ImageInsertEmbedding


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    tokenizer = build_word_tokenizer(WORDS, Path(tmp_path_factory.mktemp("tok")) / "tokenizer.json")
    config = DecoderConfig.preset("step37-tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    torch.manual_seed(0)
    decoder = Step37Decoder(config).train(False).requires_grad_(False)
    with torch.no_grad():  # larger weights: varied outputs instead of one repeated token
        for name, param in decoder.named_parameters():
            if param.dim() == 2 and name != "embed_tokens.weight":
                param.mul_(4.0)
    fusion = ImageInsertEmbedding(decoder.embed_tokens, config.encoder_output_dim, config.hidden_size,
                                  placeholder_token_id=tokenizer.ids.im_patch).train(False).requires_grad_(False)
    return Model(tokenizer, decoder, fusion)


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.decode_batches: list[int] = []
        self.prefills: list[tuple[int, int]] = []  # (newcomers, already running)
        self.running = 0

    def on_queue(self, running: int, waiting: int, free_slots: int) -> None:
        self.running = running

    def on_prefill(self, sequences: int, tokens: int, seconds: float) -> None:
        self.prefills.append((sequences, self.running))

    def on_decode(self, batch_size: int, seconds: float) -> None:
        self.decode_batches.append(batch_size)


def make_scheduler(model: Model, *, max_batch_size: int = 4, backend=None, **kwargs) -> Scheduler:
    backend = backend or LocalDecoderBackend(model.decoder, max_batch_size=max_batch_size, max_seq_len=128)
    return Scheduler(ModelRunner(backend, model.fusion), eos_token_id=model.tokenizer.eos_token_id,
                     decode_text=model.tokenizer.decode, max_batch_size=max_batch_size, **kwargs)


def make_request(model: Model, index: int, *, max_new_tokens: int = 6, images: int = 1,
                 **sampling) -> SequenceRequest:
    gen = torch.Generator().manual_seed(100 + index)
    features = torch.randn(images, FEATURES_PER_IMAGE, model.fusion.encoder_output_dim, generator=gen)
    words = " ".join(WORDS[(index + k) % 10] for k in range(index % 4 + 1))
    prompt = f"describe {words} " + " and ".join(["<image>"] * images)
    prompt_ids = model.tokenizer.build_prompt_ids(prompt, [FEATURES_PER_IMAGE] * images)
    item = ImageForInsert(model.tokenizer.ids.im_start, image_features=features) if images else None
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **sampling)
    return SequenceRequest(f"r{index}", prompt_ids, [item] if item else [], params)


def reference_greedy(model: Model, request: SequenceRequest) -> list[int]:
    """One sequence alone, no KV cache: a full forward over everything per new token."""
    ids = torch.tensor([request.prompt_ids])
    with torch.inference_mode():
        prompt = model.fusion(ids, request.images)  # [S, 1, H]
        generated: list[int] = []
        for _ in range(request.sampling.max_new_tokens):
            tail = model.decoder.embed_tokens(torch.tensor(generated, dtype=torch.long))[:, None]
            logits = model.decoder(torch.cat([prompt, tail]))  # [S + n, 1, V]
            generated.append(int(logits[-1, 0].argmax()))
    return generated


async def drive(scheduler: Scheduler, tasks: list[asyncio.Task]) -> None:
    """Step the engine on this thread until every task is done."""
    for _ in range(500):
        if all(task.done() for task in tasks):
            return
        scheduler.step()
        for _ in range(3):  # deliver the events, then let the readers run
            await asyncio.sleep(0)
    raise AssertionError("requests did not finish within 500 steps")


def collect(stream: GenerationStream) -> asyncio.Task:
    return asyncio.ensure_future(stream.collect())


@pytest.mark.anyio
async def test_requests_join_and_leave_and_match_one_at_a_time_greedy(model: Model) -> None:
    recorder = Recorder()
    scheduler = make_scheduler(model, max_batch_size=3, observer=recorder)
    requests = [make_request(model, i, max_new_tokens=4 + 2 * (i % 4), images=1 + i % 2) for i in range(7)]
    tasks = [collect(scheduler.submit(r)) for r in requests[:2]]
    for _ in range(3):
        scheduler.step()
    tasks += [collect(scheduler.submit(r)) for r in requests[2:5]]  # join a running batch
    scheduler.step()
    tasks += [collect(scheduler.submit(r)) for r in requests[5:]]
    await drive(scheduler, tasks)

    for request, task in zip(requests, tasks, strict=True):
        response: GenerateResponse = task.result()
        assert response.finish_reason == "length"
        assert response.token_ids == reference_greedy(model, request), request.request_id
        assert response.text == model.tokenizer.decode(response.token_ids)
    assert max(recorder.decode_batches) == 3  # batched, and never above max_batch_size
    assert any(running > 0 for _, running in recorder.prefills)  # newcomers joined mid-flight
    assert len(set(tuple(t.result().token_ids) for t in tasks)) > 3  # outputs differ per request
    assert scheduler.backend.num_free_slots == 3 and scheduler.num_running == 0


@pytest.mark.anyio
async def test_a_finished_sequence_frees_its_slot_for_a_waiting_one(model: Model) -> None:
    recorder = Recorder()
    scheduler = make_scheduler(model, max_batch_size=2, observer=recorder)
    short = scheduler.submit(make_request(model, 0, max_new_tokens=2))
    long = scheduler.submit(make_request(model, 1, max_new_tokens=8))
    waiting = scheduler.submit(make_request(model, 2, max_new_tokens=3))
    tasks = [collect(s) for s in (short, long, waiting)]
    scheduler.step()  # prefill two (token 1), decode (token 2): the short one finishes
    await asyncio.sleep(0)
    assert scheduler.num_running == 1 and scheduler.num_waiting == 1
    scheduler.step()  # the waiting one takes the freed slot
    assert scheduler.num_running == 2 and scheduler.num_waiting == 0
    await drive(scheduler, tasks)
    assert [len(t.result().token_ids) for t in tasks] == [2, 8, 3]
    assert recorder.prefills[1] == (1, 1)


@pytest.mark.anyio
async def test_full_waiting_queue_is_overloaded(model: Model) -> None:
    scheduler = make_scheduler(model, max_waiting=2)
    first = scheduler.submit(make_request(model, 0))
    scheduler.submit(make_request(model, 1))
    with pytest.raises(Overloaded) as info:
        scheduler.submit(make_request(model, 2))
    assert info.value.http_status == 503 and "waiting" in str(info.value)
    first.cancel()  # a cancelled waiter leaves the queue at once
    third = scheduler.submit(make_request(model, 2))
    scheduler.step()
    await asyncio.sleep(0)
    final = [event async for event in first]
    assert final[-1].finish_reason == "abort" and final[-1].token_ids == []
    third.cancel()


@pytest.mark.anyio
async def test_cancel_frees_the_slot_at_the_next_step(model: Model) -> None:
    scheduler = make_scheduler(model, max_batch_size=2)
    stream = scheduler.submit(make_request(model, 0, max_new_tokens=50))
    other = collect(scheduler.submit(make_request(model, 1, max_new_tokens=12)))
    for _ in range(3):
        scheduler.step()
    await asyncio.sleep(0)
    received = [await stream.__anext__() for _ in range(3)]
    stream.cancel()
    assert scheduler.backend.num_free_slots == 0  # not before the next step
    scheduler.step()
    assert scheduler.backend.num_free_slots == 1 and scheduler.num_running == 1
    await asyncio.sleep(0)
    rest = [event async for event in stream]
    assert rest[-1].finish_reason == "abort"
    assert rest[-1].completion_tokens == 4  # tokens of the 3 steps before the cancel (+ prefill)
    assert sum(len(e.token_ids) for e in received + rest) == 4
    await drive(scheduler, [other])
    assert len(other.result().token_ids) == 12 and scheduler.backend.num_free_slots == 2


@pytest.mark.anyio
async def test_cancelling_the_reader_task_cancels_the_sequence(model: Model) -> None:
    scheduler = make_scheduler(model)
    task = collect(scheduler.submit(make_request(model, 0, max_new_tokens=50)))
    scheduler.step()
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    scheduler.step()
    assert scheduler.num_running == 0 and scheduler.backend.num_free_slots == 4


@pytest.mark.anyio
async def test_prefill_token_budget_splits_newcomers(model: Model) -> None:
    recorder = Recorder()
    requests = [make_request(model, i, max_new_tokens=2) for i in range(3)]
    budget = len(requests[0].prompt_ids) + len(requests[1].prompt_ids)
    scheduler = make_scheduler(model, observer=recorder, max_prefill_tokens=budget)
    tasks = [collect(scheduler.submit(r)) for r in requests]
    await drive(scheduler, tasks)
    assert [n for n, _ in recorder.prefills] == [2, 1]
    # A prompt longer than the whole budget is still admitted, and prefilled a position a step.
    recorder = PrefixRecorder()
    scheduler = make_scheduler(model, observer=recorder, max_prefill_tokens=1)
    task = collect(scheduler.submit(requests[0]))
    await drive(scheduler, [task])
    assert task.result().token_ids == reference_greedy(model, requests[0])[:2]
    assert recorder.prefilled_tokens == [1] * len(requests[0].prompt_ids)


class ChunkRecorder(NullObserver):
    def __init__(self) -> None:
        self.steps: list[tuple[str, int]] = []  # ("prefill", positions) or ("decode", batch size)

    def on_prefill(self, sequences: int, tokens: int, seconds: float) -> None:
        self.steps.append(("prefill", tokens))

    def on_decode(self, batch_size: int, seconds: float) -> None:
        self.steps.append(("decode", batch_size))


@pytest.mark.anyio
@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["eager", "fixed-shape steps"])
async def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_keeps_decoding(model: Model,
                                                                                   fixed_shapes: bool) -> None:
    recorder = ChunkRecorder()
    backend = LocalDecoderBackend(model.decoder, max_batch_size=2, max_seq_len=128, cuda_graphs=fixed_shapes)
    short, long = make_request(model, 0, max_new_tokens=14), make_request(model, 1, max_new_tokens=5, images=4)
    budget = len(short.prompt_ids)
    assert len(long.prompt_ids) > 2 * budget + 1  # three chunks at least, the last one partial
    scheduler = make_scheduler(model, max_batch_size=2, backend=backend, observer=recorder,
                               max_prefill_tokens=budget)
    tasks = [collect(scheduler.submit(short))]
    scheduler.step()  # the short prompt whole, then its first decode step
    tasks.append(collect(scheduler.submit(long)))
    await drive(scheduler, tasks)

    assert [t.result().token_ids for t in tasks] == [reference_greedy(model, short), reference_greedy(model, long)]
    full, rest = divmod(len(long.prompt_ids), budget)
    chunks = [("prefill", budget)] * full + [("prefill", rest)] * (rest > 0)
    # Each chunk is followed by a decode step of the short sequence (the batch does not
    # wait for the long prompt); after the last one, both decode together.
    expected = [("prefill", budget), ("decode", 1)]
    for chunk in chunks[:-1]:
        expected += [chunk, ("decode", 1)]
    expected += [chunks[-1], ("decode", 2)]
    assert recorder.steps[: len(expected)] == expected
    assert scheduler.num_running == 0 and scheduler.backend.num_free_slots == 2


@pytest.mark.anyio
async def test_cancelling_a_sequence_midway_through_its_prefill_frees_its_slot(model: Model) -> None:
    request = make_request(model, 2, images=4)
    scheduler = make_scheduler(model, max_prefill_tokens=len(request.prompt_ids) // 3)
    stream = scheduler.submit(request)
    scheduler.step()
    assert scheduler.num_running == 1 and scheduler.backend.num_free_slots == 3  # one chunk in
    stream.cancel()
    scheduler.step()
    assert scheduler.num_running == 0 and scheduler.backend.num_free_slots == 4
    await asyncio.sleep(0)
    events = [event async for event in stream]
    assert events[-1].finish_reason == "abort" and events[-1].completion_tokens == 0


@pytest.mark.anyio
async def test_seeded_sampling_does_not_depend_on_the_batch(model: Model) -> None:
    sampled = dict(temperature=0.9, top_p=0.95, seed=1234, max_new_tokens=8)
    alone = make_scheduler(model)
    task = collect(alone.submit(make_request(model, 0, **sampled)))
    await drive(alone, [task])
    together = make_scheduler(model)
    tasks = [collect(together.submit(make_request(model, i, **(sampled if i == 0 else {}))))
             for i in range(4)]
    await drive(together, tasks)
    assert tasks[0].result().token_ids == task.result().token_ids


@pytest.mark.anyio
async def test_images_that_do_not_fit_fail_alone(model: Model) -> None:
    scheduler = make_scheduler(model)
    bad = make_request(model, 0, images=1)
    bad.images = [ImageForInsert(model.tokenizer.ids.im_start,
                                 image_features=torch.zeros(2, FEATURES_PER_IMAGE, 256))]
    bad_task = collect(scheduler.submit(bad))
    good_task = collect(scheduler.submit(make_request(model, 1)))
    await drive(scheduler, [bad_task, good_task])
    with pytest.raises(FeatureCountMismatch, match="2 image feature block"):
        bad_task.result()
    assert len(good_task.result().token_ids) == 6
    assert scheduler.backend.num_free_slots == 4


class FlakyBackend(LocalDecoderBackend):
    """Fails the next ``failures`` decode steps."""

    failures = 0

    def decode(self, slots, token_ids):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("simulated device fault")
        return super().decode(slots, token_ids)


@pytest.mark.anyio
async def test_a_failed_step_fails_its_sequences_and_the_engine_keeps_serving(model: Model) -> None:
    backend = FlakyBackend(model.decoder, max_batch_size=4, max_seq_len=128)
    scheduler = make_scheduler(model, backend=backend)
    tasks = [collect(scheduler.submit(make_request(model, i))) for i in range(2)]
    backend.failures = 1
    await drive(scheduler, tasks)
    for task in tasks:
        with pytest.raises(EngineError, match="decode step failed: RuntimeError") as info:
            task.result()
        assert info.value.http_status == 500
    assert backend.num_free_slots == 4
    request = make_request(model, 3)
    task = collect(scheduler.submit(request))
    await drive(scheduler, [task])
    assert task.result().token_ids == reference_greedy(model, request)


@pytest.mark.anyio
async def test_final_event_carries_usage_and_timings(model: Model) -> None:
    scheduler = make_scheduler(model)
    request = make_request(model, 0, max_new_tokens=5)
    task = collect(scheduler.submit(request))
    await drive(scheduler, [task])
    response = task.result()
    assert response.prompt_tokens == len(request.prompt_ids) and response.request_id == "r0"
    timings = response.timings
    for stage in ("queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "total_ms", "tokens_per_s"):
        assert timings[stage] >= 0, stage
    assert timings["tokens_per_s"] > 0
    assert timings["ttft_ms"] <= timings["total_ms"]


class PrefixRecorder(NullObserver):
    def __init__(self) -> None:
        self.lookups: list[tuple[int, int]] = []  # (queried, hit) prompt tokens
        self.prefilled_tokens: list[int] = []

    def on_prefix_cache(self, query_tokens: int, hit_tokens: int) -> None:
        self.lookups.append((query_tokens, hit_tokens))

    def on_prefill(self, sequences: int, tokens: int, seconds: float) -> None:
        self.prefilled_tokens.append(tokens)


def caching_scheduler(model: Model, block: int, *, max_batch_size: int,
                      max_blocks: int = 64) -> tuple[Scheduler, PrefixRecorder]:
    recorder = PrefixRecorder()
    backend = LocalDecoderBackend(model.decoder, max_batch_size=max_batch_size, max_seq_len=128)
    scheduler = make_scheduler(model, max_batch_size=max_batch_size, backend=backend, observer=recorder,
                               prefix_cache=PrefixCache(backend.cache, block_size=block, max_blocks=max_blocks))
    return scheduler, recorder


@pytest.mark.anyio
async def test_a_repeated_prompt_starts_from_the_prefix_cache_and_decodes_the_same(model: Model) -> None:
    block = 2
    scheduler, recorder = caching_scheduler(model, block, max_batch_size=2)
    backend = scheduler.backend

    def keyed(request: SequenceRequest) -> SequenceRequest:
        request.prefix_keys = prefix_block_keys(request.prompt_ids, request.images, block)
        return request

    first = keyed(make_request(model, 3, max_new_tokens=6))
    again = keyed(make_request(model, 3, max_new_tokens=6))
    again.request_id = "again"
    other_image = keyed(SequenceRequest("other", list(first.prompt_ids), [
        ImageForInsert(model.tokenizer.ids.im_start, image_features=torch.randn(1, FEATURES_PER_IMAGE, model.fusion.encoder_output_dim))],
        first.sampling))
    blocks = len(first.prefix_keys)
    assert blocks >= 3
    responses = []
    for request in (first, again, other_image):  # one at a time: each sees what the ones before kept
        task = collect(scheduler.submit(request))
        await drive(scheduler, [task])
        responses.append(task.result())

    start = first.prompt_ids.index(model.tokenizer.ids.im_start)
    shared_text = (start // block) * block  # the blocks before the one holding the image's start token
    assert [hit for _, hit in recorder.lookups] == [0, blocks * block, shared_text]
    assert recorder.prefilled_tokens == [len(first.prompt_ids), len(first.prompt_ids) - blocks * block,
                                         len(first.prompt_ids) - shared_text]
    assert [r.cached_tokens for r in responses] == [0, blocks * block, shared_text]
    assert responses[0].token_ids == responses[1].token_ids == reference_greedy(model, first)
    assert responses[2].token_ids == reference_greedy(model, other_image)
    assert responses[1].prompt_tokens == len(first.prompt_ids)  # usage counts the whole prompt

    # A cached start (the text before the image), then the rest in chunks: the same tokens.
    chunk_recorder = PrefixRecorder()
    chunked = make_scheduler(model, max_batch_size=2, backend=backend, observer=chunk_recorder,
                             prefix_cache=scheduler.prefix_cache, max_prefill_tokens=2)
    third_image = keyed(SequenceRequest("third", list(first.prompt_ids), [
        ImageForInsert(model.tokenizer.ids.im_start, image_features=torch.randn(1, FEATURES_PER_IMAGE, model.fusion.encoder_output_dim))],
        first.sampling))
    task = collect(chunked.submit(third_image))
    await drive(chunked, [task])
    assert task.result().token_ids == reference_greedy(model, third_image)
    assert task.result().cached_tokens == shared_text
    rest = len(first.prompt_ids) - shared_text
    assert rest > 4 and chunk_recorder.prefilled_tokens == [2] * (rest // 2) + [1] * (rest % 2)


@pytest.mark.anyio
async def test_a_burst_of_one_prompt_prefills_it_once_and_the_rest_start_from_the_cache(model: Model) -> None:
    block = 2
    scheduler, recorder = caching_scheduler(model, block, max_batch_size=4)

    def keyed(index: int, request_id: str) -> SequenceRequest:
        request = make_request(model, index, max_new_tokens=5)
        request.request_id = request_id
        request.prefix_keys = prefix_block_keys(request.prompt_ids, request.images, block)
        return request

    burst = [keyed(3, f"same-{i}") for i in range(3)]
    other = keyed(4, "other")
    other.prompt_ids = model.tokenizer.build_prompt_ids("the left <image>", [FEATURES_PER_IMAGE])  # no shared block
    other.prefix_keys = prefix_block_keys(other.prompt_ids, other.images, block)
    streams = [scheduler.submit(r) for r in [*burst[:2], other, burst[2]]]
    tasks = [collect(s) for s in streams]
    scheduler.step()  # one of the burst and the other prompt; the two repeats wait a step
    assert scheduler.num_running == 2 and scheduler.num_waiting == 2
    await drive(scheduler, tasks)

    responses = [t.result() for t in tasks]
    cached = len(burst[0].prefix_keys) * block
    assert [r.cached_tokens for r in responses] == [0, cached, 0, cached]
    assert recorder.prefilled_tokens == [len(burst[0].prompt_ids) + len(other.prompt_ids),
                                         2 * (len(burst[0].prompt_ids) - cached)]
    assert all(r.token_ids == reference_greedy(model, burst[0]) for r in (responses[0], responses[1], responses[3]))
    assert responses[2].token_ids == reference_greedy(model, other)
    assert scheduler.num_waiting == 0 and scheduler.backend.num_free_slots == 4

    # Only for blocks a prefill can leave behind: past the pool's size, repeats go together.
    small, _ = caching_scheduler(model, block, max_batch_size=4, max_blocks=1)
    repeats = [collect(small.submit(keyed(6, f"repeat-{i}"))) for i in range(3)]
    small.step()  # one prefills; the first block is all the pool keeps, so the others wait for it alone
    small.step()
    assert small.num_waiting == 0 and small.num_running == 3
    await drive(small, repeats)
    # A newcomer that fails on admission holds no one back.
    failing = keyed(7, "failing")
    failing.images = [ImageForInsert(model.tokenizer.ids.im_start,
                                     image_features=torch.zeros(2, FEATURES_PER_IMAGE, model.fusion.encoder_output_dim))]
    follower = keyed(7, "follower")
    failed, followed = collect(scheduler.submit(failing)), collect(scheduler.submit(follower))
    scheduler.step()
    assert scheduler.num_waiting == 0
    await drive(scheduler, [failed, followed])
    assert isinstance(failed.exception(), FeatureCountMismatch) and followed.result().finish_reason == "length"

    # A repeat that is cancelled while it waits for the prefix leaves no trace.
    first, repeat = keyed(5, "first"), keyed(5, "repeat")
    first_task, repeat_stream = collect(scheduler.submit(first)), scheduler.submit(repeat)
    scheduler.step()
    assert scheduler.num_waiting == 1
    repeat_stream.cancel()
    scheduler.step()
    assert scheduler.num_waiting == 0
    await drive(scheduler, [first_task])
    assert [event async for event in repeat_stream][-1].finish_reason == "abort"


@pytest.mark.anyio
async def test_a_request_that_does_not_stream_gets_one_event_with_every_token(model: Model) -> None:
    scheduler = make_scheduler(model)
    streamed, held = make_request(model, 3, max_new_tokens=7), make_request(model, 3, max_new_tokens=7)
    held.stream = False
    streams = [scheduler.submit(streamed), scheduler.submit(held)]
    events: list[list] = [[], []]

    async def read(index: int) -> None:
        async for event in streams[index]:
            events[index].append(event)

    await drive(scheduler, [asyncio.ensure_future(read(0)), asyncio.ensure_future(read(1))])
    assert len(events[0]) > 1 and len(events[1]) == 1 and events[1][0].is_final
    assert events[1][0].token_ids == [t for e in events[0] for t in e.token_ids] == reference_greedy(model, held)
    assert events[1][0].text == "".join(e.text for e in events[0])
    assert events[1][0].completion_tokens == events[0][-1].completion_tokens == 7


@pytest.mark.anyio
async def test_context_length_is_checked_at_submit(model: Model) -> None:
    scheduler = make_scheduler(model)
    request = make_request(model, 0, max_new_tokens=128)
    with pytest.raises(ContextLengthExceeded, match="exceed the context length 128") as info:
        scheduler.submit(request)
    assert info.value.field == "sampling.max_new_tokens" and info.value.http_status == 400


@pytest.mark.anyio
async def test_engine_thread_serves_concurrent_requests_and_stops_cleanly(model: Model) -> None:
    scheduler = make_scheduler(model, max_batch_size=3)
    scheduler.start()
    assert scheduler.is_running
    with pytest.raises(RuntimeError, match="engine thread"):
        scheduler.step()
    requests = [make_request(model, i, max_new_tokens=3 + i) for i in range(5)]
    probe = scheduler.probe(requests[0].prompt_ids, requests[0].images)
    responses = await asyncio.gather(*(scheduler.submit(r).collect() for r in requests))
    await asyncio.wrap_future(probe)
    for request, response in zip(requests, responses, strict=True):
        assert response.token_ids == reference_greedy(model, request)
    await asyncio.to_thread(scheduler.stop)
    assert not scheduler.is_running
    with pytest.raises(EngineUnavailable):
        scheduler.submit(requests[0])
    with pytest.raises(EngineUnavailable):
        await asyncio.wrap_future(scheduler.probe([1], []))


@pytest.mark.anyio
async def test_stop_fails_what_is_still_queued(model: Model) -> None:
    scheduler = make_scheduler(model)
    stream = scheduler.submit(make_request(model, 0))
    scheduler.stop()
    await asyncio.sleep(0)
    with pytest.raises(EngineUnavailable, match="stopped") as info:
        await stream.collect()
    assert info.value.http_status == 503
