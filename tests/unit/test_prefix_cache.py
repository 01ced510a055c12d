"""Prefix cache: chained block keys name exactly what determines a block, and a prompt
started from cached blocks gives the logits of one prefilled whole."""

from __future__ import annotations

import pytest
import torch

from lm_worker.model import DecoderConfig, LocalDecoderBackend, Step37Decoder
from lm_worker.prefix_cache import PrefixCache, prefix_block_keys
from proto import ImageForInsert

START, PATCH = 4, 5
BLOCK = 4


def prompt_with_image(text_before: list[int], rows: int, text_after: list[int]) -> list[int]:
    return [*text_before, START, *[PATCH] * rows, *text_after]


def image(seed: int, rows: int = 6, dim: int = 8, dtype: torch.dtype = torch.float32) -> ImageForInsert:
    features = torch.randn(1, rows, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return ImageForInsert(START, image_features=features)


def test_keys_cover_the_full_blocks_before_the_last_position() -> None:
    ids = list(range(10, 19))  # 9 positions: 8 before the last → 2 blocks of 4
    assert len(prefix_block_keys(ids, [], BLOCK)) == 2
    assert len(prefix_block_keys(ids[:8], [], BLOCK)) == 1  # 7 before the last
    assert prefix_block_keys(ids[:4], [], BLOCK) == []
    assert prefix_block_keys(ids, [], BLOCK) == prefix_block_keys(list(ids), [], BLOCK)


def test_a_changed_token_changes_its_block_and_every_later_one() -> None:
    ids = list(range(10, 23))  # 3 blocks
    changed = list(ids)
    changed[5] = 99  # in block 1
    a, b = prefix_block_keys(ids, [], BLOCK), prefix_block_keys(changed, [], BLOCK)
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]


def test_image_content_enters_the_key_from_the_block_of_its_start_token() -> None:
    ids = prompt_with_image([1, 2, 3, 9, 9], rows=6, text_after=[7, 7, 7])  # start token at 5: block 1
    first = prefix_block_keys(ids, [image(1)], BLOCK)
    again = prefix_block_keys(ids, [image(1)], BLOCK)
    other = prefix_block_keys(ids, [image(2)], BLOCK)
    assert first == again
    assert first[0] == other[0] and all(x != y for x, y in zip(first[1:], other[1:], strict=True))
    # The same values in another dtype are other features on the wire: not the same prefix.
    bf16 = image(1, dtype=torch.bfloat16)
    widened = ImageForInsert(START, image_features=bf16.image_features.float())
    assert prefix_block_keys(ids, [bf16], BLOCK)[1] != prefix_block_keys(ids, [widened], BLOCK)[1]


def test_a_salt_keeps_prefixes_to_requests_of_the_same_salt() -> None:
    ids = prompt_with_image([1, 2, 3], rows=6, text_after=[7] * 8)  # 18 positions: 4 blocks
    plain = prefix_block_keys(ids, [image(1)], BLOCK)
    salted = prefix_block_keys(ids, [image(1)], BLOCK, "tenant-a")
    assert salted == prefix_block_keys(ids, [image(1)], BLOCK, "tenant-a")
    other = prefix_block_keys(ids, [image(1)], BLOCK, "tenant-b")
    for keys in (plain, other):  # no block of one matches any block of the other
        assert len(keys) == len(salted) == 4 and not set(keys) & set(salted)


def test_images_that_do_not_pair_with_start_tokens_are_not_cached() -> None:
    ids = prompt_with_image([1, 2, 3], rows=6, text_after=[7] * 8)
    two = ImageForInsert(START, image_features=torch.randn(2, 6, 8))
    assert prefix_block_keys(ids, [two], BLOCK) == []


@pytest.fixture(scope="module")
def decoder() -> Step37Decoder:
    torch.manual_seed(0)
    config = DecoderConfig.preset("step37-tiny", vocab_size=64, max_position_embeddings=128)
    return Step37Decoder(config).train(False).requires_grad_(False)


def test_a_prompt_started_from_cached_blocks_matches_one_prefilled_whole(decoder: Step37Decoder) -> None:
    backend = LocalDecoderBackend(decoder, max_batch_size=4, max_seq_len=128)
    cache = PrefixCache(backend.cache, block_size=BLOCK, max_blocks=16)
    hidden = decoder.config.hidden_size
    prompt = torch.randn(23, hidden, generator=torch.Generator().manual_seed(3))  # [S, H]
    keys = [bytes([i]) for i in range((23 - 1) // BLOCK)]  # 5 blocks: positions 0..19

    whole = backend.allocate()
    reference = backend.prefill([whole], [prompt])  # [1, V]
    assert cache.store(whole, keys) == 5
    assert cache.store(whole, keys) == 0  # held already

    reused = backend.allocate()
    blocks = cache.match(keys)
    assert len(blocks) == 5
    assert cache.load(reused, blocks) == 20
    for layer in range(decoder.config.num_layers):  # the copy is exact
        assert torch.equal(backend.cache.keys[layer][reused, :, :20], backend.cache.keys[layer][whole, :, :20])
        assert torch.equal(backend.cache.values[layer][reused, :, :20], backend.cache.values[layer][whole, :, :20])
    logits = backend.prefill([reused], [prompt[20:]])
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)

    token = torch.tensor([int(reference.argmax())])
    step_whole = backend.decode([whole], token)
    step_reused = backend.decode([reused], token)
    torch.testing.assert_close(step_reused, step_whole, rtol=1e-4, atol=1e-4)
    assert backend.sequence_length(reused) == backend.sequence_length(whole) == 24


def test_match_stops_at_the_first_missing_block_and_eviction_is_least_recent(decoder: Step37Decoder) -> None:
    backend = LocalDecoderBackend(decoder, max_batch_size=2, max_seq_len=128)
    cache = PrefixCache(backend.cache, block_size=BLOCK, max_blocks=3)
    slot = backend.allocate()
    backend.prefill([slot], [torch.randn(13, decoder.config.hidden_size)])
    assert cache.store(slot, [b"a", b"b", b"c"]) == 3
    assert len(cache.match([b"a", b"x", b"c"])) == 1
    cache.match([b"b"])  # a, b recently used: c is the least recent
    assert cache.store(slot, [b"d"]) == 1
    assert len(cache) == 3
    assert cache.match([b"c"]) == [] and len(cache.match([b"a", b"b"])) == 2
    # A prompt longer than the pool keeps its first blocks only.
    assert cache.store(slot, [b"p", b"q", b"r"]) == 3
    assert len(cache.match([b"p", b"q", b"r"])) == 3


def test_load_refuses_a_slot_that_holds_positions(decoder: Step37Decoder) -> None:
    backend = LocalDecoderBackend(decoder, max_batch_size=2, max_seq_len=128)
    cache = PrefixCache(backend.cache, block_size=BLOCK, max_blocks=4)
    slot = backend.allocate()
    backend.prefill([slot], [torch.randn(9, decoder.config.hidden_size)])
    cache.store(slot, [b"a"])
    with pytest.raises(ValueError, match="already holds"):
        cache.load(slot, cache.match([b"a"]))
    with pytest.raises(ValueError, match="fewer than"):
        cache.store(slot, [b"a", b"b", b"c"])


def test_within_sizes_the_pool_by_bytes(decoder: Step37Decoder) -> None:
    backend = LocalDecoderBackend(decoder, max_batch_size=2, max_seq_len=128)
    config = decoder.config
    block_bytes = 2 * config.num_layers * config.num_kv_heads * BLOCK * config.head_dim * 4
    cache = PrefixCache.within(backend.cache, block_size=BLOCK, max_bytes=10 * block_bytes + 1)
    assert cache is not None and cache.max_blocks == 10
    assert PrefixCache.within(backend.cache, block_size=BLOCK, max_bytes=block_bytes - 1) is None


def test_eviction_takes_a_prompts_tail_before_its_head(decoder: Step37Decoder) -> None:
    backend = LocalDecoderBackend(decoder, max_batch_size=2, max_seq_len=128)
    cache = PrefixCache(backend.cache, block_size=BLOCK, max_blocks=3)
    slot = backend.allocate()
    backend.prefill([slot], [torch.randn(13, decoder.config.hidden_size)])
    cache.store(slot, [b"a", b"b", b"c"])
    cache.store(slot, [b"d"])  # evicts the prompt's last block, not its first
    assert len(cache.match([b"a", b"b", b"c"])) == 2


def test_a_failed_copy_leaves_no_block_that_could_be_found(decoder: Step37Decoder, monkeypatch) -> None:
    backend = LocalDecoderBackend(decoder, max_batch_size=2, max_seq_len=128)
    cache = PrefixCache(backend.cache, block_size=BLOCK, max_blocks=2)
    slot = backend.allocate()
    backend.prefill([slot], [torch.randn(13, decoder.config.hidden_size)])
    cache.store(slot, [b"a", b"b"])

    def out_of_memory(*args: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cache, "_copy_out", out_of_memory)
    with pytest.raises(RuntimeError):
        cache.store(slot, [b"x", b"y"])  # evicts a and b, then fails to write x and y
    assert cache.match([b"x"]) == [] and cache.match([b"a"]) == [] and len(cache) == 0
    monkeypatch.undo()
    assert cache.store(slot, [b"x", b"y"]) == 2 and len(cache.match([b"x", b"y"])) == 2
