"""patch_glm4v: a transformers GLM-4V model gives the same features and the same generated tokens after its vision
tower is replaced by glm4v_fast's.

Tiny GLM-4.1V (dense text), GLM-4.5V (MoE text) and GLM-4.6V models are built by transformers from configs with
random weights (scaled up so that the image visibly changes the logits), in float32 on the CPU.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from glm4v_fast.integrations.transformers import FastGlm4vVisionModel, patch_glm4v  # noqa: E402
from glm4v_fast.model import VisionModel  # noqa: E402
from _tiny import rel_err  # noqa: E402

# Special token ids of the tiny vocabulary (as in transformers' own GLM-4V tests).
VIDEO_START, VIDEO_END, IMAGE_START, IMAGE_END, IMAGE_TOKEN, VIDEO_TOKEN = 3, 4, 5, 6, 7, 8
TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, image_start_token_id=IMAGE_START,
              image_end_token_id=IMAGE_END, video_start_token_id=VIDEO_START, video_end_token_id=VIDEO_END)
VISION = dict(depth=2, hidden_size=64, num_heads=4, out_hidden_size=32, intermediate_size=48, patch_size=14,
              image_size=112, spatial_merge_size=2, temporal_patch_size=2)
# head_dim 16 -> mrope sections over its 8 rotary frequencies.
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
# GLM-4.5V's text model rotates half of each head (partial_rotary_factor 0.5): 4 frequencies for head_dim 16.
MOE_TEXT = dict(TEXT, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                first_k_dense_replace=1,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})

IMAGE_GRID = [[1, 8, 12], [1, 4, 6]]      # two images of different sizes in one prompt
VIDEO_GRID = [[2, 4, 6]]                  # one video of two temporal slices


def _build(kind: str):
    if kind == "glm4v":
        config = transformers.Glm4vConfig(text_config=TEXT, vision_config=VISION, **TOKENS)
        cls = transformers.Glm4vForConditionalGeneration
    elif kind == "glm4v_moe":
        config = transformers.Glm4vMoeConfig(text_config=MOE_TEXT, vision_config=VISION, **TOKENS)
        cls = transformers.Glm4vMoeForConditionalGeneration
    else:
        if not hasattr(transformers, "Glm46VForConditionalGeneration"):
            pytest.skip("this transformers has no GLM-4.6V model")
        config = transformers.Glm46VConfig(text_config=dict(TEXT, model_type="glm4v_text"),
                                           vision_config=dict(VISION, model_type="glm4v_vision"), **TOKENS)
        cls = transformers.Glm46VForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        # transformers' 0.02 init leaves the logits nearly flat and the vision output tiny; wider weights make
        # greedy decoding decisive and every vision term visible in the comparison.
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2 if ".visual." in f".{name}" else 0.1)
    return model


def _image_prompt(grid):
    ids, types = [TEXT["bos_token_id"], 10, 11], [0, 0, 0]
    for t, h, w in grid:
        n = t * h * w // 4
        ids += [IMAGE_START] + [IMAGE_TOKEN] * n + [IMAGE_END, 12]
        types += [0] + [1] * n + [0, 0]
    ids += [13, 14]
    types += [0, 0]
    return torch.tensor([ids]), torch.tensor([types], dtype=torch.int32)


def _video_prompt(grid):
    # GLM-4.1V lays a video out as one image-token block per temporal slice, each followed by its timestamp
    # text; the blocks use image_token_id and are typed 2 (video) for the M-RoPE index.
    ids, types = [TEXT["bos_token_id"], 10, VIDEO_START], [0, 0, 0]
    for t, h, w in grid:
        for frame in range(t):
            n = h * w // 4
            ids += [IMAGE_START] + [IMAGE_TOKEN] * n + [IMAGE_END, 20 + frame]
            types += [0] + [2] * n + [0, 0]
    ids += [VIDEO_END, 13]
    types += [0, 0]
    return torch.tensor([ids]), torch.tensor([types], dtype=torch.int32)


def _pixels(grid, seed):
    gen = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grid, dtype=torch.int64)
    return torch.randn(int(grid.prod(-1).sum()), 1176, generator=gen), grid


def _run_everything(model):
    """Image and video features, and greedy generations from an image prompt and a video prompt."""
    pv, igrid = _pixels(IMAGE_GRID, seed=1)
    pvv, vgrid = _pixels(VIDEO_GRID, seed=2)
    ids, types = _image_prompt(IMAGE_GRID)
    vids, vtypes = _video_prompt(VIDEO_GRID)
    gen = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        image = model.model.get_image_features(pv, igrid)
        video = model.model.get_video_features(pvv, vgrid)
        logits = model(input_ids=ids, mm_token_type_ids=types, pixel_values=pv, image_grid_thw=igrid).logits
        tokens = model.generate(input_ids=ids, mm_token_type_ids=types, pixel_values=pv, image_grid_thw=igrid,
                                attention_mask=torch.ones_like(ids), **gen)
        vtokens = model.generate(input_ids=vids, mm_token_type_ids=vtypes, pixel_values_videos=pvv,
                                 video_grid_thw=vgrid, attention_mask=torch.ones_like(vids), **gen)
    return dict(image=image, video=video, logits=logits, tokens=tokens, vtokens=vtokens)


@pytest.mark.parametrize("kind", ["glm4v", "glm4v_moe", "glm46v"])
def test_patched_model_gives_same_features_and_tokens(kind):
    model = _build(kind)
    before = _run_everything(model)
    hf_keys = set(model.state_dict())

    assert patch_glm4v(model, kernels="torch") is model
    visual = model.model.visual
    assert isinstance(visual, FastGlm4vVisionModel) and isinstance(visual, VisionModel)
    assert visual.dtype == torch.float32 and visual.device.type == "cpu" and not visual.training
    assert visual.spatial_merge_size == 2
    # The parent's checkpoint keys are unchanged, so save_pretrained still writes a transformers checkpoint.
    assert set(model.state_dict()) == hf_keys
    after = _run_everything(model)

    for key in ("image", "video"):
        b, a = before[key], after[key]
        assert [x.shape for x in a.pooler_output] == [x.shape for x in b.pooler_output]
        for x, y in zip(a.pooler_output, b.pooler_output):
            assert rel_err(x, y) <= 1e-5, key
        assert rel_err(a.last_hidden_state, b.last_hidden_state) <= 1e-5, key
    assert rel_err(after["logits"], before["logits"]) <= 1e-4
    assert torch.equal(after["tokens"], before["tokens"])
    assert torch.equal(after["vtokens"], before["vtokens"])
    assert after["tokens"].shape[1] == _image_prompt(IMAGE_GRID)[0].shape[1] + 6


def test_image_changes_the_logits():
    """Guards the test above: the comparison is meaningless if the image did not reach the text model."""
    model = patch_glm4v(_build("glm4v"), kernels="torch")
    ids, types = _image_prompt(IMAGE_GRID)
    with torch.no_grad():
        logits = [model(input_ids=ids, mm_token_type_ids=types, pixel_values=_pixels(IMAGE_GRID, seed)[0],
                        image_grid_thw=torch.tensor(IMAGE_GRID)).logits[0, -1] for seed in (1, 2)]
    assert rel_err(logits[0], logits[1]) > 1e-3


def test_inner_model_tuple_output_and_repatching():
    model = _build("glm4v")
    inner = model.model
    pv, grid = _pixels(IMAGE_GRID, seed=3)
    with torch.no_grad():
        expected = inner.visual(pv, grid_thw=grid)
    assert patch_glm4v(inner, kernels="torch", attn_backend="sdpa") is inner
    with torch.no_grad():
        out = inner.visual(pv, grid_thw=grid, return_dict=True, position_ids=None, output_attentions=False)
        features, merged = inner.visual(pv, grid, return_dict=False)
    assert rel_err(out.pooler_output, expected.pooler_output) <= 1e-5
    assert torch.equal(merged, out.pooler_output) and torch.equal(features, out.last_hidden_state)
    # Patching again rebuilds the tower (new options) from the fast tower's own weights.
    patch_glm4v(model, kernels="torch", attn_backend="auto")
    assert inner.visual.attn_backend == "auto"
    with torch.no_grad():
        again = inner.visual(pv, grid_thw=grid).pooler_output
    assert rel_err(again, expected.pooler_output) <= 1e-5


def test_follows_dtype():
    model = _build("glm4v").to(torch.bfloat16)
    patch_glm4v(model, kernels="torch")
    assert model.model.visual.dtype == torch.bfloat16
    pv, grid = _pixels([[1, 4, 4]], seed=4)
    with torch.no_grad():
        out = model.model.get_image_features(pv, grid).pooler_output[0]
    assert out.dtype == torch.bfloat16 and out.shape == (4, 32)


@pytest.mark.parametrize("bad", [torch.nn.Linear(2, 2), "not a model", None])
def test_unsupported_models_are_rejected(bad):
    with pytest.raises(ValueError, match="patch_glm4v supports"):
        patch_glm4v(bad)


def test_meta_weights_are_rejected():
    config = transformers.Glm4vConfig(text_config=TEXT, vision_config=VISION, **TOKENS)
    with torch.device("meta"):
        model = transformers.Glm4vForConditionalGeneration(config)
    with pytest.raises(ValueError, match="meta"):
        patch_glm4v(model)
