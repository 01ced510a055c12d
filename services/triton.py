"""``step37-serve triton``: the encoder tier on a real Triton Inference Server, without Docker.

In a work directory (``--work-dir``, or a temporary one removed at exit) this command
lays out

* ``backends/python/``: the python backend and the stub for the running Python, from
  the nvidia-pytriton wheel (``services.triton_install``);
* ``model_repository/step37_vision/``: the shipped ``1/model.py`` and a
  ``config.pbtxt`` rendered from the flags (``services.triton_repository``);

then runs ``tritonserver`` on ``--host`` (HTTP/KServe v2 on ``--port``, gRPC and
metrics on their own ports) until it exits, or until this process gets SIGINT or
SIGTERM, which it passes on as SIGTERM. A missing wheel or stub numpy ends the
command with the ``pip install`` that fixes it.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.common.server import find_free_port
from services.common.settings import add_setting
from services.launcher import BUNDLED_MODEL
from services.triton_install import (
    STUB_NUMPY_DIR,
    StubNumpyMissing,
    TritonInstall,
    TritonNotInstalled,
    find_triton,
    lay_out_backends,
    server_environment,
    stub_python_path,
)
from services.triton_repository import (
    MODEL_NAME,
    SHIPPED_REPOSITORY,
    TritonModelConfig,
    write_repository,
)

__all__ = ["ServerPorts", "add_arguments", "model_config_from_args", "run", "server_command"]


@dataclass(frozen=True)
class ServerPorts:
    host: str
    http: int
    grpc: int
    metrics: int


def server_command(install: TritonInstall, repository: Path, backends: Path, ports: ServerPorts, *,
                   gpu: bool, exit_timeout_s: int, log_verbose: int) -> list[str]:
    return [
        str(install.server),
        f"--model-repository={repository}", f"--backend-directory={backends}",
        # model.py needs no completing, and skipping it saves a second stub importing torch.
        "--disable-auto-complete-config",
        f"--http-address={ports.host}", f"--http-port={ports.http}",
        f"--grpc-address={ports.host}", f"--grpc-port={ports.grpc}",
        f"--metrics-address={ports.host}", f"--metrics-port={ports.metrics}",
        f"--allow-gpu-metrics={str(gpu).lower()}",
        f"--exit-timeout-secs={exit_timeout_s}", f"--log-verbose={log_verbose}",
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    add_setting(model, "--model", default=str(BUNDLED_MODEL), help="checkpoint directory")
    add_setting(model, "--insert-start-token", default=None, type=int,
                help="<im_start> id published in the config (unset: im_start_token_id of config.json)")
    add_setting(model, "--device", default="auto", help="gpu (or cuda): KIND_GPU, bf16; cpu: KIND_CPU, "
                "fp32; auto: gpu when torch sees one")
    add_setting(model, "--instances", default=1, type=int, help="model instances (stub processes)")
    add_setting(model, "--torch-threads", default=0, type=int, help="intra-op threads per instance (0: torch's default)")
    add_setting(model, "--max-batch-size", default=8, type=int, help="images per forward (Triton's max_batch_size)")
    add_setting(model, "--max-queue-delay-ms", default=5.0, type=float, help="dynamic batcher's longest wait")
    server = parser.add_argument_group("server")
    add_setting(server, "--host", default="127.0.0.1", help="address of the HTTP, gRPC and metrics endpoints")
    add_setting(server, "--port", default=8001, type=int, help="HTTP (KServe v2) port")
    add_setting(server, "--grpc-port", default=0, type=int, help="gRPC port (0: a free one)")
    add_setting(server, "--metrics-port", default=0, type=int, help="Prometheus metrics port (0: a free one)")
    add_setting(server, "--work-dir", default=None, help="where backends/ and model_repository/ are written "
                "(unset: a temporary directory removed at exit)")
    add_setting(server, "--template", default=str(SHIPPED_REPOSITORY),
                help="model repository whose step37_vision/1/model.py is served")
    add_setting(server, "--stub-numpy-dir", default=str(STUB_NUMPY_DIR),
                help="directory holding numpy < 2 for the backend stub (pip install --target)")
    add_setting(server, "--exit-timeout-s", default=5, type=int, help="Triton's grace for in-flight requests at exit")
    add_setting(server, "--log-verbose", default=0, type=int, help="Triton's --log-verbose level")


def _gpu_present() -> bool:
    import torch  # only for --device auto: the launcher needs torch for nothing else

    return torch.cuda.is_available()


def model_config_from_args(args: argparse.Namespace) -> TritonModelConfig:
    model_dir = Path(args.model).resolve()
    token = args.insert_start_token
    if token is None:
        try:
            token = json.loads((model_dir / "config.json").read_text())["im_start_token_id"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"step37-serve triton: no im_start_token_id in {model_dir}/config.json "
                             f"({type(exc).__name__}); pass --insert-start-token") from exc
    if args.device not in ("auto", "cpu", "gpu", "cuda"):
        raise SystemExit(f"step37-serve triton: --device must be auto, cpu, gpu or cuda, got {args.device!r}")
    gpu = args.device in ("gpu", "cuda") or (args.device == "auto" and _gpu_present())
    return TritonModelConfig(max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                             instance_kind="KIND_GPU" if gpu else "KIND_CPU", instance_count=args.instances,
                             model_dir=str(model_dir), insert_start_token=int(token),
                             torch_threads=args.torch_threads)


@contextmanager
def _work_dir(path: str | None) -> Iterator[Path]:
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="step37-triton-") as temporary:
        yield Path(temporary)


def run(args: argparse.Namespace) -> int:
    try:
        install = find_triton()
        numpy_dir = Path(args.stub_numpy_dir).resolve()
        numpy_dirs = [str(numpy_dir)] if numpy_dir.is_dir() else []
        python_path = stub_python_path(numpy_dirs)
    except (TritonNotInstalled, StubNumpyMissing) as exc:
        raise SystemExit(f"step37-serve triton: {exc}") from exc
    config = model_config_from_args(args)
    ports = ServerPorts(args.host, args.port, args.grpc_port or find_free_port(args.host),
                        args.metrics_port or find_free_port(args.host))
    with _work_dir(args.work_dir) as relative_work:
        work = relative_work.resolve()  # tritonserver and the stubs get absolute paths
        repository = write_repository(work / "model_repository", config, Path(args.template))
        backends = lay_out_backends(work / "backends", install)
        command = server_command(install, repository, backends, ports, gpu=config.instance_kind == "KIND_GPU",
                                 exit_timeout_s=args.exit_timeout_s, log_verbose=args.log_verbose)
        stop = threading.Event()  # set before the server exists: no signal goes unheard
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        process = subprocess.Popen(command, env=server_environment(install, python_path))
        return _supervise(process, stop, ports, grace_s=args.exit_timeout_s + 10)


def _supervise(process: subprocess.Popen, stop: threading.Event, ports: ServerPorts, grace_s: float) -> int:
    """Wait for the server or ``stop``; then SIGTERM it, and SIGKILL it after ``grace_s``."""
    announced = False
    url = f"http://{ports.host}:{ports.http}"
    with httpx.Client(timeout=2.0) as client:
        while process.poll() is None and not stop.wait(0.5):
            if not announced and _ready(client, url):
                announced = True
                print(f"triton     {url}  (KServe v2, model {MODEL_NAME}; gRPC {ports.host}:{ports.grpc}, "
                      f"metrics {ports.host}:{ports.metrics}). Ctrl-C to stop.", flush=True)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return 0
    return process.returncode


def _ready(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/v2/health/ready").status_code == 200
    except httpx.HTTPError:
        return False

