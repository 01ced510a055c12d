"""Tokenizer glue: prompt template, ``<image>`` expansion, raw-id validation, decoding.

The prompt template is deliberately plain (the demo model is a captioner, not a chat
model)::

    <s> + prompt text, where each "<image>" becomes
          <im_start> + <im_patch> x L + <im_end>

L is the feature count of the matching image (``image_features.shape[1]`` of its
``ImageForInsert``): ``ImageInsertEmbedding`` overwrites exactly the L rows after each
``<im_start>``, so a wrong L would misplace features or leave placeholder embeddings in
the sequence. Multicrop patches use ``<patch_start>`` + ``<im_patch>`` x L +
``<patch_end>``; they only come in caller-provided ``input_ids``, which
:meth:`Step37Tokenizer.validate_input_ids` checks against the same rule.

All token ids are looked up in ``tokenizer.json`` (the released tokenizer puts
``<im_start>`` at 128000; the demo one at 4), never hard-coded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lm_worker.errors import TokenLayoutError

__all__ = [
    "IMAGE_PLACEHOLDER",
    "SpecialTokenIds",
    "SpecialTokens",
    "Step37Tokenizer",
    "TokenLayoutError",
    "build_word_tokenizer",
]

IMAGE_PLACEHOLDER = "<image>"

# TokenLayoutError lives in lm_worker.errors with the rest of the hierarchy; it stays
# importable from here for callers that found it here first.


@dataclass(frozen=True)
class SpecialTokens:
    """The special-token strings; override for a tokenizer that spells them differently."""

    bos: str = "<s>"
    eos: str = "</s>"
    pad: str = "<pad>"
    im_start: str = "<im_start>"
    im_patch: str = "<im_patch>"
    im_end: str = "<im_end>"
    patch_start: str = "<patch_start>"
    patch_end: str = "<patch_end>"


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of :class:`SpecialTokens` in one tokenizer file."""

    bos: int
    eos: int
    pad: int
    im_start: int
    im_patch: int
    im_end: int
    patch_start: int
    patch_end: int


class Step37Tokenizer:
    """An HF ``tokenizers.Tokenizer`` plus the Step3.7 special tokens and image layout."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: SpecialTokens | None = None) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens or SpecialTokens()
        ids: dict[str, int] = {}
        for name, text in dataclasses.asdict(self.special_tokens).items():
            token_id = tokenizer.token_to_id(text)
            if token_id is None:
                raise ValueError(
                    f"special token {name}={text!r} is not in the tokenizer vocabulary"
                )
            ids[name] = token_id
        self.ids = SpecialTokenIds(**ids)
        self._special_ids = frozenset(ids.values())

    @classmethod
    def from_file(
        cls, path: str | Path, special_tokens: SpecialTokens | None = None
    ) -> Step37Tokenizer:
        """Load a standard ``tokenizer.json``."""
        return cls(Tokenizer.from_file(str(path)), special_tokens)

    @property
    def vocab_size(self) -> int:
        """Size including added tokens; the decoder's ``vocab_size`` may be padded larger."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self.ids.eos

    def encode_text(self, text: str) -> list[int]:
        """Plain text to ids, no BOS; special-token strings in it are rejected.

        User text is not trusted to contain ``<im_patch>`` and friends: they would be
        matched as special tokens and break the image layout (or inject a BOS/EOS).
        """
        token_ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        for token_id in token_ids:
            if token_id in self._special_ids:
                raise TokenLayoutError(
                    "prompt",
                    "text may not contain special tokens; use <image> for images",
                    self.tokenizer.id_to_token(token_id),
                )
        return token_ids

    def image_block(self, num_features: int) -> list[int]:
        """``<im_start>`` + ``<im_patch>`` x ``num_features`` + ``<im_end>``."""
        return [self.ids.im_start, *[self.ids.im_patch] * num_features, self.ids.im_end]

    def build_prompt_ids(self, prompt: str, image_token_counts: Sequence[int]) -> list[int]:
        """Apply the template: ``<s>`` + ``prompt`` with each ``<image>`` expanded.

        ``image_token_counts[i]`` is the feature count L of the i-th image, which fills
        the i-th ``<image>`` in reading order.
        """
        _check_counts(image_token_counts, "image_token_counts")
        segments = prompt.split(IMAGE_PLACEHOLDER)
        if len(segments) - 1 != len(image_token_counts):
            raise TokenLayoutError(
                "prompt",
                f"has {len(segments) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but "
                f"{len(image_token_counts)} image(s) were sent",
            )
        token_ids = [self.ids.bos]
        for index, segment in enumerate(segments):
            if segment.strip():
                token_ids += self.encode_text(segment)
            if index < len(image_token_counts):
                token_ids += self.image_block(image_token_counts[index])
        return token_ids

    def validate_input_ids(
        self,
        input_ids: Sequence[int] | np.ndarray,
        image_token_counts: Sequence[int],
        *,
        patch_token_counts: Sequence[int] = (),
    ) -> None:
        """Check caller-provided ids against the images (and multicrop patches) sent.

        Every id is in the vocabulary; there are exactly ``len(image_token_counts)``
        ``<im_start>``, the i-th followed by exactly ``image_token_counts[i]``
        ``<im_patch>`` and then ``<im_end>`` (likewise ``<patch_start>`` ...
        ``<patch_end>`` for ``patch_token_counts``); no ``<im_patch>``, ``<im_end>`` or
        ``<patch_end>`` outside such a block. Raises :class:`TokenLayoutError` at the
        first problem.
        """
        _check_counts(image_token_counts, "image_token_counts")
        _check_counts(patch_token_counts, "patch_token_counts")
        ids = np.asarray(input_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise TokenLayoutError(
                "input_ids", "must be a non-empty flat list of integers", f"shape {ids.shape}"
            )
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            raise TokenLayoutError(
                f"input_ids[{bad[0]}]",
                f"not in the vocabulary [0, {self.vocab_size})",
                int(ids[bad[0]]),
            )
        covered = np.zeros(ids.shape, dtype=bool)
        self._check_blocks(ids, covered, "im_start", "im_end", image_token_counts, "image")
        self._check_blocks(ids, covered, "patch_start", "patch_end", patch_token_counts, "patch")
        layout = np.isin(ids, [self.ids.im_patch, self.ids.im_end, self.ids.patch_end])
        stray = np.flatnonzero(layout & ~covered)
        if stray.size:
            position = int(stray[0])
            raise TokenLayoutError(
                f"input_ids[{position}]",
                "placeholder token outside an image block",
                self.tokenizer.id_to_token(int(ids[position])),
            )

    def _check_blocks(
        self,
        ids: np.ndarray,
        covered: np.ndarray,
        start_field: str,
        end_field: str,
        counts: Sequence[int],
        kind: str,
    ) -> None:
        """Check the blocks opened by ``start_field`` (a :class:`SpecialTokens` field)."""
        start_id, end_id = getattr(self.ids, start_field), getattr(self.ids, end_field)
        start_name = getattr(self.special_tokens, start_field)
        end_name = getattr(self.special_tokens, end_field)
        starts = np.flatnonzero(ids == start_id)
        if starts.size != len(counts):
            raise TokenLayoutError(
                "input_ids",
                f"has {starts.size} {start_name} but {len(counts)} {kind}(s) were sent",
            )
        patch_name = self.special_tokens.im_patch
        for index, (start, count) in enumerate(zip(starts.tolist(), counts, strict=True)):
            body = ids[start + 1 : start + 1 + count]  # [<= count]
            wrong = np.flatnonzero(body != self.ids.im_patch)
            if wrong.size or body.size < count:
                found = int(wrong[0]) if wrong.size else body.size
                raise TokenLayoutError(
                    f"input_ids[{start + 1 + found}]",
                    f"{kind} {index} has {count} features: expected {count} {patch_name} after "
                    f"the {start_name} at {start}, found {found}",
                )
            end = start + 1 + count
            if end >= ids.size or ids[end] != end_id:
                got = (
                    self.tokenizer.id_to_token(int(ids[end])) if end < ids.size else "end of input"
                )
                raise TokenLayoutError(
                    f"input_ids[{end}]",
                    f"expected {end_name} after {count} {patch_name} ({kind} {index})",
                    got,
                )
            covered[start : end + 1] = True

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens (ids past the vocabulary are dropped)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _check_counts(counts: Sequence[int], field: str) -> None:
    for index, count in enumerate(counts):
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1:
            raise TokenLayoutError(f"{field}[{index}]", "must be a positive integer", count)


def build_word_tokenizer(words: Sequence[str], path: str | Path) -> Step37Tokenizer:
    """Build and save a word-level ``tokenizer.json`` (for the demo model and tests).

    Ids: ``<pad>`` 0, ``<unk>`` 1, then the other special tokens, then ``words`` in
    order (duplicates dropped). Text splits on whitespace and punctuation, so each
    word must be a single pre-token (``"dog"`` and ``"."``, not ``"dog."``).
    """
    specials = ["<pad>", "<unk>", *dataclasses.asdict(SpecialTokens()).values()]
    specials = list(dict.fromkeys(specials))
    pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = {token: index for index, token in enumerate(specials)}
    for word in words:
        pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(word)]
        if pieces != [word]:
            raise ValueError(f"word {word!r} is not a single pre-token (splits into {pieces})")
        vocab.setdefault(word, len(vocab))

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizer
    # WordPiece's cleanup glues punctuation back ("dog ." -> "dog."); no "##" occurs.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.add_special_tokens(specials)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return Step37Tokenizer.from_file(path)
