"""The Step3.7 text decoder, its slot KV cache, the backend interface and checkpoint I/O.

Model code only: tensors and dataclasses in, logits out; nothing here knows about HTTP.
"""

from lm_worker.model.backend import DecoderBackend, LocalDecoderBackend
from lm_worker.model.config import ConfigError, DecoderConfig
from lm_worker.model.decoder import Step37Decoder
from lm_worker.model.kv_cache import CacheCapacityError, KVCache
from lm_worker.model.loading import CheckpointError, load_lm, save_pretrained

__all__ = [
    "CacheCapacityError",
    "CheckpointError",
    "ConfigError",
    "DecoderBackend",
    "DecoderConfig",
    "KVCache",
    "LocalDecoderBackend",
    "Step37Decoder",
    "load_lm",
    "save_pretrained",
]
