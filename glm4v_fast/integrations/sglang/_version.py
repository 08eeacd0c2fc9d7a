"""The SGLang versions this integration is tested with, and the check every entry point runs first."""
from __future__ import annotations

from importlib import metadata

from ..engines import TestedVersions

# SGLang changes its GLM-4V model classes, their weight loading and its multimodal processors between patch
# releases: the integration subclasses them, so it runs only on the releases it was tested with.
TESTED = TestedVersions(
    engine="SGLang", extra="sglang", first=(0, 5, 23), last=(0, 5, 23), text=">=0.5.23,<0.5.24",
    without_plugin="SGLANG_PLUGINS set to a list without 'glm4v_fast', or GLM4V_FAST_SGLANG=0")
TESTED_RANGE = TESTED.text


def installed_sglang_version() -> str | None:
    """The installed SGLang distribution's version, or None."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(version: str | None = None) -> str:
    """Return the SGLang version, or raise a RuntimeError naming it and the tested range."""
    return TESTED.check(installed_sglang_version() if version is None else version)
