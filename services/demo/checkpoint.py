"""Write a complete checkpoint directory in the layout real Step3.7 checkpoints use.

``config.json`` (``vision_config``, ``text_config``, token ids), ``model.safetensors``
(``vision_model.*``, ``vit_large_projector.*``, ``language_model.*``) and
``tokenizer.json``. The trainer writes the bundled model through ``save_checkpoint``;
tests and benchmarks get seeded random weights of the same shape through
``random_checkpoint``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from encoder_server.model import Step37VisionModel, VisionConfig, init_random
from encoder_server.model import save_pretrained as save_vision
from lm_worker.image_insert_embedding import ImageInsertEmbedding
from lm_worker.model.config import DecoderConfig
from lm_worker.model.decoder import Step37Decoder
from lm_worker.model.loading import save_pretrained as save_lm
from lm_worker.tokens import Step37Tokenizer, build_word_tokenizer

__all__ = ["TOKEN_ID_KEYS", "random_checkpoint", "read_token_ids", "save_checkpoint"]

# config.json key → special token; image_token_id is the released config's name for <im_patch>.
TOKEN_ID_KEYS = {
    "im_start_token_id": "im_start",
    "image_token_id": "im_patch",
    "im_end_token_id": "im_end",
    "patch_start_token_id": "patch_start",
    "patch_end_token_id": "patch_end",
}


def save_checkpoint(
    directory: str | Path,
    *,
    vision: Step37VisionModel,
    decoder: Step37Decoder,
    fusion: ImageInsertEmbedding,
    text_config: DecoderConfig,
    tokenizer: Step37Tokenizer,
    extra_config: dict | None = None,
) -> Path:
    """Save all three parts; the vision side first (it writes config.json afresh)."""
    directory = Path(directory)
    ids = tokenizer.ids
    token_ids = {key: getattr(ids, name) for key, name in TOKEN_ID_KEYS.items()}
    save_vision(vision, directory, vision.config,
                extra_config={"model_type": "step37", **token_ids, **(extra_config or {})})
    save_lm(directory, decoder, fusion.align_projector.state_dict(), text_config)
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.exists():
        tokenizer.tokenizer.save(str(tokenizer_path))
    # Lets Hugging Face tooling (AutoTokenizer, and clients such as aiperf) load the directory.
    special = tokenizer.special_tokens
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special.bos, "eos_token": special.eos,
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": text_config.max_position_embeddings,
    }, indent=2) + "\n")
    return directory


def read_token_ids(directory: str | Path) -> dict[str, int]:
    """The special-token ids recorded in ``config.json`` (``im_start_token_id`` …)."""
    document = json.loads((Path(directory) / "config.json").read_text())
    return {key: int(document[key]) for key in TOKEN_ID_KEYS if key in document}


def random_checkpoint(
    directory: str | Path,
    *,
    seed: int = 0,
    words: Sequence[str] | None = None,
    vision_preset: str = "step37-tiny",
    text_preset: str = "step37-tiny",
) -> Path:
    """A seeded random checkpoint of the given presets (for tests and benchmarks)."""
    from services.demo.captions import CAPTION_VOCABULARY

    directory = Path(directory)
    tokenizer = build_word_tokenizer(list(words or CAPTION_VOCABULARY), directory / "tokenizer.json")
    vision_config = VisionConfig.preset(vision_preset)
    vision = init_random(vision_config, seed=seed, dtype=torch.float32, device="cpu")
    text_config = DecoderConfig.preset(text_preset, vocab_size=tokenizer.vocab_size,
                                       encoder_output_dim=vision_config.output_dim)
    torch.manual_seed(seed)
    decoder = Step37Decoder(text_config)
    fusion = ImageInsertEmbedding(decoder.embed_tokens, text_config.encoder_output_dim, text_config.hidden_size,
                                  text_config.projector_bias, placeholder_token_id=tokenizer.ids.im_patch)
    return save_checkpoint(directory, vision=vision, decoder=decoder, fusion=fusion,
                           text_config=text_config, tokenizer=tokenizer)
