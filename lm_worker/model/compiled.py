"""Decode steps and prefills compiled by TorchInductor, for the CPU.

On the CPU a decode step of a small decoder is hundreds of operator calls of a few
microseconds of dispatch each, and those, not arithmetic, are the step (``python
bench/decode_step.py`` counts them); a short prompt's prefill is the same. CUDA graphs
do not exist here; Inductor instead turns each into a few generated C++ kernels behind
a C++ wrapper.

Each compiled function serves every batch size and length: those are symbolic, so the
functions compile when the backend is built and not again while serving. Each compiles
twice (a batch of one, which Inductor specialises, and any larger batch); a one-token
prompt (another specialisation) prefills eagerly. Should a call still miss every
compiled variant, it runs eagerly rather than compiling inside the engine loop. Both
attend up to the longest sequence of the step, masked per row, and write K/V into the
slots in place, as the eager path does; they are the graphed path's step functions
(:mod:`lm_worker.model.graphs`) on symbolic shapes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from lm_worker.model.decoder import Step37Decoder
from lm_worker.model.graphs import one_token_step, prompt_step
from lm_worker.model.kv_cache import KVCache

__all__ = ["CompiledSteps"]

logger = logging.getLogger(__name__)

_OPTIONS = {"cpp_wrapper": True}


class CompiledSteps:
    """Decode steps and prefills through ``torch.compile`` (Inductor, C++ wrapper), compiled here, once.

    The cache must have a scratch slot: compiling runs the steps on it, so the warm-up
    writes nowhere a sequence owns. The decoder's joined weights are packed first (the
    steps read them in place); replacing a weight afterwards needs a new instance.
    Raises what compiling raised (no C++ compiler, an unsupported operator); the
    backend then stays eager.
    """

    # While serving, a call no compiled variant's guards accept runs eagerly
    # (``torch._dynamo.run``): compiling would stall every running sequence for tens of
    # seconds. Tests turn it off to see a recompile (``error_on_recompile``).
    run_only = True

    def __init__(self, decoder: Step37Decoder, cache: KVCache) -> None:
        if cache.scratch_slot is None:
            raise ValueError("compiled steps need a KV cache with a scratch slot to compile on")
        if cache.max_seq_len < 4:
            raise ValueError("compiled steps need max_seq_len >= 4 to compile on")
        if not decoder.joined_weights_packed:
            decoder.pack_joined_weights()  # the compiled steps read the packed weights
        self.decoder = decoder
        self.cache = cache
        device = cache.device
        self._key_positions = torch.arange(cache.max_seq_len, device=device)  # [T]
        # Only the step's own sizes are symbolic: with the cache's dims symbolic too, a batch
        # that happened to equal one of them while compiling (two newcomers, two K/V heads)
        # would be guarded equal to it, and another batch size would compile again.
        for fixed in (*cache.keys, *cache.values, self._key_positions):
            torch._dynamo.mark_static(fixed)
        self._decode = torch.compile(self._decode_step, dynamic=True, fullgraph=True, options=_OPTIONS)
        self._prefill = torch.compile(self._prefill_step, dynamic=True, fullgraph=True, options=_OPTIONS)
        started = time.perf_counter()
        scratch = cache.scratch_slot
        hidden = decoder.embed_tokens.weight.shape[1]
        with torch.inference_mode():  # on the scratch slot, with sizes unlike any fixed dim
            for count in (1, 2):  # batch 1 is specialised; 2 traces the symbolic batch
                self._decode(torch.zeros(count, dtype=torch.long, device=device),
                             torch.full((count,), scratch, dtype=torch.long, device=device),
                             torch.ones(count, dtype=torch.long, device=device), 3)
                self._prefill(torch.zeros(count, 3, hidden, dtype=decoder.embed_tokens.weight.dtype, device=device),
                              torch.full((count,), scratch, dtype=torch.long, device=device),
                              torch.ones(count, dtype=torch.long, device=device),
                              torch.full((count,), 3, dtype=torch.long, device=device), 4)
        if self.run_only:
            self._decode = torch._dynamo.run(self._decode_step)
            self._prefill = torch._dynamo.run(self._prefill_step)
        logger.info("decode step and prefill compiled in %.1f s", time.perf_counter() - started)

    def _decode_step(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                     length: int) -> torch.Tensor:
        rows = torch.arange(tokens.shape[0], device=tokens.device)  # [n]
        return one_token_step(self.decoder, self.cache, tokens, slots, positions, self._key_positions[:length], rows)

    def _prefill_step(self, embeddings: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
                      counts: torch.Tensor, length: int) -> torch.Tensor:
        rows = torch.arange(embeddings.shape[0], device=embeddings.device)  # [n]
        columns = torch.arange(embeddings.shape[1], device=embeddings.device)  # [L]
        return prompt_step(self.decoder, self.cache, embeddings, slots, starts, counts,
                           self._key_positions[:length], rows, columns)

    def decode(self, slots: Sequence[int], starts: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, V]`` for one token per slot, ``token_ids [n]`` written at ``starts``.

        The caller has checked the slots (``KVCache.check_append``) and advances their
        lengths afterwards.
        """
        device = self.cache.device
        # Fresh tensors, made (as the warm-up's) in the caller's inference mode: a tensor from
        # outside it would miss the compiled graphs' guards, and the step would run eagerly.
        tokens = token_ids.to(device=device, dtype=torch.long, copy=True)
        positions = torch.tensor(starts, dtype=torch.long, device=device)
        return self._decode(tokens, torch.tensor(slots, dtype=torch.long, device=device), positions,
                            max(starts) + 1)

    @staticmethod
    def fits_prefill(longest: int) -> bool:
        return longest >= 2  # a one-token prompt would specialise the compiled prefill

    def prefill(self, slots: Sequence[int], starts: Sequence[int], embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits ``[n, V]`` of each prompt's last position; the caller checked the slots
        (``KVCache.check_append``), advances their lengths afterwards, and asked :meth:`fits_prefill`."""
        weight = self.decoder.embed_tokens.weight
        lengths = [emb.shape[0] for emb in embeddings]
        batch = torch.zeros(len(slots), max(lengths), weight.shape[1], dtype=weight.dtype, device=weight.device)
        for row, emb in enumerate(embeddings):
            batch[row, : emb.shape[0]] = emb  # right-padded; padded columns write the scratch slot
        ends = max(start + length for start, length in zip(starts, lengths, strict=True))
        return self._prefill(batch, torch.tensor(slots, dtype=torch.long, device=weight.device),
                             torch.tensor(starts, dtype=torch.long, device=weight.device),
                             torch.tensor(lengths, dtype=torch.long, device=weight.device), ends)
