"""Ahead-of-time compile checks (``pytest -m aot``): every kernel configuration the launchers can pick,
compiled for sm_90a and sm_80 by the installed triton, without a GPU.

Each kernel module's ``aot_specs()`` lists its configurations (glm4v_fast/kernels/_aot.py). The suite sets
TRITON_INTERPRET=1, under which kernels are interpreted, so one subprocess without it compiles every
(spec, arch) once per session (on two worker processes) and returns the figures as JSON: registers, spill
bytes, stack frame, shared memory, wgmma and cp.async use. The figures are written to
``<pytest tmp>/aot/aot_figures.json`` and printed as a table with ``-v``.

Asserted: every spec compiles; every ``no_spills`` spec (the fp16/bf16 configurations GLM shapes use)
compiles for sm_90a with no spill stores and no stack frame; bf16 attention at head dim 128 uses wgmma on
sm_90a (TTGIR, PTX, and HGMMA in the SASS where triton ships nvdisasm); every expected kernel module is
present (a module without ``aot_specs()`` is skipped, visibly).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from glm4v_fast.kernels import _aot  # noqa: E402

pytestmark = pytest.mark.aot

#: Kernel modules that must exist and, once written, provide aot_specs().
EXPECTED_MODULES = ("layer_norm_gelu", "rms_norm", "rotary", "swiglu", "varlen_attention")
#: The arch whose spills and wgmma are asserted (the GPU image's H100); the other archs are compiled and
#: their figures recorded.
ASSERTED_ARCH = "sm_90a"
COMPILE_TIMEOUT_S = 900

FOUND = _aot.discover()
SPECS = {spec.name: spec for specs in FOUND.values() if isinstance(specs, list) for spec in specs}
CASES = [(name, arch) for name in SPECS for arch in _aot.ARCHS]


@pytest.fixture(scope="session")
def aot_results(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """(spec name, arch) -> compile figures, from one subprocess compiling every spec for every arch."""
    out_dir = tmp_path_factory.mktemp("aot")
    json_path = out_dir / "aot_figures.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; from glm4v_fast.kernels._aot import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "--json", str(json_path)], env=env, capture_output=True,
                          text=True, timeout=COMPILE_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"the compile subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(json_path.read_text())
    result["json_path"] = str(json_path)
    return result


@pytest.fixture(scope="session")
def figures(aot_results) -> dict[tuple[str, str], dict]:
    return {(r["name"], r["arch"]): r for r in aot_results["rows"]}


def test_expected_modules_are_discovered():
    missing = [m for m in EXPECTED_MODULES if m not in FOUND]
    assert not missing, f"kernel modules not found in glm4v_fast.kernels: {missing}"


@pytest.mark.parametrize("module", sorted(set(FOUND) | set(EXPECTED_MODULES)))
def test_module_has_aot_specs(module):
    specs = FOUND.get(module)
    if not isinstance(specs, list):
        pytest.skip(specs or f"{module} not found")
    assert specs, f"{module}.aot_specs() returned no configurations"
    names = [s.name for s in specs]
    assert len(set(names)) == len(names), f"{module}: duplicate spec names"


def test_spec_names_are_unique_across_modules():
    names = [s.name for specs in FOUND.values() if isinstance(specs, list) for s in specs]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name,arch", CASES, ids=[f"{n}@{a}" for n, a in CASES])
def test_compiles(figures, name, arch):
    row = figures[(name, arch)]
    assert row["ok"], f"{name} does not compile for {arch}: {row['error']}"
    if SPECS[name].no_spills and arch == ASSERTED_ARCH:
        assert row["spill_stores"] == 0 and row["stack_frame"] == 0, (
            f"{name} spills on {arch}: {row['regs']} registers, {row['spill_stores']} bytes spill stores, "
            f"{row['stack_frame']} bytes stack frame")


def test_bf16_attention_head_dim_128_uses_wgmma(figures):
    row = figures[("varlen_attention/bf16/D=128", ASSERTED_ARCH)]
    assert row["ok"] and row["wgmma"], row
    assert row["sass_hgmma"] is None or row["sass_hgmma"] > 0, "wgmma in the PTX but no HGMMA in the SASS"
    assert row["cp_async"], "the K/V tiles are no longer loaded through the cp.async pipeline"


def test_attention_head_dim_72_keeps_vectorised_loads(figures):
    """Head dim 72: head strides are multiples of 8, not 16; the STRIDE_ALIGN hint keeps cp.async."""
    for dtype in ("fp16", "bf16"):
        row = figures[(f"varlen_attention/{dtype}/D=72", ASSERTED_ARCH)]
        assert row["ok"] and row["cp_async"] and row["spill_stores"] == 0, row


def test_report(aot_results, request):
    """The figures, as a table (shown with -v); the JSON path is printed with it."""
    rows = aot_results["rows"]
    assert len(rows) == len(CASES) and all("seconds" in r for r in rows)
    lines = [f"triton {aot_results['triton']}: {len(rows)} compiles in {aot_results['seconds']} s; "
             f"figures in {aot_results['json_path']}",
             f"{'spec':<34} {'arch':<7} {'config':<30} {'regs':>4} {'spill st':>8} {'stack':>6} {'smem KB':>7} "
             f"{'wgmma':>5} {'HGMMA':>5} {'cp.async':>8}"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"{r['name']:<34} {r['arch']:<7} FAILED: {r['error'][:80]}")
            continue
        lines.append(f"{r['name']:<34} {r['arch']:<7} {r['config']:<30} {r['regs']:>4} {r['spill_stores']:>8} "
                     f"{r['stack_frame']:>6} {r['shared'] / 1024:>7.1f} {str(r['wgmma']):>5} "
                     f"{str(r['sass_hgmma']):>5} {str(r['cp_async']):>8}")
    Path(aot_results["json_path"]).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    if request.config.get_verbosity() > 0:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\n" + "\n".join(lines))


def test_ptxas_log_parsing():
    # The log triton prints with TRITON_DUMP_PTXAS_LOG=1 (ptxas -v), as captured from a compile above.
    log = """ptxas info    : Compiling entry function '_varlen_attn_kernel' for 'sm_90a'
ptxas info    : Function properties for _varlen_attn_kernel
    80 bytes stack frame, 76 bytes spill stores, 72 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""
    assert _aot._ptxas_figures(log) == {"stack_frame": 80, "spill_stores": 76, "spill_loads": 72, "regs": 255}
    with pytest.raises(RuntimeError, match="ptxas log"):
        _aot._ptxas_figures("")


def test_interpreted_kernel_is_refused_by_name():
    spec = next(iter(SPECS.values()))
    if hasattr(spec.kernel, "cache_key"):
        pytest.skip("kernels are compiled in this process (no TRITON_INTERPRET)")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _aot._source(spec)
