"""The gateway's settings: one frozen dataclass, every field declared once as a flag.

Flags come first, then ``STEP37_*`` environment variables (``--api-key`` →
``STEP37_API_KEY``), then the defaults below; all are read once at start-up by
:func:`settings_from_args`. List settings take comma-separated values and may repeat
(``--encoder-url A --encoder-url B`` or ``STEP37_ENCODER_URL=A,B``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from services.common.settings import add_setting, env_name

__all__ = ["GatewaySettings", "add_gateway_arguments", "settings_from_args"]

EncoderProtocol = Literal["native", "kserve"]


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs to know; tests build it directly."""

    encoder_urls: tuple[str, ...] = ()
    lm_urls: tuple[str, ...] = ()
    encoder_protocol: EncoderProtocol = "native"
    # The encoder model's name (the encoder names it after its checkpoint directory):
    # the KServe URL path and part of every cache key, so features from different
    # weights never mix. Change it when the weights change.
    encoder_model: str = "step37-tiny"
    feature_dtype: str = "bfloat16"  # native protocol only; KServe serves float16
    # KServe answers carry no insert token; None reads it from the model's config
    # (parameters.insert_start_token, which the encoder and our Triton model publish).
    kserve_insert_start_token: int | None = None
    model_name: str = "step37-tiny"  # what /v1/models lists and requests must name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    internal_token: str | None = None  # sent as x-internal-token to encoders and LM workers
    # auto: encodes and generates (streams too) go over the call channel an endpoint
    # advertises in /ready (rpc_port), HTTP where none is; http: HTTP only.
    internal_transport: str = "auto"
    cache_bytes: int = 1 << 30
    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 16 << 20
    max_images: int = 16
    max_pixels: int = 7680 * 4320
    max_prompt_chars: int = 16_384
    max_tokens: int = 512
    # When a request names no max_tokens. Not the cap: the cap may exceed what the
    # model's context leaves after a long prompt, and the worker refuses that.
    default_max_tokens: int = 64
    allowed_url_hosts: tuple[str, ...] = ()
    request_timeout_s: float = 300.0
    encoder_timeout_s: float = 60.0
    lm_timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    fetch_timeout_s: float = 10.0
    encoder_attempts: int = 2
    probe_interval_s: float = 5.0
    eject_after_failures: int = 3
    # An image seen before goes to the LM worker it went to (its prefix cache holds the
    # prompt) while that one has at most this many more requests in flight than the least
    # busy worker; -1: always the least busy.
    lm_affinity_slack: int = 4
    max_concurrent_requests: int = 256
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.encoder_protocol not in ("native", "kserve"):
            raise ValueError(f"encoder_protocol must be native or kserve, got {self.encoder_protocol!r}")
        if self.internal_transport not in ("auto", "http"):
            raise ValueError(f"internal_transport must be auto or http, got {self.internal_transport!r}")
        if self.feature_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"feature_dtype must be bfloat16, float16 or float32, got {self.feature_dtype!r}")
        for name in ("max_body_bytes", "max_image_bytes", "max_images", "max_pixels", "max_prompt_chars",
                     "max_tokens", "default_max_tokens", "encoder_attempts", "eject_after_failures", "max_concurrent_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "encoder_timeout_s", "lm_timeout_s", "connect_timeout_s",
                     "fetch_timeout_s", "probe_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} exceeds max_tokens {self.max_tokens}")
        if self.lm_affinity_slack < -1:
            raise ValueError(f"lm_affinity_slack must be >= -1 (-1 turns affinity off), got {self.lm_affinity_slack}")
        if self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0 (0 disables the cache), got {self.cache_bytes}")
        # Normalised here so every consumer compares like with like.
        object.__setattr__(self, "encoder_urls", tuple(u.rstrip("/") for u in self.encoder_urls))
        object.__setattr__(self, "lm_urls", tuple(u.rstrip("/") for u in self.lm_urls))
        object.__setattr__(self, "allowed_url_hosts", tuple(h.strip().lower() for h in self.allowed_url_hosts))

    @property
    def cache_dtype(self) -> str:
        """The dtype features arrive in, and so part of the cache key."""
        return "float16" if self.encoder_protocol == "kserve" else self.feature_dtype


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _optional_str(text: str) -> str | None:
    return text or None


def _optional_int(text: str) -> int | None:
    return int(text) if text.strip() else None


class _ListSetting(argparse.Action):
    """Repeatable list flag whose first use on the command line replaces the env/default
    value instead of appending to it (argparse's ``append`` would merge the two)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest)
        if current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, *values])


# flag → (type, help); the default is the dataclass field's.
_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "--encoder-url": (_comma_list, "encoder base URL(s); repeat or comma-separate for replicas"),
    "--lm-url": (_comma_list, "LM worker base URL(s); repeat or comma-separate for replicas"),
    "--encoder-protocol": (str, "native (msgpack /v1/encode) or kserve (KServe v2 / Triton)"),
    "--encoder-model": (str, "encoder model name: KServe path and cache-key part"),
    "--feature-dtype": (str, "feature dtype asked of a native encoder: bfloat16, float16, float32"),
    "--kserve-insert-start-token": (_optional_int, "<im_start> id for --encoder-protocol kserve "
                                                   "(unset: read from the model's config)"),
    "--model-name": (str, "model name served at /v1/models"),
    "--host": (str, "bind address (loopback unless told otherwise)"),
    "--port": (int, "bind port"),
    "--api-key": (_optional_str, "require 'Authorization: Bearer KEY' on /v1/* (empty: no auth)"),
    "--internal-token": (_optional_str, "shared secret sent to encoders and LM workers in x-internal-token"),
    "--internal-transport": (str, "auto: encodes and generates over the call channel each encoder and LM worker "
                                  "reports in /ready (HTTP where none is); http: HTTP only"),
    "--cache-bytes": (int, "feature cache size in bytes (0 disables)"),
    "--max-body-bytes": (int, "largest request body in bytes"),
    "--max-image-bytes": (int, "largest image file in bytes"),
    "--max-images": (int, "most images per request"),
    "--max-pixels": (int, "most pixels (width x height) per image"),
    "--max-prompt-chars": (int, "longest prompt text in characters"),
    "--max-tokens": (int, "largest max_tokens a request may ask for"),
    "--default-max-tokens": (int, "max_tokens of a request that names none"),
    "--allowed-url-hosts": (_comma_list, "hosts whose http(s) image URLs may be fetched (none by default)"),
    "--request-timeout-s": (float, "deadline for a whole non-streaming request"),
    "--encoder-timeout-s": (float, "timeout of one encoder call"),
    "--lm-timeout-s": (float, "timeout of a generate call, and most time between streamed tokens"),
    "--connect-timeout-s": (float, "TCP connect timeout to downstreams"),
    "--fetch-timeout-s": (float, "timeout for fetching an allow-listed image URL"),
    "--encoder-attempts": (int, "encoder attempts, each on another endpoint (encodes are idempotent; after a lost "
                                   "connection with none left, the same one again)"),
    "--probe-interval-s": (float, "seconds between readiness probes of each endpoint"),
    "--eject-after-failures": (int, "consecutive failures that take an endpoint out of rotation"),
    "--lm-affinity-slack": (int, "send an image seen before to the LM worker whose prefix cache holds its prompt "
                                 "while it has at most this many more requests in flight than the least busy "
                                 "one (-1: always the least busy)"),
    "--max-concurrent-requests": (int, "requests served at once; more get 503 (overloaded)"),
    "--log-level": (str, "logging level"),
}


_SECRETS = frozenset({"--api-key", "--internal-token"})


def _dest(flag: str) -> str:
    name = flag.lstrip("-").replace("-", "_")
    return {"encoder_url": "encoder_urls", "lm_url": "lm_urls"}.get(name, name)


def add_gateway_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    environ = os.environ if environ is None else environ
    defaults = {f.name: f.default for f in fields(GatewaySettings)}
    for flag, (kind, help_text) in _FLAGS.items():
        dest = _dest(flag)
        default = defaults[dest]
        extra: dict[str, Any] = {"dest": dest}
        if kind is _comma_list:
            extra["action"] = _ListSetting
            extra["metavar"] = "HOST" if dest == "allowed_url_hosts" else "URL"
            default = list(default)
        elif flag == "--encoder-protocol":
            extra["choices"] = ("native", "kserve")
        elif flag == "--internal-transport":
            extra["choices"] = ("auto", "http")
        if flag in _SECRETS:
            # Not through add_setting: its help would print the secret from the environment.
            parser.add_argument(flag, dest=dest, type=kind, default=environ.get(env_name(flag)) or None,
                                metavar="KEY", help=f"{help_text} (env {env_name(flag)})")
            continue
        add_setting(parser, flag, default=default, type=kind, help=help_text, environ=environ, **extra)


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    values: dict[str, Any] = {}
    for f in fields(GatewaySettings):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return GatewaySettings(**values)

