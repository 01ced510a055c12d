"""Decode steps on fixed shapes, replayed from CUDA graphs.

A decode step of a small decoder is a few hundred kernels of a few microseconds each;
on a GPU their launches, not their arithmetic, are the step. A CUDA graph records one
step's kernels once and replays them with one launch. Graphs need fixed shapes and
fixed addresses, so a graphed step:

* pads the batch to the next captured size (1, 2, 4, 8, … and the backend's largest);
  padding rows decode token 0 at position 0 of the cache's scratch slot, a row no
  sequence owns, so they write nowhere that is ever read;
* attends over every position of a slot (``max_seq_len`` keys, masked by length)
  instead of the step's longest length — cheap at the sizes graphs pay off for;
* reads its inputs (token ids, slots, positions) from one device tensor, filled by one
  copy from pinned host memory.

On the CPU the same fixed-shape step runs without capture (``capture=False``): that
is how the tests hold it to the dynamic path, row for row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_worker.model.decoder import Step37Decoder
from lm_worker.model.kv_cache import CacheStep, KVCache
from services.common.graphs import capture as capture_graph
from services.common.graphs import padded_batch_sizes

__all__ = ["DecodeGraphs", "PrefillGraphs", "one_token_step", "prompt_step"]


def one_token_step(decoder: Step37Decoder, cache: KVCache, tokens: torch.Tensor, slots: torch.Tensor,
                   positions: torch.Tensor, key_positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, V]`` (float32) of ``tokens [n]`` written at ``positions [n]`` of ``slots [n]``,
    each row attending over ``key_positions [T]`` of its slot up to its own position;
    ``rows`` is ``arange(n)``. The decode step of the graphed and the compiled paths."""
    mask = key_positions[None, :] <= positions[:, None]  # [n, T]
    step = CacheStep(
        slots=slots, positions=positions[:, None], write_rows=rows, write_cols=torch.zeros_like(rows),
        write_slots=slots, write_positions=positions, attention_mask=mask[:, None, None], slot_ids=(),
        input_lengths=(), total_length=key_positions.shape[0], slot_span=None, dense=True,
    )  # fmt: skip
    x = decoder.embed_tokens(tokens)[:, None]  # [n, 1, H]
    hidden = decoder.run_layers(x, positions[:, None], cache, step)  # [n, 1, H]
    return decoder.compute_logits(hidden[:, 0]).float()  # [n, V]


def prompt_step(decoder: Step37Decoder, cache: KVCache, embeddings: torch.Tensor, slots: torch.Tensor,
                starts: torch.Tensor, counts: torch.Tensor, key_positions: torch.Tensor, rows: torch.Tensor,
                columns: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, V]`` (float32) of each row's last prompt position: row ``b`` appends the
    first ``counts[b]`` of ``embeddings [n, L, H]`` at ``starts[b]`` of ``slots[b]`` and
    attends over ``key_positions [T]`` of its slot (causally, up to its end); ``rows`` is
    ``arange(n)``, ``columns`` ``arange(L)``. A padded column writes its K/V into the
    cache's scratch slot, so a slot receives exactly its prompt. The prefill of the
    graphed and the compiled paths."""
    positions = starts[:, None] + columns[None, :]  # [n, L]
    valid = columns[None, :] < counts[:, None]  # [n, L]
    scratch = torch.full_like(positions, cache.scratch_slot)
    ends = starts + counts  # [n]
    keys = key_positions
    mask = (keys[None, None, :] <= positions[:, :, None]) & (keys[None, None, :] < ends[:, None, None])
    step = CacheStep(
        slots=slots, positions=positions, write_rows=rows, write_cols=columns,
        write_slots=torch.where(valid, slots[:, None], scratch).flatten(),
        write_positions=torch.where(valid, positions, columns[None, :]).flatten(),
        attention_mask=mask[:, None], slot_ids=(), input_lengths=(),
        total_length=keys.shape[0], slot_span=None, dense=True,
    )  # fmt: skip
    hidden = decoder.run_layers(embeddings, positions, cache, step)  # [n, L, H]
    last = hidden[rows, counts - 1]  # [n, H]
    return decoder.compute_logits(last).float()  # [n, V]


class DecodeGraphs:
    """One fixed-shape decode step per batch size, captured as CUDA graphs when ``capture``."""

    def __init__(self, decoder: Step37Decoder, cache: KVCache, batch_sizes: Sequence[int], *,
                 capture: bool) -> None:
        if cache.scratch_slot is None:
            raise ValueError("fixed-shape decode steps need a KV cache with a scratch slot")
        if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > cache.max_batch_size:
            raise ValueError(f"batch sizes must lie in [1, {cache.max_batch_size}], got {list(batch_sizes)}")
        self.decoder = decoder
        self.cache = cache
        self.sizes = sorted(set(batch_sizes))
        device = cache.device
        self._key_positions = torch.arange(cache.max_seq_len, device=device)  # [T]
        # Per size: host staging (pinned when capturing), the device inputs the step
        # reads, and the write indices a dense step ignores but CacheStep carries.
        self._host = {size: torch.zeros(3, size, dtype=torch.long, pin_memory=capture) for size in self.sizes}
        self._inputs = {size: torch.zeros(3, size, dtype=torch.long, device=device) for size in self.sizes}
        self._rows = {size: torch.arange(size, device=device) for size in self.sizes}
        for size in self.sizes:  # every row at the scratch slot, so warm-up writes nothing a sequence owns
            self._host[size][1] = cache.scratch_slot
            self._inputs[size][1] = cache.scratch_slot
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._copied = torch.cuda.Event() if capture else None
        if capture:
            with torch.inference_mode():
                pool = None
                for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory
                    step = lambda size=size: self._step(size)  # noqa: E731
                    self._graphs[size], self._logits[size] = capture_graph(step, device, pool)
                    pool = self._graphs[size].pool()

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _step(self, size: int) -> torch.Tensor:
        """The fixed-shape step over ``self._inputs[size]``: logits ``[size, V]`` (float32)."""
        tokens, slots, positions = self._inputs[size].unbind(0)  # each [size]
        return one_token_step(self.decoder, self.cache, tokens, slots, positions, self._key_positions,
                              self._rows[size])

    def decode(self, slots: Sequence[int], starts: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, V]`` for one token per slot, ``token_ids [n]`` written at ``starts``.

        The caller has checked the slots (``KVCache.check_append``) and advances their
        lengths afterwards; ``n`` must not exceed :attr:`max_batch_size`.
        """
        count = len(slots)
        size = next(size for size in self.sizes if size >= count)
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the staging buffers
        host = self._host[size].numpy()  # a view: pinned memory written in place
        host[0, :count] = token_ids.cpu().numpy()
        host[1, :count] = slots
        host[2, :count] = starts
        host[0, count:], host[1, count:], host[2, count:] = 0, self.cache.scratch_slot, 0
        self._inputs[size].copy_(self._host[size], non_blocking=True)
        if self._copied is None:
            return self._step(size)[:count]
        self._copied.record()
        self._graphs[size].replay()
        return self._logits[size][:count].clone()  # the next replay overwrites the graph's output


class PrefillGraphs:
    """Prefill of short prompts on fixed shapes, captured as CUDA graphs when ``capture``.

    Newcomers are padded to the next captured batch size and their prompts to the next
    captured length (16, 32, 64, 128: short prompts, whose prefill is launch-bound like a
    decode step; longer ones, or more newcomers than the largest batch, prefill eagerly).
    A padded column writes its K/V into the scratch slot, so a slot receives exactly
    its prompt; a padding row is a one-token prompt in the scratch slot.
    """

    LENGTHS = (16, 32, 64, 128)
    MAX_BATCH = 8

    def __init__(self, decoder: Step37Decoder, cache: KVCache, *, capture: bool) -> None:
        if cache.scratch_slot is None:
            raise ValueError("fixed-shape prefill steps need a KV cache with a scratch slot")
        self.decoder = decoder
        self.cache = cache
        self.batch_sizes = padded_batch_sizes(min(cache.max_batch_size, self.MAX_BATCH))
        self.lengths = sorted({min(length, cache.max_seq_len) for length in self.LENGTHS})
        device, weight = cache.device, decoder.embed_tokens.weight
        self._key_positions = torch.arange(cache.max_seq_len, device=device)  # [T]
        self._columns = {length: torch.arange(length, device=device) for length in self.lengths}
        self._rows = {size: torch.arange(size, device=device) for size in self.batch_sizes}
        shapes = [(size, length) for size in self.batch_sizes for length in self.lengths]
        # Per shape: the prompts' embeddings, and slots / starts / lengths per row (device,
        # with pinned host staging); every row starts as a one-token prompt in the scratch slot.
        self._embeddings = {shape: torch.zeros(*shape, weight.shape[1], dtype=weight.dtype, device=device)
                            for shape in shapes}
        self._host = {}
        for size in self.batch_sizes:
            staging = torch.tensor([[cache.scratch_slot], [0], [1]]).repeat(1, size)  # [3, size]
            self._host[size] = staging.pin_memory() if capture else staging
        self._inputs = {shape: self._host[shape[0]].to(device) for shape in shapes}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, int], torch.Tensor] = {}
        self._copied = torch.cuda.Event() if capture else None
        if capture:
            with torch.inference_mode():
                pool = None
                for shape in reversed(shapes):  # largest first: the smaller graphs reuse its memory
                    step = lambda shape=shape: self._step(shape)  # noqa: E731
                    self._graphs[shape], self._logits[shape] = capture_graph(step, device, pool)
                    pool = self._graphs[shape].pool()

    def fits(self, count: int, longest: int) -> bool:
        return count <= self.batch_sizes[-1] and longest <= self.lengths[-1]

    def _step(self, shape: tuple[int, int]) -> torch.Tensor:
        """The fixed-shape prefill over the buffers of ``shape``: logits ``[size, V]`` of each row's last token."""
        size, length = shape
        slots, starts, counts = self._inputs[shape].unbind(0)  # each [size]
        return prompt_step(self.decoder, self.cache, self._embeddings[shape], slots, starts, counts,
                           self._key_positions, self._rows[size], self._columns[length])

    def prefill(self, slots: Sequence[int], starts: Sequence[int], embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits ``[n, V]`` of each prompt's last position; the caller checked the slots
        (``KVCache.check_append``), advances their lengths afterwards, and asked :meth:`fits`."""
        count, longest = len(slots), max(emb.shape[0] for emb in embeddings)
        size = next(size for size in self.batch_sizes if size >= count)
        shape = (size, next(length for length in self.lengths if length >= longest))
        buffer = self._embeddings[shape]
        for row, emb in enumerate(embeddings):
            buffer[row, : emb.shape[0]].copy_(emb)
        if self._copied is not None:
            self._copied.synchronize()  # the last prefill's copy has left the staging buffer
        host = self._host[size].numpy()
        host[0, :count], host[1, :count] = slots, starts
        host[2, :count] = [emb.shape[0] for emb in embeddings]
        host[0, count:], host[1, count:], host[2, count:] = self.cache.scratch_slot, 0, 1
        self._inputs[shape].copy_(self._host[size], non_blocking=True)
        if self._copied is None:
            return self._step(shape)[:count]
        self._copied.record()
        self._graphs[shape].replay()
        return self._logits[shape][:count].clone()
