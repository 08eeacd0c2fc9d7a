"""What the serving-engine integrations (vLLM, SGLang) share: the tested-version gate, the on/off switch, the
tower choice and its one log line.

Each engine's package keeps its own names (GLM4V_FAST_VLLM, vLLM's logger, its tested range) and builds on these.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass, field

_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def parse_flag(value, source: str) -> bool | None:
    """A forcing switch: True/False, or None when unset, empty or "auto"; a ValueError naming `source` otherwise."""
    if value is None or value == "" or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{source} must be one of 1/0, true/false, on/off or auto, got {value!r}")


def env_flag(env_var: str) -> bool | None:
    return parse_flag(os.environ.get(env_var), env_var)


@dataclass(frozen=True)
class TowerChoice:
    """Which tower a model built by the engine gets, whether a setting forced it, and why (for the log line)."""
    use_fast: bool
    forced: bool
    reason: str


def decide(forced: bool | None, source: str, blockers: list[str], *, engine: str, how_to_unforce: str,
           default: bool, default_reason: str) -> TowerChoice:
    """The choice for one model. `forced` comes from `source` (a setting); `blockers` lists the options in use that
    glm4v-fast's tower cannot serve: unforced they keep the engine's tower, forced on they raise a ValueError."""
    if forced is False:
        return TowerChoice(False, True, f"forced off by {source}")
    if blockers:
        if forced:
            raise ValueError(f"glm4v-fast's vision tower was forced on ({source}) but cannot serve this model: "
                             + "; ".join(blockers) + f". {how_to_unforce} ({engine}'s tower is then used) or drop "
                             "the option.")
        return TowerChoice(False, False, f"{engine}'s tower kept: " + "; ".join(blockers))
    if forced:
        return TowerChoice(True, True, f"forced on by {source}")
    return TowerChoice(default, False, default_reason)


@dataclass
class ChoiceLog:
    """One INFO line per process and distinct choice: which tower, with which kernels and attention backend."""
    logger: logging.Logger
    engine: str                                  # "vLLM" / "SGLang": whose own tower is named when ours is not used
    seen: set = field(default_factory=set)

    def __call__(self, arch: str, choice: TowerChoice, kernels: str | None = None,
                 attention: str | None = None) -> None:
        key = (arch, choice.use_fast, kernels, attention)
        if key in self.seen:
            return
        self.seen.add(key)
        if choice.use_fast:
            self.logger.info("glm4v-fast: %s uses glm4v-fast's vision tower (kernels=%s, attention=%s; %s)", arch,
                             kernels, attention, choice.reason)
        else:
            self.logger.info("glm4v-fast: %s uses %s's own vision tower (%s)", arch, self.engine, choice.reason)


@dataclass(frozen=True)
class TestedVersions:
    """The engine releases an integration was tested with. The integrations subclass engine internals that change
    between releases, so every entry point refuses an untested one, naming both versions and the way out."""
    engine: str                   # "vLLM"
    extra: str                    # the pip extra that installs a tested release: glm4v-fast[extra]
    first: tuple[int, ...]        # first and last tested release, inclusive, to as many parts as matter
    last: tuple[int, ...]
    text: str                     # the range as a requirement: ">=0.32.0,<0.35"
    without_plugin: str           # how to start the engine without the plugin

    def parse(self, version: str) -> tuple[int, ...]:
        parts = len(self.first)
        match = re.match(r"\.".join([r"(\d+)"] * parts), version)
        if match is None:
            raise RuntimeError(f"glm4v-fast: cannot read the installed {self.engine} version {version!r}")
        return tuple(int(group) for group in match.groups())

    def check(self, version: str | None) -> str:
        """Return `version` (the installed one, None when absent), or raise a RuntimeError saying what to do."""
        if version is None:
            raise RuntimeError(f"glm4v-fast's {self.engine} integration needs {self.engine}: "
                               f"pip install 'glm4v-fast[{self.extra}]'")
        if not self.first <= self.parse(version) <= self.last:
            raise RuntimeError(
                f"glm4v-fast's {self.engine} integration is tested with {self.engine} {self.text}, but "
                f"{self.engine} {version} is installed. Install a tested version (pip install "
                f"'glm4v-fast[{self.extra}]'), or start {self.engine} without this plugin ({self.without_plugin}).")
        return version


def plugin_may_register(check_version, env_var: str) -> bool:
    """The version gate of a plugin's `register()`: True on a tested engine; False (register nothing, the engine
    runs as shipped) on an untested one when `env_var` switches glm4v-fast off; the version error otherwise."""
    try:
        check_version()
    except RuntimeError:
        if env_flag(env_var) is False:
            return False
        raise
    return True


def lazy_exports(package: str, table: dict[str, str]):
    """A package's module-level ``__getattr__`` (PEP 562) that imports each name of `table` from its submodule on
    first use, so that importing an integration's package does not import the engine."""
    def __getattr__(name: str):
        if name in table:
            return getattr(importlib.import_module(f".{table[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
