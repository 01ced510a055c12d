"""Image-insert word embedding for Step3.7: project vision features, scatter them in.

``ImageInsertEmbedding`` owns the align projector (``nn.Linear(encoder_output_dim,
hidden_size)``, checkpoint name ``vit_large_projector``) and *borrows* the decoder's
word embedding. For every ``ImageForInsert`` it finds each ``insert_start_token`` in
``input_ids`` (row-major: batch, then position), and overwrites the ``L`` rows after
it — the ``<im_patch>`` placeholders — with that image's projected features. The
result is the sequence-first ``[S, B, H]`` tensor the decoder takes as
``decoder_input``.

The fast path does, per ``ImageForInsert``, one projection matmul over all images'
rows and one ``index_copy_`` into the embedding; start positions are found on the
host copy of ``input_ids`` (which serving keeps on the CPU anyway), so there is no
per-image Python loop over tensors and no device→host sync per image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from lm_worker.errors import (
    FeatureCountMismatch,
    FeatureDimMismatch,
    ImageInsertError,
    PlaceholderMismatch,
    SpanOutOfRange,
)
from proto import ImageForInsert, feature_blocks, to_device

__all__ = ["ImageForInsert", "ImageInsertEmbedding", "LanguageEmbedding"]

logger = logging.getLogger(__name__)

Features = torch.Tensor | list[torch.Tensor]


class LanguageEmbedding(Protocol):
    """A Megatron-Core style embedding: ``[B, S]`` ids → ``[S, B, H]``.

    A plain ``nn.Embedding`` is accepted too (it is called on the transposed ids).
    """

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor: ...


class ImageInsertEmbedding(nn.Module):
    """Word embedding + image-feature projection + ``<im_start>`` scatter-insert.

    ``strict`` (default) turns every mismatch between features and the token layout
    into an ``ImageInsertError`` naming the counts; ``strict=False`` keeps the
    lenient behaviour of the original module (use the overlap, clip at the sequence
    end, log a warning). ``placeholder_token_id`` (``<im_patch>``), when known, lets
    strict mode also check that a block only overwrites placeholders.
    """

    def __init__(
        self,
        language_embedding: nn.Module,
        encoder_output_dim: int,
        hidden_size: int,
        projector_bias: bool = False,
        *,
        placeholder_token_id: int | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__()
        # Borrowed, not owned: bypass nn.Module registration so the decoder's embedding
        # weight is not counted twice in parameters() / state_dict().
        object.__setattr__(self, "language_embedding", language_embedding)
        self.encoder_output_dim = encoder_output_dim
        self.hidden_size = hidden_size
        self.placeholder_token_id = placeholder_token_id
        self.strict = strict
        self.align_projector = nn.Linear(encoder_output_dim, hidden_size, bias=projector_bias)
        nn.init.kaiming_normal_(self.align_projector.weight, mode="fan_in", nonlinearity="relu")
        if projector_bias:
            nn.init.zeros_(self.align_projector.bias)

    # ---- the seed's static helpers ---------------------------------------------------
    @staticmethod
    def _normalize_feature_list(
        image_features: Features, *, device: torch.device, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """One ``[L, C]`` tensor per image on ``device``/``dtype`` (views when possible)."""
        return [block.to(device=device, dtype=dtype) for block in feature_blocks(image_features)]

    @staticmethod
    def insert_features(
        input_embeddings: torch.Tensor,
        image_features: Features,
        input_ids: torch.Tensor,
        flag: int,
        *,
        strict: bool = True,
        placeholder_token_id: int | None = None,
    ) -> torch.Tensor:
        """Scatter already-projected feature rows after each ``flag`` token.

        ``input_embeddings`` is sequence-first ``[S, B, H]``; ``image_features`` is
        ``[N, L, H]`` or a list of ``[L, H]`` / ``[N, L, H]``. Returns a new tensor:
        the input is not modified.
        """
        out = input_embeddings.clone()
        rows, lengths = _flatten_rows(image_features, out.device, out.dtype)
        _insert_rows_(out, rows, lengths, input_ids, flag, strict=strict,
                      placeholder_token_id=placeholder_token_id, field="image_features")
        return out

    # ---- forward ---------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        images: Sequence[ImageForInsert] | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """``input_ids`` ``[B, S]`` + pre-encoded images → fused ``[S, B, H]``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {list(input_ids.shape)}")
        embeddings = self._embed(input_ids, position_ids)  # [S, B, H]
        if not images:
            return embeddings
        weight = self.align_projector.weight
        host_ids = input_ids if input_ids.device.type == "cpu" else input_ids.cpu()  # at most one sync
        for i, item in enumerate(images):
            field = f"images[{i}]"
            if item.image_features is None:
                raise ImageInsertError(
                    f"{field}.image_features",
                    "is None: run the vision tower upstream and send its features",
                )
            rows, lengths = _flatten_rows(item.image_features, weight.device, weight.dtype)  # [T, C]
            if rows.shape[-1] != self.encoder_output_dim:
                raise FeatureDimMismatch(
                    f"{field}.image_features",
                    f"feature dim {rows.shape[-1]} != projector input dim {self.encoder_output_dim}",
                )
            projected = self.align_projector(rows)  # [T, H]
            # In place into the embedding computed just above: no extra full-size copy.
            _insert_rows_(embeddings, projected, lengths, host_ids, item.insert_start_token,
                          strict=self.strict, placeholder_token_id=self.placeholder_token_id,
                          field=f"{field}.image_features")
        return embeddings

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        embedding = self.language_embedding
        if isinstance(embedding, nn.Embedding):
            # Embedding the transposed ids yields [S, B, H] directly and contiguously,
            # cheaper than transposing [B, S, H] activations afterwards. Host ids (the
            # fast path: start tokens are found on them) go over in one pinned copy.
            return embedding(to_device(input_ids, embedding.weight.device).t())
        out = embedding(input_ids=input_ids, position_ids=position_ids)
        batch, seq = input_ids.shape
        if out.dim() != 3 or out.shape[0] != seq or out.shape[1] != batch:
            raise ValueError(f"language_embedding must return [S, B, H] = [{seq}, {batch}, H], got {list(out.shape)}")
        return out


def _flatten_rows(features: Features, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """All images' feature rows as one ``[T, C]`` tensor, plus each image's ``L``."""
    if isinstance(features, torch.Tensor):
        if features.dim() != 3:
            raise ImageInsertError("image_features", f"expected [N, L, C], got {list(features.shape)}")
        count, length, dim = features.shape
        rows = features.reshape(count * length, dim)  # [N·L, C]
        lengths = [length] * count
    else:
        blocks = list(feature_blocks(features))
        if not blocks:
            raise ImageInsertError("image_features", "empty list of feature blocks")
        lengths = [int(block.shape[0]) for block in blocks]
        rows = torch.cat(blocks, dim=0)  # [ΣL, C]
    return to_device(rows, device, dtype), lengths  # pinned, asynchronous, cast on the device


def _insert_rows_(
    embeddings: torch.Tensor,
    rows: torch.Tensor,
    lengths: list[int],
    input_ids: torch.Tensor,
    flag: int,
    *,
    strict: bool,
    placeholder_token_id: int | None,
    field: str,
) -> None:
    """Write ``rows`` (``[ΣL, H]``) into ``embeddings`` (``[S, B, H]``) in place."""
    seq, batch, hidden = embeddings.shape
    host_ids = input_ids if input_ids.device.type == "cpu" else input_ids.cpu()
    if host_ids.shape != (batch, seq):
        raise ValueError(f"input_ids {list(host_ids.shape)} does not match embeddings [S={seq}, B={batch}, H]")
    if rows.shape != (sum(lengths), hidden):
        raise FeatureDimMismatch(field, f"projected rows {list(rows.shape)} do not fit hidden size {hidden}")
    starts = (host_ids == flag).nonzero()  # [K, 2] (b, s), row-major order
    if starts.shape[0] != len(lengths):
        if strict:
            raise FeatureCountMismatch(field, len(lengths), int(starts.shape[0]), flag)
        count = min(len(lengths), int(starts.shape[0]))
        logger.warning("%d feature blocks for %d start tokens (id %d): inserting the first %d",
                       len(lengths), starts.shape[0], flag, count)
        starts, lengths = starts[:count], lengths[:count]
        rows = rows[: sum(lengths)]
    if not lengths:
        return
    lengths_t = torch.tensor(lengths)
    total = int(rows.shape[0])
    # Row j of block i lands at s_i + 1 + j: expand per-block values to per-row.
    block_first_row = torch.cumsum(lengths_t, 0) - lengths_t
    within = torch.arange(total) - block_first_row.repeat_interleave(lengths_t, output_size=total)
    b_index = starts[:, 0].repeat_interleave(lengths_t, output_size=total)  # [T]
    s_index = (starts[:, 1] + 1).repeat_interleave(lengths_t, output_size=total) + within  # [T]
    keep: torch.Tensor | None = None
    inside = s_index < seq
    if not bool(inside.all()):
        block = int(torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)[~inside][0])
        if strict:
            raise SpanOutOfRange(
                f"{field}[{block}]",
                f"{lengths[block]} rows after the start token at (batch {int(starts[block, 0])}, "
                f"position {int(starts[block, 1])}) run past the sequence end ({seq})",
            )
        logger.warning("image block %d runs past the sequence end (%d): clipped", block, seq)
        keep = inside
    if strict:
        _check_targets(host_ids, b_index, s_index, flag, placeholder_token_id, field)
    flat = s_index * batch + b_index  # row index into the [S·B, H] view
    if keep is not None:
        flat = flat[keep]
    if not strict:
        keep_last = _last_write_wins(flat)
        if keep_last is not None:
            flat = flat[keep_last]
            keep = keep_last if keep is None else keep.nonzero().squeeze(1)[keep_last]
    if keep is not None:
        rows = rows[keep.to(rows.device)]
    flat = to_device(flat, embeddings.device)
    rows = rows.to(embeddings.dtype)
    if embeddings.is_contiguous():
        embeddings.view(seq * batch, hidden).index_copy_(0, flat, rows)
    else:
        embeddings.index_put_((flat // batch, flat % batch), rows)


def _check_targets(host_ids: torch.Tensor, b_index: torch.Tensor, s_index: torch.Tensor, flag: int,
                   placeholder_token_id: int | None, field: str) -> None:
    targets = host_ids[b_index, s_index]  # ids the rows would overwrite
    if bool((targets == flag).any()):
        raise PlaceholderMismatch(field, f"image spans overlap: a block would overwrite a start token (id {flag})")
    if placeholder_token_id is not None:
        wrong = (targets != placeholder_token_id).nonzero()
        if wrong.numel():
            j = int(wrong[0, 0])
            raise PlaceholderMismatch(
                field,
                f"position (batch {int(b_index[j])}, {int(s_index[j])}) holds token {int(targets[j])}, "
                f"not the placeholder {placeholder_token_id}",
            )


def _last_write_wins(flat: torch.Tensor) -> torch.Tensor | None:
    """Indices into ``flat`` keeping only the last write to each row (None: no repeats).

    Overlapping spans are only possible in lenient mode; a sequential loop would let
    the later image win, and ``index_copy_`` with repeated indices promises no order.
    """
    unique, inverse = torch.unique(flat, return_inverse=True)
    if unique.numel() == flat.numel():
        return None
    order = torch.arange(flat.numel())
    last = torch.full((unique.numel(),), -1, dtype=torch.long).scatter_reduce_(0, inverse, order, reduce="amax")
    return last
