"""Nothing in the repository root may shadow an installed package.

Python started in the repository root (pytest, `python -c`, a REPL, a notebook) has the root on `sys.path`
ahead of site-packages, so any package folder there wins over an installed package of the same name. A
top-level `kernels/` folder once did exactly that to the PyPI `kernels` package, which transformers imports
while loading models, and broke transformers in every clone.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_root_holds_no_package_but_glm4v_fast():
    packages = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert packages == ["glm4v_fast"] and modules == [], (packages, modules)


def test_transformers_loads_glm4v_from_the_repository_root(tmp_path):
    """From the root: load a tiny GLM-4V model with from_pretrained, then check where `kernels` resolves."""
    pytest.importorskip("transformers")
    script = f"""
import importlib.util, json, sys
import torch, transformers
vision = dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=16, intermediate_size=24, patch_size=14,
              image_size=56, spatial_merge_size=2, temporal_patch_size=2)
text = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=128,
            rope_parameters={{"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}})
config = transformers.Glm4vConfig(text_config=text, vision_config=vision, image_token_id=7, video_token_id=8)
transformers.Glm4vForConditionalGeneration(config).save_pretrained({str(tmp_path)!r})
model = transformers.Glm4vForConditionalGeneration.from_pretrained({str(tmp_path)!r})
spec = importlib.util.find_spec("kernels")
loaded = sys.modules.get("kernels")
print(json.dumps({{"cwd_on_path": sys.path[0] in ("", {str(ROOT)!r}),
                  "spec": spec.origin if spec else None,
                  "loaded": getattr(loaded, "__file__", None),
                  "prefix": sys.prefix, "model": type(model).__name__}}))
"""
    # `python -c` puts the working directory first on sys.path, as a REPL or notebook started there does.
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["cwd_on_path"] and found["model"] == "Glm4vForConditionalGeneration"
    installed = Path(found["prefix"]).resolve()      # the environment may live in the checkout (.venv)
    for origin in (found["spec"], found["loaded"]):
        if origin is not None:
            origin = Path(origin).resolve()
            assert origin.is_relative_to(installed) or not origin.is_relative_to(ROOT), origin
