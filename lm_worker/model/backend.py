"""The decoder backend interface the scheduler drives, and its in-process implementation.

The scheduler (continuous batching) only needs: reserve a slot, prefill newcomers from
fused embeddings, run one decode step over any subset of running slots, free a slot.
Keeping that to a handful of methods lets an HF-transformers or Megatron-Core backend
be a new file rather than an ``if`` in the scheduler. Every method returns logits; the
scheduler samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lm_worker.model.compiled import CompiledSteps
from lm_worker.model.decoder import Step37Decoder
from lm_worker.model.graphs import DecodeGraphs, PrefillGraphs
from lm_worker.model.kv_cache import KVCache
from services.common.graphs import padded_batch_sizes

__all__ = ["DecoderBackend", "LocalDecoderBackend"]

logger = logging.getLogger(__name__)


@runtime_checkable
class DecoderBackend(Protocol):
    """What the scheduler needs from a decoder with a per-sequence KV cache."""

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The word embedding ``ImageInsertEmbedding`` borrows to build prefill inputs."""
        ...

    @property
    def max_seq_len(self) -> int:
        """Longest sequence (prompt + generated) one slot can hold."""
        ...

    @property
    def num_free_slots(self) -> int:
        """Slots available to :meth:`allocate` right now."""
        ...

    def allocate(self) -> int:
        """Reserve a slot for a new sequence; raises when none is free."""
        ...

    def prefill(self, slots: Sequence[int], embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        """Append fused embeddings ``[S_i, H]`` to ``slots[i]``; logits ``[n, V]`` of each last position."""
        ...

    def decode(self, slots: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per slot (``token_ids [n]``); logits ``[n, V]``."""
        ...

    def free(self, slot: int) -> None:
        """Release a finished or cancelled sequence's slot."""
        ...


class LocalDecoderBackend:
    """:class:`DecoderBackend` over a :class:`Step37Decoder` and a slot :class:`KVCache`.

    Newcomers are prefilled together in one forward, right-padded to the longest; the
    padding costs compute proportional to the length spread, which is small next to
    one forward per sequence at serving batch sizes. Prefill appends at the slot's
    current length, so a prompt may also be fed in chunks.

    ``cuda_graphs`` (default: on when the decoder is on a GPU) runs decode steps, and the
    prefill of short prompts, as fixed-shape steps replayed from CUDA graphs
    (:mod:`lm_worker.model.graphs`), captured here, once; if capturing fails, they stay
    eager and it says why. On the CPU, ``True`` runs the same fixed-shape steps without
    graphs (for tests).

    ``compile_steps``, the CPU's counterpart (off by default: compiling when the backend
    is built takes up to a minute or so on two cores), runs decode steps and
    prefills compiled by Inductor (:mod:`lm_worker.model.compiled`); if compiling fails,
    they stay eager and it says why. It applies on the CPU only.
    """

    def __init__(self, decoder: Step37Decoder, *, max_batch_size: int, max_seq_len: int,
                 cuda_graphs: bool | None = None, compile_steps: bool = False) -> None:
        self.decoder = decoder.train(False)
        weight = decoder.embed_tokens.weight
        self._device, self._dtype = weight.device, weight.dtype
        on_gpu = self._device.type == "cuda"
        fixed_shapes = on_gpu if cuda_graphs is None else cuda_graphs
        compile_steps = compile_steps and not fixed_shapes and self._device.type == "cpu"
        self.cache: KVCache = decoder.new_kv_cache(
            max_batch_size=max_batch_size, max_seq_len=max_seq_len, scratch_slot=fixed_shapes or compile_steps
        )
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.compiled: CompiledSteps | None = None
        if compile_steps:
            try:
                self.compiled = CompiledSteps(decoder, self.cache)
            except Exception as exc:  # noqa: BLE001 -- a compiler error of any kind: serve eagerly
                logger.warning("compiling the decode step and prefill failed (%s: %s); they stay eager",
                               type(exc).__name__, exc)
        if fixed_shapes:
            try:
                self.graphs = DecodeGraphs(decoder, self.cache, padded_batch_sizes(max_batch_size), capture=on_gpu)
                self.prefill_graphs = PrefillGraphs(decoder, self.cache, capture=on_gpu)
            except RuntimeError as exc:  # pragma: no cover - needs a GPU whose capture fails
                self.graphs = self.prefill_graphs = None
                logger.warning("capturing CUDA graphs failed (%s); prefill and decode stay eager", exc)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    @property
    def num_free_slots(self) -> int:
        return self.cache.num_free_slots

    def allocate(self) -> int:
        return self.cache.allocate()

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    def sequence_length(self, slot: int) -> int:
        """Positions cached for ``slot`` (prompt + tokens decoded so far)."""
        return self.cache.length(slot)

    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(slots) != len(embeddings) or not slots:
            raise ValueError(
                f"need one embedding per slot, got {len(slots)} slots and "
                f"{len(embeddings)} embeddings"
            )
        hidden_size = self.decoder.config.hidden_size
        for slot, emb in zip(slots, embeddings, strict=True):
            if emb.dim() != 2 or emb.shape[0] == 0 or emb.shape[1] != hidden_size:
                raise ValueError(
                    f"slot {slot}: embeddings must be [S, {hidden_size}] with S >= 1, "
                    f"got {list(emb.shape)}"
                )
        lengths = [emb.shape[0] for emb in embeddings]
        longest = max(lengths)
        if self.prefill_graphs is not None and self.prefill_graphs.fits(len(slots), longest):
            starts = self.cache.check_append(slots, lengths, longest)
            logits = self.prefill_graphs.prefill(slots, starts, embeddings)  # [n, V]
            self.cache.advance(slots, lengths)
            return logits
        if self.compiled is not None and self.compiled.fits_prefill(longest):
            starts = self.cache.check_append(slots, lengths, longest)
            logits = self.compiled.prefill(slots, starts, embeddings)  # [n, V]
            self.cache.advance(slots, lengths)
            return logits
        batch = torch.zeros(
            longest, len(slots), hidden_size, dtype=self._dtype, device=self._device
        )  # [S_max, n, H], right-padded
        for row, emb in enumerate(embeddings):
            batch[: emb.shape[0], row] = emb.to(device=self._device, dtype=self._dtype)
        hidden = self.decoder.hidden_states(
            batch, kv_cache=self.cache, slots=list(slots), input_lengths=lengths
        )  # [S_max, n, H]
        last = torch.tensor(lengths, device=self._device) - 1  # [n]
        rows = torch.arange(len(slots), device=self._device)  # [n]
        return self.decoder.compute_logits(hidden[last, rows]).float()  # [n, V]

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.dim() != 1 or token_ids.shape[0] != len(slots):
            raise ValueError(
                f"token_ids must be [{len(slots)}] (one per slot), got {list(token_ids.shape)}"
            )
        steps = self.graphs if self.graphs is not None else self.compiled
        if steps is not None:
            counts = [1] * len(slots)
            starts = self.cache.check_append(slots, counts, 1)
            logits = steps.decode(slots, starts, token_ids.to(dtype=torch.long))  # [n, V]
            self.cache.advance(slots, counts)
            return logits
        token_ids = token_ids.to(device=self._device, dtype=torch.long)
        embedded = self.decoder.embed_tokens(token_ids)[None]  # [1, n, H]
        hidden = self.decoder.hidden_states(embedded, kv_cache=self.cache, slots=list(slots))
        return self.decoder.compute_logits(hidden[0]).float()  # [n, V]
