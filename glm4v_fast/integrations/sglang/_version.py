"""The SGLang versions this integration is tested with, and the check every entry point runs first."""
from __future__ import annotations

import re
from importlib import metadata

# SGLang changes its GLM-4V model classes, their weight loading and its multimodal processors between patch
# releases: the integration subclasses them, so it runs only on the releases it was tested with.
TESTED_SGLANG = ((0, 5, 23), (0, 5, 23))     # first and last tested (major, minor, patch), inclusive
TESTED_RANGE = ">=0.5.23,<0.5.24"


def _parse(version: str) -> tuple[int, int, int]:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise RuntimeError(f"glm4v-fast: cannot read the installed SGLang version {version!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def installed_sglang_version() -> str | None:
    """The installed SGLang distribution's version, or None."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(version: str | None = None) -> str:
    """Return the SGLang version, or raise a RuntimeError naming it and the tested range."""
    version = installed_sglang_version() if version is None else version
    if version is None:
        raise RuntimeError("glm4v-fast's SGLang integration needs SGLang: pip install 'glm4v-fast[sglang]'")
    if not TESTED_SGLANG[0] <= _parse(version) <= TESTED_SGLANG[1]:
        raise RuntimeError(
            f"glm4v-fast's SGLang integration is tested with SGLang {TESTED_RANGE}, but SGLang {version} is "
            f"installed. Install a tested version (pip install 'glm4v-fast[sglang]'), or start SGLang without this "
            f"plugin (SGLANG_PLUGINS set to a list without 'glm4v_fast', or GLM4V_FAST_SGLANG=0).")
    return version
