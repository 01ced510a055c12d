"""Slot-based KV cache for continuous batching.

Each running sequence owns one *slot*: a row of preallocated K and V tensors
``[max_batch_size, num_kv_heads, max_seq_len, head_dim]`` per layer (the layout of
gpt-fast and TGI's non-paged cache). Requests join and leave between decode steps, so
one forward pass runs over an arbitrary subset of slots, each at its own length and
its own RoPE positions. A forward pass goes through three calls:

1. :meth:`KVCache.plan` turns ``(slots, input_lengths, step_len)`` into a
   :class:`CacheStep`: per-row positions, the scatter indices of the new tokens and
   the attention mask over every slot's valid keys. Computed once, shared by layers.
2. :meth:`KVCache.update` (per layer) writes the new K/V and returns the keys/values
   the step attends over.
3. :meth:`KVCache.commit` advances the lengths once every layer has written.

Lengths live on the host as Python ints: the scheduler reads them every step and a
device tensor would cost a sync per read.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["CacheCapacityError", "CacheStep", "KVCache"]


class CacheCapacityError(RuntimeError):
    """No free slot, an unknown slot, or a sequence that would outgrow ``max_seq_len``.

    A server error from the client's point of view only when the scheduler failed to
    check capacity first; the scheduler should reject or queue before reaching here.
    """


@dataclass(frozen=True)
class CacheStep:
    """Everything a layer needs to write to and read from the cache for one step.

    ``B`` rows (one per slot), ``S`` new positions per row (right-padded), ``T`` the
    longest attended length in this step.
    """

    slots: torch.Tensor  # [B] long, device
    positions: torch.Tensor  # [B, S] long: absolute RoPE position of each new token
    write_rows: torch.Tensor  # [W] long: batch row of each valid new token
    write_cols: torch.Tensor  # [W] long: column (0..S-1) of each valid new token
    write_slots: torch.Tensor  # [W] long: cache slot of each valid new token
    write_positions: torch.Tensor  # [W] long: cache position of each valid new token
    attention_mask: torch.Tensor  # [B, 1, S, T] bool, True = attend
    slot_ids: tuple[int, ...]
    input_lengths: tuple[int, ...]
    total_length: int  # T
    slot_span: slice | None  # the slots as one ascending run (a view, not a gather), if they are
    dense: bool  # every row writes all S columns (decode, equal-length prefill): no gather needed


class KVCache:
    """Preallocated per-layer K/V storage with a free-slot list and per-slot lengths."""

    def __init__(
        self,
        *,
        num_layers: int,
        max_batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        scratch_slot: bool = False,
    ) -> None:
        """``scratch_slot``: one more row, never handed out, that fixed-shape steps
        (:mod:`lm_worker.model.graphs`) point their padding rows at."""
        if max_batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(
                f"max_batch_size and max_seq_len must be positive, got "
                f"{max_batch_size} and {max_seq_len}"
            )
        shape = (max_batch_size + int(scratch_slot), num_kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.scratch_slot: int | None = max_batch_size if scratch_slot else None
        self.device = self.keys[0].device if num_layers else torch.device(device or "cpu")
        self._lengths = [0] * max_batch_size
        self._in_use = [False] * max_batch_size
        # A min-heap: the lowest free slot goes first, so the running slots tend to stay
        # one ascending run, which a step reads as a view (``slot_span``), not a gather.
        self._free = list(range(max_batch_size))

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Reserve an empty slot for a new sequence."""
        if not self._free:
            raise CacheCapacityError(f"all {self.max_batch_size} KV-cache slots are in use")
        slot = heapq.heappop(self._free)
        self._in_use[slot] = True
        self._lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Return a slot. Its stale K/V stay in memory but are masked by length 0."""
        self._check_slot(slot)
        self._in_use[slot] = False
        self._lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def length(self, slot: int) -> int:
        """Number of cached positions of the sequence in ``slot``."""
        self._check_slot(slot)
        return self._lengths[slot]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch_size or not self._in_use[slot]:
            raise CacheCapacityError(f"slot {slot} is not allocated")

    def check_append(self, slots: Sequence[int], input_lengths: Sequence[int], step_len: int) -> list[int]:
        """Each slot's current length, after checking that ``input_lengths[b]`` (at most
        ``step_len``) new positions fit in ``slots[b]``: allocated, distinct, in capacity."""
        if len(slots) != len(input_lengths) or not slots:
            raise ValueError(
                f"need one input length per slot, got {len(slots)} slots and "
                f"{len(input_lengths)} lengths"
            )
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one step: {list(slots)}")
        starts = []
        for slot, count in zip(slots, input_lengths, strict=True):
            self._check_slot(slot)
            if not 1 <= count <= step_len:
                raise ValueError(f"slot {slot}: input length {count} not in [1, {step_len}]")
            start = self._lengths[slot]
            if start + count > self.max_seq_len:
                raise CacheCapacityError(
                    f"slot {slot}: {start} cached + {count} new positions exceed "
                    f"max_seq_len={self.max_seq_len}"
                )
            starts.append(start)
        return starts

    def plan(self, slots: Sequence[int], input_lengths: Sequence[int], step_len: int) -> CacheStep:
        """Indices and mask for appending ``input_lengths[b]`` tokens to ``slots[b]``.

        Row ``b`` of the step holds ``step_len`` columns, of which the first
        ``input_lengths[b]`` are real tokens (right padding). Padded columns are never
        written to the cache; their queries see the row's valid keys only, so their
        (discarded) outputs stay finite.
        """
        starts = self.check_append(slots, input_lengths, step_len)
        device = self.device
        start_t = torch.tensor(starts, dtype=torch.long, device=device)  # [B]
        count_t = torch.tensor(list(input_lengths), dtype=torch.long, device=device)  # [B]
        slot_t = torch.tensor(list(slots), dtype=torch.long, device=device)  # [B]
        cols = torch.arange(step_len, device=device)  # [S]
        positions = start_t[:, None] + cols[None, :]  # [B, S]
        valid = cols[None, :] < count_t[:, None]  # [B, S]
        write_rows, write_cols = valid.nonzero(as_tuple=True)  # [W], [W]

        end_t = start_t + count_t  # [B] length after this step
        total_length = max(s + c for s, c in zip(starts, input_lengths, strict=True))
        key_pos = torch.arange(total_length, device=device)  # [T]
        # Causal within the row's own sequence, and never past its valid end.
        mask = (key_pos[None, None, :] <= positions[:, :, None]) & (
            key_pos[None, None, :] < end_t[:, None, None]
        )  # [B, S, T]
        return CacheStep(
            slots=slot_t,
            positions=positions,
            write_rows=write_rows,
            write_cols=write_cols,
            write_slots=slot_t[write_rows],
            write_positions=positions[write_rows, write_cols],
            attention_mask=mask[:, None],  # [B, 1, S, T]
            slot_ids=tuple(slots),
            input_lengths=tuple(input_lengths),
            total_length=total_length,
            slot_span=slice(slots[0], slots[0] + len(slots))
            if list(slots) == list(range(slots[0], slots[0] + len(slots))) else None,
            dense=all(count == step_len for count in input_lengths),
        )

    def update(
        self, layer: int, step: CacheStep, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's K/V ``[B, num_kv_heads, S, head_dim]`` for ``layer``.

        Returns the keys and values to attend over, ``[B, num_kv_heads, T, head_dim]``:
        a view of the cache when the slots are one ascending run (the free list hands out
        the lowest slot first, so a batch that did not lose a middle member is one), else
        a gathered copy.
        """
        cache_k, cache_v = self.keys[layer], self.values[layer]
        if step.dense:
            # Row-major over (row, column), the order of write_rows/write_cols.
            new_k = keys.transpose(1, 2).flatten(0, 1)  # [W, num_kv_heads, head_dim]
            new_v = values.transpose(1, 2).flatten(0, 1)
        else:
            # Advanced indices around a slice: the layout is [W, num_kv_heads, head_dim].
            new_k = keys[step.write_rows, :, step.write_cols]
            new_v = values[step.write_rows, :, step.write_cols]
        cache_k[step.write_slots, :, step.write_positions] = new_k.to(cache_k.dtype)
        cache_v[step.write_slots, :, step.write_positions] = new_v.to(cache_v.dtype)
        span = slice(0, step.total_length)
        rows = step.slots if step.slot_span is None else step.slot_span
        return cache_k[rows, :, span], cache_v[rows, :, span]  # [B, kv, T, D]

    def commit(self, step: CacheStep) -> None:
        """Advance lengths after every layer has written ``step``."""
        self.advance(step.slot_ids, step.input_lengths)

    def advance(self, slots: Sequence[int], counts: Sequence[int]) -> None:
        """Count ``counts[b]`` more cached positions in ``slots[b]`` (written by a step)."""
        for slot, count in zip(slots, counts, strict=True):
            self._lengths[slot] += count
