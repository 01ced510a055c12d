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
    with tempfile.TemporaryDirectory(prefix="train-sweep-") as tmp:
        processes = {}
        started = time.perf_counter()
        for name, extra in args.run:
            out = Path(tmp) / name
            command = [sys.executable, "-m", "services.cli", "train-demo", "--out", str(out), "--device", args.device,
                       "--render-processes", str(renderers), "--workers", "1", "--threads", "1",
                       "--eval-scenes", str(args.eval_scenes), *extra]
            log = open(Path(tmp) / f"{name}.log", "w")  # closed with its process, below
            processes[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log, out,
                               command)
        for name, (process, log, out, command) in processes.items():
            try:
                code = process.wait(timeout=max(1.0, args.timeout_s - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            log.close()
            report_path = out / "training_log.json"
            report = json.loads(report_path.read_text()) if report_path.exists() else {}
            results[name] = {"command": shlex.join(command[2:]), "exit_code": code,
                             "wall_s": round(time.perf_counter() - started, 1),
                             **{key: report.get(key) for key in ("finished", "train_seconds", "device", "eval", "log")}}
            if code:
                results[name]["log_tail"] = (Path(tmp) / f"{name}.log").read_text()[-2000:]
            evaluated = results[name]["eval"] or {}
            print(f"{name:<20} exit {code}  train {results[name]['train_seconds']} s  "
                  f"exact {evaluated.get('exact_match')}  shape {evaluated.get('shape')}", flush=True)
    path = write_result(f"train-sweep-{args.name}", {"config": {"device": args.device, "render_processes": renderers,
                                                               "eval_scenes": args.eval_scenes},
                                                    "runs": results}, device=args.device if args.device != "auto"
                        else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
