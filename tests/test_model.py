"""The reference and the fast model against transformers' Glm4vVisionModel, and against each other."""
import os

import pytest
import torch

import glm4v_fast as gf
from glm4v_fast.reference import ReferenceVisionModel
from _tiny import CONFIGS, IMAGE_GRIDS, VIDEO_GRIDS, hf_vision_model, random_inputs, rel_err, split_video_grid

transformers = pytest.importorskip("transformers")


def _load(cls, hf, **kwargs):
    model = cls(gf.VisionConfig.from_dict(hf.config.to_dict()), **kwargs).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf(request):
    return hf_vision_model(CONFIGS[request.param])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_reference_equals_transformers_on_packed_images(hf, attn):
    hf.config._attn_implementation = attn
    ref = _load(ReferenceVisionModel, hf)
    pv, grid = random_inputs(IMAGE_GRIDS)
    with torch.no_grad():
        expected = hf(pv, grid)
        features, merged = ref.forward_features(pv, grid)
    hf.config._attn_implementation = "sdpa"
    assert rel_err(features, expected.last_hidden_state) <= 1e-5
    assert rel_err(merged, expected.pooler_output) <= 1e-5


@pytest.mark.parametrize("cls", [ReferenceVisionModel, gf.VisionModel])
def test_video_equals_transformers_get_video_features(hf, cls):
    model = _load(cls, hf) if cls is ReferenceVisionModel else _load(cls, hf, kernels="torch", attn_backend="sdpa")
    pv, grid = random_inputs(VIDEO_GRIDS)
    with torch.no_grad():
        expected = hf(pv, split_video_grid(grid)).pooler_output
        per_video = model.get_video_features(pv, grid)
    assert [t.shape[0] for t in per_video] == (grid.prod(-1) // 4).tolist()
    assert rel_err(torch.cat(per_video), expected) <= 1e-5


def test_fast_model_equals_transformers(hf):
    fast = _load(gf.VisionModel, hf, kernels="torch", attn_backend="sdpa")
    pv, grid = random_inputs(IMAGE_GRIDS)
    with torch.no_grad():
        expected = hf(pv, grid)
        out = fast.forward_features(pv, grid)
        per_image = fast.get_image_features(pv, grid)
    assert rel_err(out.last_hidden_state, expected.last_hidden_state) <= 1e-5
    assert rel_err(out.pooler_output, expected.pooler_output) <= 1e-5
    assert len(per_image) == len(IMAGE_GRIDS)
    assert rel_err(torch.cat(per_image), expected.pooler_output) <= 1e-5


def test_mixed_images_and_videos_in_one_call(hf):
    """Images and videos (t > 1) packed into one forward equal encoding each item alone."""
    fast = _load(gf.VisionModel, hf, kernels="torch", attn_backend="sdpa")
    grids = [[1, 4, 6], [3, 4, 4], [1, 2, 2], [2, 2, 6]]
    pv, grid = random_inputs(grids)
    with torch.no_grad():
        together = fast(pv, grid)
        alone, start = [], 0
        for row in grid:
            n = int(row.prod())
            alone.append(fast(pv[start:start + n], row[None]))
            start += n
    assert rel_err(together, torch.cat(alone)) <= 1e-6


def test_state_dict_has_transformers_keys_and_shapes(hf):
    fast = _load(gf.VisionModel, hf)
    ours, theirs = fast.state_dict(), hf.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key
    assert gf.VisionModel.expected_shapes(fast.config) == {k: tuple(v.shape) for k, v in theirs.items()}


def test_default_state_dict_matches_spec_count():
    """GLM-4.1V: 181 tensors and 892,498,432 parameters (spec §1.2, §3), computed without allocating."""
    shapes = gf.VisionModel.expected_shapes(gf.VisionConfig())
    assert len(shapes) == 181
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 892_498_432
    shapes_45v = gf.VisionModel.expected_shapes(gf.VisionConfig(intermediate_size=10944))
    assert sum(torch.Size(s).numel() for s in shapes_45v.values()) == 858_681_856


def test_bfloat16_close_to_float32():
    hf = hf_vision_model(CONFIGS["tiny"], std=0.1)
    fast32 = _load(gf.VisionModel, hf, kernels="torch", attn_backend="sdpa")
    fast16 = _load(gf.VisionModel, hf, kernels="torch", attn_backend="sdpa").to(torch.bfloat16)
    ref16 = _load(ReferenceVisionModel, hf).to(torch.bfloat16)
    pv, grid = random_inputs(IMAGE_GRIDS)
    with torch.no_grad():
        exact = fast32(pv, grid)
        ours = fast16(pv, grid).float()
        theirs = ref16(pv.bfloat16(), grid).float()
    # bf16 rule: at most twice the error of the same-precision reference, plus a small atol.
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-2


def _kernels_ready():
    from glm4v_fast import kernels

    return kernels.triton_available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _kernels_ready(), reason="needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
def test_triton_kernels_and_attention_equal_reference():
    """The fast path as it runs on a GPU (Triton kernels + Triton varlen attention), here under the interpreter."""
    hf = hf_vision_model(dict(CONFIGS["tiny"], num_heads=2))       # head_dim 32
    ref = _load(ReferenceVisionModel, hf)
    fast = _load(gf.VisionModel, hf, kernels="triton", attn_backend="triton")
    grids = [[1, 4, 6], [2, 2, 2], [1, 6, 4]]                         # images and a video
    pv, grid = random_inputs(grids)
    with torch.no_grad():
        expected = ref(pv, grid)
        got = fast(pv, grid)
    assert rel_err(got, expected) <= 1e-4


def test_backends_available_on_this_machine_agree():
    from glm4v_fast.attention import available_backends

    hf = hf_vision_model(dict(CONFIGS["tiny"], num_heads=2))
    pv, grid = random_inputs([[1, 4, 6], [1, 2, 2]])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    outputs = {}
    for backend in available_backends(device):
        model = _load(gf.VisionModel, hf, kernels="torch", attn_backend=backend).to(device)
        with torch.no_grad():
            outputs[backend] = model(pv.to(device), grid).cpu()
    base = outputs.pop("sdpa")
    for name, out in outputs.items():
        assert rel_err(out, base) <= 1e-4, name


def test_auto_selection_on_cpu():
    model = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]))
    assert model.resolved() == ("torch", "sdpa")


@pytest.mark.parametrize("kwargs, match", [
    ({"attn_backend": "nope"}, "attn_backend"),
    ({"kernels": "cuda"}, "kernels"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), **kwargs)


def test_unavailable_backend_is_a_clear_error():
    model = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), attn_backend="torch_varlen")
    pv, grid = random_inputs([[1, 2, 2]])
    if torch.cuda.is_available():
        pytest.skip("torch_varlen runs on this machine")
    with pytest.raises(ValueError, match="torch_varlen"):
        model(pv, grid)


@pytest.mark.parametrize("cls", [ReferenceVisionModel, gf.VisionModel])
@pytest.mark.parametrize("pv_shape, grid, match", [
    ((16, 1000), [[1, 4, 4]], "width"),
    ((15, 1176), [[1, 4, 4]], "rows"),
    ((16, 1176), [[1, 4, 3]], "multiples"),
    ((16, 1176), [[1, -4, -4]], "positive"),
    ((16, 1176), [[0, 4, 4]], "positive"),
    ((16, 1176), [[1, 4]], "shape"),
    ((16, 1176), [[1.0, 4.0, 4.0]], "integer"),
    ((16,), [[1, 4, 4]], "2-D"),
])
def test_bad_inputs(cls, pv_shape, grid, match):
    model = cls(gf.VisionConfig(**CONFIGS["tiny"]))
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(pv_shape), torch.tensor(grid))


def test_layout_cache_is_reused_bounded_and_exact():
    model = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), kernels="torch").eval()
    pv, grid = random_inputs([[1, 4, 6], [1, 2, 2]])
    with torch.no_grad():
        first = model(pv, grid)
        batch = model.pack(grid, pv)
        assert model.pack(grid.clone(), pv) is batch            # same shapes: the cached layout
        assert torch.equal(model(pv, grid), first)
        for h in range(2, 2 + 2 * (model.LAYOUT_CACHE_SIZE + 2), 2):
            other_pv, other_grid = random_inputs([[1, h, 2]])
            model(other_pv, other_grid)
    assert len(model._layouts) == model.LAYOUT_CACHE_SIZE
    assert model.pack(grid, pv) is not batch                     # evicted, rebuilt
