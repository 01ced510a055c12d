"""Running an ASGI app with uvicorn, and logging set-up, the same way for every service."""

from __future__ import annotations

import logging
import socket

import uvicorn

__all__ = ["KEEP_ALIVE_S", "find_free_port", "serve", "setup_logging"]

# How long a server keeps an idle keep-alive connection open. Longer than any of our
# clients keeps one (the gateway's and the load tester's transports: 15 s), so the
# client side always closes first: a server that gave up first (uvicorn's default is
# 5 s) could close a connection just as a client reuses it, failing that request with
# a write error (and, for the gateway, counting it against a healthy endpoint).
KEEP_ALIVE_S = 75.0


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out; callers bind it promptly (a small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve(app: object, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; uvicorn drains in-flight requests on shutdown.

    ``log_config=None``: uvicorn logs through the root handler set up here instead of
    installing its own, which printed every line twice.
    """
    setup_logging(log_level)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, log_config=None,
                            timeout_graceful_shutdown=10, timeout_keep_alive=KEEP_ALIVE_S)
    uvicorn.Server(config).run()
