"""The GPU round, checked without a GPU.

- The test selection under a simulated CUDA device with the interpreter off (tests/_simulated_cuda.py): the
  device script's pytest selections are CUDA cases only, every CPU kernel case of the suite is skipped there,
  and the kernel tests that do run there never reach the kernels with CPU tensors; without hypothesis (a
  GPU image may lack it) only the property-based tests skip.
- bench/gpu_quick.py: its arguments, and a whole ``--small`` round on CPU (every step, the JSON rewritten after
  each, a step past its timeout killed while the round goes on).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SCRIPT = ROOT / "bench" / "gpu_quick.py"
KERNEL_FILES = ["tests/test_kernels.py", "tests/test_kernels_backward.py", "tests/test_kernels_attention.py"]
MODEL_FILES = ["tests/test_model.py", "tests/test_model_static.py", "tests/test_model_grad.py"]
INTERPRETER_ERROR = "CPU tensors need the Triton interpreter"


def _gpu_quick():
    spec = importlib.util.spec_from_file_location("gpu_quick", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_quick", module)       # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_quick = _gpu_quick()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                   else []))
    env.update(extra)
    return env


def _simulated_cuda_pytest(tmp_path, *args, timeout=600):
    """pytest under the simulated CUDA device; returns (completed process, collected items, test outcomes)."""
    report, outcomes = tmp_path / "items.json", tmp_path / "outcomes.jsonl"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_simulated_cuda", "-p", "gpu_quick",
           *args]
    env = _env(SIMULATED_CUDA_REPORT=str(report), GPU_QUICK_EVENTS=str(outcomes))
    env["PYTHONPATH"] += os.pathsep + str(SCRIPT.parent)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    items = json.loads(report.read_text()) if report.exists() else []
    tests = [json.loads(line) for line in outcomes.read_text().splitlines()] if outcomes.exists() else []
    return res, items, tests


# --------------------------------------------------------------------------------------------------------------
# The selection on a CUDA machine
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_collection(tmp_path_factory):
    """The kernel and model files as `pytest tests` collects them on a CUDA machine (one collection)."""
    res, items, _ = _simulated_cuda_pytest(tmp_path_factory.mktemp("collect"), "--collect-only", *KERNEL_FILES,
                                           *MODEL_FILES)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return items


@pytest.mark.parametrize("step", sorted(gpu_quick.PYTEST_SELECTIONS))
def test_device_script_selections_are_cuda_cases_only(cuda_collection, step):
    marker, files = gpu_quick.PYTEST_SELECTIONS[step][1], gpu_quick.PYTEST_SELECTIONS[step][2:]
    assert gpu_quick.PYTEST_SELECTIONS[step][0] == "-m" and set(files) <= set(KERNEL_FILES + MODEL_FILES)
    selected = [i for i in cuda_collection if i["nodeid"].split("::")[0] in files and marker in i["markers"]]
    assert len(selected) >= (150 if step == "kernels" else 3), len(selected)
    for item in selected:
        assert "interpreter" not in item["markers"] and not item["skips"], item   # each runs on the GPU
        assert "-cpu]" not in item["nodeid"] and "[cpu" not in item["nodeid"], item


def test_every_cpu_kernel_case_is_skipped_under_cuda(cuda_collection):
    interpreted = [i for i in cuda_collection if "interpreter" in i["markers"]]
    assert len(interpreted) >= 150, len(interpreted)
    for item in interpreted:
        assert any("interpreter" in reason for reason in item["skips"]), item
    cuda_cases = [i for i in cuda_collection if i["nodeid"].endswith("cuda]")]
    assert cuda_cases and all("gpu" in i["markers"] and not i["skips"] for i in cuda_cases)


@pytest.mark.slow
def test_kernel_tests_that_run_under_cuda_never_launch_on_cpu_tensors(tmp_path):
    # What runs without a GPU of the kernel files' selection on a GPU machine: nothing may fail because the
    # kernels were handed CPU tensors with the interpreter off. The `slow` ones are left out: besides the
    # interpreter cases (skipped there) they are subprocess checks that set up their own environment.
    res, _, tests = _simulated_cuda_pytest(tmp_path, "-m", "not gpu and not slow", *KERNEL_FILES)
    assert tests, res.stdout[-3000:] + res.stderr[-3000:]
    ran = [t for t in tests if t["outcome"] == "passed"]
    failed = [t for t in tests if t["outcome"] == "failed"]
    assert len(ran) >= 8, len(ran)
    assert not [t for t in tests if t["message"] and INTERPRETER_ERROR in t["message"]]
    assert not failed, failed
    assert res.returncode == 0, res.stdout[-3000:]


BLOCK_HYPOTHESIS = """
import importlib.abc, sys
class _NoHypothesis(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "hypothesis" or name.startswith("hypothesis."):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoHypothesis())
import pytest
raise SystemExit(pytest.main(sys.argv[1:]))
"""


def test_without_hypothesis_only_the_property_tests_skip(tmp_path):
    # A GPU image may lack hypothesis: the modules with property-based tests still run their other tests.
    runner = tmp_path / "run_without_hypothesis.py"
    runner.write_text(BLOCK_HYPOTHESIS)
    outcomes = tmp_path / "outcomes.jsonl"
    env = _env(GPU_QUICK_EVENTS=str(outcomes))
    env["PYTHONPATH"] += os.pathsep + str(SCRIPT.parent)
    files = ["tests/test_kernels_attention.py", "tests/test_processing.py", "tests/test_video.py"]
    res = subprocess.run([sys.executable, str(runner), "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                          "-p", "gpu_quick", *files, "-k", "tile_plan or stride_align or smart_resize or fuzz or "
                          "sample_frame"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    tests = [json.loads(line) for line in outcomes.read_text().splitlines()]
    skipped = {t["nodeid"].split("::")[1] for t in tests if t["outcome"] == "skipped"}
    assert skipped == {"test_tile_plan_covers_each_query_once", "test_smart_resize_matches_transformers",
                       "test_fuzz_arrays_never_crash", "test_sample_frame_indices_match_transformers"}
    assert all("needs hypothesis" in t["message"] for t in tests if t["outcome"] == "skipped")
    assert len([t for t in tests if t["outcome"] == "passed"]) >= 20


# --------------------------------------------------------------------------------------------------------------
# bench/gpu_quick.py
# --------------------------------------------------------------------------------------------------------------
def test_arguments_defaults_and_order():
    args = gpu_quick.parse_args(["--small", "--steps", "encoder,preflight", "--out", "x"])
    assert args.steps == ["preflight", "encoder"]            # run in the order of importance
    assert args.repeats == 1 and args.budget == 300 and args.out == Path("x")
    full = gpu_quick.parse_args(["--timeout", "kernels=30"])
    assert full.steps == list(gpu_quick.STEP_NAMES) and full.budget <= 480
    assert full.timeouts["kernels"] == 30 and full.timeouts["encoder"] == 150
    # The steps' own timeouts as they come first fit in the budget: the four most important steps always run.
    assert sum(full.timeouts[s] for s in ("preflight", "kernels", "cuda-graphs", "encoder")) <= full.budget


@pytest.mark.parametrize("argv, match", [
    (["--steps", "encoder,nope"], "unknown step"),
    (["--steps", ","], "unknown step"),
    (["--timeout", "encoder"], "STEP=SECONDS"),
    (["--timeout", "nope=3"], "STEP=SECONDS"),
    (["--timeout", "encoder=soon"], "not a number"),
    (["--timeout", "encoder=0"], "positive"),
    (["--budget", "-1"], "budget"),
    (["--repeats", "0"], "repeats"),
])
def test_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        gpu_quick.parse_args(argv)


def _run_script(out: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    res = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(out), *args], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    result = json.loads((out / gpu_quick.JSON_NAME).read_text())
    return res, result


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU check of the script; on a GPU run the round itself")
def test_small_round_runs_every_step_on_cpu(tmp_path):
    res, result = _run_script(tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == list(gpu_quick.STEP_NAMES) and result["finished"]
    assert all(s["status"] == "ok" and not s["errors"] for s in steps.values()), \
        {n: (s["status"], s["errors"]) for n, s in steps.items()}
    assert result["elapsed_s"] <= result["budget_s"]
    env = steps["preflight"]["records"][0]
    assert env["kind"] == "environment" and env["cuda"] is False and env["interpreter"] is True
    launch = steps["preflight"]["records"][1]
    assert launch["kind"] == "kernel-launch" and launch["max_rel_err_vs_fp64"] < 1e-5
    # Without CUDA every case of the device's selections is collected and skipped.
    for name in gpu_quick.PYTEST_SELECTIONS:
        assert steps[name]["counts"].get("skipped", 0) >= 3 and set(steps[name]["counts"]) == {"skipped"}
    rows = [r for r in steps["encoder"]["records"] if "workload" in r]
    assert [r["workload"] for r in rows] == list(gpu_quick.ENCODER_WORKLOADS)
    for row in rows:
        assert row["ours_ms"] > 0 and row["patches"] > 0
        if row["hf_ms"] is not None:                       # transformers is installed here
            assert row["max_rel_err_vs_hf"] <= 1e-4       # fp32 small tower: exact up to rounding
    variants = {(r["workload"], r["variant"]) for r in steps["graphs-timing"]["records"]}
    assert variants == {("single-448", v) for v in ("plain", "bucketed", "graphs")}
    assert all(r["max_rel_err_vs_plain"] <= 1e-5 for r in steps["graphs-timing"]["records"])
    backends = {r["backend"]: r for r in steps["attention-backends"]["records"]}
    assert "sdpa" in backends and "triton" in backends           # the interpreter runs triton here
    assert all(r["max_rel_err_vs_sdpa"] <= 1e-4 for r in backends.values())
    assert steps["attention-sweep"]["records"]
    log = (tmp_path / gpu_quick.LOG_NAME).read_text()
    assert all(f"{name}: ok" in log for name in gpu_quick.STEP_NAMES)
    assert "elapsed" in res.stdout.splitlines()[-1]             # the summary table ends the output


def test_a_step_past_its_timeout_is_killed_and_the_round_goes_on(tmp_path):
    res, result = _run_script(tmp_path, "--steps", "encoder,attention-sweep", "--timeout", "encoder=1")
    assert res.returncode == 1
    steps = {s["name"]: s for s in result["steps"]}
    assert steps["encoder"]["status"] == "timeout" and "timed out after 1s" in steps["encoder"]["errors"][0]
    assert steps["attention-sweep"]["status"] == "ok" and steps["attention-sweep"]["records"]
    assert result["finished"]


def test_steps_that_do_not_fit_in_the_budget_are_skipped(tmp_path):
    res, result = _run_script(tmp_path, "--steps", "preflight,attention-sweep", "--budget", "5")
    assert res.returncode == 0, res.stderr[-2000:]
    assert [(s["name"], s["status"]) for s in result["steps"]] == [("preflight", "skipped"),
                                                                  ("attention-sweep", "skipped")]
    assert all("budget" in s["reason"] for s in result["steps"]) and result["finished"]
