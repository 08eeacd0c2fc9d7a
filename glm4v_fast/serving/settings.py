"""ServeSettings: the server's limits, timeouts and batching knobs, each declared once with its CLI option.

A field's declaration holds its default, its `glm4v-fast serve` option, help text, option group and check: the
dataclass, the argparse options (`add_settings_arguments`), the mapping back from parsed options
(`settings_from_args`) and `validate` are all derived from it. Dependency-free, so that building the CLI parser
does not import the server stack.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..validation import non_negative_int, non_negative_number, positive_int, positive_number

#: Where the API key is read from when no --api-key is given (it then stays out of process lists).
API_KEY_ENV = "GLM4V_FAST_API_KEY"

SERVER = "server"
BUDGETS = "per-request budgets (checked from the images' headers, before decoding)"
CACHE = "embedding cache"
CONNECTIONS = "connections"
SECURITY = "security (API key and TLS)"


@dataclass(frozen=True)
class Option:
    """How a ServeSettings field appears on the command line, and how its value is checked."""

    flag: str
    group: str
    help: str               # "{default}" is replaced by the field's default
    check: Callable[[Any, str], Any]
    metavar: str
    env: str | None = None    # the CLI's default comes from this environment variable (a secret stays unprinted)


# The argparse type of each field's annotation.
_ARG_TYPES = {"int": int, "float": float, "str | None": str}


def _setting(default, flag: str, group: str, check, metavar: str, what: str, default_help: str,
             env: str | None = None):
    """A field with its option: `what` it sets and `default_help`, the help's second half (both one line here,
    so that every declaration reads alike). A field read from `env` is a secret: it stays out of repr()."""
    option = Option(flag, group, f"{what} {default_help}", check, metavar, env)
    return field(default=default, repr=env is None, metadata={"option": option})


def api_key_from_env() -> str | None:
    """The key in GLM4V_FAST_API_KEY (None when unset or empty)."""
    return os.environ.get(API_KEY_ENV) or None


def _optional_key(value: Any, name: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{name} must be a non-empty string or None, got a {type(value).__name__}")
    return value


@dataclass
class ServeSettings:
    """Limits, timeouts and batching knobs (the CLI's --max-* and --*-timeout options)."""

    max_batch_tokens: int = _setting(
        16384, "--max-batch-tokens", SERVER, positive_int, "N",
        "patch tokens per batched forward",
        "(default: {default})")
    max_wait_ms: float = _setting(
        5.0, "--max-wait-ms", SERVER, non_negative_number, "MS",
        "how long a request may wait for others to batch with",
        "(default: {default})")
    max_queue: int = _setting(
        256, "--max-queue", SERVER, positive_int, "N",
        "requests waiting for the model before new ones get 503",
        "(default: {default})")
    max_image_pixels: int = _setting(
        40_000_000, "--max-image-pixels", SERVER, positive_int, "N",
        "largest decoded image, width*height; larger ones get 413",
        "(default: {default})")
    max_body_mb: float = _setting(
        32.0, "--max-body-mb", SERVER, positive_number, "N",
        "largest request body in MiB; larger ones get 413",
        "(default: {default:g})")
    drain_timeout_s: float = _setting(
        60.0, "--drain-timeout", SERVER, non_negative_number, "S",
        "seconds shutdown waits for open requests",
        "(default: {default:g})")
    max_images_per_request: int = _setting(
        64, "--max-images-per-request", BUDGETS, positive_int, "N",
        "images in one request; more get 413",
        "(default: {default})")
    max_patches_per_request: int = _setting(
        65536, "--max-patches-per-request", BUDGETS, positive_int, "N",
        "patch rows one request's images resize to; more get 413",
        "(default: {default}{full_size})")
    # max_jpeg_scans' default is imageio's; max_patches_per_request's help gets the full-size image from the CLI.
    max_jpeg_scans: int = _setting(
        100, "--max-jpeg-scans", BUDGETS, positive_int, "N",
        "scans of a (progressive) JPEG, a decoding pass each; more get 413",
        "(default: {default})")
    decode_timeout_s: float = _setting(
        10.0, "--decode-timeout", BUDGETS, positive_number, "S",
        "seconds from admission to preprocessed images; a request still waiting for a decoder then gets 503,",
        "one still decoding 413 (checked between images) (default: {default:g})")
    decode_workers: int = _setting(
        0, "--decode-workers", BUDGETS, non_negative_int, "N",
        "threads decoding and preprocessing requests",
        "(default: 0 = min(8, CPUs))")
    overload_wait_s: float = _setting(
        1.0, "--overload-wait", BUDGETS, positive_number, "S",
        "/health answers 503 'overloaded' while a request has waited this long for a decoder,",
        "or --max-queue requests are admitted (default: {default:g})")
    cache_mb: float = _setting(
        512.0, "--cache-mb", CACHE, non_negative_number, "MB",
        "embedding cache in MiB: an image whose decoded pixels were encoded before is answered from memory",
        "(LRU, evicted by bytes); 0 disables it (default: {default:g})")
    max_connections: int = _setting(
        1000, "--max-connections", CONNECTIONS, positive_int, "N",
        "open connections; further ones get a 503 and are closed at once",
        "(default: {default})")
    header_timeout_s: float = _setting(
        10.0, "--header-timeout", CONNECTIONS, positive_number, "S",
        "seconds for a request's headers to arrive, from the connection or the request's first byte;",
        "slower clients are cut off (default: {default:g})")
    body_timeout_s: float = _setting(
        60.0, "--body-timeout", CONNECTIONS, positive_number, "S",
        "seconds for a whole request body to arrive; then 408",
        "(default: {default:g})")
    keep_alive_timeout_s: float = _setting(
        5.0, "--keep-alive-timeout", CONNECTIONS, positive_number, "S",
        "idle keep-alive connections are closed after this",
        "(default: {default:g})")
    api_key: str | None = _setting(
        None, "--api-key", SECURITY, _optional_key, "KEY",
        "require 'Authorization: Bearer KEY' on /v1/embeddings (401 without it; /health and /metrics stay open).",
        f"Default: ${API_KEY_ENV}, which keeps the key out of process lists; unset: no key", API_KEY_ENV)

    def validate(self) -> None:
        for f, option in _options():
            option.check(getattr(self, f.name), f.name)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * 1024 * 1024)

    @property
    def decode_threads(self) -> int:
        return self.decode_workers or min(8, os.cpu_count() or 1)


def _options() -> list[tuple[dataclasses.Field, Option]]:
    return [(f, f.metadata["option"]) for f in dataclasses.fields(ServeSettings) if "option" in f.metadata]


def add_settings_arguments(groups: dict[str, argparse._ArgumentGroup], parser: argparse.ArgumentParser,
                           **help_values: str) -> None:
    """One option per ServeSettings field, in declaration order, into the groups by title (created in that order
    when `groups` lacks them). `help_values` fill further {placeholders} of the help texts."""
    for f, option in _options():
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        default = (os.environ.get(option.env) or f.default) if option.env else f.default
        groups[option.group].add_argument(
            option.flag, dest=f.name, type=_ARG_TYPES[f.type], default=default, metavar=option.metavar,
            help=option.help.format(default=f.default, **help_values))


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The ServeSettings of parsed `add_settings_arguments` options, validated."""
    settings = ServeSettings(**{f.name: getattr(args, f.name) for f, _ in _options()})
    settings.validate()
    return settings
