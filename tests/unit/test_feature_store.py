"""The LM worker's store of named image features: what comes with a name is kept, a name
alone stands for what was kept, least recently used out first within a byte bound."""

from __future__ import annotations

import pytest
import torch

from lm_worker.feature_store import FeaturesNotKept, FeatureStore
from proto import GenerateRequest, ImageForInsert

START = 4


def sent(ref: str, rows: int = 4, seed: int = 0) -> GenerateRequest:
    features = torch.randn(1, rows, 8, generator=torch.Generator().manual_seed(seed))  # 32 floats: 128 bytes per row
    return GenerateRequest(prompt="<image>", images=[ImageForInsert(START, image_features=features)],
                           feature_refs=[ref])


def by_name(ref: str, start: int = START) -> GenerateRequest:
    return GenerateRequest(prompt="<image>", images=[ImageForInsert(start)], feature_refs=[ref])


def test_a_name_alone_stands_for_the_features_kept_under_it() -> None:
    events: list[str] = []
    store = FeatureStore(10_000, on_event=events.append)
    first = sent("a")
    assert store.resolve(first) == [None]  # it brought its own
    store.keep(first, [[b"digest"]])
    request = by_name("a")
    assert store.resolve(request) == [[b"digest"]]
    kept = request.images[0]
    assert kept is not first.images[0] and torch.equal(kept.image_features, first.images[0].image_features)
    assert kept.image_features.data_ptr() != first.images[0].image_features.data_ptr()  # its own copy
    with pytest.raises(FeaturesNotKept) as info:
        store.resolve(by_name("b"))
    assert info.value.field == "feature_refs[0]" and info.value.http_status == 400
    with pytest.raises(FeaturesNotKept):  # the same name for another start token is not the same item
        store.resolve(by_name("a", start=START + 3))
    assert events == ["kept", "hit", "miss", "miss"]


def test_the_store_is_bounded_in_bytes_least_recently_used_out_first() -> None:
    store = FeatureStore(3 * 4 * 8 * 4)  # three 4-row items of float32
    for name in "abc":
        store.keep(sent(name))
    store.resolve(by_name("a"))  # a is now the most recent
    store.keep(sent("d"))
    assert store.bytes == 3 * 128 and len(store) == 3
    with pytest.raises(FeaturesNotKept):
        store.resolve(by_name("b"))
    for name in "acd":
        store.resolve(by_name(name))
    store.keep(sent("huge", rows=40))  # larger than the whole store: not kept, nothing evicted
    assert len(store) == 3
    kept = by_name("a")
    store.resolve(kept)
    store.keep(sent("a", seed=1))  # a kept name keeps what it has: a name stands for one set of features
    again = by_name("a")
    store.resolve(again)
    assert again.images[0] is kept.images[0] and store.bytes == 3 * 128
