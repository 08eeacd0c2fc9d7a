"""Gradients through the fast tower: every parameter's gradient equals the reference model's (and, through the
transformers drop-in, the stock tower's), with the PyTorch ops and with the Triton kernels (interpreter on CPU).

The fast model stores some weights in another layout than transformers (the patch Conv3d as a Linear, the
downsample Conv2d permuted, gate and up stacked); its state dict maps them to transformers' names and shapes
with views and permutes, a linear map, so the same map turns its gradients into gradients under
transformers' names. Weights are drawn wider than the 0.02 init (std 0.2) so that every term matters.
"""
import copy

import pytest
import torch

import glm4v_fast as gf
from glm4v_fast.kernels import can_run_on
from glm4v_fast.reference import ReferenceVisionModel
from _tiny import CONFIGS, random_inputs, rel_err

KERNELS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not can_run_on("cpu"), reason="no interpreter"))]
# Two images and a video of two temporal slices, packed into one call.
GRIDS = [[1, 4, 6], [2, 2, 4], [1, 2, 2]]
# fp32 on CPU: the fast and reference towers order their arithmetic differently (fused add+norm, packed
# attention, Linear vs Conv), so gradients agree to float32 rounding accumulated over the layers. Measured
# max|fast - ref| / max|ref| per parameter: up to 3.1e-5 with kernels="torch" (pure PyTorch, only the order
# differs) and 2.7e-5 with the Triton kernels; each kernel alone is held to 1e-5 in test_kernels_backward.py.
# A missing or wrong gradient is off by O(1).
GRAD_RTOL = 1e-4


def _fast_model(config, seed=0, **kwargs):
    model = gf.VisionModel(config, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # Matrices N(0, 0.2); norm weights and biases around 1 and 0 with visible spread.
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() > 1 else 0.5) + (p.dim() == 1))
    return model


def hf_named_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of `module`'s parameters under its state-dict (transformers) names."""
    shadow = copy.deepcopy(module)
    with torch.no_grad():
        for (name, p), q in zip(module.named_parameters(), shadow.parameters()):
            assert p.grad is not None, f"{name} received no gradient"
            q.copy_(p.grad)
    buffers = {name for name, _ in shadow.named_buffers()}
    return {k: v for k, v in shadow.state_dict().items() if k not in buffers}


def _assert_same_grads(got: dict, expected: dict):
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, g in expected.items():
        assert g.abs().max() > 0, f"{name}: the reference gradient is zero, the comparison would be empty"
        assert got[name].shape == g.shape, name
        assert rel_err(got[name], g) <= GRAD_RTOL, (name, rel_err(got[name], g))


def _loss(features, merged, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return ((features * torch.randn(features.shape, generator=gen)).sum()
            + (merged * torch.randn(merged.shape, generator=gen)).sum())


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_parameter_gradient_equals_the_reference(kernels, config):
    fast = _fast_model(gf.VisionConfig(**CONFIGS[config]), kernels=kernels, attn_backend="auto")
    ref = ReferenceVisionModel(fast.config)
    ref.load_state_dict(fast.state_dict(), strict=True)
    pv, grid = random_inputs(GRIDS)
    pv_fast, pv_ref = pv.clone().requires_grad_(), pv.clone().requires_grad_()

    out = fast.forward_features(pv_fast, grid)
    _loss(out.last_hidden_state, out.pooler_output).backward()
    features, merged = ref.forward_features(pv_ref, grid)
    _loss(features, merged).backward()

    assert fast.resolved() == (kernels, "sdpa")
    _assert_same_grads(hf_named_grads(fast), {n: p.grad for n, p in ref.named_parameters()})
    assert rel_err(pv_fast.grad, pv_ref.grad) <= GRAD_RTOL


def test_frozen_tower_gives_input_gradient_only():
    # Parameters frozen, pixels require grad: the kernels still record their backward for the input.
    fast = _fast_model(gf.VisionConfig(**CONFIGS["tiny"]), kernels="torch")
    fast.requires_grad_(False)
    pv, grid = random_inputs(GRIDS)
    pv.requires_grad_()
    fast(pv, grid).sum().backward()
    assert pv.grad is not None and pv.grad.abs().max() > 0
    assert all(p.grad is None for p in fast.parameters())


def test_forward_only_attention_refuses_grad():
    fast = _fast_model(gf.VisionConfig(**CONFIGS["tiny"]), kernels="torch", attn_backend="triton")
    if not can_run_on("cpu"):
        pytest.skip("no Triton interpreter")
    pv, grid = random_inputs([[1, 2, 2]])
    with pytest.raises(ValueError, match="forward-only"):
        fast(pv, grid)
    with torch.no_grad():
        assert fast(pv, grid).shape == (1, CONFIGS["tiny"]["out_hidden_size"])
    fast.requires_grad_(False)
    assert fast(pv, grid).grad_fn is None          # nothing requires grad: the forward-only kernel is fine


# Through transformers' drop-in: the stock GLM-4V model's gradients, with our tower in place of its own.

TOKENS = dict(image_token_id=7, video_token_id=8, image_start_token_id=5, image_end_token_id=6,
              video_start_token_id=3, video_end_token_id=4)
VISION = dict(depth=2, hidden_size=64, num_heads=4, out_hidden_size=32, intermediate_size=48, patch_size=14,
              image_size=112, spatial_merge_size=2, temporal_patch_size=2)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
IMAGE_GRID = [[1, 4, 6], [1, 2, 2]]
VIDEO_GRID = [[2, 2, 4]]


def _glm4v():
    transformers = pytest.importorskip("transformers")
    config = transformers.Glm4vConfig(text_config=TEXT, vision_config=VISION, **TOKENS)
    torch.manual_seed(0)
    model = transformers.Glm4vForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2 if ".visual." in f".{name}" else 0.1)
    return model.train()


def _prompt(grid):
    ids, types = [2, 10], [0, 0]
    for t, h, w in grid:
        n = t * h * w // 4
        ids += [TOKENS["image_start_token_id"]] + [TOKENS["image_token_id"]] * n + [TOKENS["image_end_token_id"]]
        types += [0] + [1] * n + [0]
    ids += [13]
    types += [0]
    return torch.tensor([ids]), torch.tensor([types], dtype=torch.int32)


def _drop_in_loss(model):
    """Logits of an image prompt (the vision features reach the loss through the text model) + video features."""
    pv, igrid = random_inputs(IMAGE_GRID, seed=1)
    pvv, vgrid = random_inputs(VIDEO_GRID, seed=2)
    ids, types = _prompt(IMAGE_GRID)
    logits = model(input_ids=ids, mm_token_type_ids=types, pixel_values=pv, image_grid_thw=igrid).logits
    video = torch.cat(model.model.get_video_features(pvv, vgrid).pooler_output)
    gen = torch.Generator().manual_seed(7)
    return (logits * torch.randn(logits.shape, generator=gen)).sum() + (video * torch.randn(video.shape, generator=gen)).sum()


@pytest.mark.parametrize("kernels", KERNELS)
def test_drop_in_vision_gradients_equal_the_stock_tower(kernels):
    from glm4v_fast.integrations.transformers import patch_glm4v

    stock = _glm4v()
    patched = patch_glm4v(copy.deepcopy(stock), kernels=kernels)
    _drop_in_loss(stock).backward()
    _drop_in_loss(patched).backward()
    expected = {n: p.grad for n, p in stock.model.visual.named_parameters()}
    _assert_same_grads(hf_named_grads(patched.model.visual), expected)
    # The text model's gradients see the same vision features.
    text = dict(patched.model.language_model.named_parameters())
    for name, p in stock.model.language_model.named_parameters():
        assert rel_err(text[name].grad, p.grad) <= 1e-4, name
