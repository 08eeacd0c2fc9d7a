"""`glm4v-fast bench`: end to end on the CPU (small shapes, two workloads, one repeat: well under a minute), its
targets, its errors when transformers is missing or broken, and its parts (timing, workloads, sweeps)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from glm4v_fast.cli import main

ENCODER_FIELDS = ("workload", "images", "patches", "ours_ms", "hf_ms", "speedup", "tflops", "mfu",
                  "max_rel_err_vs_hf", "ours_peak_mib", "hf_peak_mib")
KERNEL_FIELDS = ("kernel", "shape", "dtype", "ours_us", "torch_us", "compile_us", "gbps", "peak_fraction")
ATTENTION_FIELDS = ("backend", "seqlen", "segments", "ms", "tflops")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# The command end to end on the CPU (one run shared by the tests that read its JSON)
@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--small", "--workloads", "single-448,video-448", "--repeats", "1", "--out", str(out)])
    (json_path,) = out.glob("*.json")
    return rc, json_path, json.loads(json_path.read_text())


def test_runs_and_names_the_file(bench_run):
    rc, json_path, result = bench_run
    assert rc == 0, result["errors"]
    assert result["errors"] == []
    assert json_path.name == f"{result['date']}-cpu-small.json"


def test_header_and_peaks(bench_run):
    _, _, result = bench_run
    for key in ("device", "torch", "triton", "flash_attn", "date", "command", "peaks", "encoder", "kernels",
                "attention"):
        assert key in result
    assert result["command"].startswith(("glm4v-fast bench", "TRITON_INTERPRET=1 glm4v-fast bench"))
    assert "--small" in result["command"] and "single-448,video-448" in result["command"]
    peaks = result["peaks"]
    assert _positive(peaks["bf16_tflops"]) and _positive(peaks["hbm_tbps"])
    assert peaks["peak_dtype"] == result["dtype"] == "float32"      # CPU: the dtype actually used


def test_encoder_rows(bench_run):
    _, _, result = bench_run
    rows = {r["workload"]: r for r in result["encoder"]}
    assert set(rows) == {"single-448", "video-448"}
    for r in rows.values():
        for key in ENCODER_FIELDS:
            assert key in r, key
        for key in ("ours_ms", "hf_ms", "speedup", "tflops", "mfu"):
            assert _positive(r[key]), (r["workload"], key, r[key])
        assert 0 <= r["max_rel_err_vs_hf"] <= 1e-2          # fp32, same weights: the target holds
        assert r["ours_peak_mib"] is None and r["hf_peak_mib"] is None   # no allocator statistics on CPU
    # video-448 (small): one video of 4 temporal slices of 8 x 8 patches, 4 attention segments.
    assert rows["video-448"]["images"] == 1 and rows["video-448"]["patches"] == 4 * 8 * 8
    assert rows["video-448"]["segments"] == 4


def test_kernel_and_attention_rows(bench_run):
    _, _, result = bench_run
    kernels = {k["kernel"] for k in result["kernels"]}
    assert kernels == {"rms_norm", "rms_norm+residual", "apply_rotary", "swiglu"}
    for k in result["kernels"]:
        for key in KERNEL_FIELDS:
            assert key in k, key
        assert _positive(k["torch_us"])
        # torch.compile may be unavailable (no C++ toolchain): then null, with a note saying why.
        assert k["compile_us"] is None or _positive(k["compile_us"])
        if k["compile_us"] is None:
            assert any("torch.compile" in note for note in result["notes"])
        assert (k["ours_us"] is None) == (k["gbps"] is None) == (k["peak_fraction"] is None)
        assert k["ours_us"] is None or _positive(k["ours_us"])
    assert result["attention"]
    assert "sdpa" in {a["backend"] for a in result["attention"]}
    for a in result["attention"]:
        for key in ATTENTION_FIELDS:
            assert key in a, key
        assert _positive(a["ms"]) and _positive(a["tflops"])


def test_plot_written(bench_run):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    _, json_path, result = bench_run
    png = json_path.with_name(result["plot"])
    assert png.suffix == ".png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_encoder_only_skips_the_sweeps(tmp_path):
    pytest.importorskip("transformers")
    assert main(["bench", "--small", "--workloads", "single-448", "--repeats", "1", "--encoder-only", "--no-plot",
                 "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*.json")
    result = json.loads(json_path.read_text())
    assert result["kernels"] == [] and result["attention"] == []
    assert [r["workload"] for r in result["encoder"]] == ["single-448"] and _positive(result["encoder"][0]["hf_ms"])
    assert "--encoder-only" in result["command"]


def test_exclusive_flags(capsys):
    assert main(["bench", "--kernels-only", "--encoder-only"]) == 2
    assert "exclude each other" in capsys.readouterr().err


# Targets: speed targets graded on a full GPU run only
def test_cpu_run_is_not_graded_against_gpu_speed_targets(bench_run):
    from glm4v_fast.bench import ENCODER_TARGETS, format_tables

    _, _, result = bench_run
    assert result["targets_apply"] is False
    graded = [t["target"] for t in result["targets"]]
    assert graded and all("max_rel_err_vs_hf" in t or "peak_mib" in t for t in graded)
    assert not any(t.startswith(f"{workload} {field} ") for t in graded for workload, field, _, _ in ENCODER_TARGETS)
    assert not any(t.startswith("kernel ") for t in graded)
    printed = format_tables(result)
    assert "MISSED" not in printed and "speed targets: not graded" in printed


def test_full_gpu_run_grades_the_speed_targets():
    from glm4v_fast.bench import evaluate_targets

    row = {"workload": "single-448", "ours_ms": 2.5, "max_rel_err_vs_hf": 3e-3, "ours_peak_mib": 10.0,
           "hf_peak_mib": 20.0}
    kernel = {"kernel": "swiglu", "shape": "32768x4096", "ours_interpreted": False, "peak_fraction": 0.5,
              "ours_us": 10.0, "compile_us": 12.0}
    met = {t["target"]: t["met"] for t in evaluate_targets([row], [kernel])}
    assert met == {"single-448 max_rel_err_vs_hf <= 0.01": True, "single-448 ours_peak_mib <= hf_peak_mib": True,
                   "single-448 ours_ms <= 3": True, "kernel swiglu 32768x4096 peak_fraction >= 0.8": False,
                   "kernel swiglu 32768x4096 ours_us <= compile_us": True}
    assert len(evaluate_targets([row], [kernel], speed_targets=False)) == 2


# transformers missing or broken
def test_transformers_that_fails_to_import_is_reported_as_it_is(monkeypatch, capsys, tmp_path):
    """Installed but broken (here: its GLM-4V module cannot be imported): the real error, not "install it"."""
    import sys

    from glm4v_fast.bench import import_transformers

    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "transformers.models.glm4v.modeling_glm4v", None)
    with pytest.raises(ValueError, match="installed but its GLM-4V model failed to import: ModuleNotFoundError: "
                                         "import of transformers") as info:
        import_transformers()
    assert "pip install" not in str(info.value)
    assert main(["bench", "--small", "--workloads", "single-448", "--out", str(tmp_path)]) == 2
    assert "failed to import: ModuleNotFoundError" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())                 # refused before any measurement


def test_transformers_not_installed_says_how_to_install(monkeypatch):
    import importlib.util

    from glm4v_fast.bench import import_transformers

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"needs it installed: pip install 'glm4v-fast\[test\]'"):
        import_transformers()


# The parts: timing, workloads, sweeps
def test_side_by_side_timing_alternates():
    import torch

    from glm4v_fast.bench import time_pair_ms

    calls = []
    a_ms, b_ms = time_pair_ms(lambda: calls.append("a"), lambda: calls.append("b"), torch.device("cpu"),
                              repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert a_ms >= 0 and b_ms >= 0


def test_huge_image_workloads_are_the_processors_sizes():
    from glm4v_fast.bench import HUGE_IMAGE_GRID, HUGE_IMAGE_MAX_GRID, workloads
    from glm4v_fast.processing import DEFAULT_IMAGE_SIZE, smart_resize

    budget = DEFAULT_IMAGE_SIZE["longest_edge"]
    for grid, max_pixels in ((HUGE_IMAGE_GRID, budget), (HUGE_IMAGE_MAX_GRID, 2 * budget)):
        h, w = smart_resize(2, 8000, 8000, max_pixels=max_pixels)
        assert grid == (1, h // 14, w // 14)
    full = {wl.name: wl for wl in workloads(False, ["huge-image", "huge-image-max"])}
    assert full["huge-image"].seqlens == [29584] and full["huge-image-max"].seqlens == [59536]
    for wl in workloads(True, ["huge-image", "huge-image-max"]):
        assert len(wl.seqlens) == 1 and all(side % 2 == 0 for side in wl.grid[0][1:])


def test_attention_sweep_pins_each_sdpa_kernel_on_cuda():
    import torch

    from glm4v_fast.bench import attention_backends

    variants = {label: (backend, context) for label, backend, context in attention_backends(torch.device("cuda"))}
    for label in ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient"):
        backend, context = variants[label]
        assert backend == "sdpa"
        with context():     # torch.nn.attention.sdpa_kernel: sets the allowed backends, needs no GPU
            pass
    assert "sdpa" in variants
    assert not any(label.startswith("sdpa-") for label, _, _ in attention_backends(torch.device("cpu")))


def test_pinned_sdpa_kernel_that_cannot_run_is_a_note(monkeypatch):
    import contextlib

    import torch
    import torch.nn.functional as F

    from glm4v_fast.bench import small_config, sweeps

    @contextlib.contextmanager
    def no_kernel():
        def refuse(*args, **kwargs):
            raise RuntimeError("No available kernel. Aborting execution.")

        with monkeypatch.context() as m:
            m.setattr(F, "scaled_dot_product_attention", refuse)
            yield

    monkeypatch.setattr(sweeps, "attention_backends", lambda device: [("sdpa-cudnn", "sdpa", no_kernel)])
    notes, errors = [], []
    rows = sweeps.run_attention_sweep(small_config(), "small", torch.float32, torch.device("cpu"), 1, notes, errors)
    assert errors == []
    assert [r["backend"] for r in rows] == ["sdpa-cudnn"] * 2 and all(r["ms"] is None for r in rows)
    assert len(notes) == 2 and all("No available kernel" in n for n in notes)
