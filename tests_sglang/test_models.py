"""SGLang's GLM-4V model classes and ours, built side by side in this process (no engine): the towers agree in
float32 (with each other and with transformers'), the weights load strictly, the rest reaches SGLang's loader,
and SGLang's data-parallel encoder function runs our tower.

SGLang's layers read its process-wide runtime context and model-parallel groups: the module publishes a
one-process context (gloo, world size 1) as SGLang's scheduler does.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from conftest import KINDS

GRIDS = [[1, 4, 6], [1, 2, 2], [1, 4, 4]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sglang_process(checkpoints):
    from sglang.srt import runtime_context
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=str(checkpoints["glm4v"]), device="cpu", attention_backend="torch_native",
                      dtype="float32")
    runtime_context.publish(args, role="scheduler", ranks=runtime_context.SpawnRanks(world_rank=0))
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
    initialize_model_parallel()
    return checkpoints


def _config(path):
    from sglang.srt.utils.hf_transformers_utils import get_config

    return get_config(str(path), trust_remote_code=False)


def _state_dict(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _build(kind: str, fast: bool, path, monkeypatch, weights=None):
    """SGLang's model class (fast=False) or ours with glm4v-fast's tower, loaded from `weights` (default: the
    checkpoint's)."""
    from sglang.srt.models import glm4v, glm4v_moe

    from glm4v_fast.integrations.sglang import models

    if fast:
        monkeypatch.setenv("GLM4V_FAST_SGLANG", "1")
        cls = models.Glm4vForConditionalGeneration if kind == "glm4v" else models.Glm4vMoeForConditionalGeneration
    else:
        cls = glm4v.Glm4vForConditionalGeneration if kind == "glm4v" else glm4v_moe.Glm4vMoeForConditionalGeneration
    with torch.device("cpu"):
        model = cls(_config(path))
    model.load_weights(iter((weights if weights is not None else _state_dict(path)).items()))
    monkeypatch.delenv("GLM4V_FAST_SGLANG", raising=False)
    return model


def _pixels(rows: int, seed: int = 0) -> torch.Tensor:
    """Normalized pixel rows as SGLang hands them to the tower (transformers' processor normalized them)."""
    return torch.randn(rows, 1176, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module", params=KINDS)
def pair(request, sglang_process):
    """(kind, checkpoint path, SGLang's model, ours) for one checkpoint."""
    monkeypatch = pytest.MonkeyPatch()
    path = sglang_process[request.param]
    stock = _build(request.param, False, path, monkeypatch)
    fast = _build(request.param, True, path, monkeypatch)
    yield request.param, path, stock, fast
    monkeypatch.undo()


def test_our_tower_replaces_sglangs(pair):
    from sglang.srt.models.glm4v import Glm4vVisionModel

    from glm4v_fast.integrations.sglang.tower import SglangVisionTower

    kind, _, stock, fast = pair
    assert type(stock.visual) is Glm4vVisionModel
    assert type(fast.visual) is SglangVisionTower
    assert type(fast).__name__ == type(stock).__name__       # SGLang finds the multimodal processor by this name
    for name in ("spatial_merge_size", "out_hidden_size"):
        assert getattr(fast.visual, name) == getattr(stock.visual, name)
    assert fast.visual.dtype == stock.visual.dtype == torch.float32
    assert fast.visual.device == stock.visual.device
    # compiled on a CPU where measured faster, as every entry point (the tests keep it eager: GLM4V_FAST_COMPILE)
    assert fast.visual.compile_choice == "auto"


@pytest.mark.parametrize("grid_as", ["tensor", "list"])
def test_tower_matches_sglang_and_transformers(pair, grid_as):
    """float32: two images and a video slice packed in one call."""
    from transformers import AutoModelForImageTextToText

    _, path, stock, fast = pair
    rows = sum(t * h * w for t, h, w in GRIDS)
    pixels = _pixels(rows)
    grid = torch.tensor(GRIDS) if grid_as == "tensor" else GRIDS
    with torch.no_grad():
        ours = fast.visual(pixels, grid_thw=grid)
        theirs = stock.visual(pixels, grid_thw=torch.tensor(GRIDS))
        hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        want = hf.model.visual(pixels, grid_thw=torch.tensor(GRIDS), return_dict=True).pooler_output
    assert ours.shape == theirs.shape == want.shape == (rows // 4, 128)
    assert _rel(ours, theirs) <= 1e-5
    assert _rel(ours, want) <= 1e-5


def test_everything_else_loads_through_sglang(pair):
    _, _, stock, fast = pair
    theirs = {name: p for name, p in stock.named_parameters() if not name.startswith("visual.")}
    ours = {name: p for name, p in fast.named_parameters() if not name.startswith("visual.")}
    assert theirs.keys() == ours.keys() and theirs
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_data_parallel_encoder_runs_our_tower(pair):
    """SGLang's data-parallel encoder function (one rank here) gives the direct call's embeddings."""
    from sglang.srt.multimodal.mm_utils import run_dp_sharded_mrope_vision_model

    _, _, _, fast = pair
    pixels = _pixels(sum(t * h * w for t, h, w in GRIDS), seed=1)
    with torch.no_grad():
        sharded = run_dp_sharded_mrope_vision_model(fast.visual, pixels, GRIDS, rope_type="rope_3d")
        direct = fast.visual(pixels, torch.tensor(GRIDS))
    assert torch.equal(sharded, direct)


def _without(weights: dict, name: str) -> dict:
    return {k: v for k, v in weights.items() if k != name}


@pytest.mark.parametrize("kind", KINDS)
def test_missing_or_misshaped_tower_tensor_is_refused(sglang_process, kind, monkeypatch):
    path = sglang_process[kind]
    weights = _state_dict(path)
    name = "model.visual.blocks.1.attn.qkv.weight"
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) of the vision tower: model.visual.blocks.1.attn.qkv"):
        _build(kind, True, path, monkeypatch, _without(weights, name))
    with pytest.raises(ValueError, match=r"model.visual.blocks.1.attn.qkv.weight has shape \(191, 64\)"):
        _build(kind, True, path, monkeypatch, {**weights, name: weights[name][:-1]})
    with pytest.raises(ValueError, match="no parameter 'blocks.1.attn.extra.weight'"):
        _build(kind, True, path, monkeypatch, {**weights, "model.visual.blocks.1.attn.extra.weight": torch.zeros(1)})


def test_choice_is_logged_once_with_kernels_and_attention(sglang_process, monkeypatch, caplog):
    from glm4v_fast.integrations.sglang import selection

    monkeypatch.setattr(selection.log_choice_once, "seen", set())
    with caplog.at_level(logging.INFO, logger="sglang.glm4v_fast"):
        _build("glm4v", True, sglang_process["glm4v"], monkeypatch)
        _build("glm4v", True, sglang_process["glm4v"], monkeypatch)
    lines = [r.getMessage() for r in caplog.records if r.name == "sglang.glm4v_fast"]
    assert lines == ["glm4v-fast: Glm4vForConditionalGeneration uses glm4v-fast's vision tower (kernels=torch, "
                     "attention=sdpa; forced on by GLM4V_FAST_SGLANG=1)"]


def test_switched_off_keeps_sglangs_tower(sglang_process, monkeypatch):
    from sglang.srt.models.glm4v import Glm4vVisionModel

    from glm4v_fast.integrations.sglang import models

    monkeypatch.setenv("GLM4V_FAST_SGLANG", "0")
    with torch.device("cpu"):
        model = models.Glm4vForConditionalGeneration(_config(sglang_process["glm4v"]))
    assert type(model.visual) is Glm4vVisionModel
    model.load_weights(iter(_state_dict(sglang_process["glm4v"]).items()))     # SGLang's own loading


def test_sglangs_glm4v_feeds_precomputed_embeddings_to_its_tower(pair):
    """Why processing.py moves a precomputed_embedding item's feature: SGLang's GLM-4V model passes an item's
    `feature` to the vision tower as pixels, whatever the item's format."""
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalInputFormat

    _, _, stock, _ = pair
    item = MultimodalDataItem(modality=Modality.IMAGE, feature=torch.randn(6, 128),
                              format=MultimodalInputFormat.PRECOMPUTED_EMBEDDING,
                              model_specific_data={"image_grid_thw": torch.tensor([[1, 4, 6]])})
    with pytest.raises(RuntimeError):
        stock.get_image_feature([item])
