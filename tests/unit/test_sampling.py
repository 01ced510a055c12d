"""Sampling (greedy, temperature, top-k, top-p, seeds) and stop rules (EOS, stop ids,
stop strings, length, abort) with incremental detokenisation on a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm_worker.sampling import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    IncrementalDetokenizer,
    SamplingState,
    SequenceOutput,
    sample,
)
from lm_worker.tokens import Step37Tokenizer, build_word_tokenizer
from proto import SamplingParams

WORDS = ["a", "red", "circle", "and", "blue", "square", "on", "the", "left", ",", ".", "stop", "here"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Step37Tokenizer:
    return build_word_tokenizer(WORDS, Path(tmp_path_factory.mktemp("tok")) / "tokenizer.json")


def state(**params) -> SamplingState:
    return SamplingState.create(SamplingParams(**params))


def draws(logits: torch.Tensor, params: dict, n: int) -> list[int]:
    """``n`` tokens from one sequence's generator over the same logits row."""
    sampler = state(**params)
    return [sample(logits[None], [sampler])[0] for _ in range(n)]


# ---- sample() ---------------------------------------------------------------------------
def test_greedy_is_argmax_and_consumes_no_randomness() -> None:
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    states = [state(temperature=0.0, seed=1), state(temperature=0.0), state(top_k=1, temperature=2.0),
              state(), state(temperature=0.0, top_p=0.1)]
    assert all(s.greedy and s.generator is None for s in states)
    assert sample(logits, states) == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = torch.zeros(50)  # uniform: every draw is decided by the generator alone
    first = draws(logits, {"temperature": 1.0, "seed": 7}, 30)
    assert draws(logits, {"temperature": 1.0, "seed": 7}, 30) == first
    assert draws(logits, {"temperature": 1.0, "seed": 8}, 30) != first
    assert len(set(first)) > 10


def test_a_row_samples_the_same_alone_or_in_a_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30, generator=gen)
    params = [dict(temperature=0.8, seed=11), dict(temperature=0.0), dict(temperature=1.3, top_k=5, seed=12),
              dict(temperature=1.0, top_p=0.7, seed=13)]
    batch_states = [state(**p) for p in params]
    alone_states = [state(**p) for p in params]
    for _ in range(10):
        together = sample(logits, batch_states)
        alone = [sample(logits[i : i + 1], [alone_states[i]])[0] for i in range(4)]
        assert together == alone


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    assert set(draws(logits, {"temperature": 5.0, "top_k": 2, "seed": 0}, 200)) == {0, 1}
    probs = torch.softmax(logits, -1)  # [0.64, 0.23, 0.09, ...]
    assert probs[0] < 0.7 < probs[:2].sum()
    # The smallest set with mass >= top_p: the first two tokens.
    assert set(draws(logits, {"temperature": 1.0, "top_p": 0.7, "seed": 0}, 200)) == {0, 1}
    assert set(draws(logits, {"temperature": 1.0, "top_p": 0.5, "seed": 0}, 50)) == {0}


def test_temperature_one_follows_the_softmax() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    tokens = draws(logits, {"temperature": 1.0, "seed": 123}, 3000)
    freq = torch.bincount(torch.tensor(tokens), minlength=3).float() / len(tokens)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_high_temperature_flattens_low_temperature_sharpens() -> None:
    logits = torch.tensor([2.0, 0.0, 0.0, 0.0])
    hot = draws(logits, {"temperature": 50.0, "seed": 1}, 400)
    cold = draws(logits, {"temperature": 0.05, "seed": 1}, 100)
    assert hot.count(0) < 200 and set(cold) == {0}


def test_sample_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"logits must be \[2, V\]"):
        sample(torch.zeros(3, 5), [state(), state()])


# ---- detokenisation and stop rules -------------------------------------------------------
def ids_of(tok: Step37Tokenizer, text: str) -> list[int]:
    return tok.encode_text(text)


def run(tok: Step37Tokenizer, token_ids: list[int], **params) -> tuple[SequenceOutput, list]:
    output = SequenceOutput(SamplingParams(**params), tok.eos_token_id, tok.decode)
    chunks = []
    for token_id in token_ids:
        chunks.append(output.append(token_id))
        if output.finished:
            break
    return output, chunks


def test_incremental_text_equals_whole_decode(tok: Step37Tokenizer) -> None:
    text = "a red circle , a blue square and a red square on the left ."
    token_ids = ids_of(tok, text)
    detokenizer = IncrementalDetokenizer(tok.decode)
    streamed = "".join(detokenizer.push(t) for t in token_ids)
    assert streamed == tok.decode(token_ids) == "a red circle, a blue square and a red square on the left."


def test_eos_stops_unless_ignored(tok: Step37Tokenizer) -> None:
    token_ids = [*ids_of(tok, "a red circle"), tok.eos_token_id, *ids_of(tok, "and")]
    output, chunks = run(tok, token_ids, max_new_tokens=10)
    assert output.finish_reason == FINISH_STOP
    assert output.token_ids == token_ids[:4] and output.text == "a red circle"
    assert chunks[-1].finish_reason == FINISH_STOP and chunks[-1].token_ids == [tok.eos_token_id]
    output, _ = run(tok, token_ids, max_new_tokens=10, ignore_eos=True)
    assert output.finish_reason is None and output.text == "a red circle and"


def test_stop_token_ids_and_length(tok: Step37Tokenizer) -> None:
    token_ids = ids_of(tok, "a red circle and a blue square")
    stop_id = token_ids[3]  # "and"
    output, _ = run(tok, token_ids, max_new_tokens=20, stop_token_ids=[stop_id])
    assert output.finish_reason == FINISH_STOP and output.text == "a red circle"
    assert output.token_ids[-1] == stop_id
    output, chunks = run(tok, token_ids, max_new_tokens=2)
    assert output.finish_reason == FINISH_LENGTH and output.token_ids == token_ids[:2]
    assert [c.finish_reason for c in chunks] == [None, FINISH_LENGTH]


@pytest.mark.parametrize(
    ("stop", "expected_text"),
    [
        (["blue"], "a red circle and a "),  # one token
        (["circle and a"], "a red "),  # spans three tokens
        (["d c"], "a re"),  # spans a token boundary mid-word
        (["square", "and"], "a red circle "),  # earliest match wins
    ],
)
def test_stop_strings_are_trimmed_and_never_streamed(tok: Step37Tokenizer, stop: list[str],
                                                     expected_text: str) -> None:
    token_ids = ids_of(tok, "a red circle and a blue square on the left")
    output, chunks = run(tok, token_ids, max_new_tokens=50, stop=stop)
    assert output.finish_reason == FINISH_STOP
    assert output.text == expected_text
    streamed = "".join(c.text for c in chunks)
    assert streamed == expected_text
    for index in range(1, len(chunks) + 1):  # no prefix of the stream ever shows a stop string
        assert not any(s in "".join(c.text for c in chunks[:index]) for s in stop)


def test_text_that_could_start_a_stop_string_is_held_back(tok: Step37Tokenizer) -> None:
    token_ids = ids_of(tok, "a red circle")
    output, chunks = run(tok, token_ids, max_new_tokens=3, stop=["circle here"])
    assert [c.text for c in chunks] == ["a", " red", " circle"]  # released at the finish
    output, chunks = run(tok, ids_of(tok, "a red circle and"), max_new_tokens=10, stop=["circle here"])
    # Only "circle" could begin "circle here"; the space before it goes out at once.
    assert [c.text for c in chunks] == ["a", " red", " ", "circle and"]
    assert output.finish_reason is None


def test_abort_releases_held_text(tok: Step37Tokenizer) -> None:
    output, chunks = run(tok, ids_of(tok, "a red"), max_new_tokens=10, stop=["red circle"])
    assert "".join(c.text for c in chunks) == "a "
    final = output.abort()
    assert final.finish_reason == FINISH_ABORT and final.text == "red"
    with pytest.raises(RuntimeError, match="already finished"):
        output.append(1)


def test_vanishing_temperature_is_greedy_and_never_fails_the_batch():
    """A temperature that underflows float32 (1e-46 → 0) once made softmax NaN and
    failed every sequence decoded in the same step."""
    from lm_worker.sampling import SamplingState, sample
    from proto import SamplingParams

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    states = [SamplingState.create(SamplingParams(temperature=t, seed=1)) for t in (1e-46, 0.7, 0.0)]
    tokens = sample(logits, states)
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
