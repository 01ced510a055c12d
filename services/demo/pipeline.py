"""The monolithic in-process pipeline: vision tower → ImageInsertEmbedding → decoder.

It is the reference the decoupled system must match caption for caption under greedy
decoding, the baseline of the end-to-end benchmark, and the evaluator the trainer
uses. Same checkpoint, same preprocessing, same prompt template, same KV-cache decoder
backend as the services; only the wire is missing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from encoder_server.model import Step37VisionModel, load_vision_model
from encoder_server.model.graphs import TowerGraphs
from encoder_server.preprocess import ImageInput, preprocess_batch
from lm_worker.image_insert_embedding import ImageForInsert, ImageInsertEmbedding
from lm_worker.model.backend import LocalDecoderBackend
from lm_worker.model.decoder import Step37Decoder
from lm_worker.model.loading import load_lm
from lm_worker.tokens import Step37Tokenizer
from proto import to_device

__all__ = ["DEFAULT_PROMPT", "InProcessCaptioner"]

DEFAULT_PROMPT = "<image>"


class InProcessCaptioner:
    """Greedy captions for a batch of images, all in one process.

    Thread-safe by serialising: one KV cache (and, on a GPU, one set of graphs with
    their fixed input buffers) serves every call, so calls from several threads take
    turns rather than interleave.
    """

    def __init__(self, vision: Step37VisionModel, decoder: Step37Decoder, fusion: ImageInsertEmbedding,
                 tokenizer: Step37Tokenizer, *, max_batch_size: int = 64,
                 wire_dtype: torch.dtype | None = torch.bfloat16, cuda_graphs: bool | None = None,
                 compile_steps: bool = False) -> None:
        self.vision = vision
        # The services ship features as bf16 by default; rounding to the same dtype at the
        # same point makes this the exact reference for the decoupled path (None: skip).
        self.wire_dtype = wire_dtype
        self.decoder = decoder
        self.fusion = fusion
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.cuda_graphs = cuda_graphs  # None: on a GPU, as the LM worker
        self.compile_steps = compile_steps  # as the LM worker's --compile-steps on
        self._backend: LocalDecoderBackend | None = None
        self._backend_weights: tuple[tuple[int, int], ...] = ()
        self._tower: TowerGraphs | None = None
        self._tower_weights: tuple[tuple[int, int], ...] = ()
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | None = None, max_batch_size: int = 64,
                        wire_dtype: torch.dtype | None = torch.bfloat16,
                        cuda_graphs: bool | None = None, compile_steps: bool = False) -> InProcessCaptioner:
        vision = load_vision_model(directory, device=device)
        decoder, projector_state, config = load_lm(directory, device=device)
        tokenizer = Step37Tokenizer.from_file(Path(directory) / "tokenizer.json")
        fusion = ImageInsertEmbedding(decoder.embed_tokens, config.encoder_output_dim, config.hidden_size,
                                      config.projector_bias, placeholder_token_id=tokenizer.ids.im_patch)
        fusion.align_projector.load_state_dict(projector_state)
        fusion.to(device=decoder.embed_tokens.weight.device, dtype=decoder.embed_tokens.weight.dtype)
        return cls(vision, decoder, fusion, tokenizer, max_batch_size=max_batch_size, wire_dtype=wire_dtype,
                   cuda_graphs=cuda_graphs, compile_steps=compile_steps)

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    @torch.inference_mode()
    def encode(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images → vision features ``[N, L, C]``."""
        weight = next(self.vision.parameters())
        pixels = to_device(preprocess_batch(images, self.image_size), weight.device)  # the tower casts
        with self._lock:
            features = self.tower()(pixels)  # [N, L, C]
        if self.wire_dtype is not None:
            features = features.to(self.wire_dtype).to(features.dtype)
        return features

    @torch.inference_mode()
    def caption_features(self, features: torch.Tensor, *, prompt: str = DEFAULT_PROMPT,
                         max_new_tokens: int = 48) -> list[str]:
        """Greedy captions from features ``[N, L, C]``, one image per caption."""
        captions: list[str] = []
        with self._lock:
            for start in range(0, features.shape[0], self.max_batch_size):
                captions += self._caption_chunk(features[start : start + self.max_batch_size], prompt,
                                                max_new_tokens)
        return captions

    def caption(self, images: Sequence[ImageInput], *, prompt: str = DEFAULT_PROMPT,
                max_new_tokens: int = 48) -> list[str]:
        return self.caption_features(self.encode(images), prompt=prompt, max_new_tokens=max_new_tokens)

    def tower(self) -> Step37VisionModel | TowerGraphs:
        """The vision tower, replayed from CUDA graphs on a GPU (unless ``cuda_graphs`` is
        False) as the encoder service does; captured again if its weights changed."""
        weight = next(self.vision.parameters())
        if weight.device.type != "cuda" or self.cuda_graphs is False:
            return self.vision
        weights = _weights_key(self.vision)
        if self._tower is None or weights != self._tower_weights:
            with torch.inference_mode(False):  # its buffers outlive this call's inference mode
                self._tower = TowerGraphs(self.vision, self.max_batch_size)
            self._tower_weights = weights
        return self._tower

    def decode_backend(self) -> LocalDecoderBackend:
        """The KV cache (and, on a GPU, the decode graphs) this captioner decodes with.

        Made once and kept, as the LM worker keeps its own; made again if the decoder's
        weights were replaced or updated in place since (a captured graph would still
        read the old ones).
        """
        weights = _weights_key(self.decoder)
        if self._backend is None or weights != self._backend_weights:
            with torch.inference_mode(False):  # its cache outlives this call's inference mode
                self._backend = LocalDecoderBackend(self.decoder, max_batch_size=self.max_batch_size,
                                                max_seq_len=self.decoder.config.max_position_embeddings,
                                                cuda_graphs=self.cuda_graphs, compile_steps=self.compile_steps)
            self._backend_weights = _weights_key(self.decoder)  # compiling may have packed the weights
        return self._backend

    def _caption_chunk(self, features: torch.Tensor, prompt: str, max_new_tokens: int) -> list[str]:
        count, length = int(features.shape[0]), int(features.shape[1])
        prompt_ids = self.tokenizer.build_prompt_ids(prompt, [length])
        backend = self.decode_backend()
        if len(prompt_ids) + max_new_tokens > backend.max_seq_len:
            raise ValueError(f"a {len(prompt_ids)}-token prompt and max_new_tokens={max_new_tokens} exceed "
                             f"the decoder's {backend.max_seq_len} positions")
        input_ids = torch.tensor([prompt_ids] * count)  # [N, S]
        item = ImageForInsert(self.tokenizer.ids.im_start, image_features=features)
        fused = self.fusion(input_ids, [item])  # [S, N, H]
        slots: list[int] = []
        try:
            for _ in range(count):
                slots.append(backend.allocate())
            return self._generate(backend, slots, fused, max_new_tokens)
        finally:
            for slot in slots:
                backend.free(slot)

    def _generate(self, backend: LocalDecoderBackend, slots: list[int], fused: torch.Tensor,
                  max_new_tokens: int) -> list[str]:
        count = len(slots)
        logits = backend.prefill(slots, list(fused.unbind(1)))  # [N, V]
        generated: list[list[int]] = [[] for _ in range(count)]
        active = list(range(count))
        eos = self.tokenizer.eos_token_id
        for _ in range(max_new_tokens):
            next_ids = logits.argmax(dim=-1)  # [n]
            still = []
            for row, token in zip(active, next_ids.tolist(), strict=True):
                if token == eos:
                    continue
                generated[row].append(token)
                still.append(row)
            if not still or len(generated[still[0]]) >= max_new_tokens:
                break
            keep = [active.index(row) for row in still]
            active = still
            logits = backend.decode([slots[row] for row in active], next_ids[keep])
        return [self.tokenizer.decode(ids) for ids in generated]


def _weights_key(module: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    """Changes when a parameter is replaced or updated in place (what a captured graph would miss)."""
    return tuple((param.data_ptr(), param._version) for param in module.parameters())
