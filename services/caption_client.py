"""``step37-serve caption IMAGE...``: caption image files through a running gateway.

Sends the files in one multipart ``POST /v1/captions`` and prints one line per image
(``path<TAB>caption``), then the server's per-stage timings. Exit status 1 on any
error, with the server's message on stderr.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
from pathlib import Path

import httpx

from services.common.settings import add_setting

__all__ = ["add_arguments", "run"]


def _api_key(text: str) -> str | None:
    return text or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, GIF)")
    add_setting(parser, "--url", default="http://127.0.0.1:8000", help="gateway base URL")
    add_setting(parser, "--api-key", default=None, type=_api_key, help="API key, if the gateway requires one")
    parser.add_argument("--prompt", default=None, help="text to go with each image (may place it with <image>)")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest caption in tokens")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="request timeout")
    parser.add_argument("--json", action="store_true", help="print the whole JSON response")


def run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"caption: no such file: {', '.join(missing)}", file=sys.stderr)
        return 1
    files = [("file", (p.name, p.read_bytes(), mimetypes.guess_type(p.name)[0] or "application/octet-stream"))
             for p in paths]
    data = {key: str(value) for key, value in (("prompt", args.prompt), ("max_tokens", args.max_tokens))
            if value is not None}
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        response = httpx.post(f"{args.url.rstrip('/')}/v1/captions", files=files, data=data, headers=headers,
                              timeout=args.timeout_s, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"caption: could not reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        print(f"caption: HTTP {response.status_code}: {message}", file=sys.stderr)
        return 1
    body = response.json()
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    for path, caption in zip(paths, body["captions"], strict=True):
        print(f"{path}\t{caption}")
    timings = ", ".join(f"{name} {ms:.1f} ms" for name, ms in body.get("timings", {}).items())
    print(f"timings: {timings}", file=sys.stderr)
    return 0
