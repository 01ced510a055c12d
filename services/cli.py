"""``step37-serve``: the command-line entry point.

Sub-commands are registered in one table; each lives in its own module, imported only
when that command runs, so ``step37-serve --help`` stays fast and the gateway process
never imports model code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name → (module, help). Each module exposes add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("services.demo.run", "run the local demo on the bundled model"),
    "up": ("services.launcher", "start encoder, LM worker and gateway on loopback"),
    "eval-demo": ("services.demo.evaluate", "score the bundled model's captions through the HTTP API"),
    "train-demo": ("services.demo.train", "train the bundled step37-tiny model on generated scenes"),
    "encoder": ("encoder_server.cli", "serve the vision tower (native msgpack + KServe v2)"),
    "lm-worker": ("lm_worker.cli", "serve the decoder fed by ImageForInsert messages"),
    "triton": ("services.triton", "serve the vision tower on Triton Inference Server (python backend)"),
    "gateway": ("services.gateway.cli", "serve the OpenAI-compatible public API (chat completions, captions)"),
    "caption": ("services.caption_client", "caption image files through a running gateway"),
    "loadtest": ("services.loadtest.cli", "load-test an OpenAI-compatible or captions endpoint"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="step37-serve", description="Decoupled vision-encoder serving for Step3.7-style models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    known, rest = parser.parse_known_args(argv[:1])
    module_name, help_text = COMMANDS[known.command]
    command_parser = argparse.ArgumentParser(prog=f"step37-serve {known.command}", description=help_text)
    module = importlib.import_module(module_name)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
