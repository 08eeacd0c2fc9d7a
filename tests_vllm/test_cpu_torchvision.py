"""The shipped start-up hook for PyPI's CUDA torchvision next to a CPU torch (`glm4v-fast-vllm-cpu install`).

Each check runs in a new interpreter without the tests' own start-up file (PYTHONPATH cleared), the hook's .pth file
processed by `site.addsitedir` exactly as Python processes site-packages at start-up. In vllm-cpu 0.32's environment
torchvision's ops do not load (the hook declares the two schemas); in 0.33/0.34's they do (the hook leaves them).
"""
from __future__ import annotations

import os
import subprocess
import sys

from glm4v_fast.integrations.vllm import cpu_torchvision


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd="/")


def _extension_loads() -> bool:
    library = cpu_torchvision.torchvision_extension()
    if library is None:
        return False
    return _python(f"import torch; torch.ops.load_library({library!r})").returncode == 0


def test_command_writes_and_removes_the_pth_file(tmp_path, capsys):
    site = str(tmp_path)
    assert cpu_torchvision.main(["install", "--site-packages", site]) == 0
    pth = tmp_path / cpu_torchvision.PTH_NAME
    text = pth.read_text()
    assert text.startswith("import ") and text.count("\n") == 1            # one start-up line
    assert os.path.abspath(cpu_torchvision.__file__) in text
    assert "wrote" in capsys.readouterr().out
    assert cpu_torchvision.main(["uninstall", "--site-packages", site]) == 0
    assert not pth.exists()
    assert cpu_torchvision.main(["uninstall", "--site-packages", site]) == 0   # nothing to remove: fine


def test_hook_makes_torchvision_import_in_every_new_process(tmp_path):
    cpu_torchvision.main(["install", "--site-packages", str(tmp_path)])
    probe = ("import site, sys; site.addsitedir(%r); assert 'torch' not in sys.modules; "
             "import torchvision, torch; import torchvision.transforms.v2; "
             "print(sys.modules['glm4v_fast_vllm_cpu_hook'].outcome)" % str(tmp_path))
    run = _python(probe)
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = run.stdout.strip().splitlines()[-1]
    loads = _extension_loads()
    assert outcome == ("loaded" if loads else "declared")
    without = _python("import torchvision")
    assert (without.returncode == 0) == loads                              # the hook is what makes it import
    if not loads:
        assert "operator torchvision::nms does not exist" in without.stderr


def test_start_up_line_does_nothing_once_the_package_is_gone(tmp_path):
    (tmp_path / cpu_torchvision.PTH_NAME).write_text(cpu_torchvision.pth_line(str(tmp_path / "gone.py")))
    run = _python("import site, sys; site.addsitedir(%r); print('glm4v_fast_vllm_cpu_hook' in sys.modules)"
                  % str(tmp_path))
    assert run.returncode == 0 and run.stdout.strip() == "False" and not run.stderr


def test_status_says_what_imports(tmp_path, capsys):
    code = cpu_torchvision.main(["status", "--site-packages", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"{tmp_path / cpu_torchvision.PTH_NAME}: not installed" in out
    # the new process inherits the tests' start-up hook (PYTHONPATH): torchvision imports there
    assert "import torchvision in a new process: ok" in out
    assert code == (1 if "FAILS" in out else 0)


def test_broken_audio_packages_are_named_with_the_fix(capsys, monkeypatch):
    monkeypatch.setattr(cpu_torchvision, "_imports", lambda p: (False, "OSError") if p == "torchaudio" else (None, ""))
    assert cpu_torchvision.main(["status", "--site-packages", "/nonexistent"]) == 1
    assert "pip uninstall -y torchaudio" in capsys.readouterr().out
