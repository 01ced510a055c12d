"""``step37-serve gateway``: serve the public API in front of encoders and LM workers.

Example::

    step37-serve gateway --encoder-url http://127.0.0.1:8001 --encoder-url http://127.0.0.1:8002 \\
        --lm-url http://127.0.0.1:8003 --port 8000
"""

from __future__ import annotations

import argparse
import logging

from services.common.server import serve
from services.gateway.settings import add_gateway_arguments, settings_from_args

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_gateway_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not settings.encoder_urls or not settings.lm_urls:
        raise SystemExit("step37-serve gateway: give at least one --encoder-url and one --lm-url "
                         "(or STEP37_ENCODER_URL / STEP37_LM_URL)")
    # Imported here so `--help` does not pay for FastAPI and torch.
    from services.gateway.app import create_app

    # httpx logs every request at INFO: a line per readiness probe and per downstream
    # call would drown the gateway's own log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    serve(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0
