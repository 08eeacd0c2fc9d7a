"""Whether a GLM-4V model built by SGLang gets glm4v-fast's tower or keeps SGLang's own, and logging the choice.

Forcing: the environment variable GLM4V_FAST_SGLANG (1/true/on or 0/false/off; unset or "auto": the default).
SGLang starts its scheduler processes after reading the environment, so the variable is set before the engine or
`python -m sglang.launch_server` starts. Unforced, glm4v-fast's tower is used wherever it can serve the model;
a quantized checkpoint keeps SGLang's tower (forced on, it raises a ValueError naming the option instead).
"""
from __future__ import annotations

import logging
import os

from ..engines import ChoiceLog, TowerChoice, decide, env_flag

ENV_VAR = "GLM4V_FAST_SGLANG"

# A child of SGLang's logger: its handler and level (--log-level) apply.
logger = logging.getLogger("sglang.glm4v_fast")


def choose_tower(blockers: list[str] | None = None) -> TowerChoice:
    """Decide for one model. `blockers` lists the reasons (options in use) glm4v-fast's tower cannot serve."""
    return decide(env_flag(ENV_VAR), f"{ENV_VAR}={os.environ.get(ENV_VAR)}", blockers or [], engine="SGLang",
                  how_to_unforce=f"Unset {ENV_VAR}", default=True,
                  default_reason=f"the default (set {ENV_VAR}=0 for SGLang's tower)")


log_choice_once = ChoiceLog(logger, "SGLang")
