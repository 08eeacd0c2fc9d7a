"""The compiled CPU path (VisionModel(compile=...), glm4v_fast.compiled_cpu): outputs equal to transformers and to
the eager forward in float32 and within bf16's rule, one compiled graph for every input size, the on-disk cache
reused by a second process, the eager fallback without a C++ compiler and under autograd, and what "auto" picks.

Compiling costs seconds even at this size, so the module shares one compiled model per dtype; the cache tests run
in subprocesses with their own cache directory.
"""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import glm4v_fast as gf
from glm4v_fast import compiled_cpu
from glm4v_fast.reference import ReferenceVisionModel
from _tiny import CONFIGS, IMAGE_GRIDS, VIDEO_GRIDS, hf_vision_model, random_inputs, rel_err

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(compiled_cpu.cxx_compiler() is None, reason="inductor needs a C++ compiler")

# Several calls of different sizes and mixes: images alone, a mixed batch, a video with images, one large image.
CALLS = [[[1, 4, 6]], IMAGE_GRIDS, [[3, 4, 4], [1, 2, 2]], [[1, 10, 8]], [[1, 2, 2], [1, 2, 2], [1, 6, 4]]]


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    """The module's compiles go to a cache of their own (not the user's ~/.cache)."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def _load(cls, hf, **kwargs):
    model = cls(gf.VisionConfig.from_dict(hf.config.to_dict()), **kwargs).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    return model


@pytest.fixture(scope="module")
def hf():
    return hf_vision_model(CONFIGS["tiny_bias"], std=0.1)


@pytest.fixture(scope="module")
def compiled32(hf):
    """One compiled float32 model for the module; its first call compiles (not counted as a recompilation)."""
    model = _load(gf.VisionModel, hf, compile="cpu")
    assert model.compiled() == (True, "compile='cpu'")
    pv, grid = random_inputs(CALLS[0])
    with torch.no_grad():
        model(pv, grid)
    return model


def test_float32_equals_transformers_and_eager_with_no_recompilation(hf, compiled32):
    eager = _load(gf.VisionModel, hf)
    # Every size after the first runs the graph compiled on the first call: a recompilation would raise.
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for grids in CALLS + [VIDEO_GRIDS + IMAGE_GRIDS]:
            pv, grid = random_inputs(grids)
            ours = compiled32.forward_features(pv, grid)
            mine = eager.forward_features(pv, grid)
            assert rel_err(ours.pooler_output, mine.pooler_output) <= 1e-5
            if all(t == 1 for t, _, _ in grids):    # transformers' tower takes a video's slices one by one
                theirs = hf(pv, grid_thw=grid)
                assert rel_err(ours.pooler_output, theirs.pooler_output) <= 1e-5
                assert rel_err(ours.last_hidden_state, theirs.last_hidden_state) <= 1e-5
    # The compiled graph itself ran (not an eager fallback).
    assert compiled32._compiled.failed is None and compiled32._compiled._fn is not None


def test_inference_mode_and_per_item_outputs(compiled32, hf):
    eager = _load(gf.VisionModel, hf)
    pv, grid = random_inputs(IMAGE_GRIDS)
    with torch.inference_mode():
        ours = compiled32.get_image_features(pv, grid)
        theirs = eager.get_image_features(pv, grid)
    assert [o.shape for o in ours] == [t.shape for t in theirs]
    assert max(rel_err(o, t) for o, t in zip(ours, theirs)) <= 1e-5


def test_bfloat16_within_the_bf16_rule(hf):
    fast32 = _load(gf.VisionModel, hf)
    compiled16 = _load(gf.VisionModel, hf, compile="cpu").to(torch.bfloat16)
    ref16 = _load(ReferenceVisionModel, hf).to(torch.bfloat16)
    assert compiled16.compiled()[0]
    for grids in (IMAGE_GRIDS, [[1, 10, 8]]):
        pv, grid = random_inputs(grids)
        with torch.no_grad():
            exact = fast32(pv, grid)
            ours = compiled16(pv.bfloat16(), grid).float()
            theirs = ref16(pv.bfloat16(), grid).float()
        # As for the eager bf16 path: at most twice the error of the same-precision reference, plus a small atol.
        assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-2
    assert compiled16._compiled.failed is None and compiled16._compiled._fn is not None


def test_gradients_run_eagerly(compiled32, hf):
    pv, grid = random_inputs(IMAGE_GRIDS)
    layout = compiled32.pack(grid, pv)
    pv.requires_grad_(True)
    assert not compiled32._compiled.applies(compiled32, pv, layout)     # a gradient is needed: eager
    out = compiled32(pv, grid)
    out.sum().backward()
    assert pv.grad is not None and pv.grad.abs().sum() > 0
    with torch.no_grad():
        assert compiled32._compiled.applies(compiled32, pv, layout)


@pytest.mark.parametrize("freeze", [False, True])
def test_new_weights_are_used(hf, freeze):
    """Loading other weights after a compiled call: the graph reads them as inputs; a frozen graph (weights as
    constants, the benchmark's variant) is rebuilt."""
    model = _load(gf.VisionModel, hf, compile="cpu")
    model._compiled.freeze = freeze
    eager = _load(gf.VisionModel, hf)
    pv, grid = random_inputs(IMAGE_GRIDS)
    with torch.no_grad():
        before = model(pv, grid)
        other = {k: v * 1.5 if v.dim() > 1 else v for k, v in hf.state_dict().items()}
        model.load_state_dict(other)
        eager.load_state_dict(other)
        after, expected = model(pv, grid), eager(pv, grid)
    assert rel_err(after, expected) <= 1e-5 and rel_err(before, expected) > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Fallbacks and the "auto" choice
# ---------------------------------------------------------------------------------------------------------------
def test_no_cxx_compiler_logs_once_and_runs_eagerly(hf, monkeypatch, caplog):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(compiled_cpu.CompiledCpuForward, "_logged", set())
    models = [_load(gf.VisionModel, hf, compile="cpu") for _ in range(2)]
    eager = _load(gf.VisionModel, hf)
    pv, grid = random_inputs(IMAGE_GRIDS)
    # What inductor searches ($CXX, else g++): a compiler path that does not exist.
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/bin/g++",)}):
        assert compiled_cpu.cxx_compiler() is None
        with caplog.at_level(logging.INFO, logger="glm4v_fast"), torch.no_grad():
            outs = [m(pv, grid) for m in models]
            expected = eager(pv, grid)
    assert compiled_cpu.cxx_compiler() is not None
    lines = [r for r in caplog.records if "C++ compiler" in r.getMessage()]
    assert len(lines) == 1 and "eagerly" in lines[0].getMessage()
    assert all(torch.equal(o, expected) for o in outs)
    assert all(m._compiled._fn is None for m in models)
    assert models[0].compiled()[0] is False and "C++ compiler" in models[0].compiled()[1]


def test_auto_choice(monkeypatch):
    config = gf.VisionConfig(**CONFIGS["tiny"])
    monkeypatch.delenv(compiled_cpu.ENV_VAR, raising=False)
    assert gf.VisionModel(config).compiled() == (False, "compile='off'")      # the class default
    auto = gf.VisionModel(config, compile="auto")
    assert auto.compile_choice == "auto"
    assert auto.compiled()[0] is (torch.float32 in compiled_cpu.AUTO_DTYPES)
    assert auto.to(torch.bfloat16).compiled()[0] is (torch.bfloat16 in compiled_cpu.AUTO_DTYPES)
    assert gf.VisionModel(config, compile="auto").to(torch.float16).compiled()[0] is False
    # The entry points default to "auto".
    with pytest.warns(UserWarning, match="RANDOM"):
        _, model, _ = gf.create_glm4v_vision_encoder(config, device="cpu", dtype="float32")
    assert model.compile_choice == "auto"
    # GLM4V_FAST_COMPILE overrides "auto" (tests/conftest.py sets it off for the rest of the suite), not an
    # explicit choice.
    monkeypatch.setenv(compiled_cpu.ENV_VAR, "off")
    assert gf.VisionModel(config, compile="auto").compiled()[0] is False
    assert gf.VisionModel(config, compile="cpu").compiled()[0] is True
    monkeypatch.setenv(compiled_cpu.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="GLM4V_FAST_COMPILE"):
        gf.VisionModel(config, compile="auto").compiled()
    with pytest.raises(ValueError, match="compile must be one of"):
        gf.VisionModel(config, compile="gpu")


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiled_cpu.default_cache_dir() == str(tmp_path / "glm4v-fast" / "inductor")


# ---------------------------------------------------------------------------------------------------------------
# The on-disk cache, across processes
# ---------------------------------------------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from torch._dynamo.utils import counters
    import glm4v_fast as gf
    sys.path.insert(0, "tests")
    from _tiny import CONFIGS, IMAGE_GRIDS, random_inputs

    model = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), compile="cpu").eval()
    model.reset_parameters(seed=3)
    pv, grid = random_inputs(IMAGE_GRIDS)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(pv, grid)
    print(json.dumps({"first_call_s": time.perf_counter() - start, "hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"], "sum": out.double().sum().item(),
                      "cache_dir": __import__("os").environ["TORCHINDUCTOR_CACHE_DIR"]}))
""")


def test_compile_cache_is_written_and_reused_by_another_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", compiled_cpu.ENV_VAR)}
    env["XDG_CACHE_HOME"] = str(tmp_path)       # the default cache dir, under it
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cache = tmp_path / "glm4v-fast" / "inductor"
    assert runs[0]["cache_dir"] == runs[1]["cache_dir"] == str(cache)
    assert runs[0]["misses"] >= 1 and runs[0]["hits"] == 0
    assert runs[1]["hits"] >= 1 and runs[1]["misses"] == 0          # the second process compiles nothing
    assert runs[0]["sum"] == runs[1]["sum"]
    assert any(cache.rglob("*.so"))
