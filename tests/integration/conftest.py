"""Real service processes on free loopback ports, polled for readiness, killed as a tree."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.common.procs import ServiceProcess


@pytest.fixture
def start_service(tmp_path) -> Iterator:
    """``start_service(name, [cmd, args...], env={...}) -> ready ServiceProcess``."""
    started: list[ServiceProcess] = []

    def start(name: str, command: list[str], *, env: dict[str, str] | None = None,
              timeout_s: float = 120.0, wait: bool = True) -> ServiceProcess:
        service = ServiceProcess(name, command, env=env or {}, log_path=str(tmp_path / f"{name}.log"))
        started.append(service)
        service.start()
        if wait:
            service.wait_ready(timeout_s)
        return service

    yield start
    for service in started:
        service.stop()
