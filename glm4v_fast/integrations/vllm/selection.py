"""Whether a GLM-4V model built by vLLM gets glm4v-fast's tower or keeps vLLM's own, and logging the choice.

Forcing, in order: the environment variable GLM4V_FAST_VLLM (1/true/on or 0/false/off), then vLLM's
`additional_config={"glm4v_fast": true | false}` (`--additional-config '{"glm4v_fast": false}'`). Unforced, the
tower is glm4v-fast's on CUDA, and on other devices what DEFAULT_BY_DEVICE says (set from a measurement:
bench/vllm_tower.py). Configurations the tower cannot serve fall back to vLLM's tower when unforced and raise a
ValueError naming the option when forced.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

ENV_VAR = "GLM4V_FAST_VLLM"
CONFIG_KEY = "glm4v_fast"
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")

# Where glm4v-fast's tower is the default when nothing forces either. CUDA: Triton kernels and varlen attention.
# CPU: off. bench/vllm_tower.py (both towers in one vLLM process, one 448x448 image, GLM-4.1V's width) measured
# vLLM's oneDNN-packed tower faster there, in float32 and bf16 (bench/results/2026-12-03-vllm-cpu-*.json).
DEFAULT_BY_DEVICE = {"cuda": True, "cpu": False}

# A child of vLLM's logger: its handler and level (VLLM_LOGGING_LEVEL) apply.
logger = logging.getLogger("vllm.glm4v_fast")


@dataclass(frozen=True)
class TowerChoice:
    use_fast: bool
    forced: bool
    reason: str


def _parse_flag(value, source: str) -> bool | None:
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


def forced_setting(additional_config=None) -> tuple[bool | None, str]:
    """(True/False when forced, else None; where it came from)."""
    env = _parse_flag(os.environ.get(ENV_VAR), ENV_VAR)
    if env is not None:
        return env, f"{ENV_VAR}={os.environ[ENV_VAR]}"
    if isinstance(additional_config, dict) and CONFIG_KEY in additional_config:
        value = _parse_flag(additional_config[CONFIG_KEY], f"additional_config[{CONFIG_KEY!r}]")
        if value is not None:
            return value, f"additional_config {CONFIG_KEY}={value}"
    return None, ""


def choose_tower(device_type: str, additional_config=None, blockers: list[str] | None = None) -> TowerChoice:
    """Decide for one model. `blockers` lists the reasons (options in use) glm4v-fast's tower cannot serve."""
    forced, source = forced_setting(additional_config)
    blockers = blockers or []
    if forced is False:
        return TowerChoice(False, True, f"forced off by {source}")
    if blockers:
        if forced:
            raise ValueError(f"glm4v-fast's vision tower was forced on ({source}) but cannot serve this model: "
                             + "; ".join(blockers) + f". Stop forcing it ({ENV_VAR} or additional_config {CONFIG_KEY!r}: "
                             "vLLM's tower is then used) or drop the option.")
        return TowerChoice(False, False, "vLLM's tower kept: " + "; ".join(blockers))
    if forced:
        return TowerChoice(True, True, f"forced on by {source}")
    default = DEFAULT_BY_DEVICE.get(device_type, False)
    return TowerChoice(default, False, f"default on {device_type} (set {ENV_VAR}=0/1 to force)")


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
        logger.info("glm4v-fast: %s uses vLLM's own vision tower (%s)", arch, choice.reason)
