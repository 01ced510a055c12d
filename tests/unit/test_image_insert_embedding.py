"""ImageInsertEmbedding against a straightforward per-image loop written from the seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lm_worker import ImageForInsert, ImageInsertEmbedding
from lm_worker.errors import (
    FeatureCountMismatch,
    FeatureDimMismatch,
    ImageInsertError,
    PlaceholderMismatch,
    SpanOutOfRange,
)

IM_START, IM_PATCH, IM_END, PATCH_START = 5, 6, 7, 8
# The reference projects image by image, the module all rows in one matmul: BLAS may
# block a [L, C] and a [ΣL, C] product differently, so fp32 results can differ in the
# last bits. The scatter itself is compared bit for bit below.
FP32 = {"rtol": 1e-5, "atol": 1e-6}
VOCAB, HIDDEN, ENC_DIM = 32, 24, 12


def reference_forward(module: ImageInsertEmbedding, input_ids, images):
    """The seed, read literally: embed, then per image: project, find the i-th start
    token in row-major order, overwrite the rows after it (clipped at the end)."""
    emb = module.language_embedding(input_ids).transpose(0, 1).clone()  # [S, B, H]
    seq = emb.shape[0]
    for item in images:
        blocks = []
        feats = item.image_features
        for block in feats if isinstance(feats, list) else [feats]:
            blocks.extend([block] if block.dim() == 2 else list(block))
        positions = [
            (b, s)
            for b in range(input_ids.shape[0])
            for s in range(input_ids.shape[1])
            if int(input_ids[b, s]) == item.insert_start_token
        ]
        for block, (b, s) in zip(blocks, positions, strict=False):
            projected = module.align_projector(block.to(emb.dtype))  # [L, H]
            end = min(s + 1 + block.shape[0], seq)
            emb[s + 1 : end, b] = projected[: end - s - 1]
    return emb


def make_module(dtype=torch.float32, **kwargs) -> ImageInsertEmbedding:
    embedding = nn.Embedding(VOCAB, HIDDEN).to(dtype)
    return ImageInsertEmbedding(embedding, ENC_DIM, HIDDEN, **kwargs).to(dtype)


def layout(rows: list[list[tuple[str, int]]], seq: int) -> torch.Tensor:
    """Build [B, S] ids from a description: ("text", n) or ("image", L) per segment."""
    out = torch.full((len(rows), seq), 1, dtype=torch.long)
    for b, segments in enumerate(rows):
        pos = 0
        for kind, n in segments:
            if kind == "text":
                out[b, pos : pos + n] = torch.randint(9, VOCAB, (n,))
                pos += n
            else:
                out[b, pos] = IM_START
                out[b, pos + 1 : pos + 1 + n] = IM_PATCH
                if pos + 1 + n < seq:
                    out[b, pos + 1 + n] = IM_END
                pos += n + 2
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["tensor", "list2d", "list3d"])
def test_matches_reference_loop(dtype, form):
    torch.manual_seed(0)
    module = make_module(dtype)
    ids = layout([[("text", 3), ("image", 4), ("text", 2), ("image", 4)], [("image", 4), ("text", 7), ("image", 4)]], 24)
    feats = torch.randn(4, 4, ENC_DIM, dtype=dtype)
    if form == "tensor":
        image_features = feats
    elif form == "list2d":
        image_features = list(feats)
    else:
        image_features = [feats[:1], feats[1:]]
    images = [ImageForInsert(IM_START, image_features=image_features)]
    with torch.no_grad():
        fast = module(ids, images)
        slow = reference_forward(module, ids, images)
    assert fast.shape == (24, 2, HIDDEN)
    # bf16: the reference projects per image, the fast path in one matmul; rounding of
    # the same products in a different blocking can differ in the last bit.
    tol = FP32 if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(fast, slow, **tol)


def test_variable_lengths_several_kinds_and_end_of_sequence():
    torch.manual_seed(1)
    module = make_module(placeholder_token_id=IM_PATCH)
    ids = layout([[("image", 3), ("text", 2), ("image", 5)], [("text", 3), ("image", 2), ("image", 6)]], 14)
    # An image that ends exactly at the sequence end (no room for <im_end>).
    assert ids[1, -1] == IM_PATCH
    features = [torch.randn(3, ENC_DIM), torch.randn(5, ENC_DIM), torch.randn(2, ENC_DIM), torch.randn(6, ENC_DIM)]
    with torch.no_grad():
        fast = module(ids, [ImageForInsert(IM_START, image_features=features)])
        slow = reference_forward(module, ids, [ImageForInsert(IM_START, image_features=features)])
    torch.testing.assert_close(fast, slow, **FP32)


def test_two_groups_patch_and_image_tokens():
    torch.manual_seed(2)
    module = make_module()
    ids = layout([[("image", 4), ("text", 2), ("image", 4)]], 16)
    ids[0, 0] = PATCH_START  # the first block belongs to the multicrop-patch group
    groups = [
        ImageForInsert(PATCH_START, image_features=torch.randn(1, 4, ENC_DIM)),
        ImageForInsert(IM_START, image_features=torch.randn(1, 4, ENC_DIM)),
    ]
    with torch.no_grad():
        torch.testing.assert_close(module(ids, groups), reference_forward(module, ids, groups), **FP32)


def test_random_layouts_against_reference():
    gen = torch.Generator().manual_seed(3)
    module = make_module()
    for _ in range(20):
        batch = int(torch.randint(1, 4, (1,), generator=gen))
        rows, lengths = [], []
        for _b in range(batch):
            segments = []
            for _k in range(int(torch.randint(0, 4, (1,), generator=gen))):
                segments.append(("text", int(torch.randint(0, 4, (1,), generator=gen))))
                length = int(torch.randint(1, 6, (1,), generator=gen))
                segments.append(("image", length))
                lengths.append(length)
            rows.append(segments)
        seq = max([sum(n + (2 if k == "image" else 0) for k, n in r) for r in rows] + [1])
        ids = layout(rows, seq)
        if not lengths:
            continue
        feats = [torch.randn(n, ENC_DIM, generator=gen) for n in lengths]
        images = [ImageForInsert(IM_START, image_features=feats)]
        with torch.no_grad():
            torch.testing.assert_close(module(ids, images), reference_forward(module, ids, images), **FP32)


def reference_scatter(embeddings, blocks, input_ids, flag):
    out = embeddings.clone()
    positions = (input_ids == flag).nonzero().tolist()
    for block, (b, s) in zip(blocks, positions, strict=False):
        end = min(s + 1 + block.shape[0], out.shape[0])
        out[s + 1 : end, b] = block[: end - s - 1]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_insert_features_is_bit_identical_to_a_loop(dtype):
    gen = torch.Generator().manual_seed(7)
    for batch, seq in [(1, 9), (3, 40), (4, 64)]:
        rows, lengths = [], []
        for _ in range(batch):
            segments = [("text", 1)]
            for _k in range(3):
                length = int(torch.randint(1, 5, (1,), generator=gen))
                segments += [("image", length), ("text", 1)]
                lengths.append(length)
            rows.append(segments)
        seq = max(seq, max(sum(n + (2 if k == "image" else 0) for k, n in r) for r in rows))
        ids = layout(rows, seq)
        embeddings = torch.randn(seq, batch, HIDDEN, generator=gen).to(dtype)
        blocks = [torch.randn(n, HIDDEN, generator=gen).to(dtype) for n in lengths]
        fast = ImageInsertEmbedding.insert_features(embeddings, blocks, ids, IM_START, placeholder_token_id=IM_PATCH)
        assert torch.equal(fast, reference_scatter(embeddings, blocks, ids, IM_START))


def test_insert_features_does_not_mutate_input():
    torch.manual_seed(4)
    ids = layout([[("text", 2), ("image", 3)]], 8)
    base = torch.randn(8, 1, HIDDEN)
    before = base.clone()
    rows = torch.randn(1, 3, HIDDEN)
    out = ImageInsertEmbedding.insert_features(base, rows, ids, IM_START)
    assert torch.equal(base, before)
    assert torch.equal(out[3:6, 0], rows[0])
    assert torch.equal(out[:3], base[:3]) and torch.equal(out[6:], base[6:])


def test_embedding_is_borrowed_not_registered():
    embedding = nn.Embedding(VOCAB, HIDDEN)
    module = ImageInsertEmbedding(embedding, ENC_DIM, HIDDEN, projector_bias=True)
    names = set(dict(module.named_parameters()))
    assert names == {"align_projector.weight", "align_projector.bias"}
    assert set(module.state_dict()) == names
    assert module.language_embedding is embedding
    assert torch.count_nonzero(module.align_projector.bias) == 0
    # kaiming-normal (fan_in, relu): std ≈ sqrt(2 / fan_in)
    std = module.align_projector.weight.std().item()
    assert abs(std - (2 / ENC_DIM) ** 0.5) < 0.1


def test_megatron_style_embedding_is_called_with_ids_and_positions():
    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding(VOCAB, HIDDEN)
            self.seen_positions = None

        def forward(self, input_ids, position_ids=None):
            self.seen_positions = position_ids
            return self.word(input_ids).transpose(0, 1).contiguous()

    emb = SeqFirst()
    module = ImageInsertEmbedding(emb, ENC_DIM, HIDDEN)
    ids = layout([[("image", 2)]], 5)
    positions = torch.arange(5)[None]
    out = module(ids, [ImageForInsert(IM_START, image_features=torch.randn(1, 2, ENC_DIM))], position_ids=positions)
    assert out.shape == (5, 1, HIDDEN) and emb.seen_positions is positions


def test_gradients_flow_to_projector_and_embedding():
    module = make_module()
    ids = layout([[("text", 1), ("image", 2)]], 5)
    out = module(ids, [ImageForInsert(IM_START, image_features=torch.randn(1, 2, ENC_DIM))])
    out.sum().backward()
    assert module.align_projector.weight.grad is not None
    assert module.language_embedding.weight.grad is not None


# ---- strict errors and lenient mode ---------------------------------------------------
def test_missing_features_is_a_clear_value_error():
    module = make_module()
    ids = layout([[("image", 2)]], 5)
    with pytest.raises(ValueError, match=r"images\[0\]\.image_features.*vision tower"):
        module(ids, [ImageForInsert(IM_START, images=torch.zeros(1, 3, 14, 14))])


def test_count_mismatch_names_counts():
    module = make_module()
    ids = layout([[("image", 2), ("image", 2)]], 9)
    with pytest.raises(FeatureCountMismatch, match=r"1 image feature block\(s\) but 2 start token"):
        module(ids, [ImageForInsert(IM_START, image_features=torch.randn(1, 2, ENC_DIM))])


def test_span_past_end_is_an_error_in_strict_mode():
    module = make_module()
    ids = layout([[("text", 3), ("image", 2)]], 6)
    with pytest.raises(SpanOutOfRange, match="past the sequence end"):
        module(ids, [ImageForInsert(IM_START, image_features=torch.randn(1, 4, ENC_DIM))])


def test_placeholder_check():
    module = make_module(placeholder_token_id=IM_PATCH)
    ids = layout([[("image", 3), ("text", 3)]], 8)
    with pytest.raises(PlaceholderMismatch, match="not the placeholder"):
        module(ids, [ImageForInsert(IM_START, image_features=torch.randn(1, 5, ENC_DIM))])


def test_feature_dim_mismatch():
    module = make_module()
    ids = layout([[("image", 2)]], 5)
    with pytest.raises(FeatureDimMismatch, match="projector input dim"):
        module(ids, [ImageForInsert(IM_START, image_features=torch.randn(1, 2, ENC_DIM + 1))])
    assert issubclass(FeatureDimMismatch, ImageInsertError)


def test_lenient_mode_matches_the_seed(caplog):
    torch.manual_seed(5)
    module = make_module(strict=False)
    # Three start tokens, two feature blocks; the second block runs past the end.
    ids = layout([[("image", 2), ("text", 1), ("image", 2), ("image", 1)]], 10)
    ids[0, 8] = IM_PATCH
    feats = [torch.randn(2, ENC_DIM), torch.randn(9, ENC_DIM)]
    images = [ImageForInsert(IM_START, image_features=feats)]
    with torch.no_grad():
        fast = module(ids, images)
        slow = reference_forward(module, ids, images)
    torch.testing.assert_close(fast, slow, **FP32)
    assert "start tokens" in caplog.text


def test_lenient_overlapping_spans_later_image_wins():
    torch.manual_seed(6)
    module = make_module(strict=False)
    ids = torch.tensor([[IM_START, IM_PATCH, IM_START, IM_PATCH, IM_PATCH, 1, 1]])
    feats = [torch.randn(4, ENC_DIM), torch.randn(2, ENC_DIM)]
    images = [ImageForInsert(IM_START, image_features=feats)]
    with torch.no_grad():
        torch.testing.assert_close(module(ids, images), reference_forward(module, ids, images), **FP32)
    with pytest.raises(PlaceholderMismatch, match="overlap"):
        make_module()(ids, images)
