"""``step37-serve``: the command-line entry point.

Sub-commands are registered in one table; each lives in its own module and is
imported only when run, so ``step37-serve --help`` stays fast and the gateway never
imports model code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name → (module, help). Each module exposes add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("services.demo.run", "run the local demo on the bundled model"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="step37-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command_parser)
        modules[name] = module
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
