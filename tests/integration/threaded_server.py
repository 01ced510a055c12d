"""Small ASGI apps served by uvicorn in a thread of the test process, on loopback."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from services.common.server import find_free_port


@contextlib.contextmanager
def serve_in_thread(app: object, name: str) -> Iterator[str]:
    """Serves ``app`` with uvicorn on a free loopback port in a daemon thread; yields its URL."""
    port = find_free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20.0
    while not server.started:  # polls readiness; fails fast if the server thread died
        assert thread.is_alive(), f"{name} exited during start-up"
        assert time.monotonic() < deadline, f"{name} did not start within 20 s"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20.0)
