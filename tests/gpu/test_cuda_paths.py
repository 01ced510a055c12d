"""The CUDA paths: bf16 on the GPU, pinned asynchronous copies, no host sync in the insert.

Run where a CUDA device is present (``python -m pytest tests/gpu``); on a machine
without one every test here is skipped. Each check that could pass vacuously has a
positive control beside it (a sync the debug mode must catch, a pageable copy the
profiler must name).
"""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from encoder_server.model.graphs import TowerGraphs
from encoder_server.preprocess import preprocess_batch
from lm_worker import ImageForInsert, ImageInsertEmbedding
from lm_worker.model.backend import LocalDecoderBackend
from lm_worker.model.config import DecoderConfig
from lm_worker.model.decoder import Step37Decoder
from proto import to_device
from services.demo.captions import score_captions
from services.demo.pipeline import InProcessCaptioner
from services.demo.scenes import generate_scene
from services.launcher import BUNDLED_MODEL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
IM_START, IM_PATCH, IM_END = 1, 2, 3
VOCAB, HIDDEN, ENC_DIM, TOKENS = 512, 256, 384, 49


def make_ids(batch: int, seq: int, images_per_row: int, gen: torch.Generator) -> torch.Tensor:
    """[B, S] host ids with ``images_per_row`` blocks of ``TOKENS`` placeholders per row."""
    ids = torch.randint(10, VOCAB, (batch, seq), generator=gen)
    stride = seq // images_per_row
    for row in range(batch):
        for k in range(images_per_row):
            pos = k * stride + 3
            ids[row, pos] = IM_START
            ids[row, pos + 1 : pos + 1 + TOKENS] = IM_PATCH
            ids[row, pos + 1 + TOKENS] = IM_END
    return ids


def make_module(seed: int) -> ImageInsertEmbedding:
    torch.manual_seed(seed)
    return ImageInsertEmbedding(nn.Embedding(VOCAB, HIDDEN), ENC_DIM, HIDDEN, placeholder_token_id=IM_PATCH)


def move(module: ImageInsertEmbedding, device: torch.device, dtype: torch.dtype) -> ImageInsertEmbedding:
    module.language_embedding.to(device, dtype)  # borrowed: .to() on the fusion leaves it behind
    return module.to(device, dtype)


def wire_features(count: int, seed: int) -> torch.Tensor:
    """Features as they come off the wire: bf16, on the host, in pageable memory."""
    return torch.randn(count, TOKENS, ENC_DIM, generator=torch.Generator().manual_seed(seed)).bfloat16()


def per_image_reference(module: ImageInsertEmbedding, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The seed's loop, on whatever device the module is: embed, then image by image."""
    weight = module.align_projector.weight
    emb = module.language_embedding(ids.to(weight.device).t()).clone()  # [S, B, H]
    starts = (ids == IM_START).nonzero().tolist()  # row-major
    for block, (b, s) in zip(features, starts, strict=True):
        emb[s + 1 : s + 1 + TOKENS, b] = module.align_projector(block.to(weight.device, weight.dtype))
    return emb


def htod_copies(fn) -> list[str]:
    """Names of the host→device copies the CUDA profiler saw while ``fn`` ran."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if "HtoD" in event.name]


def test_bf16_insert_on_cuda_matches_the_fp32_loop_on_the_host():
    gen = torch.Generator().manual_seed(1)
    ids = make_ids(batch=3, seq=400, images_per_row=2, gen=gen)
    features = wire_features(6, seed=2)
    reference = per_image_reference(make_module(0), ids, features)  # fp32, CPU
    module = move(make_module(0), CUDA, torch.bfloat16)
    with torch.inference_mode():
        fused = module(ids, [ImageForInsert(IM_START, image_features=features)])
    assert fused.device.type == "cuda" and fused.dtype == torch.bfloat16
    assert fused.shape == (400, 3, HIDDEN)
    fused = fused.float().cpu()
    image_rows = (ids == IM_PATCH).t()  # [S, B]
    # Text rows are a gather of the bf16 embedding: exactly the rounded fp32 rows.
    assert torch.equal(fused[~image_rows], reference[~image_rows].bfloat16().float())
    # Image rows are a bf16 matmul with fp32 accumulation: within bf16 rounding.
    torch.testing.assert_close(fused[image_rows], reference[image_rows], rtol=2e-2, atol=3e-2)


def test_cuda_insert_is_bit_identical_to_the_loop_with_the_same_projection():
    gen = torch.Generator().manual_seed(3)
    ids = make_ids(batch=4, seq=256, images_per_row=3, gen=gen)
    features = wire_features(12, seed=4)
    module = move(make_module(5), CUDA, torch.bfloat16)
    with torch.inference_mode():
        fused = module(ids, [ImageForInsert(IM_START, image_features=features)])
        projected = module.align_projector(features.to(CUDA).reshape(-1, ENC_DIM).bfloat16())
        expected = module.language_embedding(ids.to(CUDA).t()).clone()
        for i, (b, s) in enumerate((ids == IM_START).nonzero().tolist()):
            expected[s + 1 : s + 1 + TOKENS, b] = projected[i * TOKENS : (i + 1) * TOKENS]
    assert torch.equal(fused, expected)


def test_the_sync_debug_mode_catches_a_host_sync():
    # Positive control for the next test: the mode is live and raises on a sync.
    probe = torch.ones(4, device=CUDA)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            probe.nonzero()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def served_case(seed: int) -> tuple[torch.Tensor, ImageForInsert, ImageInsertEmbedding]:
    """What the LM worker hands the fusion: host ids, bf16 host features, a bf16 GPU module."""
    ids = make_ids(batch=2, seq=300, images_per_row=2, gen=torch.Generator().manual_seed(seed))
    item = ImageForInsert(IM_START, image_features=wire_features(4, seed=seed + 1))
    return ids, item, move(make_module(seed + 2), CUDA, torch.bfloat16)


def test_insert_makes_no_host_sync():
    ids, item, module = served_case(6)
    with torch.inference_mode():
        module(ids, [item])  # warm: first-call allocations are not the point
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fused = module(ids, [item])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    reference = per_image_reference(module, ids, item.image_features)
    torch.testing.assert_close(fused, reference, rtol=2e-2, atol=3e-2)


def test_the_profiler_names_a_pageable_copy():
    # Positive control for the next test: a plain .to() of pageable memory is seen as such.
    host = torch.randn(1 << 16)
    names = htod_copies(lambda: host.to(CUDA))
    assert names and any("Pageable" in name for name in names), names


def test_insert_copies_features_and_indices_from_pinned_memory():
    ids, item, module = served_case(9)
    with torch.inference_mode():
        names = htod_copies(lambda: module(ids, [item]))
    assert len(names) >= 2, names  # the feature rows and the scatter indices
    assert not [name for name in names if "Pageable" in name], names


def test_to_device_copies_in_the_source_dtype_then_casts_on_the_gpu():
    host = torch.randn(64, 96).bfloat16()
    with torch.inference_mode():
        names = htod_copies(lambda: to_device(host, CUDA, torch.float32))
        moved = to_device(host, CUDA, torch.float32)
    assert moved.device.type == "cuda" and moved.dtype == torch.float32
    assert torch.equal(moved.cpu(), host.float())
    assert names and not [name for name in names if "Pageable" in name], names
    assert not host.is_pinned()  # the caller's tensor is left as it was


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(20_261_126)
    return [generate_scene(rng.getrandbits(63)) for _ in range(64)]


def test_bundled_tower_in_bf16_on_cuda_matches_fp32_on_the_host(scenes):
    images = [scene.image for scene in scenes[:16]]
    on_gpu = InProcessCaptioner.from_pretrained(BUNDLED_MODEL, device="cuda", wire_dtype=None)
    on_host = InProcessCaptioner.from_pretrained(BUNDLED_MODEL, device="cpu", wire_dtype=None)
    assert next(on_gpu.vision.parameters()).dtype == torch.bfloat16  # the GPU default
    gpu = on_gpu.encode(images).float().cpu()
    host = on_host.encode(images)
    cosine = nn.functional.cosine_similarity(gpu, host, dim=-1)  # [N, L]
    assert cosine.min() > 0.98 and cosine.mean() > 0.99, (cosine.min(), cosine.mean())


def test_bundled_model_captions_on_cuda_as_well_as_on_the_host(scenes):
    images = [scene.image for scene in scenes]
    gpu = InProcessCaptioner.from_pretrained(BUNDLED_MODEL, device="cuda").caption(images)
    host = InProcessCaptioner.from_pretrained(BUNDLED_MODEL, device="cpu").caption(images)
    gpu_scores, host_scores = score_captions(gpu, scenes), score_captions(host, scenes)
    assert gpu_scores["exact_match"] >= 0.85, gpu_scores
    assert gpu_scores["exact_match"] >= host_scores["exact_match"] - 0.05, (gpu_scores, host_scores)
    agree = sum(a == b for a, b in zip(gpu, host, strict=True)) / len(scenes)
    assert agree >= 0.9, agree


def test_prefill_and_decode_graphs_match_eager_steps():
    """Prefill and decode steps replayed from CUDA graphs (batches padded into the
    scratch slot, attention over whole slots) give the eager steps' logits, sequences
    joining and leaving."""
    torch.manual_seed(0)
    decoder = Step37Decoder(DecoderConfig.preset("step37-tiny", vocab_size=64)).to(CUDA).train(False)
    graphed = LocalDecoderBackend(decoder, max_batch_size=8, max_seq_len=64)
    eager = LocalDecoderBackend(decoder, max_batch_size=8, max_seq_len=64, cuda_graphs=False)
    assert graphed.graphs is not None and graphed.graphs.captured and eager.graphs is None
    assert graphed.prefill_graphs is not None and eager.prefill_graphs is None
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randn(length, 128, generator=gen).to(CUDA) for length in (5, 9, 3)]
    slots = {name: [backend.allocate() for _ in prompts] for name, backend in (("g", graphed), ("e", eager))}
    first = {name: backend.prefill(slots[name], prompts) for name, backend in (("g", graphed), ("e", eager))}
    torch.testing.assert_close(first["g"], first["e"], atol=2e-4, rtol=1e-4)
    rows = [0, 1, 2]
    for step in range(12):
        if step == 6:
            rows = [2, 0]  # a sequence left: size 2, and another order
        tokens = torch.randint(0, 64, (len(rows),), generator=gen)
        got = graphed.decode([slots["g"][row] for row in rows], tokens)
        want = eager.decode([slots["e"][row] for row in rows], tokens)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_tower_graphs_match_the_eager_tower(scenes):
    """Trained-resolution forwards replayed from CUDA graphs (batches padded with zero
    images) give the eager forward's features; other sizes fall back to eager."""
    captioner = InProcessCaptioner.from_pretrained(BUNDLED_MODEL, device="cuda", wire_dtype=None)
    tower = captioner.tower()
    assert isinstance(tower, TowerGraphs) and tower.sizes[-1] == 64
    pixels = to_device(preprocess_batch([scene.image for scene in scenes[:8]], 224), CUDA)
    with torch.inference_mode():
        for count in (1, 3, 8):
            got, want = tower(pixels[:count]).float(), captioner.vision(pixels[:count]).float()
            cosine = nn.functional.cosine_similarity(got, want, dim=-1)  # [N, L]
            assert got.shape == want.shape and cosine.min() > 0.999, (count, cosine.min())
        smaller = pixels[:2, :, :112, :112]  # not the captured resolution
        torch.testing.assert_close(tower(smaller), captioner.vision(smaller))


def test_graphs_give_the_captions_of_eager_forwards(scenes):
    """Tower and decode steps replayed from CUDA graphs caption like eager forwards."""
    images = [scene.image for scene in scenes]
    graphed = InProcessCaptioner.from_pretrained(BUNDLED_MODEL, device="cuda")
    eager = InProcessCaptioner.from_pretrained(BUNDLED_MODEL, device="cuda", cuda_graphs=False)
    assert graphed.decode_backend().graphs.captured and eager.decode_backend().graphs is None
    assert isinstance(graphed.tower(), TowerGraphs) and eager.tower() is eager.vision
    with_graphs, without = graphed.caption(images), eager.caption(images)
    same = sum(a == b for a, b in zip(with_graphs, without, strict=True))
    print(f"captions identical with and without CUDA graphs: {same} of {len(images)}")
    assert same >= len(images) - 2, [(a, b) for a, b in zip(with_graphs, without, strict=True) if a != b]


def test_train_demo_on_cuda_follows_the_cpu_run(tmp_path):
    """The GPU trains on the very batches the CPU does (scenes rendered ahead by other
    processes, normalised on the GPU), and so follows the CPU's losses up to float rounding."""
    from concurrent.futures import ProcessPoolExecutor

    from services.demo import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    *_, tokenizer, _ = train.build_models(parser.parse_args(["--out", str(tmp_path / "tok")]), tmp_path / "tok")
    on_cpu = train.Examples(tokenizer, 224, 16, seed=3)
    with ProcessPoolExecutor(2) as pool:
        ahead = train.Examples(tokenizer, 224, 16, seed=3).prefetched(5, pool, CUDA, ahead=2, chunk=2)
        for _ in range(3):
            for got, expected in zip(next(ahead), on_cpu.batch(5), strict=True):
                assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)

    def run(device: str, *extra: str) -> dict:
        parser = argparse.ArgumentParser()
        train.add_arguments(parser)
        args = parser.parse_args(["--out", str(tmp_path / device), "--steps", "6", "--batch-size", "4",
                                  "--warmup-steps", "1", "--eval-scenes", "4", "--no-compile", "--workers", "1",
                                  "--device", device, *extra])
        assert train.run(args) == 0
        return json.loads((tmp_path / device / "training_log.json").read_text())

    gpu, cpu = run("cuda", "--render-processes", "2"), run("cpu")
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    losses_gpu, losses_cpu = [e["loss"] for e in gpu["log"]], [e["loss"] for e in cpu["log"]]
    assert len(losses_gpu) == len(losses_cpu) == 2
    assert all(abs(a - b) <= 2e-2 * b for a, b in zip(losses_gpu, losses_cpu, strict=True)), (losses_gpu, losses_cpu)
