"""pytest plugin: every GLM-4V model that transformers' own tests build gets glm4v_fast's vision tower.

    PYTHONPATH=<repo>/tools/hf_suite python -m pytest -p glm4v_fast_patch_plugin tests/models/glm4v/...

It wraps the constructors of transformers' Glm4vModel, Glm4vMoeModel and Glm46VModel
(`patch_glm4v_classes`), so models built directly, by `from_pretrained` (on the meta device, then loaded by
name into the fast tower) and by `from_config` are all patched. GLM4V_FAST_KERNELS and GLM4V_FAST_ATTN choose
`kernels=` and `attn_backend=` (default "auto" for both).
"""
import os

_state = {}


def _options() -> dict:
    return {"kernels": os.environ.get("GLM4V_FAST_KERNELS", "auto"),
            "attn_backend": os.environ.get("GLM4V_FAST_ATTN", "auto")}


def pytest_configure(config):
    from glm4v_fast.integrations.transformers import patch_glm4v_classes

    _state["unpatch"] = patch_glm4v_classes(**_options())


def pytest_unconfigure(config):
    unpatch = _state.pop("unpatch", None)
    if unpatch is not None:
        unpatch()


def pytest_report_header(config):
    opts = ", ".join(f"{k}={v}" for k, v in _options().items())
    return f"glm4v_fast: GLM-4V vision towers replaced by FastGlm4vVisionModel ({opts})"
