"""``step37-serve lm-worker``: serve the decoder fed by ``ImageForInsert`` messages.

    step37-serve lm-worker --model models/step37-tiny
    step37-serve lm-worker --preset step37-tiny --tokenizer models/step37-tiny/tokenizer.json

Every flag also reads ``STEP37_<FLAG>`` (``--max-batch-size`` → ``STEP37_MAX_BATCH_SIZE``).
Binds 127.0.0.1 unless told otherwise: the worker is an internal service behind the gateway.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from lm_worker.app import create_app
from lm_worker.model import DecoderConfig
from lm_worker.settings import DTYPES, LMWorkerSettings
from services.common.rpc import RpcListen
from services.common.server import serve, setup_logging
from services.common.settings import add_setting

__all__ = ["add_arguments", "run"]


def _default(name: str) -> Any:
    """The settings dataclass is the one place defaults are written down."""
    return LMWorkerSettings.__dataclass_fields__[name].default


def _optional(text: str) -> str | None:
    return text or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting(parser, "--model", default=None, type=_optional,
                help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    add_setting(parser, "--preset", default=None, type=_optional,
                help=f"serve random weights of a preset instead, one of {sorted(DecoderConfig.PRESETS)}")
    add_setting(parser, "--tokenizer", default=None, type=_optional,
                help="tokenizer.json (required with --preset; overrides the checkpoint's)")
    add_setting(parser, "--seed", default=_default("seed"), type=int, help="seed of --preset weights")
    add_setting(parser, "--host", default="127.0.0.1", help="address to bind")
    add_setting(parser, "--port", default=8002, type=int, help="port to bind")
    add_setting(parser, "--rpc-port", default=0, type=int, help="port of the gateway's call channel, on the "
                "same address (0: any free port, reported in /ready; -1: off, HTTP only)")
    add_setting(parser, "--device", default=_default("device"), help="auto, cpu, cuda or cuda:N")
    add_setting(parser, "--torch-threads", default=0, type=int,
                help="intra-op threads (0: torch's default); on small CPUs leave cores to the other services")
    add_setting(parser, "--dtype", default=_default("dtype"), choices=["auto", *DTYPES],
                help="compute dtype (auto: float32 on CPU, bfloat16 on GPU)")
    add_setting(parser, "--max-batch-size", default=_default("max_batch_size"), type=int,
                help="sequences decoded together (KV-cache slots)")
    add_setting(parser, "--max-waiting", default=_default("max_waiting"), type=int,
                help="requests queued for a slot before answering 503")
    add_setting(parser, "--max-prefill-tokens", default=_default("max_prefill_tokens"), type=int,
                help="prompt positions prefilled in one step, at most: a longer prompt is prefilled in chunks "
                     "between decode steps of the running batch (chunked prefill)")
    add_setting(parser, "--max-seq-len", default=_default("max_seq_len"), type=int,
                help="context length per sequence (0: the model's)")
    add_setting(parser, "--cuda-graphs", default=_default("cuda_graphs"), choices=["auto", "off"],
                help="auto: on a GPU, decode steps replay CUDA graphs captured at start-up; off: eager")
    add_setting(parser, "--compile-steps", default=_default("compile_steps"), choices=["on", "off"],
                help="on: decode steps and prefills compiled by Inductor at start-up, the CPU's "
                     "counterpart of CUDA graphs (up to a minute or so on two cores; needs g++)")
    add_setting(parser, "--prefix-cache-mb", default=_default("prefix_cache_mb"), type=int,
                help="memory for the keys and values of earlier prompts' prefixes, reused by prompts that "
                     "start the same way (the same image and text before it); 0: off")
    add_setting(parser, "--prefix-block-size", default=_default("prefix_block_size"), type=int,
                help="prompt positions per cached prefix block")
    add_setting(parser, "--feature-store-mb", default=_default("feature_store_mb"), type=int,
                help="host memory for image features the gateway may then name instead of sending "
                     "(a chat about one image resends it every turn); 0: off")
    add_setting(parser, "--max-body-bytes", default=_default("max_body_bytes"), type=int,
                help="largest accepted request body")
    add_setting(parser, "--internal-token", default=None, secret=True, type=_optional,
                help="require this shared secret in x-internal-token on /v1/* (prefer the env "
                     "variable: flags show up in ps)")
    add_setting(parser, "--log-level", default="info",
                choices=["critical", "error", "warning", "info", "debug"], help="log level")


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)  # before loading: loading (and compiling) logs too
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    try:
        settings = LMWorkerSettings.from_args(args)
    except ValueError as exc:
        raise SystemExit(f"step37-serve lm-worker: {exc}") from exc
    rpc = RpcListen(args.host, args.rpc_port, settings.internal_token) if args.rpc_port >= 0 else None
    serve(create_app(settings, rpc=rpc), host=args.host, port=args.port, log_level=args.log_level)
    return 0
