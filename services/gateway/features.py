"""Per-image features: split an encoder's batch answer, join a request's images.

The encoder answers one ``ImageForInsert`` for a whole batch, but the cache and the
LM requests work per image: a cached image may join a request with fresh ones, and a
captions request sends each image to its own generate call. ``EncodedImage`` is one
image's slice, copied out of the received message so it owns exactly its bytes (the
cache accounts them honestly and the message buffer can be freed), with a digest of
its content: what the LM worker keeps it under (:func:`features_name`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from proto import ImageForInsert, feature_blocks
from services.gateway.errors import UpstreamError

__all__ = ["EncodedImage", "features_name", "join_encoded", "split_image_for_insert"]


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """One image's vision features and the metadata the LM worker needs with them."""

    features: torch.Tensor  # [L, C]
    insert_start_token: int
    rope_seqlen: int | None  # this image's patch count in the tower's 2D RoPE
    digest: bytes = field(init=False)  # of everything above: the same digest, the same features

    def __post_init__(self) -> None:
        features = self.features.contiguous()
        digest = hashlib.blake2b(f"{features.dtype}{list(features.shape)}/{self.insert_start_token}/"
                                 f"{self.rope_seqlen}".encode(), digest_size=16)
        digest.update(features.view(torch.uint8).numpy())
        object.__setattr__(self, "digest", digest.digest())

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


def split_image_for_insert(item: ImageForInsert, expected_images: int, *, service: str = "encoder") -> list[EncodedImage]:
    """One ``EncodedImage`` per image, in order; a wrong count is the downstream's fault."""
    if item.image_features is None:
        raise UpstreamError(f"the {service} answered without image_features")
    blocks = list(feature_blocks(item.image_features))  # N × [L, C]
    if len(blocks) != expected_images:
        raise UpstreamError(f"the {service} answered {len(blocks)} images for {expected_images} sent")
    seqlens: list[int | None] = [None] * len(blocks)
    if item.rope_cu_seqlens is not None:
        cu = item.rope_cu_seqlens.tolist()
        if len(cu) != len(blocks) + 1:
            raise UpstreamError(f"the {service} answered {len(cu)} rope_cu_seqlens for {len(blocks)} images")
        seqlens = [end - start for start, end in zip(cu, cu[1:], strict=False)]
    return [EncodedImage(block.clone(), item.insert_start_token, seqlen)
            for block, seqlen in zip(blocks, seqlens, strict=True)]


def features_name(images: Sequence[EncodedImage], cache_salt: str | None = None) -> str:
    """The name an LM worker keeps these images' features under, sent together in this
    order (``GenerateRequest.feature_refs``): a digest of their contents, so a name
    stands for exactly one set of features whoever sent it, and of the request's salt,
    so tenants do not learn by a faster send that another sent the same image."""
    digest = hashlib.blake2b((cache_salt or "").encode(), digest_size=16, person=b"salted" if cache_salt else b"")
    for image in images:
        digest.update(image.digest)
    return digest.hexdigest()


def join_encoded(images: Sequence[EncodedImage]) -> ImageForInsert:
    """The ``ImageForInsert`` for a request's images, in prompt order.

    Equal token counts stack into one ``[N, L, C]`` tensor (the common case, one
    contiguous buffer on the wire); otherwise the list form carries ``[L, C]`` blocks.
    """
    if not images:
        raise ValueError("join_encoded needs at least one image")
    tokens = {image.insert_start_token for image in images}
    if len(tokens) != 1:
        raise UpstreamError(f"encoder endpoints disagree on insert_start_token: {sorted(tokens)}")
    lengths = {int(image.features.shape[0]) for image in images}
    if len(lengths) == 1:
        features: torch.Tensor | list[torch.Tensor] = torch.stack([image.features for image in images])  # [N, L, C]
    else:
        features = [image.features for image in images]  # N × [L_i, C]
    rope_cu_seqlens = None
    rope_max_seq_len = None
    seqlens = [image.rope_seqlen for image in images]
    if all(seqlen is not None for seqlen in seqlens):
        counts = [int(seqlen) for seqlen in seqlens if seqlen is not None]
        rope_cu_seqlens = torch.tensor(list(accumulate(counts, initial=0)), dtype=torch.int32)  # [N+1]
        rope_max_seq_len = max(counts)
    return ImageForInsert(insert_start_token=tokens.pop(), image_features=features,
                          rope_cu_seqlens=rope_cu_seqlens, rope_max_seq_len=rope_max_seq_len)
