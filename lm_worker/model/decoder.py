"""The Step3.7 text decoder: a dense LLaMA-style transformer with a Megatron-style input.

Like Megatron-Core's ``GPTModel(decoder_input=...)`` it does not embed tokens itself in
the forward pass: the caller passes already-fused embeddings ``[S, B, H]`` (word
embeddings with projected image features scattered in by ``ImageInsertEmbedding``,
which borrows :attr:`Step37Decoder.embed_tokens`). Logits come back sequence-first,
``[S, B, V]``, the same layout as the input; Megatron transposes to ``[B, S, V]`` at
the end, we don't, because the serving path only ever reads one position per row.

Blocks are pre-norm: ``x += attn(rmsnorm(x))``, ``x += mlp(rmsnorm(x))`` with RoPE
(rotate-half convention, as HF LLaMA), grouped-query attention and a SwiGLU MLP.
Parameter names match the checkpoint (``language_model.`` + these names), so weights
load by name with no mapping table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm_worker.model.config import DecoderConfig
from lm_worker.model.kv_cache import CacheStep, KVCache

__all__ = ["RMSNorm", "Step37Decoder", "apply_rotary", "rotary_cos_sin"]


class JoinedWeight:
    """Several linear weights stacked along the output dim: one matmul where there were several.

    Used only without autograd (serving): a decode step is a few hundred tiny kernels,
    so their count is its cost. The checkpoint keeps the separate weights. After
    :meth:`pack` (the LM worker does it at load) the parts are views of one tensor, which
    is used as is; otherwise the stack is a copy, made again when a part's memory moves
    (replaced, ``.to()``) or changes in place (its version counter: optimizer steps,
    ``load_state_dict``). The copy's sources are held, so a moved part cannot reappear
    at its old address. In-place writes through ``.data`` bypass the version counter and
    leave a copy stale: pack again after them.
    """

    __slots__ = ("_held", "_key", "_packed", "_value")

    def __init__(self) -> None:
        self._packed: torch.Tensor | None = None
        self._held: tuple[torch.Tensor, ...] = ()
        self._key: tuple[tuple[int, int], ...] = ()
        self._value: torch.Tensor | None = None

    def holds(self, *parts: torch.Tensor) -> bool:
        """Whether ``parts`` are, in order, the rows of the packed tensor now."""
        return self._packed is not None and _consecutive_rows_of(self._packed, parts)

    def get(self, *parts: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # A compiled step reads the packed tensor (its compiler packs the weights first;
            # memory addresses and version counters are not traceable).
            assert self._packed is not None, "pack the weights before compiling"
            return self._packed
        if self.holds(*parts):
            return self._packed  # the parts are its rows: always current, never copied
        key = tuple((part.data_ptr(), part._version) for part in parts)
        if key != self._key or self._value is None:
            self._held = tuple(part.detach() for part in parts)
            self._value = torch.cat(self._held)  # [sum(out), in]
            self._key = key
        return self._value

    @torch.no_grad()
    def pack(self, *linears: nn.Linear) -> None:
        """Move the linears' weights into one tensor and make each a view of its rows."""
        joined = torch.cat([linear.weight.detach() for linear in linears])  # [sum(out), in]
        start = 0
        for linear in linears:
            rows = linear.weight.shape[0]
            linear.weight = nn.Parameter(joined[start : start + rows], requires_grad=linear.weight.requires_grad)
            start += rows
        self._packed, self._held, self._key, self._value = joined, (), (), None


def _consecutive_rows_of(joined: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``parts`` are, in order, exactly the rows of ``joined`` (same memory)."""
    pointer, itemsize = joined.data_ptr(), joined.element_size()
    for part in parts:
        if part.data_ptr() != pointer or part.dtype != joined.dtype or not part.is_contiguous():
            return False
        pointer += part.numel() * itemsize
    return pointer == joined.data_ptr() + joined.numel() * itemsize


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 so bf16 activations keep precision."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[B, 1, S, head_dim]`` (float32) for absolute ``positions [B, S]``.

    Computed per call rather than cached in a buffer: it is a few thousand flops, each
    slot has its own positions, and a buffer-free module can be built on the meta
    device and loaded with ``assign=True``.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))  # [D/2]
    freqs = positions.float()[..., None] * inv_freq  # [B, S, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, S, D]`` in float32 (bf16 angles lose positions) and cast back."""
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention: ``num_heads`` query heads share ``num_kv_heads`` K/V heads."""

    def __init__(self, config: DecoderConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        hidden, q_width, kv_width = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        self.q_proj = nn.Linear(hidden, q_width, bias=False)
        self.k_proj = nn.Linear(hidden, kv_width, bias=False)
        self.v_proj = nn.Linear(hidden, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, hidden, bias=False)
        self._qkv = JoinedWeight()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        step: CacheStep | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape  # [B, S, H]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        serving = not torch.is_grad_enabled()
        if serving:
            weight = self._qkv.get(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
            qkv = F.linear(x, weight).view(batch, seq, heads + 2 * kv_heads, head_dim).transpose(1, 2)
            # q and k rotate together: one set of elementwise kernels, the same values.
            qk = apply_rotary(qkv[:, : heads + kv_heads], cos, sin)
            q, k = qk.split((heads, kv_heads), dim=1)
            v = qkv[:, heads + kv_heads :]
        else:
            q = self.q_proj(x).view(batch, seq, heads, head_dim).transpose(1, 2)
            k = self.k_proj(x).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
            v = self.v_proj(x).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # q: [B, heads, S, D]; k, v: [B, kv_heads, S, D]

        if kv_cache is None:
            mask, causal = None, True
        else:
            assert step is not None
            k, v = kv_cache.update(self.layer_index, step, k, v)  # [B, kv_heads, T, D]
            mask, causal = step.attention_mask, False  # [B, 1, S, T]

        groups = heads // kv_heads
        if groups > 1 and serving:
            # SDPA reads K/V head h // groups itself: no copies of the cached keys.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        else:
            if groups > 1:
                # Query head h reads K/V head h // groups (HF `repeat_kv` order). Training
                # keeps the explicit expand: its backward is the one the recipes ran.
                total = k.shape[2]
                k = k[:, :, None].expand(batch, kv_heads, groups, total, head_dim)
                k = k.reshape(batch, heads, total, head_dim)  # [B, heads, T, D]
                v = v[:, :, None].expand(batch, kv_heads, groups, total, head_dim)
                v = v.reshape(batch, heads, total, head_dim)  # [B, heads, T, D]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out = out.transpose(1, 2).reshape(batch, seq, heads * head_dim)
        return self.o_proj(out)  # [B, S, H]


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self._gate_up = JoinedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, self._gate_up.get(self.gate_proj.weight, self.up_proj.weight)).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        step: CacheStep | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Step37Decoder(nn.Module):
    """Dense decoder over fused embeddings; owns the word embedding the fusion borrows.

    Two ways to run it:

    * no cache: ``forward(decoder_input)`` is a plain causal forward over positions
      ``0..S-1`` of every row (training, reference checks);
    * with a :class:`KVCache`: each batch row ``b`` appends ``input_lengths[b]`` tokens
      (right-padded to ``S``) to ``slots[b]`` at that slot's current length, and attends
      over the slot's cached keys. Prefill and decode are the same call.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tied: logits reuse embed_tokens.weight and no lm_head.weight is saved.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2·layers).

        PyTorch's default N(0, 1) embedding, tied to the head, would start training
        with logits of std ~sqrt(hidden) and a loss in the hundreds.
        """
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            elif param.dim() >= 2:
                nn.init.normal_(param, mean=0.0, std=std)
            else:
                nn.init.ones_(param)  # RMSNorm gains

    def hidden_states(
        self,
        decoder_input: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        slots: list[int] | None = None,
        input_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states ``[S, B, H]`` for ``decoder_input [S, B, H]``.

        With ``kv_cache``, ``slots`` (one allocated slot per batch row) is required and
        ``input_lengths`` defaults to ``S`` for every row; the cache lengths advance by
        ``input_lengths`` on return. Outputs at padded columns are meaningless.
        """
        if decoder_input.dim() != 3 or decoder_input.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"decoder_input must be [S, B, {self.config.hidden_size}] (sequence-first), "
                f"got {list(decoder_input.shape)}"
            )
        seq, batch, _ = decoder_input.shape
        x = decoder_input.transpose(0, 1)  # [B, S, H]: attention wants batch-first

        step = None
        if kv_cache is None:
            if slots is not None or input_lengths is not None:
                raise ValueError("slots and input_lengths need a kv_cache")
            if seq > self.config.max_position_embeddings:
                raise ValueError(
                    f"sequence length {seq} exceeds max_position_embeddings="
                    f"{self.config.max_position_embeddings}"
                )
            positions = torch.arange(seq, device=x.device).expand(batch, seq)  # [B, S]
        else:
            if slots is None or len(slots) != batch:
                raise ValueError(f"need one slot per batch row ({batch}), got {slots}")
            step = kv_cache.plan(slots, input_lengths or [seq] * batch, seq)
            positions = step.positions  # [B, S]

        x = self.run_layers(x, positions, kv_cache, step)  # [B, S, H]
        if kv_cache is not None and step is not None:
            kv_cache.commit(step)
        return x.transpose(0, 1)  # [S, B, H]

    def run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache | None, step: CacheStep | None
    ) -> torch.Tensor:
        """Final-norm hidden states ``[B, S, H]`` for batch-first inputs ``x [B, S, H]`` at
        ``positions [B, S]``, through ``step``'s cache writes and reads (no host reads, no
        length bookkeeping: what a fixed-shape, graph-captured step runs)."""
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache, step)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``[..., V]`` for final hidden states ``[..., H]``."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def forward(
        self,
        decoder_input: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        slots: list[int] | None = None,
        input_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """Logits ``[S, B, V]`` for fused embeddings ``decoder_input [S, B, H]``."""
        hidden = self.hidden_states(
            decoder_input, kv_cache=kv_cache, slots=slots, input_lengths=input_lengths
        )
        return self.compute_logits(hidden)

    def pack_joined_weights(self) -> None:
        """For serving: each layer's q/k/v and gate/up weights become rows of one tensor,
        so the joined matmuls read them in place (no second copy). Names, shapes, values
        and the saved checkpoint are unchanged; call it after moving the model."""
        for layer in self.layers:
            attention, mlp = layer.self_attn, layer.mlp
            attention._qkv.pack(attention.q_proj, attention.k_proj, attention.v_proj)
            mlp._gate_up.pack(mlp.gate_proj, mlp.up_proj)

    @property
    def joined_weights_packed(self) -> bool:
        """Whether :meth:`pack_joined_weights` holds for the current weights."""
        return all(
            layer.self_attn._qkv.holds(layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                       layer.self_attn.v_proj.weight)
            and layer.mlp._gate_up.holds(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight)
            for layer in self.layers
        )

    def new_kv_cache(self, *, max_batch_size: int, max_seq_len: int, scratch_slot: bool = False) -> KVCache:
        """A cache sized for this decoder, on its device and in its dtype."""
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        weight = self.embed_tokens.weight
        return KVCache(
            num_layers=self.config.num_layers,
            max_batch_size=max_batch_size,
            num_kv_heads=self.config.num_kv_heads,
            max_seq_len=max_seq_len,
            head_dim=self.config.head_dim,
            dtype=weight.dtype,
            device=weight.device,
            scratch_slot=scratch_slot,
        )
