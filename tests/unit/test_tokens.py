"""Tokenizer glue on a real tokenizer.json: ids from the file, <image> expansion,
validation of caller-provided input_ids, decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from lm_worker.tokens import (
    SpecialTokens,
    Step37Tokenizer,
    TokenLayoutError,
    build_word_tokenizer,
)

WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left", "describe", "image", ".", ":"]


@pytest.fixture
def tok(tmp_path: Path) -> Step37Tokenizer:
    path = tmp_path / "tokenizer.json"
    build_word_tokenizer(WORDS, path)
    return Step37Tokenizer.from_file(path)


def test_special_ids_come_from_the_file(tok: Step37Tokenizer, tmp_path: Path) -> None:
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.ids.im_start == raw.token_to_id("<im_start>")
    assert tok.ids.im_patch == raw.token_to_id("<im_patch>")
    assert tok.ids.pad == 0 and tok.eos_token_id == raw.token_to_id("</s>")
    assert len(set(vars(tok.ids).values())) == 8
    assert tok.vocab_size == 9 + len(WORDS)


def test_text_round_trip(tok: Step37Tokenizer) -> None:
    text = "a red circle on the left."
    assert tok.decode(tok.encode_text(text)) == text
    assert tok.tokenizer.id_to_token(tok.encode_text("purple")[0]) == "<unk>"


def test_prompt_template_expands_each_image(tok: Step37Tokenizer) -> None:
    ids = tok.build_prompt_ids("<image> describe <image> the image.", [3, 2])
    s = tok.ids
    expected = (
        [s.bos, s.im_start, s.im_patch, s.im_patch, s.im_patch, s.im_end]
        + tok.encode_text("describe")
        + [s.im_start, s.im_patch, s.im_patch, s.im_end]
        + tok.encode_text("the image.")
    )
    assert ids == expected
    tok.validate_input_ids(ids, [3, 2])
    assert tok.decode(ids) == "describe the image."
    assert tok.build_prompt_ids("describe", []) == [s.bos, *tok.encode_text("describe")]


def test_prompt_errors(tok: Step37Tokenizer) -> None:
    with pytest.raises(TokenLayoutError, match="1 <image> placeholder.*2 image"):
        tok.build_prompt_ids("<image> describe", [4, 4])
    with pytest.raises(TokenLayoutError, match="special tokens") as info:
        tok.build_prompt_ids("<image> a <im_patch> red", [4])
    assert info.value.field == "prompt" and info.value.value == "<im_patch>"
    assert isinstance(info.value, ValueError) and info.value.http_status == 400
    with pytest.raises(TokenLayoutError, match=r"image_token_counts\[0\]"):
        tok.build_prompt_ids("<image>", [0])


def layout(tok: Step37Tokenizer, *blocks: list[int]) -> list[int]:
    red = tok.encode_text("red")
    return [tok.ids.bos, *red, *[i for block in blocks for i in block], *red]


@pytest.mark.parametrize(
    ("mutate", "counts", "match"),
    [
        (lambda ids, s: ids, [3, 3], r"input_ids: has 1 <im_start> but 2 image"),
        (lambda ids, s: ids[:3] + ids[4:], [3], r"input_ids\[5\].*expected 3 <im_patch>.*found 2"),
        (
            lambda ids, s: ids[:3] + [s.im_patch] + ids[3:],
            [3],
            r"input_ids\[6\]: expected <im_end>",
        ),
        (lambda ids, s: ids[:6], [3], r"input_ids\[6\]: expected <im_end>"),
        (lambda ids, s: ids + [s.im_patch], [3], r"input_ids\[8\]: placeholder token outside"),
        (lambda ids, s: [s.im_end] + ids, [3], r"input_ids\[0\]: placeholder token outside"),
        (lambda ids, s: ids + [10_000], [3], r"input_ids\[8\]: not in the vocabulary"),
        (lambda ids, s: ids + [-1], [3], r"not in the vocabulary"),
        (lambda ids, s: [], [3], r"non-empty"),
    ],
)
def test_validate_input_ids_failures(tok: Step37Tokenizer, mutate, counts, match) -> None:
    ids = layout(tok, tok.image_block(3))
    tok.validate_input_ids(ids, [3])
    with pytest.raises(TokenLayoutError, match=match):
        tok.validate_input_ids(mutate(ids, tok.ids), counts)


def test_validate_multicrop_patch_blocks(tok: Step37Tokenizer) -> None:
    s = tok.ids
    patch_block = [s.patch_start, s.im_patch, s.im_patch, s.patch_end]
    ids = layout(tok, patch_block, patch_block, tok.image_block(4))
    tok.validate_input_ids(ids, [4], patch_token_counts=[2, 2])
    tok.validate_input_ids(torch.tensor(ids), [4], patch_token_counts=[2, 2])
    with pytest.raises(TokenLayoutError, match="2 <patch_start> but 1 patch"):
        tok.validate_input_ids(ids, [4], patch_token_counts=[2])
    with pytest.raises(TokenLayoutError, match="expected <patch_end>"):
        tok.validate_input_ids(ids, [4], patch_token_counts=[1, 2])


def test_decode_skips_special_tokens(tok: Step37Tokenizer) -> None:
    ids = [tok.ids.bos, *tok.encode_text("a blue square."), tok.ids.eos, tok.ids.pad]
    assert tok.decode(ids) == "a blue square."


def test_build_word_tokenizer_rejects_multi_token_words(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="single pre-token"):
        build_word_tokenizer(["red", "circle."], tmp_path / "tokenizer.json")


def test_custom_special_token_names(tmp_path: Path) -> None:
    build_word_tokenizer(WORDS, tmp_path / "tokenizer.json")
    renamed = SpecialTokens(bos="<|begin|>")
    with pytest.raises(ValueError, match=r"bos='<\|begin\|>'"):
        Step37Tokenizer.from_file(tmp_path / "tokenizer.json", renamed)
