"""VisionModel: outputs equal to transformers' Glm4vVisionModel and to the reference model (images, videos,
mixed, dtypes, kernels, backends), its arguments and input checks, and its cache of packed layouts (reuse,
bounds, every grad mode, no host work on a layout seen before).

Static shapes and CUDA graphs are in test_model_static.py, gradients in test_model_grad.py, the choice of
attention backend in test_attention_backends.py."""

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


# ---------------------------------------------------------------------------------------------------------------
# Outputs: equal to transformers and to the reference model
# ---------------------------------------------------------------------------------------------------------------
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
    """GLM-4.1V: 181 tensors and 892,498,432 parameters (docs/reference.md §1.2, §3), computed without allocating."""
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


@pytest.mark.interpreter        # CPU tensors through the Triton kernels (tests/conftest.py)
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


# ---------------------------------------------------------------------------------------------------------------
# Arguments and inputs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"attn_backend": "nope"}, "attn_backend"),
    ({"kernels": "cuda"}, "kernels"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), **kwargs)


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


# ---------------------------------------------------------------------------------------------------------------
# Cached layouts: every grad mode, bounded in bytes, no host work on a layout seen before
# ---------------------------------------------------------------------------------------------------------------


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


def _cached_tensors(model):
    found = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for b in model._layouts.layouts():
        walk(b.tensors())
    return found


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_layout_cached_in_inference_mode_serves_no_grad_and_backward(attn):
    """A layout first built under inference_mode holds no inference tensors: later calls in no_grad and in
    training (recording autograd history, then a backward) reuse it, with the reference model's gradients."""
    hf = hf_vision_model(dict(CONFIGS["tiny"], num_heads=2))
    ref = _load(ReferenceVisionModel, hf)
    fast = _load(gf.VisionModel, hf, kernels="torch", attn_backend=attn)
    pv, grid = random_inputs([[1, 4, 6], [2, 2, 2]])
    with torch.inference_mode():
        first = fast(pv, grid)
        per_image = fast.get_image_features(pv, grid)
    assert not any(t.is_inference() for t in _cached_tensors(fast))
    with torch.no_grad():
        second = fast.forward_features(pv, grid).pooler_output
    assert torch.equal(first, second)
    assert rel_err(torch.cat(per_image), first) == 0
    fast.train()
    if attn == "triton":
        # The Triton attention is forward-only: under grad it refuses, rather than dropping the gradient.
        with pytest.raises(ValueError, match="forward-only"):
            fast(pv, grid)
        return
    third = fast(pv, grid)
    third.square().sum().backward()
    ref(pv, grid).square().sum().backward()
    assert rel_err(third, first) <= 1e-6
    grads = dict(fast.named_parameters())
    # The position table is recomputed from the cached device matrices when autograd needs it: gradients
    # reach the position-embedding weight and equal the reference model's.
    compared = 0
    for name, p in ref.named_parameters():
        if name in grads and grads[name].shape == p.shape:     # same storage layout (not the fused ones)
            assert rel_err(grads[name].grad, p.grad) <= 1e-4, name
            compared += 1
    assert compared >= 10
    assert grads["embeddings.position_embedding.weight"].grad.abs().max() > 0


def test_transformers_drop_in_after_inference_mode_trains():
    """The drop-in: features in inference mode, then no_grad, then model.train() and a backward pass."""
    from glm4v_fast.integrations.transformers import patch_glm4v
    from test_integration_transformers import IMAGE_GRID, _build, _image_prompt, _pixels

    model = patch_glm4v(_build("glm4v"), kernels="torch")
    pv, grid = _pixels(IMAGE_GRID, seed=1)
    ids, types = _image_prompt(IMAGE_GRID)
    with torch.inference_mode():
        first = model.model.get_image_features(pv, grid).pooler_output
    with torch.no_grad():
        second = model.model.get_image_features(pv, grid).pooler_output
    model.train()
    logits = model(input_ids=ids, mm_token_type_ids=types, pixel_values=pv, image_grid_thw=grid).logits
    logits.float().square().mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    visual = model.model.visual
    assert visual.embeddings.position_embedding.weight.grad.abs().max() > 0
    assert visual.blocks[0].attn.qkv.weight.grad.abs().max() > 0


def test_readme_flow_pipeline_then_plain_calls(recwarn):
    """The README's Python block: the pipeline and encode_image (inference mode), then plain model calls."""
    import numpy as np

    config, model, processor = gf.create_glm4v_vision_encoder(config=gf.VisionConfig(**CONFIGS["tiny"]),
                                                              device="cpu", dtype=torch.float32, kernels="torch")
    image = np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8)
    pipe = gf.GLM4VEmbeddingPipeline(model=model, processor=processor)
    embs = pipe.extract_image_embeddings([image])
    emb = gf.encode_image(image, model=model, processor=processor)
    out = processor(images=[image])
    plain = model(out["pixel_values"], out["image_grid_thw"])            # grad mode: records history
    per_image = model.get_image_features(out["pixel_values"], out["image_grid_thw"])
    both = model.forward_features(out["pixel_values"], out["image_grid_thw"])
    plain.sum().backward()
    assert torch.equal(embs[0], emb) and rel_err(plain.detach(), emb) <= 1e-6
    assert torch.equal(per_image[0], plain) and torch.equal(both.pooler_output, plain)
    assert model.patch_embed.proj.weight.grad is not None


def test_layout_cache_is_bounded_in_bytes():
    model = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), kernels="torch").eval()
    grids = [[[1, 2, 8]], [[1, 4, 4]], [[1, 8, 2]], [[4, 2, 2]], [[2, 2, 4]]]      # 16 patches each
    with torch.no_grad():
        model(*random_inputs(grids[0]))
    (one,) = model._layouts.layouts()
    assert one.position_table is not None and one.nbytes() > one.cos.nbytes * 2   # the position table is counted
    model.LAYOUT_CACHE_BYTES = int(2.5 * one.nbytes())
    with torch.no_grad():
        for g in grids[1:]:
            model(*random_inputs(g))
            assert sum(b.nbytes() for b in model._layouts.layouts()) <= model.LAYOUT_CACHE_BYTES
            assert model._layouts.keys()[-1][0] == tuple(g[0])          # the most recent is kept
    assert 2 <= len(model._layouts) <= 3 < model.LAYOUT_CACHE_SIZE
    model.LAYOUT_CACHE_BYTES = one.nbytes() // 2                           # a layout alone over the budget
    with torch.no_grad():
        out = model(*random_inputs([[1, 6, 6]]))
    assert len(model._layouts) == 0 and out.shape == (9, 48)


def test_cached_position_table_follows_the_weight():
    hf = hf_vision_model(CONFIGS["tiny"])
    model = _load(gf.VisionModel, hf, kernels="torch", attn_backend="sdpa")
    pv, grid = random_inputs([[1, 4, 6]])
    with torch.no_grad():
        before = model(pv, grid)
        model.embeddings.position_embedding.weight.mul_(1.5)               # in place: same storage, new version
        changed = model(pv, grid)
        fresh = _load(gf.VisionModel, hf, kernels="torch", attn_backend="sdpa")
        fresh.embeddings.position_embedding.weight.mul_(1.5)
        assert rel_err(changed, before) > 1e-3 and torch.equal(changed, fresh(pv, grid))
        model.double()                                                      # new storage and dtype
        assert rel_err(model(pv.double(), grid), changed) <= 1e-5


class _NoHostWork:
    """Fails on host data becoming a tensor and on anything crossing between host and device.

    The meta device stands in for a GPU here: a host-to-device copy is an op with CPU inputs and a meta
    output (seen by the dispatch mode), and reading a device value on the host (.item, .tolist, bool) is
    an error on meta tensors anyway.
    """

    def __enter__(self):
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in (torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy):
                    raise AssertionError(f"host data made into a tensor during a cached forward: {func.__name__}")
                return func(*args, **(kwargs or {}))

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                inputs = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                out = func(*args, **kwargs)
                outputs = {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
                if len(inputs | outputs) > 1:
                    raise AssertionError(f"{func} moves data between {inputs} and {outputs} in a cached forward")
                return out

        self.modes = [Functions(), Dispatch()]
        for m in self.modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)


@pytest.mark.parametrize("buckets", [None, (64, 256)])
def test_no_host_work_in_a_forward_on_a_cached_layout(buckets):
    with torch.device("meta"):
        model = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), kernels="torch", attn_backend="sdpa",
                               token_buckets=buckets).eval()
    pv, grid = random_inputs([[1, 4, 6], [2, 2, 6], [1, 2, 2]])
    pv = pv.to("meta")
    with torch.no_grad():
        model(pv, grid)                                 # builds and caches the layout
        with _NoHostWork():
            out = model(pv, grid)
            model.get_image_features(pv, grid)
            model.forward_features(pv, grid)
    assert out.shape == (52 // 4, 48) and out.device.type == "meta"


def test_no_host_work_check_catches_host_copies():
    """Guards the test above: the old per-forward bicubic matrices (torch.tensor(..., device=)) are caught."""
    from glm4v_fast.packing import interpolated_position_table

    weight = torch.empty(16, 64, device="meta")
    with pytest.raises(AssertionError, match="cached forward"), _NoHostWork():
        interpolated_position_table(weight, 4, 6, 4)
    with pytest.raises(AssertionError, match="cached forward"), _NoHostWork():
        torch.arange(3).to("meta")
