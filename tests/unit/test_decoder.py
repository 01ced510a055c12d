"""Decoder, KV cache and local backend: math against a naive reference, cache against
the full forward, batch invariance under continuous batching, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from lm_worker.model.backend import DecoderBackend, LocalDecoderBackend
from lm_worker.model.compiled import CompiledSteps
from lm_worker.model.config import ConfigError, DecoderConfig
from lm_worker.model.decoder import Step37Decoder
from lm_worker.model.kv_cache import CacheCapacityError
from services.common.graphs import padded_batch_sizes

ATOL = 1e-4


def tiny_config(**overrides) -> DecoderConfig:
    fields = dict(
        vocab_size=50, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=96, max_position_embeddings=64,
    )  # fmt: skip
    return DecoderConfig(**{**fields, **overrides})


def make_decoder(seed: int = 0, **overrides) -> Step37Decoder:
    torch.manual_seed(seed)
    decoder = Step37Decoder(tiny_config(**overrides))
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm shows up
        for name, param in decoder.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.uniform_(0.5, 1.5)
    return decoder.train(False)


def full_logits(decoder: Step37Decoder, token_ids: list[int]) -> torch.Tensor:
    """Logits [S, V] of one sequence from a cache-free forward."""
    with torch.inference_mode():
        embedded = decoder.embed_tokens(torch.tensor(token_ids))[:, None]  # [S, 1, H]
        return decoder(embedded)[:, 0]


def reference_logits(decoder: Step37Decoder, token_ids: list[int]) -> torch.Tensor:
    """A deliberately naive LLaMA forward (per-head loops, explicit pair rotation)."""
    config = decoder.config
    params = dict(decoder.named_parameters())

    def rms(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    def rope(x, pos):  # x: [D] for one head at one position
        half = config.head_dim // 2
        out = torch.empty_like(x)
        for j in range(half):
            angle = pos / config.rope_theta ** (2 * j / config.head_dim)
            c, s = math.cos(angle), math.sin(angle)
            out[j] = x[j] * c - x[j + half] * s
            out[j + half] = x[j + half] * c + x[j] * s
        return out

    with torch.no_grad():
        x = params["embed_tokens.weight"][torch.tensor(token_ids)]  # [S, H]
        seq, d = x.shape[0], config.head_dim
        groups = config.num_heads // config.num_kv_heads
        for i in range(config.num_layers):
            p = lambda name, i=i: params[f"layers.{i}.{name}.weight"]  # noqa: E731
            h = rms(x, p("input_layernorm"))
            q, k, v = (
                h @ p("self_attn.q_proj").T,
                h @ p("self_attn.k_proj").T,
                h @ p("self_attn.v_proj").T,
            )
            heads = []
            for head in range(config.num_heads):
                kv = head // groups
                qh = torch.stack([rope(q[t, head * d : (head + 1) * d], t) for t in range(seq)])
                kh = torch.stack([rope(k[t, kv * d : (kv + 1) * d], t) for t in range(seq)])
                vh = v[:, kv * d : (kv + 1) * d]
                scores = qh @ kh.T / math.sqrt(d)
                scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
                heads.append(scores.softmax(-1) @ vh)
            x = x + torch.cat(heads, dim=-1) @ p("self_attn.o_proj").T
            h = rms(x, p("post_attention_layernorm"))
            gate, up = h @ p("mlp.gate_proj").T, h @ p("mlp.up_proj").T
            x = x + (torch.nn.functional.silu(gate) * up) @ p("mlp.down_proj").T
        x = rms(x, params["norm.weight"])
        head_weight = params.get("lm_head.weight", params["embed_tokens.weight"])
        return x @ head_weight.T


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_naive_reference(tied: bool) -> None:
    decoder = make_decoder(tie_word_embeddings=tied)
    tokens = [3, 17, 5, 42, 8, 8, 1]
    torch.testing.assert_close(
        full_logits(decoder, tokens), reference_logits(decoder, tokens), atol=ATOL, rtol=0
    )


def test_serving_path_matches_training_path_and_follows_weight_updates() -> None:
    """Without autograd the decoder runs joined q/k/v and gate/up matmuls and SDPA's own
    GQA; with it, the separate projections training uses. Same logits, and the joined
    weights are rebuilt when a weight changes in place (an optimizer step) or is replaced."""
    decoder = make_decoder()
    tokens = [3, 17, 5, 42, 8]
    embedded = decoder.embed_tokens.weight[tokens].detach()[:, None]  # [S, 1, H]

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        training = decoder(embedded).detach()
        with torch.inference_mode():
            serving = decoder(embedded)
        return training, serving

    training, serving = both()
    torch.testing.assert_close(serving, training, atol=1e-5, rtol=0)
    with torch.no_grad():
        decoder.layers[0].self_attn.k_proj.weight.add_(0.05)
        decoder.layers[1].mlp.up_proj.weight.mul_(1.5)
    changed_training, changed_serving = both()
    assert (changed_training - training).abs().max() > 1e-3
    torch.testing.assert_close(changed_serving, changed_training, atol=1e-5, rtol=0)
    decoder.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(torch.zeros(4 * 16, 48))
    replaced_training, replaced_serving = both()
    torch.testing.assert_close(replaced_serving, replaced_training, atol=1e-5, rtol=0)


def test_packed_weights_serve_in_place_and_follow_loads() -> None:
    """pack_joined_weights makes q/k/v and gate/up rows of one tensor: the serving
    matmuls read that tensor itself (no copy), the checkpoint view is unchanged, a
    load_state_dict shows through, and moving the model falls back to a fresh copy."""
    decoder = make_decoder(seed=3)
    tokens = [5, 6, 7, 8]
    embedded = decoder.embed_tokens.weight[tokens].detach()[:, None]  # [S, 1, H]
    before = {name: value.clone() for name, value in decoder.state_dict().items()}
    with torch.inference_mode():
        expected = decoder(embedded)
    decoder.pack_joined_weights()
    after = decoder.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name], before[name]) for name in before)
    attention, mlp = decoder.layers[0].self_attn, decoder.layers[0].mlp
    qkv = attention._qkv.get(attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight)
    assert qkv.data_ptr() == attention.q_proj.weight.data_ptr() and qkv.shape == (4 * 16 + 2 * 2 * 16, 48)
    assert mlp._gate_up.get(mlp.gate_proj.weight, mlp.up_proj.weight).data_ptr() == mlp.gate_proj.weight.data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(decoder(embedded), expected, atol=1e-6, rtol=0)
    decoder.load_state_dict(make_decoder(seed=4).state_dict())  # copies into the packed rows
    training = decoder(embedded).detach()
    with torch.inference_mode():
        torch.testing.assert_close(decoder(embedded), training, atol=1e-5, rtol=0)
    decoder.layers[1].self_attn.q_proj.weight = torch.nn.Parameter(decoder.layers[1].self_attn.q_proj.weight + 1)
    training = decoder(embedded).detach()
    with torch.inference_mode():  # layer 1's q/k/v no longer alias its packed tensor: a copy is used
        torch.testing.assert_close(decoder(embedded), training, atol=1e-5, rtol=0)
    decoder.double()  # new memory under the same parameters: the cached copy must not be reused
    with torch.inference_mode():
        torch.testing.assert_close(decoder(embedded.double()), training.double(), atol=1e-5, rtol=0)


def test_tied_head_has_no_lm_head_and_reuses_embedding() -> None:
    decoder = make_decoder(tie_word_embeddings=True)
    assert decoder.lm_head is None
    assert "lm_head.weight" not in decoder.state_dict()
    hidden = torch.randn(3, 48)
    torch.testing.assert_close(
        decoder.compute_logits(hidden), hidden @ decoder.embed_tokens.weight.T
    )
    assert "lm_head.weight" in make_decoder(tie_word_embeddings=False).state_dict()


def test_gqa_parameter_and_cache_shapes() -> None:
    decoder = make_decoder()
    attn = decoder.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 16, 48)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * 16, 48)
    assert attn.o_proj.weight.shape == (48, 4 * 16)
    cache = decoder.new_kv_cache(max_batch_size=3, max_seq_len=20)
    assert len(cache.keys) == 2 and cache.keys[0].shape == (3, 2, 20, 16)
    # One kv head shared by all query heads (multi-query) also matches the reference.
    mqa = make_decoder(num_kv_heads=1)
    torch.testing.assert_close(
        full_logits(mqa, [1, 2, 3]), reference_logits(mqa, [1, 2, 3]), atol=ATOL, rtol=0
    )


# The fixed-shape decode step CUDA graphs replay (padded batch, whole-slot attention,
# padding rows in the scratch slot) runs eagerly on the CPU: the same checks hold it to
# the full forward.
FIXED_SHAPES = pytest.mark.parametrize("fixed_shapes", [False, True], ids=["dynamic", "fixed-shape"])


@FIXED_SHAPES
def test_incremental_decoding_matches_full_forward(fixed_shapes: bool) -> None:
    decoder = make_decoder()
    tokens = [4, 9, 9, 30, 2, 11, 7, 25, 13]
    expected = full_logits(decoder, tokens)  # [S, V]
    backend = LocalDecoderBackend(decoder, max_batch_size=2, max_seq_len=32, cuda_graphs=fixed_shapes)
    slot = backend.allocate()
    prompt = 4
    embedded = decoder.embed_tokens.weight[tokens[:prompt]].detach()  # [4, H]
    got = [backend.prefill([slot], [embedded])[0]]
    for position in range(prompt, len(tokens)):
        got.append(backend.decode([slot], torch.tensor([tokens[position]]))[0])
    torch.testing.assert_close(torch.stack(got), expected[prompt - 1 :], atol=ATOL, rtol=0)
    assert backend.sequence_length(slot) == len(tokens)


@FIXED_SHAPES
def test_batch_invariance_with_slots_joining_and_leaving(fixed_shapes: bool) -> None:
    """Each sequence's logits do not depend on who shares the step, nor on the slot's
    previous occupant (a freed slot is reused with stale K/V still in memory)."""
    decoder = make_decoder(seed=1)
    sequences = {
        "a": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        "b": [20, 21, 22, 23, 24, 25, 26, 27, 28],
        "c": [40, 41, 42, 43, 44, 45, 46, 47],
        "d": [5, 15, 25, 35, 45, 6, 16, 26],
    }
    backend = LocalDecoderBackend(decoder, max_batch_size=3, max_seq_len=16, cuda_graphs=fixed_shapes)
    assert (backend.graphs is not None) == fixed_shapes
    join_and_leave(decoder, backend, sequences)


def test_compiled_steps_keep_batch_invariance_without_recompiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Inductor-compiled decode step and prefill (the CPU's ``--compile-steps``) under
    the same joining and leaving, one newcomer or two: compiled once when built, for every
    batch size and length."""
    # Serving would run a call no compiled variant accepts eagerly; here it fails the test.
    monkeypatch.setattr(CompiledSteps, "run_only", False)
    decoder = make_decoder(seed=3)
    backend = LocalDecoderBackend(decoder, max_batch_size=3, max_seq_len=16, compile_steps=True)
    assert backend.compiled is not None and backend.graphs is None and backend.cache.scratch_slot == 3
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # compiled above; not again
    join_and_leave(decoder, backend, {
        "a": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        "b": [20, 21, 22, 23, 24, 25, 26, 27, 28],
        "c": [40, 41, 42, 43, 44, 45, 46, 47],
        "d": [5, 15, 25, 35, 45, 6, 16, 26],
    })
    # Three newcomers at once (more than any size the steps were compiled at), and
    # three running sequences, with as many as the model's K/V heads plus one.
    for slot in range(3):
        backend.free(slot)
    sequences = {"e": [3, 1, 4, 1, 5, 9, 2, 6], "f": [2, 7, 1, 8, 2, 8], "g": [1, 4, 1, 4, 2, 1, 3]}
    assert decoder.config.num_kv_heads == 2
    join_and_leave(decoder, backend, sequences, joins=[(["e", "f", "g"], [4, 3, 5])],
                   steps=[["e", "f", "g"], ["g", "e", "f"]])


def join_and_leave(decoder: Step37Decoder, backend: LocalDecoderBackend, sequences: dict[str, list[int]], *,
                   joins: list[tuple[list[str], list[int]]] | None = None,
                   steps: list[list[str]] | None = None) -> None:
    """Sequences join, decode in changing company and order, and leave (a freed slot is
    reused); every logit is checked against the sequence's own full forward. ``joins``
    then ``steps``, when given, replace the default scenario."""
    expected = {name: full_logits(decoder, toks) for name, toks in sequences.items()}
    slot, fed = {}, {}

    def check(name: str, logits: torch.Tensor) -> None:
        torch.testing.assert_close(logits, expected[name][fed[name] - 1], atol=ATOL, rtol=0)

    def join(names: list[str], prompt_lengths: list[int]) -> None:
        for name in names:
            slot[name] = backend.allocate()
        embeddings = [
            decoder.embed_tokens.weight[sequences[n][:length]].detach()
            for n, length in zip(names, prompt_lengths, strict=True)
        ]
        logits = backend.prefill([slot[n] for n in names], embeddings)
        for row, (name, length) in enumerate(zip(names, prompt_lengths, strict=True)):
            fed[name] = length
            check(name, logits[row])

    def step(names: list[str]) -> None:
        tokens = torch.tensor([sequences[n][fed[n]] for n in names])
        logits = backend.decode([slot[n] for n in names], tokens)
        for row, name in enumerate(names):
            fed[name] += 1
            check(name, logits[row])

    if joins is not None:
        for names, lengths in joins:
            join(names, lengths)
        for names in steps or []:
            step(names)
        return
    join(["a"], [3])
    step(["a"])
    join(["b", "c"], [5, 2])  # two newcomers of different lengths, padded together
    step(["a", "b", "c"])
    step(["c", "a"])  # a subset, in another order
    backend.free(slot.pop("b"))
    join(["d"], [4])  # reuses b's slot
    assert slot["d"] not in (slot["a"], slot["c"])
    step(["d", "c", "a"])
    step(["a", "d"])
    assert backend.num_free_slots == 0


def test_fixed_shape_steps_pad_into_the_scratch_slot() -> None:
    """Three newcomers prefill, and three running sequences decode, in size-4 steps: the
    padding row writes only the scratch slot (one row past the slots handed out), never
    a sequence's keys."""
    assert padded_batch_sizes(5) == [1, 2, 4, 5] and padded_batch_sizes(1) == [1]
    assert padded_batch_sizes(8) == [1, 2, 4, 8]
    decoder = make_decoder(seed=2)
    sequences = [[7, 3, 9, 12, 30, 31, 32, 33], [1, 2, 3, 4, 5, 6, 7, 8], [40, 30, 20, 10, 11, 12, 13, 14]]
    expected = [full_logits(decoder, tokens) for tokens in sequences]
    backend = LocalDecoderBackend(decoder, max_batch_size=5, max_seq_len=12, cuda_graphs=True)
    assert backend.cache.keys[0].shape[0] == 6 and backend.cache.scratch_slot == 5
    slots = [backend.allocate() for _ in sequences]
    prompt = 3
    backend.prefill(slots, [decoder.embed_tokens.weight[tokens[:prompt]].detach() for tokens in sequences])
    for position in range(prompt, 8):
        logits = backend.decode(slots, torch.tensor([tokens[position] for tokens in sequences]))
        for row, want in enumerate(expected):
            torch.testing.assert_close(logits[row], want[position], atol=ATOL, rtol=0)
    assert [backend.sequence_length(slot) for slot in slots] == [8, 8, 8]
    # A 3-token chunk appended at position 8 of 12 runs in the 12-column prefill step:
    # its padded columns would run past the slot's end, so they go to the scratch slot.
    chunk = [17, 18, 19]
    logits = backend.prefill([slots[1]], [decoder.embed_tokens.weight[chunk].detach()])
    torch.testing.assert_close(logits[0], full_logits(decoder, sequences[1] + chunk)[-1], atol=ATOL, rtol=0)
    assert backend.prefill_graphs is not None and backend.prefill_graphs.lengths == [12]
    # The two slots never handed out were never written: padding went to the scratch slot only.
    for stored in (*backend.cache.keys, *backend.cache.values):
        assert not stored[3:5].any() and stored[5].any()


def test_decoder_input_shape_is_checked() -> None:
    decoder = make_decoder()
    with pytest.raises(ValueError, match=r"\[S, B, 48\]"):
        decoder(torch.zeros(5, 48))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        decoder(torch.zeros(65, 1, 48))


@FIXED_SHAPES
def test_cache_capacity_errors(fixed_shapes: bool) -> None:
    backend = LocalDecoderBackend(make_decoder(), max_batch_size=1, max_seq_len=4, cuda_graphs=fixed_shapes)
    assert isinstance(backend, DecoderBackend)
    slot = backend.allocate()
    with pytest.raises(CacheCapacityError, match="in use"):
        backend.allocate()
    with pytest.raises(CacheCapacityError, match="max_seq_len=4"):
        backend.prefill([slot], [torch.zeros(5, 48)])
    backend.prefill([slot], [torch.zeros(4, 48)])
    with pytest.raises(CacheCapacityError, match="exceed"):
        backend.decode([slot], torch.tensor([1]))
    backend.free(slot)
    with pytest.raises(CacheCapacityError, match="not allocated"):
        backend.free(slot)
    with pytest.raises(CacheCapacityError, match="not allocated"):
        backend.decode([slot], torch.tensor([1]))


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="num_kv_heads") as info:
        tiny_config(num_kv_heads=3)
    assert info.value.field == "num_kv_heads"
    with pytest.raises(ConfigError, match="head_dim"):
        tiny_config(head_dim=15)
    with pytest.raises(ConfigError, match="hidden_size.*integer"):
        tiny_config(hidden_size=48.0)
    with pytest.raises(ConfigError, match="tie_word_embeddings.*boolean"):
        tiny_config(tie_word_embeddings=1)
    with pytest.raises(ConfigError, match="sliding_window"):
        DecoderConfig.from_dict({**tiny_config().to_dict(), "sliding_window": 128})
    with pytest.raises(ConfigError, match="vocab_size"):
        DecoderConfig.from_dict(
            {k: v for k, v in tiny_config().to_dict().items() if k != "vocab_size"}
        )


def test_presets_round_trip() -> None:
    tiny = DecoderConfig.preset("step37-tiny", vocab_size=300)
    assert (tiny.hidden_size, tiny.encoder_output_dim, tiny.vocab_size) == (128, 256, 300)
    assert DecoderConfig.from_dict(tiny.to_dict()) == tiny
    small = DecoderConfig.preset("step37-small", vocab_size=300, num_layers=2)
    assert small.num_layers == 2 and small.hidden_size > tiny.hidden_size
    with pytest.raises(ConfigError, match="unknown preset"):
        DecoderConfig.preset("step37-huge", vocab_size=300)
