"""``step37-serve encoder``: serve the vision tower (native msgpack + KServe v2).

Every flag can also come from its ``STEP37_*`` environment variable (see ``--help``);
the service binds 127.0.0.1 unless ``--host`` says otherwise, because it has no
authentication of its own and belongs behind the gateway.
"""

from __future__ import annotations

import argparse
import logging

import torch

from encoder_server.app import create_app
from encoder_server.model import CheckpointError
from encoder_server.serving import EncoderService, EncoderSettings
from services.common.auth import InternalTokenMiddleware
from services.common.rpc import RpcListen
from services.common.server import serve, setup_logging
from services.common.settings import add_setting

__all__ = ["add_arguments", "run", "settings_from_args"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    add_setting(model, "--model", default=None, help="checkpoint directory (config.json + *.safetensors)")
    add_setting(model, "--preset", default=None, help="serve a VisionConfig preset with seeded random "
                "weights instead (step37, step37-tiny)")
    add_setting(model, "--model-name", default=None, help="name on the KServe routes and in responses "
                "(unset: the directory's or preset's name)")
    add_setting(model, "--insert-start-token", default=None, type=int, help="<im_start> id put in each "
                "ImageForInsert (unset: im_start_token_id of config.json, else 128000)")
    add_setting(model, "--seed", default=0, type=int, help="seed of the --preset random weights")
    add_setting(model, "--device", default=None, help="cpu, cuda, cuda:1 ... (unset: cuda if available)")
    add_setting(model, "--torch-threads", default=0, type=int, help="intra-op threads of the forward "
                "(0: torch's default, one per core); leave cores for preprocessing and HTTP on small CPUs")
    add_setting(model, "--cuda-graphs", default="auto", choices=["auto", "off"],
                help="auto: on a GPU, forwards at the trained resolution replay CUDA graphs captured at "
                     "start-up; off: eager")
    add_setting(model, "--dtype", default=None, help="bf16, fp16 or fp32 compute (unset: fp32 on CPU, "
                "bf16 on GPU)")
    server = parser.add_argument_group("server")
    add_setting(server, "--host", default="127.0.0.1", help="interface to bind")
    add_setting(server, "--port", default=8001, type=int, help="TCP port")
    add_setting(server, "--rpc-port", default=0, type=int, help="port of the gateway's call channel, on the "
                "same interface (0: any free port, reported in /ready; -1: off, HTTP only)")
    add_setting(server, "--log-level", default="info", help="debug, info, warning, error")
    add_setting(server, "--internal-token", default=None, secret=True, help="require this shared secret in the "
                "x-internal-token header (health, readiness and metrics stay open)")
    batching = parser.add_argument_group("batching and limits")
    add_setting(batching, "--max-batch-size", default=8, type=int, help="images per forward")
    add_setting(batching, "--max-queue-delay-ms", default=0.0, type=float,
                help="longest wait for a fuller batch, from the oldest queued request (0, as in Triton: "
                     "run as soon as the device is free; what queues during a forward is batched)")
    add_setting(batching, "--max-queue-size", default=256, type=int,
                help="requests allowed to wait; beyond it requests get 503")
    add_setting(batching, "--request-timeout-s", default=60.0, type=float,
                help="queue wait + forward deadline per request (504 when passed)")
    add_setting(batching, "--max-images-per-request", default=16, type=int, help="images in one request")
    add_setting(batching, "--max-body-bytes", default=64 * 1024 * 1024, type=int,
                help="request body size limit (after gzip/deflate inflation)")
    add_setting(batching, "--max-image-pixels", default=40_000_000, type=int,
                help="declared width x height limit, checked before decoding")
    add_setting(batching, "--preprocess-workers", default=2, type=int,
                help="threads decoding and resizing images alongside the forward")


def settings_from_args(args: argparse.Namespace) -> EncoderSettings:
    return EncoderSettings(
        model=args.model, preset=args.preset, model_name=args.model_name,
        insert_start_token=args.insert_start_token, seed=args.seed, device=args.device,
        dtype=args.dtype, max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms, max_queue_size=args.max_queue_size,
        request_timeout_s=args.request_timeout_s, max_images_per_request=args.max_images_per_request,
        max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
        preprocess_workers=args.preprocess_workers, cuda_graphs=args.cuda_graphs,
    )


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    try:
        service = EncoderService.from_settings(settings_from_args(args))
    except (CheckpointError, ValueError, OSError) as exc:
        logger.error("cannot start the encoder: %s", exc)
        return 2
    rpc = RpcListen(args.host, args.rpc_port, args.internal_token) if args.rpc_port >= 0 else None
    app = create_app(service, rpc=rpc)
    if args.internal_token:
        app = InternalTokenMiddleware(app, args.internal_token)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
