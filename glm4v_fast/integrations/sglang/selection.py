"""Whether a GLM-4V model built by SGLang gets glm4v-fast's tower or keeps SGLang's own, and logging the choice.

Forcing: the environment variable GLM4V_FAST_SGLANG (1/true/on or 0/false/off; unset or "auto": the default).
SGLang starts its scheduler processes after reading the environment, so the variable is set before the engine or
`python -m sglang.launch_server` starts. Unforced, glm4v-fast's tower is used wherever it can serve the model;
a quantized checkpoint keeps SGLang's tower (forced on, it raises a ValueError naming the option instead).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

ENV_VAR = "GLM4V_FAST_SGLANG"
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")

# A child of SGLang's logger: its handler and level (--log-level) apply.
logger = logging.getLogger("sglang.glm4v_fast")


@dataclass(frozen=True)
class TowerChoice:
    use_fast: bool
    forced: bool
    reason: str


def parse_flag(value, source: str) -> bool | None:
    if value is None or value == "" or value == "auto":
        return None
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{source} must be one of 1/0, true/false, on/off or auto, got {value!r}")


def forced_setting() -> bool | None:
    """True/False when GLM4V_FAST_SGLANG forces a tower, else None."""
    return parse_flag(os.environ.get(ENV_VAR), ENV_VAR)


def choose_tower(blockers: list[str] | None = None) -> TowerChoice:
    """Decide for one model. `blockers` lists the reasons (options in use) glm4v-fast's tower cannot serve."""
    forced = forced_setting()
    source = f"{ENV_VAR}={os.environ.get(ENV_VAR)}"
    blockers = blockers or []
    if forced is False:
        return TowerChoice(False, True, f"forced off by {source}")
    if blockers:
        if forced:
            raise ValueError(f"glm4v-fast's vision tower was forced on ({source}) but cannot serve this model: "
                             + "; ".join(blockers) + f". Unset {ENV_VAR} (SGLang's tower is then used) or drop "
                             "the option.")
        return TowerChoice(False, False, "SGLang's tower kept: " + "; ".join(blockers))
    if forced:
        return TowerChoice(True, True, f"forced on by {source}")
    return TowerChoice(True, False, f"the default (set {ENV_VAR}=0 for SGLang's tower)")


_logged: set[tuple] = set()


def log_choice_once(arch: str, choice: TowerChoice, kernels: str | None = None, attention: str | None = None) -> None:
    """One INFO line per process and distinct choice: which tower, with which kernels and attention backend."""
    key = (arch, choice.use_fast, kernels, attention)
    if key in _logged:
        return
    _logged.add(key)
    if choice.use_fast:
        logger.info("glm4v-fast: %s uses glm4v-fast's vision tower (kernels=%s, attention=%s; %s)", arch, kernels,
                    attention, choice.reason)
    else:
        logger.info("glm4v-fast: %s uses SGLang's own vision tower (%s)", arch, choice.reason)
