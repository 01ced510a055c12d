"""Image features a caller may name again instead of sending them.

A chat that goes on about one photo resends the photo every turn, and the gateway,
whose feature cache answers for the encoder, would ship its features (about 2 MB of
bf16 per image at Step3.7's size) to the LM worker every turn, where they are decoded,
scanned for non-finite values and hashed for the prefix cache again. With
``GenerateRequest.feature_refs`` the worker keeps what it received under the caller's
names; the caller then sends a name alone, and the worker answers 400 naming
``feature_refs[i]`` when it no longer has it, so the caller sends the features again.

Kept per name: the validated item and the digests of its images (the prefix cache's
block keys hash them), least recently used out first, within ``max_bytes``. Requests
are prepared on worker threads, so every method takes the lock.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lm_worker.errors import ClientError
from proto import GenerateRequest, ImageForInsert, feature_nbytes

__all__ = ["FeatureStore", "FeaturesNotKept", "refuse_names"]


class FeaturesNotKept(ClientError):
    kind = "features_not_kept"


def _named_only(request: GenerateRequest) -> list[tuple[int, str]]:
    """(index, name) of each item that came with a name and no features."""
    refs = request.feature_refs or [None] * len(request.images)
    return [(index, ref) for index, (item, ref) in enumerate(zip(request.images, refs, strict=True))
            if ref is not None and item.image_features is None and item.images is None]


def refuse_names(request: GenerateRequest) -> None:
    """What a worker that keeps no features answers an item sent by name alone."""
    for index, ref in _named_only(request):
        raise FeaturesNotKept(f"feature_refs[{index}]", "this worker keeps no features (--feature-store-mb 0): "
                              "send them", ref)


@dataclass(frozen=True)
class _Kept:
    item: ImageForInsert
    digests: list[bytes] | None  # one per image, once something asked for them
    nbytes: int


class FeatureStore:
    """Named ``ImageForInsert`` items, least recently used out first."""

    def __init__(self, max_bytes: int, on_event: Callable[[str], None] | None = None) -> None:
        """``on_event``: called with "hit", "miss" or "kept" (the metrics count them)."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_event = on_event or (lambda event: None)

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def bytes(self) -> int:
        return self._bytes

    def resolve(self, request: GenerateRequest) -> list[list[bytes] | None]:
        """Put the kept item in place of every named item that came without features.

        Returns, per item, the kept digests of its images (None where the item brought
        its own features, or none were kept). Raises :class:`FeaturesNotKept` naming the
        first name it does not have.
        """
        digests: list[list[bytes] | None] = [None] * len(request.images)
        with self._lock:
            for index, ref in _named_only(request):
                kept = self._kept.get(ref)
                if kept is None or kept.item.insert_start_token != request.images[index].insert_start_token:
                    self._on_event("miss")
                    raise FeaturesNotKept(f"feature_refs[{index}]", "these features are no longer kept here; "
                                          "send them again", ref)
                self._kept.move_to_end(ref)
                self._on_event("hit")
                request.images[index] = kept.item
                digests[index] = kept.digests
        return digests

    def keep(self, request: GenerateRequest, digests: list[list[bytes] | None] | None = None) -> None:
        """Keep every named item of a validated request that brought its features
        (``digests``: per item, its images' digests where known).

        A name already kept keeps what it has (a name stands for one set of features: the
        gateway names them by a digest of their content), so a resend is not copied again."""
        if not request.feature_refs:
            return
        digests = digests or [None] * len(request.images)
        for item, ref, item_digests in zip(request.images, request.feature_refs, digests, strict=True):
            with self._lock:
                kept = self._kept.get(ref)
                if kept is not None:
                    self._kept.move_to_end(ref)
                    if kept.digests is None and item_digests is not None and kept.item is item:
                        self._kept[ref] = _Kept(item, item_digests, kept.nbytes)
                    continue
            if item.image_features is None:
                continue
            nbytes = feature_nbytes(item.image_features)
            if nbytes > self.max_bytes:
                continue
            owned = _owned(item)  # the copy outside the lock: a small request's resolve may be waiting on it
            with self._lock:
                if ref in self._kept:  # another request kept it meanwhile
                    continue
                self._kept[ref] = _Kept(owned, item_digests, nbytes)
                self._bytes += nbytes
                self._on_event("kept")
                while self._bytes > self.max_bytes:
                    self._forget(next(iter(self._kept)))

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self._bytes = 0

    def _forget(self, ref: str) -> None:
        self._bytes -= self._kept.pop(ref).nbytes


def _owned(item: ImageForInsert) -> ImageForInsert:
    """``item`` with its own copy of the features (decoded ones are views of the received
    message, which keeping them would keep whole, outside the byte count) and no pixels."""
    features = item.image_features
    return dataclasses.replace(
        item, images=None,
        image_features=features.clone() if isinstance(features, torch.Tensor) else [b.clone() for b in features],
        rope_cu_seqlens=None if item.rope_cu_seqlens is None else item.rope_cu_seqlens.clone())
