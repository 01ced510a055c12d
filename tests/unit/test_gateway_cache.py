"""The feature cache: LRU by bytes, keys, single-flight; and per-image feature slices."""

from __future__ import annotations

import asyncio
import base64

import pytest
import torch
from gateway_fakes import FakeEncoder, harness, png

from proto import ImageForInsert
from services.gateway.cache import FeatureCache, FeatureKey
from services.gateway.errors import InvalidImage, UpstreamError
from services.gateway.features import EncodedImage, join_encoded, split_image_for_insert


def run(coro):
    return asyncio.run(coro)


def key(name: str, model: str = "m", dtype: str = "bfloat16") -> FeatureKey:
    return FeatureKey(name, model, dtype)


def encoded(tokens: int = 4, dim: int = 8, fill: float = 0.0) -> EncodedImage:
    return EncodedImage(torch.full((tokens, dim), fill, dtype=torch.bfloat16), 4, tokens * 4)


# ---- LRU ----------------------------------------------------------------------------

def test_lru_is_bounded_in_bytes_and_evicts_least_recently_used():
    entry_bytes = encoded().nbytes  # 4 × 8 × 2
    cache = FeatureCache(max_bytes=3 * entry_bytes)
    for name in "abc":
        cache.put(key(name), encoded())
    assert cache.bytes == 3 * entry_bytes and len(cache) == 3
    assert cache.get(key("a")) is not None  # a is now the most recent
    cache.put(key("d"), encoded())
    assert key("b") not in cache and all(key(n) in cache for n in "acd")
    cache.put(key("e"), encoded(tokens=8))  # twice the size: two evictions
    assert [n for n in "acde" if key(n) in cache] == ["d", "e"]
    assert cache.stats.evictions == 3 and cache.bytes == 3 * entry_bytes
    cache.put(key("huge"), encoded(tokens=100))  # larger than the whole cache: not kept
    assert key("huge") not in cache and cache.stats.rejected == 1 and len(cache) == 2


def test_replacing_an_entry_keeps_the_byte_count_exact():
    cache = FeatureCache(max_bytes=10_000)
    cache.put(key("a"), encoded(tokens=4))
    cache.put(key("a"), encoded(tokens=8))
    assert cache.bytes == encoded(tokens=8).nbytes and len(cache) == 1


def test_keys_separate_model_and_dtype():
    async def scenario():
        cache = FeatureCache(max_bytes=10_000)
        calls = []

        async def load(keys):
            calls.append(list(keys))
            return {k: encoded() for k in keys}

        for k in (key("x"), key("x", model="other"), key("x", dtype="float16"), key("x")):
            await cache.lookup([k], load).wait()
        assert len(calls) == 3 and cache.stats.hits == 1 and cache.stats.misses == 3

    run(scenario())


# ---- single-flight ------------------------------------------------------------------

def test_concurrent_lookups_share_one_load_and_duplicates_are_loaded_once():
    async def scenario():
        cache = FeatureCache(max_bytes=10_000)
        release = asyncio.Event()
        calls = []

        async def load(keys):
            calls.append(list(keys))
            await release.wait()
            return {k: encoded(fill=i) for i, k in enumerate(keys)}

        first = cache.lookup([key("a"), key("b"), key("a")], load)
        second = cache.lookup([key("b")], load)
        third = cache.lookup([key("b"), key("c")], load)
        waits = [asyncio.ensure_future(lookup.wait()) for lookup in (first, second, third)]
        await asyncio.sleep(0)
        release.set()
        a_b_a, b, b_c = await asyncio.gather(*waits)
        assert calls == [[key("a"), key("b")], [key("c")]]
        assert a_b_a[0] is a_b_a[2] and a_b_a[1] is b[0] is b_c[0]
        assert cache.stats.misses == 3 and cache.stats.coalesced == 2

    run(scenario())


def test_a_waiter_leaving_does_not_cancel_the_shared_encode_but_the_last_one_does():
    async def scenario():
        cache = FeatureCache(max_bytes=10_000)
        release = asyncio.Event()
        cancelled = []

        async def load(keys):
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.append(keys)
                raise
            return {k: encoded() for k in keys}

        leaving = asyncio.ensure_future(cache.lookup([key("a")], load).wait())
        staying = asyncio.ensure_future(cache.lookup([key("a")], load).wait())
        await asyncio.sleep(0.01)
        leaving.cancel()
        await asyncio.sleep(0.01)
        release.set()
        assert len(await staying) == 1 and cancelled == []

        release.clear()
        alone = asyncio.ensure_future(cache.lookup([key("b")], load).wait())
        await asyncio.sleep(0.01)
        alone.cancel()
        await asyncio.sleep(0.01)
        assert cancelled == [[key("b")]]
        # the abandoned key is not stuck "in flight": a new request loads it afresh
        release.set()
        assert len(await cache.lookup([key("b")], load).wait()) == 1

    run(scenario())


def test_a_joiner_reloads_when_the_shared_batch_failed_on_someone_elses_image():
    async def scenario():
        cache = FeatureCache(max_bytes=10_000)
        release = asyncio.Event()

        async def load(keys):
            await release.wait()
            if key("bad") in keys:
                raise InvalidImage("bad image")
            return {k: encoded() for k in keys}

        owner = asyncio.ensure_future(cache.lookup([key("good"), key("bad")], load).wait())
        joiner = asyncio.ensure_future(cache.lookup([key("good")], load).wait())
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(InvalidImage):
            await owner
        assert len(await joiner) == 1 and key("good") in cache

    run(scenario())


def test_server_errors_of_a_shared_encode_reach_every_waiter():
    async def scenario():
        cache = FeatureCache(max_bytes=10_000)

        async def load(keys):
            await asyncio.sleep(0.01)
            raise UpstreamError("encoder down")

        waits = [cache.lookup([key("a")], load).wait() for _ in range(3)]
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert all(isinstance(r, UpstreamError) for r in results)
        assert key("a") not in cache

    run(scenario())


# ---- through the app ----------------------------------------------------------------

def test_a_cached_image_skips_the_encoder():
    async def scenario():
        h = harness()
        image = base64.b64encode(png()).decode()
        first = await h.client.post("/v1/captions", json={"image": image})
        second = await h.client.post("/v1/captions", json={"image": image})
        assert first.json()["captions"] == second.json()["captions"]
        assert h.encoder.images_encoded == 1
        assert "encode" in first.json()["timings"] and "encode" not in second.json()["timings"]
        metrics = (await h.client.get("/metrics")).text
        assert "step37_gateway_cache_hits_total 1.0" in metrics
        assert f"step37_gateway_cache_bytes {float(h.state.cache.bytes)}" in metrics and h.state.cache.bytes > 0

    run(scenario())


def test_concurrent_requests_for_one_image_make_one_encode():
    async def scenario():
        h = harness(FakeEncoder(delay_s=0.2))
        files = {"file": ("same.png", png(), "image/png")}
        responses = await asyncio.gather(*(h.client.post("/v1/captions", files=files) for _ in range(5)))
        assert all(r.status_code == 200 for r in responses)
        assert len({tuple(r.json()["captions"]) for r in responses}) == 1
        assert len(h.encoder.calls) == 1
        assert h.state.cache.stats.coalesced == 4

    run(scenario())


def test_cache_disabled_still_serves():
    async def scenario():
        h = harness(cache_bytes=0)
        image = base64.b64encode(png()).decode()
        for _ in range(2):
            assert (await h.client.post("/v1/captions", json={"image": image})).status_code == 200
        assert h.encoder.images_encoded == 2 and len(h.state.cache) == 0

    run(scenario())


# ---- feature slices -----------------------------------------------------------------

def test_split_and_join_keep_order_lengths_and_rope_metadata():
    features = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4).bfloat16()  # [N, L, C]
    item = ImageForInsert(7, image_features=features, rope_cu_seqlens=torch.tensor([0, 12, 24], dtype=torch.int32),
                          rope_max_seq_len=12)
    first, second = split_image_for_insert(item, 2)
    assert torch.equal(first.features, features[0]) and first.rope_seqlen == 12
    assert first.features.untyped_storage().data_ptr() != features.untyped_storage().data_ptr()  # owns its bytes
    joined = join_encoded([second, first])
    assert torch.equal(joined.image_features, torch.stack([features[1], features[0]]))
    assert joined.rope_cu_seqlens.tolist() == [0, 12, 24] and joined.insert_start_token == 7
    joined.validate(require_features=True)

    short = EncodedImage(torch.zeros(2, 4, dtype=torch.bfloat16), 7, 8)
    mixed = join_encoded([first, short])  # different L: the list form
    assert isinstance(mixed.image_features, list) and mixed.feature_lengths() == [3, 2]
    assert mixed.rope_cu_seqlens.tolist() == [0, 12, 20] and mixed.rope_max_seq_len == 12
    mixed.validate(require_features=True)

    with pytest.raises(UpstreamError, match="answered 2 images for 3"):
        split_image_for_insert(item, 3)
    with pytest.raises(UpstreamError, match="disagree"):
        join_encoded([first, EncodedImage(first.features, 8, None)])
