"""Child service processes: start, wait for readiness, stop the whole tree.

Used by the ``up``/``demo`` launcher and by integration tests, so both start services
the same way: poll ``/ready`` (which runs a tiny forward pass) instead of sleeping,
fail fast when the child dies, and kill the child's whole process group on the way out
so nothing is orphaned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from services.common.server import find_free_port

__all__ = ["ServiceProcess", "ServiceStartError"]


class ServiceStartError(RuntimeError):
    pass


@dataclass
class ServiceProcess:
    """One service: ``step37-serve <command> <args> --host H --port P`` as a child."""

    name: str
    command: Sequence[str]
    host: str = "127.0.0.1"
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    log_path: str | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServiceProcess:
        if self.port == 0:
            self.port = find_free_port(self.host)
        argv = [sys.executable, "-m", "services.cli", *self.command, "--host", self.host, "--port", str(self.port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # A new session: the child and anything it spawns form one process group.
        self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if log is not subprocess.DEVNULL:
            log.close()
        return self

    def wait_ready(self, timeout_s: float = 120.0, path: str = "/ready") -> ServiceProcess:
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        last_error = "no answer yet"
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise ServiceStartError(f"{self.name} exited with code {self.process.returncode} "
                                            f"before it was ready{self._log_tail()}")
                try:
                    response = client.get(self.url + path)
                    if response.status_code == 200:
                        return self
                    last_error = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    last_error = type(exc).__name__
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        raise ServiceStartError(f"{self.name} not ready after {timeout_s:.0f} s ({last_error}){self._log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=grace_s)
        self._signal_group(signal.SIGKILL)  # grandchildren that outlived the leader

    def kill(self) -> None:
        """Abrupt death (fault injection): SIGKILL the whole group at once."""
        if self.process is not None:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=10)

    def _signal_group(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass  # already gone: the goal is reached

    def _log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as log:
            tail = log.readlines()[-lines:]
        return "\n--- last log lines ---\n" + "".join(tail)
