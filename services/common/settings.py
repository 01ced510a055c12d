"""Service settings: CLI flags first, then ``STEP37_*`` environment variables, then defaults.

Every setting is declared once, with ``add_setting``; its environment variable is the
flag's name upper-cased with the prefix (``--max-batch-size`` → ``STEP37_MAX_BATCH_SIZE``).
The environment is read when the parser is built, at start-up, never later.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ENV_PREFIX", "add_setting", "env_name", "parse_bool"]

ENV_PREFIX = "STEP37_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def add_setting(
    parser: argparse.ArgumentParser | Any,
    flag: str,
    *,
    default: Any,
    type: Callable[[str], Any] = str,
    help: str,
    environ: Mapping[str, str] | None = None,
    secret: bool = False,
    **kwargs: Any,
) -> None:
    """Add ``flag`` whose default may come from its environment variable.

    ``secret`` keeps the value out of ``--help`` (which would print an API key read
    from the environment).
    """
    environ = os.environ if environ is None else environ
    name = env_name(flag)
    if name in environ:
        try:
            default = type(environ[name])
        except ValueError as exc:
            raise SystemExit(f"environment variable {name}={environ[name]!r} is invalid: {exc}") from exc
    shown = "set" if secret and default else ("unset" if secret else "%(default)s")
    parser.add_argument(flag, default=default, type=type, help=f"{help} (env {name}; default: {shown})", **kwargs)
