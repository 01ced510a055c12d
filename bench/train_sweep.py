"""Several ``train-demo`` recipes trained side by side, each evaluated on the same held-out scenes.

    python bench/train_sweep.py --name NAME --device cuda \
        --run default= --run steps3000="--steps 3000" --run lr3e-3="--lr 3e-3"

Every run is ``step37-serve train-demo`` with its own extra arguments, started at once as
separate processes that share the machine's cores among their scene-rendering processes
(on the CPU: ``--workers 1`` each, unless a run says otherwise). The result file holds
each run's arguments, training seconds, accuracy on the held-out scenes and loss curve:
which recipe learns the most from the same number of steps, or how many steps a
target needs. Seconds are only comparable within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result
from services.demo.train import usable_cores


def parse_run(text: str) -> tuple[str, list[str]]:
    name, sep, extra = text.partition("=")
    if not sep or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise argparse.ArgumentTypeError(f"--run takes NAME=ARGS with a plain NAME, got {text!r}")
    return name, shlex.split(extra)


def stop(process: subprocess.Popen) -> int:
    """Interrupt a run and its render processes (SIGINT, then SIGKILL); its exit code."""
    for sig, grace in ((signal.SIGINT, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            return process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return process.wait()


def outcome(name: str, code: int, out: Path, command: list[str], logs: Path, started: float) -> dict:
    """One run's record: what it ran, how it ended, its training log (partial if it was stopped)."""
    report_path = out / "training_log.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    result = {"command": shlex.join(command[2:]), "exit_code": code, "wall_s": round(time.perf_counter() - started, 1),
              **{key: report.get(key) for key in ("finished", "train_seconds", "device", "args", "eval", "log")}}
    if code:
        result["log_tail"] = (logs / f"{name}.log").read_text()[-2000:]
    scores = result["eval"] or {}
    print(f"{name:<24} exit {code}  train {result['train_seconds']} s  exact {scores.get('exact_match')}  "
          f"shape {scores.get('shape')}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="results file: bench/results/train-sweep-NAME-{cpu,cuda}.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--run", type=parse_run, action="append", required=True, metavar="NAME=ARGS")
    parser.add_argument("--eval-scenes", type=int, default=500)
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()
    names = [name for name, _ in args.run]
    if len(set(names)) != len(names):
        raise SystemExit(f"run names repeat: {names}")
    # Each run's main process plus its renderers; the cores are shared out, oversubscribed a little.
    renderers = max(1, (usable_cores() + len(args.run)) // len(args.run) - 1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    results: dict[str, dict] = {}
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="train-sweep-") as tmp:
        runs: dict[str, tuple[subprocess.Popen, Path, list[str]]] = {}
        started = time.perf_counter()
        try:
            for name, extra in args.run:
                out = Path(tmp) / name
                defaults = [] if "--render-processes" in extra else ["--render-processes", str(renderers)]
                command = [sys.executable, "-m", "services.cli", "train-demo", "--out", str(out), "--device",
                           args.device, *defaults, "--workers", "1", "--threads", "1",
                           "--eval-scenes", str(args.eval_scenes), *extra]
                with open(Path(tmp) / f"{name}.log", "w") as log:  # the child keeps its own descriptor
                    # Its own session: stopping a run stops its render processes too.
                    runs[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   start_new_session=True), out, command)
            for name, (process, out, command) in runs.items():
                try:
                    code = process.wait(timeout=max(1.0, args.timeout_s - (time.perf_counter() - started)))
                except subprocess.TimeoutExpired:
                    code = stop(process)
                results[name] = outcome(name, code, out, command, Path(tmp), started)
        except KeyboardInterrupt:
            interrupted = True
        finally:  # interrupted, or a run failed to start: stop the others, keep what finished
            for name, (process, out, command) in runs.items():
                if name not in results:
                    results[name] = outcome(name, stop(process), out, command, Path(tmp), started)
    path = write_result(f"train-sweep-{args.name}", {"config": {"device": args.device,
                                                               "default_render_processes": renderers,
                                                               "eval_scenes": args.eval_scenes},
                                                    "runs": results}, device=args.device if args.device != "auto"
                        else None)
    print(f"wrote {path}")
    if interrupted:
        raise SystemExit("interrupted: the runs not finished are recorded as stopped")


if __name__ == "__main__":
    main()
