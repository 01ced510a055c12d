"""Decode steps compiled by TorchInductor, for the CPU.

On the CPU a decode step of a small decoder is hundreds of operator calls of a few
microseconds of dispatch each, and those, not arithmetic, are the step (``python
bench/decode_step.py`` counts them). CUDA graphs do not exist here; Inductor instead
turns the step into a few generated C++ kernels behind a C++ wrapper.

The compiled step is one function for every batch size and sequence length: both are
symbolic, so it compiles twice when the backend is built (a batch of one, which
Inductor specialises, and any larger batch) and not again while serving. It attends
over the positions up to the longest sequence of the step, masked per row, and writes
each token's K/V into its slot in place, as the eager step does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from lm_worker.model.decoder import Step37Decoder
from lm_worker.model.graphs import one_token_step
from lm_worker.model.kv_cache import KVCache

__all__ = ["CompiledDecode"]

logger = logging.getLogger(__name__)


class CompiledDecode:
    """Decode steps through ``torch.compile`` (Inductor, C++ wrapper), compiled here, once.

    The cache must have a scratch slot: compiling runs the step on it, so the warm-up
    writes nowhere a sequence owns. The decoder's joined weights are packed first (the
    step reads them in place); replacing a weight afterwards needs a new instance. Raises what compiling raised (no C++ compiler, an
    unsupported operator); the backend then stays eager.
    """

    def __init__(self, decoder: Step37Decoder, cache: KVCache) -> None:
        if cache.scratch_slot is None:
            raise ValueError("compiled decode steps need a KV cache with a scratch slot to compile on")
        if not decoder.joined_weights_packed:
            decoder.pack_joined_weights()  # the compiled step reads the packed weights
        self.decoder = decoder
        self.cache = cache
        self._key_positions = torch.arange(cache.max_seq_len, device=cache.device)  # [T]
        self._compiled = torch.compile(self._step, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
        started = time.perf_counter()
        scratch = cache.scratch_slot
        with torch.inference_mode():
            for count in (1, 2):  # batch 1 is specialised; 2 traces the symbolic batch
                positions = torch.ones(count, dtype=torch.long, device=cache.device)
                self._compiled(torch.zeros(count, dtype=torch.long, device=cache.device),
                               torch.full((count,), scratch, dtype=torch.long, device=cache.device),
                               positions, 5)
        logger.info("decode step compiled in %.1f s", time.perf_counter() - started)

    def _step(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
              length: int) -> torch.Tensor:
        """Logits ``[n, V]`` (float32) of ``tokens [n]`` written at ``positions [n]`` of ``slots [n]``,
        attending over the first ``length`` positions of each slot (those past a row's own
        position masked)."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)  # [n]
        return one_token_step(self.decoder, self.cache, tokens, slots, positions, self._key_positions[:length], rows)

    def decode(self, slots: Sequence[int], starts: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, V]`` for one token per slot, ``token_ids [n]`` written at ``starts``.

        The caller has checked the slots (``KVCache.check_append``) and advances their
        lengths afterwards.
        """
        device = self.cache.device
        # Fresh tensors, made (as the warm-up's) in the caller's inference mode: a tensor from
        # outside it would fail the compiled step's guards and compile it again.
        tokens = token_ids.to(device=device, dtype=torch.long, copy=True)
        positions = torch.tensor(starts, dtype=torch.long, device=device)
        return self._compiled(tokens, torch.tensor(slots, dtype=torch.long, device=device), positions,
                              max(starts) + 1)
