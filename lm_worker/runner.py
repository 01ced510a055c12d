"""The engine's model calls: fused embedding, prefill, one decode step, a readiness probe.

The scheduler decides *which* sequences run; :class:`ModelRunner` runs them (the split
vLLM draws between its scheduler and model runner). Everything here executes on the
engine thread and returns host-side token ids, so the one device→host sync per step
is the ``tolist()`` at the end of sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_worker.errors import EngineError
from lm_worker.image_insert_embedding import ImageInsertEmbedding
from lm_worker.model.backend import DecoderBackend
from lm_worker.sampling import SamplingState, sample
from proto import ImageForInsert

__all__ = ["ModelRunner"]


class ModelRunner:
    """Fusion + :class:`DecoderBackend` + sampling, one batch at a time."""

    def __init__(self, backend: DecoderBackend, fusion: ImageInsertEmbedding) -> None:
        self.backend = backend
        self.fusion = fusion

    def embed(self, prompt_ids: list[int], images: Sequence[ImageForInsert]) -> torch.Tensor:
        """Fused ``[S, H]`` embedding of one sequence, on the model's device.

        The ids stay on the CPU, where the fusion looks for start tokens; it makes the
        one host→device copy of them itself.
        """
        ids = torch.tensor([prompt_ids], dtype=torch.long)  # [1, S], host
        with torch.inference_mode():
            return self.fusion(ids, list(images))[:, 0]  # [S, 1, H] → [S, H]

    def prefill(self, slots: Sequence[int], embeddings: Sequence[torch.Tensor],
                states: Sequence[SamplingState | None]) -> list[int | None]:
        """Prefill prompt chunks together; the first generated token of each sequence whose
        prompt this chunk ends (its state given), None for one that goes on (state None)."""
        logits = self.backend.prefill(slots, embeddings)  # [n, V]
        rows = [i for i, state in enumerate(states) if state is not None]
        if len(rows) == len(states):
            return list(sample(logits, states))  # type: ignore[arg-type]
        tokens: list[int | None] = [None] * len(states)
        if rows:
            picked = sample(logits[rows], [states[i] for i in rows])  # type: ignore[misc]
            for row, token in zip(rows, picked, strict=True):
                tokens[row] = token
        return tokens

    def decode(self, slots: Sequence[int], last_tokens: Sequence[int],
               states: Sequence[SamplingState]) -> list[int]:
        """One decode step over running sequences; the next token of each."""
        token_ids = torch.tensor(list(last_tokens), dtype=torch.long)  # [n]
        logits = self.backend.decode(slots, token_ids)  # [n, V]
        return sample(logits, states)

    def probe(self, prompt_ids: list[int], images: Sequence[ImageForInsert]) -> None:
        """A tiny forward through the real path (fusion, prefill into a slot, free).

        When every slot is taken the engine is demonstrably running forwards, so
        there is nothing to prove and no slot to borrow.
        """
        if self.backend.num_free_slots == 0:
            return
        slot = self.backend.allocate()
        try:
            logits = self.backend.prefill([slot], [self.embed(prompt_ids, images)])  # [1, V]
            if not bool(torch.isfinite(logits).all()):
                raise EngineError("", "readiness probe produced non-finite logits")
        finally:
            self.backend.free(slot)
