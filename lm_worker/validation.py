"""From a decoded ``GenerateRequest`` to a :class:`SequenceRequest` the engine can run.

Everything that needs the model or the tokenizer to judge is checked here, before the
request takes a place in the queue, and each failure is a 4xx naming the field:

* every ``ImageForInsert`` carries finite ``image_features`` of at least one token per
  image, whose width is the projector's input dim, and starts at ``<im_start>``
  (images) or ``<patch_start>`` (multicrop patches);
* the images fit the token layout: one per ``<image>`` placeholder of a prompt, or,
  for raw ``input_ids``, one per start token, each followed by exactly L placeholders
  and its end token (so no span runs past the end of the sequence);
* prompt + image tokens + ``max_new_tokens`` fit the context length;
* stop strings are non-empty and short, stop token ids are in the vocabulary.

Several ``ImageForInsert``s of the same kind are merged, in order, into one: the
fusion inserts one item's blocks at all of that item's start tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from lm_worker.errors import (
    ClientError,
    ContextLengthExceeded,
    FeatureDimMismatch,
    TokenLayoutError,
)
from lm_worker.sequence import SequenceRequest
from lm_worker.tokens import Step37Tokenizer
from proto import GenerateRequest, ImageForInsert, SamplingParams, feature_blocks

__all__ = ["MAX_STOP_STRING_CHARS", "RequestValidator"]

# Stop strings are matched against the tail of the text after every token; a bound
# keeps that check O(generated text) no matter what a client sends.
MAX_STOP_STRING_CHARS = 256


class RequestValidator:
    """Checks a ``GenerateRequest`` against one model and tokenizer (see module doc)."""

    def __init__(self, tokenizer: Step37Tokenizer, *, encoder_output_dim: int, vocab_size: int,
                 max_seq_len: int) -> None:
        self.tokenizer = tokenizer
        self.encoder_output_dim = encoder_output_dim
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len

    def __call__(self, request: GenerateRequest, arrival_s: float | None = None, *,
                 checked: Sequence[bool] | None = None) -> SequenceRequest:
        """``checked[i]``: ``request.images[i]`` is one whose values were scanned before
        (kept features): its shape and layout are checked again, not every value."""
        self._check_sampling(request.sampling)
        images, patches = self._group_images(request.images, checked or [False] * len(request.images))
        image_counts = _lengths(images)
        patch_counts = _lengths(patches)
        if request.prompt is not None:
            if patches is not None:
                raise TokenLayoutError(
                    "images", "a prompt lays out <image> blocks only; send multicrop patches "
                    "(<patch_start>) with input_ids")
            prompt_ids = self.tokenizer.build_prompt_ids(request.prompt, image_counts)
            source = "prompt"
        else:
            prompt_ids = list(request.input_ids or [])
            self.tokenizer.validate_input_ids(prompt_ids, image_counts, patch_token_counts=patch_counts)
            source = "input_ids"
        self._check_length(len(prompt_ids), request.sampling.max_new_tokens, source)
        return SequenceRequest(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            images=[item for item in (images, patches) if item is not None],
            sampling=request.sampling,
            arrival_s=arrival_s if arrival_s is not None else time.perf_counter(),
        )

    def _check_sampling(self, params: SamplingParams) -> None:
        for index, stop in enumerate(params.stop):
            if not stop:
                raise ClientError(f"sampling.stop[{index}]", "must not be empty")
            if len(stop) > MAX_STOP_STRING_CHARS:
                raise ClientError(f"sampling.stop[{index}]",
                                  f"longer than {MAX_STOP_STRING_CHARS} characters", len(stop))
        for index, token_id in enumerate(params.stop_token_ids):
            if token_id >= self.vocab_size:
                raise ClientError(f"sampling.stop_token_ids[{index}]",
                                  f"not in the vocabulary [0, {self.vocab_size})", token_id)

    def _group_images(self, items: list[ImageForInsert],
                      checked: Sequence[bool]) -> tuple[ImageForInsert | None, ImageForInsert | None]:
        """Validate each item; merge them into one ``<im_start>`` and one ``<patch_start>`` item."""
        ids = self.tokenizer.ids
        blocks: dict[int, list[torch.Tensor]] = {ids.im_start: [], ids.patch_start: []}
        for index, (item, scanned) in enumerate(zip(items, checked, strict=True)):
            path = f"images[{index}]"
            item.validate(require_features=True, check_finite=not scanned, path=path)
            lengths = item.feature_lengths()
            if 0 in lengths:
                raise ClientError(f"{path}.image_features",
                                  "every image needs at least one feature token (L >= 1)", lengths)
            if item.feature_dim != self.encoder_output_dim:
                raise FeatureDimMismatch(
                    f"{path}.image_features",
                    f"feature dim {item.feature_dim} != the projector's input dim {self.encoder_output_dim}",
                    item.feature_dim,
                )
            if item.insert_start_token not in blocks:
                raise ClientError(
                    f"{path}.insert_start_token",
                    f"must be <im_start> ({ids.im_start}) or <patch_start> ({ids.patch_start})",
                    item.insert_start_token,
                )
            blocks[item.insert_start_token] += list(feature_blocks(item.image_features))
        merged = [ImageForInsert(start, image_features=found) if found else None
                  for start, found in blocks.items()]
        return merged[0], merged[1]

    def _check_length(self, prompt_tokens: int, max_new_tokens: int, source: str) -> None:
        if prompt_tokens >= self.max_seq_len:
            raise ContextLengthExceeded(
                source,
                f"{prompt_tokens} tokens (image tokens included) leave no room to generate in the "
                f"context length {self.max_seq_len}",
                prompt_tokens,
            )
        if prompt_tokens + max_new_tokens > self.max_seq_len:
            raise ContextLengthExceeded(
                "sampling.max_new_tokens",
                f"{prompt_tokens} prompt tokens (image tokens included) + {max_new_tokens} new tokens "
                f"= {prompt_tokens + max_new_tokens} exceed the context length {self.max_seq_len}; "
                f"ask for at most {self.max_seq_len - prompt_tokens}",
                max_new_tokens,
            )


def _lengths(item: ImageForInsert | None) -> list[int]:
    return item.feature_lengths() if item is not None else []
