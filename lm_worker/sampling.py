"""Choosing the next token, and deciding when a sequence is done.

Two halves, both driven by the scheduler once per step:

* :func:`sample` picks one token per row of a ``[n, V]`` logits batch. Greedy rows
  take the argmax; the others go through temperature, top-k and top-p in one sorted
  pass over the sampled rows together. Randomness comes from a ``torch.Generator`` per
  sequence, drawn one uniform per step, so a seeded request gives the same tokens
  whichever requests it happens to share a batch with (given the same logits).
* :class:`SequenceOutput` appends the chosen token to one sequence, detokenises
  incrementally and applies the stop rules: EOS (unless ``ignore_eos``), stop token
  ids, stop strings (matched on the text, trimmed from it) and ``max_new_tokens``.
  It also decides how much text is safe to stream: the tail that could still turn
  into a stop string is held back until it either completes one or cannot.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from proto import SamplingParams

__all__ = [
    "FINISH_ABORT",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "IncrementalDetokenizer",
    "SamplingState",
    "SequenceOutput",
    "TokenChunk",
    "sample",
]

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"

Decode = Callable[[Sequence[int]], str]


@dataclass
class SamplingState:
    """A sequence's sampling parameters and its own random stream.

    Unseeded requests still get a private generator (seeded from the OS): sharing
    the global one would make every seeded request's stream depend on how many
    unseeded draws happened before it.
    """

    params: SamplingParams
    generator: torch.Generator | None = None

    @classmethod
    def create(cls, params: SamplingParams) -> SamplingState:
        if cls.is_greedy(params):
            return cls(params)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return cls(params, torch.Generator(device="cpu").manual_seed(seed))

    @staticmethod
    def is_greedy(params: SamplingParams) -> bool:
        # Below MIN_TEMPERATURE, logits / t overflows float32 to ±inf and softmax gives
        # NaN; such a temperature means "greedy" anyway.
        return params.temperature < MIN_TEMPERATURE or params.top_k == 1

    @property
    def greedy(self) -> bool:
        return self.generator is None


MIN_TEMPERATURE = 1e-4


def sample(logits: torch.Tensor, states: Sequence[SamplingState]) -> list[int]:
    """One token id per row of ``logits [n, V]``; row ``i`` follows ``states[i]``.

    Sampled rows use inverse-CDF sampling over the probabilities sorted in descending
    order: top-k and top-p both cut a suffix of that order, so one sort serves both
    and the kept mass is a prefix whose cumulative sum is searched with the row's
    uniform draw.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be [{len(states)}, V], got {list(logits.shape)}")
    tokens = logits.argmax(dim=-1)  # [n]; greedy rows keep these
    rows = [i for i, state in enumerate(states) if not state.greedy]
    if not rows:
        return tokens.tolist()

    device = logits.device
    vocab = logits.shape[-1]
    chosen = [states[i] for i in rows]
    row_index = torch.tensor(rows, device=device)
    temperature = torch.tensor([s.params.temperature for s in chosen], device=device)  # [m]
    top_k = torch.tensor([s.params.top_k or vocab for s in chosen], device=device)  # [m]
    top_p = torch.tensor([s.params.top_p for s in chosen], device=device)  # [m]

    sorted_logits, sorted_ids = logits[row_index].float().sort(dim=-1, descending=True)  # [m, V]
    ranks = torch.arange(vocab, device=device)  # [V]
    scaled = sorted_logits / temperature[:, None]
    scaled.masked_fill_(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = scaled.softmax(dim=-1)  # [m, V]
    # Nucleus: keep a token while the mass *before* it is below top_p, so the first
    # token always survives and the kept set is the smallest reaching top_p.
    probs.masked_fill_(probs.cumsum(dim=-1) - probs >= top_p[:, None], 0.0)
    cumulative = probs.cumsum(dim=-1)  # [m, V], unnormalised
    uniform = torch.cat([torch.rand(1, generator=s.generator) for s in chosen]).to(device)  # [m]
    threshold = uniform * cumulative[:, -1]  # [m]
    picked = torch.searchsorted(cumulative, threshold[:, None], right=True)  # [m, 1]
    # u * total can round up to total; never step past the last kept token.
    last_kept = ((probs > 0).sum(dim=-1, keepdim=True) - 1).clamp(min=0)  # [m, 1]
    picked = torch.minimum(picked, last_kept)
    tokens[row_index] = sorted_ids.gather(1, picked).squeeze(1)
    return tokens.tolist()


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids, in O(window) per token.

    Decodes a short window rather than the whole output every step (the approach of
    vLLM and TGI): the text of ``ids[prefix:read]`` is what the client already has,
    the text of ``ids[prefix:]`` minus that is new. Keeping the previous chunk in the
    window lets the tokenizer's decoder place spaces and punctuation as it would for
    the whole sequence; a trailing U+FFFD means a multi-byte character is still
    incomplete, so nothing is released until the next token finishes it.
    """

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full_text[len(prefix_text) :]
        return ""


@dataclass(frozen=True)
class TokenChunk:
    """What one step adds to a sequence: its new token ids and the text now safe to send.

    ``finish_reason`` is set on the sequence's last chunk.
    """

    token_ids: list[int]
    text: str
    finish_reason: str | None = None


@dataclass
class SequenceOutput:
    """The generated side of one sequence: token ids, text, stop rules, streaming cursor.

    ``token_ids`` include the token that ended the sequence (EOS or a stop token id),
    as they were generated and count as completion tokens; ``text`` never contains
    a stop token's text nor the matched stop string.
    """

    params: SamplingParams
    eos_token_id: int | None
    decode: Decode
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _sent_chars: int = 0
    _detokenizer: IncrementalDetokenizer = field(init=False)

    def __post_init__(self) -> None:
        self._detokenizer = IncrementalDetokenizer(self.decode)
        self._stop_token_ids = frozenset(self.params.stop_token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> TokenChunk:
        """Add one generated token; returns the chunk to stream (possibly empty text)."""
        if self.finished:
            raise RuntimeError(f"sequence already finished ({self.finish_reason})")
        self.token_ids.append(token_id)
        if token_id == self.eos_token_id and not self.params.ignore_eos:
            self.finish_reason = FINISH_STOP
        elif token_id in self._stop_token_ids:
            self.finish_reason = FINISH_STOP
        else:
            before = len(self.text)
            self.text += self._detokenizer.push(token_id)
            if self.params.stop and self._trim_stop_string(before):
                self.finish_reason = FINISH_STOP
        if not self.finished and len(self.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = FINISH_LENGTH
        return TokenChunk([token_id], self._release(), self.finish_reason)

    def abort(self) -> TokenChunk:
        """Finish as cancelled; releases any held-back text."""
        if not self.finished:
            self.finish_reason = FINISH_ABORT
        return TokenChunk([], self._release(), self.finish_reason)

    def _trim_stop_string(self, before: int) -> bool:
        """Cut ``text`` at the earliest stop string that the last delta completed."""
        earliest = -1
        for stop in self.params.stop:
            # Only a match ending in the new text is new; start early enough to catch
            # one that began in text already held.
            index = self.text.find(stop, max(0, before - len(stop) + 1))
            if index != -1 and (earliest == -1 or index < earliest):
                earliest = index
        if earliest == -1:
            return False
        self.text = self.text[:earliest]
        return True

    def _release(self) -> str:
        """Text not yet sent that no stop string can claim any more."""
        end = len(self.text)
        if not self.finished and self.params.stop:
            end -= _longest_stop_prefix_suffix(self.text, self.params.stop)
        end = max(end, self._sent_chars)
        out = self.text[self._sent_chars : end]
        self._sent_chars = end
        return out


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
