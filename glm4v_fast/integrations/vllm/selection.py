"""Whether a GLM-4V model built by vLLM gets glm4v-fast's tower or keeps vLLM's own, and logging the choice.

Forcing, in order: the environment variable GLM4V_FAST_VLLM (1/true/on or 0/false/off), then vLLM's
`additional_config={"glm4v_fast": true | false}` (`--additional-config '{"glm4v_fast": false}'`). Unforced, the
tower is glm4v-fast's on CUDA, and on a CPU wherever glm4v-fast's compiled CPU path runs (`default_tower`).
Configurations the tower cannot serve fall back to vLLM's tower when unforced and raise a ValueError naming the
option when forced.
"""
from __future__ import annotations

import logging
import os

from ..engines import ChoiceLog, TowerChoice, decide, env_flag, parse_flag

ENV_VAR = "GLM4V_FAST_VLLM"
CONFIG_KEY = "glm4v_fast"

# A child of vLLM's logger: its handler and level (VLLM_LOGGING_LEVEL) apply.
logger = logging.getLogger("vllm.glm4v_fast")


def forced_setting(additional_config=None) -> tuple[bool | None, str]:
    """(True/False when forced, else None; where it came from)."""
    env = env_flag(ENV_VAR)
    if env is not None:
        return env, f"{ENV_VAR}={os.environ[ENV_VAR]}"
    if isinstance(additional_config, dict) and CONFIG_KEY in additional_config:
        value = parse_flag(additional_config[CONFIG_KEY], f"additional_config[{CONFIG_KEY!r}]")
        if value is not None:
            return value, f"additional_config {CONFIG_KEY}={value}"
    return None, ""


def default_tower(device_type: str, dtype) -> tuple[bool, str]:
    """(glm4v-fast's tower?, why) when nothing forces either.

    CUDA: yes (Triton kernels, varlen attention). CPU: where the tower runs compiled (`compiled_cpu.decide` with
    compile="auto": bf16 and float32, a C++ compiler, GLM4V_FAST_COMPILE not "off"), which bench/cpu_towers.py
    measured faster than vLLM's oneDNN tower wherever its rules decide, in both dtypes (docs/results.md); eager,
    it is not faster, so vLLM's tower stays. Other devices: vLLM's tower."""
    import torch

    from ...compiled_cpu import decide as compiled_decision

    if device_type == "cuda":
        return True, "default on cuda"
    if device_type != "cpu":
        return False, f"default on {device_type}"
    compiled, why = compiled_decision("auto", torch.device("cpu"), dtype, "torch")
    if compiled:
        return True, f"default on cpu: the compiled CPU path runs in {str(dtype).removeprefix('torch.')}"
    return False, f"default on cpu where glm4v-fast's tower would run eagerly ({why})"


def choose_tower(device_type: str, dtype, additional_config=None, blockers: list[str] | None = None) -> TowerChoice:
    """Decide for one model of `dtype` on `device_type`. `blockers` lists the reasons (options in use)
    glm4v-fast's tower cannot serve."""
    forced, source = forced_setting(additional_config)
    default, why = default_tower(device_type, dtype) if forced is None and not blockers else (False, "")
    return decide(forced, source, blockers or [], engine="vLLM",
                  how_to_unforce=f"Stop forcing it with {ENV_VAR} or additional_config {CONFIG_KEY!r}",
                  default=default, default_reason=f"{why} (set {ENV_VAR}=0/1 to force)")


log_choice_once = ChoiceLog(logger, "vLLM")
