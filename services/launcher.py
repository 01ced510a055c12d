"""``step37-serve up``: encoder(s), LM worker(s) and gateway as child processes on loopback.

``Stack`` is also what the demo, the end-to-end tests and the benchmarks use, so the
system is always started the same way: downstream services first (in parallel, each
polled on ``/ready``), then the gateway pointed at them. If any child dies, or on
Ctrl-C / SIGTERM, every child's process group is stopped — no orphans.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from services.common.procs import ServiceProcess
from services.common.settings import add_setting

__all__ = ["BUNDLED_MODEL", "Stack", "StackConfig", "add_arguments", "run"]

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "step37-tiny"


@dataclass
class StackConfig:
    model: str = str(BUNDLED_MODEL)
    host: str = "127.0.0.1"
    gateway_port: int = 0
    encoder_replicas: int = 1
    lm_replicas: int = 1
    device: str = "auto"
    api_key: str | None = None
    log_dir: str | None = None
    encoder_args: list[str] = field(default_factory=list)
    lm_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    ready_timeout_s: float = 300.0


class Stack:
    """The whole system as child processes; a context manager."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="step37-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        device = [] if config.device == "auto" else ["--device", config.device]
        device += ["--torch-threads", str(self.threads_per_service())]
        model = ["--model", config.model]
        self.encoders = [
            self._service(f"encoder-{i}", ["encoder", *model, *device, *config.encoder_args])
            for i in range(config.encoder_replicas)
        ]
        self.lm_workers = [
            self._service(f"lm-worker-{i}", ["lm-worker", *model, *device, *config.lm_args])
            for i in range(config.lm_replicas)
        ]
        self.gateway: ServiceProcess | None = None

    def threads_per_service(self) -> int:
        """Share the cores between the compute services: oversubscribed OpenMP threads
        spin against each other and can run several times slower than one thread each."""
        return max(1, (os.cpu_count() or 1) // (self.config.encoder_replicas + self.config.lm_replicas))

    def gateway_command(self, *extra: str) -> list[str]:
        """``gateway`` over this stack's encoders and LM workers (started), then ``extra``."""
        args = [arg for e in self.encoders for arg in ("--encoder-url", e.url)]
        args += [arg for w in self.lm_workers for arg in ("--lm-url", w.url)]
        return ["gateway", *args, "--encoder-model", Path(self.config.model).name, *extra]

    def _service(self, name: str, command: list[str], port: int = 0) -> ServiceProcess:
        return ServiceProcess(name, command, host=self.config.host, port=port,
                              log_path=str(self.log_dir / f"{name}.log"))

    @property
    def children(self) -> list[ServiceProcess]:
        return [*self.encoders, *self.lm_workers, *([self.gateway] if self.gateway else [])]

    @property
    def url(self) -> str:
        assert self.gateway is not None, "stack not started"
        return self.gateway.url

    def start(self) -> Stack:
        try:
            downstream = [*self.encoders, *self.lm_workers]
            for service in downstream:
                service.start()
            with ThreadPoolExecutor(len(downstream)) as pool:
                list(pool.map(lambda s: s.wait_ready(self.config.ready_timeout_s), downstream))
            self.gateway = self._service("gateway", self.gateway_command(*self.config.gateway_args),
                                         port=self.config.gateway_port)
            if self.config.api_key:  # through the environment: argv is visible to every user in ps
                self.gateway.env["STEP37_API_KEY"] = self.config.api_key
            self.gateway.start().wait_ready(self.config.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # Gateway first so it stops taking traffic, then the workers.
        for service in reversed(self.children):
            service.stop()

    def dead_child(self) -> ServiceProcess | None:
        return next((s for s in self.children if s.process is not None and not s.alive()), None)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting(parser, "--model", default=str(BUNDLED_MODEL), help="checkpoint directory")
    add_setting(parser, "--host", default="127.0.0.1", help="interface every service binds")
    add_setting(parser, "--port", default=8000, type=int, help="gateway port (0: any free port)")
    add_setting(parser, "--encoder-replicas", default=1, type=int, help="encoder processes")
    add_setting(parser, "--lm-replicas", default=1, type=int, help="LM worker processes")
    add_setting(parser, "--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add_setting(parser, "--api-key", default=None, secret=True, help="require this bearer token at the gateway")
    add_setting(parser, "--log-dir", default=None, help="where the children's logs go (default: a temp dir)")


def config_from_args(args: argparse.Namespace) -> StackConfig:
    return StackConfig(model=args.model, host=args.host, gateway_port=args.port,
                       encoder_replicas=args.encoder_replicas, lm_replicas=args.lm_replicas,
                       device=args.device, api_key=args.api_key, log_dir=args.log_dir)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    stack = Stack(config_from_args(args))
    # SIGTERM behaves like Ctrl-C so `kill` on the launcher also stops the children;
    # SIGINT is set explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        stack.start()
        print(f"gateway    {stack.url}   (OpenAI-compatible: {stack.url}/v1/chat/completions)")
        for service in stack.children[:-1]:
            print(f"{service.name:<10} {service.url}")
        print(f"logs       {stack.log_dir}\nCtrl-C to stop.", flush=True)
        while (dead := stack.dead_child()) is None:
            time.sleep(0.5)
        print(f"{dead.name} exited with code {dead.process.returncode}; stopping (see {dead.log_path})")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
