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


def test_patch_takes_token_buckets():
    """Every VisionModel option reaches the patched tower; bucketed features equal the stock tower's."""
    model = _build("glm4v")
    pv, grid = _pixels(IMAGE_GRID, seed=4)
    with torch.no_grad():
        expected = model.model.get_image_features(pv, grid).pooler_output
    patch_glm4v(model, kernels="torch", token_buckets=(64, 128))          # 120 patches: padded to 128
    assert model.model.visual.token_buckets == (64, 128)
    with torch.no_grad():
        got = model.model.get_image_features(pv, grid).pooler_output
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, expected))


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


# ---------------------------------------------------------------------------------------------------------------
# Training: names, gradients, checkpointing, recorded outputs, PEFT
# ---------------------------------------------------------------------------------------------------------------
import copy  # noqa: E402
import warnings  # noqa: E402

from glm4v_fast.integrations.transformers import patch_glm4v_classes  # noqa: E402


def _pair(kind="glm4v"):
    """(stock, patched): the same tiny model twice, the second with the fast tower (kernels="torch")."""
    stock = _build(kind)
    return stock, patch_glm4v(copy.deepcopy(stock), kernels="torch")


def _features_loss(model, seed=5):
    """A scalar of every image and video output (weighted so no gradient is trivially uniform)."""
    pv, igrid = _pixels(IMAGE_GRID, seed=1)
    pvv, vgrid = _pixels(VIDEO_GRID, seed=2)
    image = model.model.get_image_features(pv, igrid)
    video = model.model.get_video_features(pvv, vgrid)
    outs = [torch.cat(image.pooler_output), image.last_hidden_state, torch.cat(video.pooler_output)]
    gen = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)


def _vision_grads(model):
    return {n: p.grad for n, p in model.model.visual.named_parameters()}


def _assert_same_grads(ours, theirs, tol):
    assert ours.keys() == theirs.keys()
    for name, g in theirs.items():
        assert g is not None and ours[name] is not None, name
        assert rel_err(ours[name], g) <= tol, name


def test_module_and_parameter_names_types_and_storage_match_transformers():
    stock, fast = _pair()
    theirs, ours = stock.model.visual, fast.model.visual
    assert [(n, p.shape) for n, p in sorted(ours.named_parameters())] == \
        [(n, p.shape) for n, p in sorted(theirs.named_parameters())]
    # Every module PEFT could target (Linear / Conv / norms / embeddings) is there, by name, with its type.
    leaf_types = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.LayerNorm, torch.nn.Embedding)
    our_modules = dict(ours.named_modules())
    checked = 0
    for name, module in theirs.named_modules():
        if isinstance(module, leaf_types):
            assert name in our_modules, name
            assert isinstance(our_modules[name], type(module)), (name, type(our_modules[name]))
            checked += 1
    # per block qkv, proj, gate/up/down_proj; merger proj, norm, gate/up/down_proj; patch_embed.proj, downsample,
    # the position embedding
    assert checked == 5 * VISION["depth"] + 5 + 3
    # No two state-dict entries share storage: nothing looks like an undeclared tied weight to transformers.
    from transformers.pytorch_utils import id_tensor_storage

    storages = [id_tensor_storage(t) for t in fast.state_dict().values()]
    assert len(set(storages)) == len(storages)


def test_stock_rotary_module_is_kept_and_agrees_with_the_packing():
    """transformers' rotary module (no parameters) stays on the tower under its name; its tables are ours."""
    from glm4v_fast.packing import rotary_cos_sin, rotary_inv_freq

    stock, fast = _pair()
    rotary = fast.model.visual.rotary_pos_emb
    assert rotary is not None and not list(rotary.parameters())
    assert "rotary_pos_emb.inv_freq" not in fast.model.visual.state_dict()
    config = fast.model.visual.config
    positions = torch.stack([torch.arange(10), torch.arange(10).flip(0)], 1)
    cos, sin = rotary(torch.empty(1), positions)                 # (N, head_dim) each
    ours_cos, ours_sin = rotary_cos_sin(positions, rotary_inv_freq(config.head_dim, config.rope_theta))
    assert cos.shape == ours_cos.shape == (10, config.head_dim)
    assert torch.allclose(cos, ours_cos) and torch.allclose(sin, ours_sin)


@pytest.mark.parametrize("kind", ["glm4v", "glm46v"])
def test_hidden_states_and_attentions_equal_transformers(kind):
    stock, fast = _pair(kind)
    stock.model.visual.config._attn_implementation = "eager"
    pv, igrid = _pixels(IMAGE_GRID, seed=1)
    pvv, vgrid = _pixels(VIDEO_GRID, seed=2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call, args in (("get_image_features", (pv, igrid)), ("get_video_features", (pvv, vgrid))):
            kw = dict(output_hidden_states=True, output_attentions=True)
            theirs = getattr(stock.model, call)(*args, **kw)
            ours = getattr(fast.model, call)(*args, **kw)
            assert len(ours.hidden_states) == len(theirs.hidden_states) == VISION["depth"] + 1
            assert len(ours.attentions) == len(theirs.attentions) == VISION["depth"]
            for a, b in zip(ours.hidden_states + ours.attentions, theirs.hidden_states + theirs.attentions):
                assert a.shape == b.shape and rel_err(a, b) <= 1e-5, call
            # Not asked: not recorded. Tuples: transformers' order.
            plain = getattr(fast.model, call)(*args)
            assert plain.hidden_states is None and plain.attentions is None
            tup = fast.model.visual(args[0], args[1] if call == "get_image_features" else
                                    torch.tensor([[1, 4, 6]] * 2), return_dict=False, output_hidden_states=True)
            assert len(tup) == 3 and isinstance(tup[2], tuple) and len(tup[2]) == VISION["depth"] + 1

    # The vision config's flags are the defaults, as in transformers' tower.
    fast.model.visual.hf_config.output_hidden_states = True
    with torch.no_grad():
        assert len(fast.model.get_image_features(pv, igrid).hidden_states) == VISION["depth"] + 1


@pytest.mark.parametrize("kind", ["glm4v", "glm4v_moe"])
def test_gradients_equal_transformers_with_and_without_checkpointing(kind):
    stock, fast = _pair(kind)
    stock.train(), fast.train()
    _features_loss(stock).backward()
    expected = _vision_grads(stock)
    _features_loss(fast).backward()
    _assert_same_grads(_vision_grads(fast), expected, 1e-5)

    # transformers' gradient_checkpointing_enable() on the whole model reaches our blocks ...
    fast.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)          # 5.23 renamed it activation_checkpointing_enable
        fast.gradient_checkpointing_enable()
    blocks = fast.model.visual.blocks
    assert all(b.gradient_checkpointing for b in blocks)
    calls = []
    for b in blocks:
        func = b._gradient_checkpointing_func
        b._gradient_checkpointing_func = lambda fn, *a, _f=func, **k: calls.append(1) or _f(fn, *a, **k)
    _features_loss(fast).backward()
    assert len(calls) == 2 * len(blocks)                 # every block, in the image and the video forward
    _assert_same_grads(_vision_grads(fast), expected, 1e-5)
    # ... in training only: eval and no_grad forwards run the fused blocks.
    fast.eval()
    with torch.no_grad():
        _features_loss(fast)
    assert len(calls) == 2 * len(blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fast.gradient_checkpointing_disable()
    assert not any(b.gradient_checkpointing for b in blocks)


def test_reentrant_checkpointing_on_the_tower_alone():
    stock, fast = _pair()
    visual = fast.model.visual.train()
    stock.train()
    _features_loss(stock).backward()
    visual.gradient_checkpointing_enable({"use_reentrant": True})
    _features_loss(fast).backward()
    _assert_same_grads(_vision_grads(fast), _vision_grads(stock), 1e-5)


def test_fused_weights_follow_weight_changes_and_moves():
    """The inference fast path uses derived weights (gate|up concatenated, the permuted downsample) cached between
    calls: in-place updates, load_state_dict and dtype moves must all be seen."""
    stock, fast = _pair()
    pv, grid = _pixels(IMAGE_GRID, seed=1)

    def both():
        with torch.no_grad():
            return (torch.cat(fast.model.get_image_features(pv, grid).pooler_output),
                    torch.cat(stock.model.get_image_features(pv, grid).pooler_output))

    ours, theirs = both()
    assert rel_err(ours, theirs) <= 1e-5
    visual = fast.model.visual
    assert all(b.mlp._gate_up.value is not None for b in visual.blocks)      # the fused path ran
    assert visual.downsample._linear_weight.value is not None
    for model in (stock, fast):
        with torch.no_grad():
            model.model.visual.blocks[0].mlp.gate_proj.weight.add_(0.1)
            model.model.visual.blocks[1].mlp.up_proj.weight.mul_(1.5)
            model.model.visual.merger.gate_proj.weight.add_(0.1)
            model.model.visual.downsample.weight.mul_(-1)
    ours, changed = both()
    assert rel_err(changed, theirs) > 1e-2 and rel_err(ours, changed) <= 1e-5
    fast.model.visual.load_state_dict(_build("glm4v").model.visual.state_dict())
    stock.model.visual.load_state_dict(fast.model.visual.state_dict())
    ours, theirs = both()
    assert rel_err(theirs, changed) > 1e-2 and rel_err(ours, theirs) <= 1e-5
    stock.double(), fast.double()
    pv = pv.double()
    ours, theirs = both()
    assert ours.dtype == torch.float64 and fast.model.visual.dtype == torch.float64
    assert rel_err(ours, theirs) <= 1e-5          # the layout tables (rotary, position grid) stay float32


def test_fused_weights_of_a_tower_built_under_inference_mode():
    """Weights created under inference_mode have no version counter; load_state_dict must still refresh the cache."""
    stock = _build("glm4v")
    pv, grid = _pixels(IMAGE_GRID, seed=1)
    halved = {k: v * 0.5 for k, v in stock.model.visual.state_dict().items()}
    with torch.inference_mode():
        fast = patch_glm4v(copy.deepcopy(stock), kernels="torch")
        assert fast.model.visual.blocks[0].mlp.gate_proj.weight.is_inference()
        before = torch.cat(fast.model.get_image_features(pv, grid).pooler_output)
        fast.model.visual.load_state_dict(halved)
        after = torch.cat(fast.model.get_image_features(pv, grid).pooler_output)
    with torch.no_grad():
        expected_before = torch.cat(stock.model.get_image_features(pv, grid).pooler_output)
        stock.model.visual.load_state_dict(halved)
        expected_after = torch.cat(stock.model.get_image_features(pv, grid).pooler_output)
    assert rel_err(before, expected_before) <= 1e-5 and rel_err(after, expected_after) <= 1e-5
    assert rel_err(expected_after, expected_before) > 1e-2


def test_train_eval_follow_the_parent():
    stock, fast = _pair()
    fast.train()
    assert all(m.training for m in fast.model.visual.modules())
    fast.eval()
    assert not any(m.training for m in fast.model.visual.modules())
    assert patch_glm4v(stock.train(), kernels="torch").model.visual.training


def test_patch_glm4v_classes_loads_checkpoints_into_the_fast_tower(tmp_path):
    stock = _build("glm4v")
    stock.save_pretrained(tmp_path)
    pv, grid = _pixels(IMAGE_GRID, seed=1)
    unpatch = patch_glm4v_classes(kernels="torch")
    try:
        loaded, info = transformers.Glm4vForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
        built = transformers.Glm4vForConditionalGeneration(stock.config)
    finally:
        unpatch()
    assert isinstance(loaded.model.visual, FastGlm4vVisionModel) and isinstance(built.model.visual, FastGlm4vVisionModel)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert "Block" in loaded.model._no_split_modules
    with torch.no_grad():
        ours = torch.cat(loaded.eval().model.get_image_features(pv, grid).pooler_output)
        theirs = torch.cat(stock.model.get_image_features(pv, grid).pooler_output)
    assert rel_err(ours, theirs) <= 1e-5
    assert not isinstance(transformers.Glm4vForConditionalGeneration(stock.config).model.visual, FastGlm4vVisionModel)


LORA_TARGETS = ["qkv", "proj", "gate_proj", "up_proj", "down_proj", "patch_embed.proj"]


def test_peft_lora_finds_the_same_modules_and_trains_the_same():
    peft = pytest.importorskip("peft")
    stock, fast = _pair()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    stock_peft = peft.get_peft_model(stock, config)
    fast_peft = peft.get_peft_model(fast, copy.deepcopy(config))

    def lora_modules(model):
        return sorted(n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))

    assert lora_modules(fast_peft) == lora_modules(stock_peft)
    vision = [n for n in lora_modules(fast_peft) if ".visual." in n]
    assert len(vision) == 5 * VISION["depth"] + 4 + 1      # blocks, merger proj/gate/up/down, patch_embed.proj
    # The adapters have the same names: the stock model's (random) LoRA weights load into the patched one.
    lora_state = peft.get_peft_model_state_dict(stock_peft)
    assert set(lora_state) == set(peft.get_peft_model_state_dict(fast_peft))
    peft.set_peft_model_state_dict(fast_peft, lora_state)

    # The inference fast path caches derived weights (gate|up, the permuted downsample); built under
    # inference_mode, they must still serve a training forward through the frozen base weights. (The layouts are
    # cached first, outside inference_mode; .float() is a no-op move that clears the weight caches.)
    with torch.no_grad():
        _features_loss(fast_peft)
    fast_peft.float()
    with torch.inference_mode():
        _features_loss(fast_peft)
    pv, grid = _pixels(IMAGE_GRID, seed=1)
    results = {}
    for name, model in (("stock", stock_peft), ("fast", fast_peft)):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        _features_loss(model).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and ".visual." in n}
        with torch.no_grad():
            before = torch.cat(model.model.get_image_features(pv, grid).pooler_output)
            opt.step()
            after = torch.cat(model.model.get_image_features(pv, grid).pooler_output)
        results[name] = (before, after, grads)
    (s0, s1, sg), (f0, f1, fg) = results["stock"], results["fast"]
    assert sg.keys() == fg.keys() and len(sg) == 2 * len(vision)
    _assert_same_grads(fg, sg, 1e-4)        # fp32; the random adapters make these gradients large (max ~500)
    assert rel_err(f0, s0) <= 1e-5 and rel_err(f1, s1) <= 1e-4 and rel_err(f1, f0) > 1e-3
    # Guard: the adapters change the features, so the equalities above went through them.
    with torch.no_grad(), fast_peft.disable_adapter():
        assert rel_err(torch.cat(fast_peft.model.get_image_features(pv, grid).pooler_output), f1) > 1e-2
