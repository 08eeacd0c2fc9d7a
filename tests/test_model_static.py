"""Static-shape forwards (token_buckets) and their CUDA graphs (cuda_graphs): glm4v_fast.static's
StaticShapeRunner, which VisionModel builds from those two arguments, and the bucketed layouts it runs on.

The bucketed forward pads the packed sequence to a bucket with padding segments that attend only to
themselves, so the real tokens' outputs must equal the plain forward; batches above the largest bucket are
split between items. The CUDA-graph tests are marked `gpu`.
"""

import pytest
import torch

import glm4v_fast as gf
from glm4v_fast.packing import PAD_SEGMENT, check_inputs, pack
from glm4v_fast.static import StaticShapeRunner
from _tiny import CONFIGS, hf_vision_model, random_inputs, rel_err

TINY2 = dict(CONFIGS["tiny"], num_heads=2)       # head_dim 32
# Images and videos (t > 1) of several sizes: 24 + 8 + 48 + 4 + 24 = 108 patches.
MIXED = [[1, 4, 6], [2, 2, 2], [3, 4, 4], [1, 2, 2], [2, 2, 6]]


needs_triton = pytest.mark.interpreter       # CPU tensors through the Triton kernels (tests/conftest.py)
# A no-op tile's rows are all masked, and the interpreter (numpy) still evaluates their 0/0 before the masked store.
masked_nan = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")


@pytest.fixture(scope="module")
def weights():
    return hf_vision_model(TINY2).state_dict()


def _model(weights, device="cpu", **kwargs):
    model = gf.VisionModel(gf.VisionConfig(**TINY2), **kwargs).eval()
    model.load_state_dict(weights, strict=True)
    return model.to(device)


def _assert_same(got, expected, tol=1e-5):
    assert got.last_hidden_state.shape == expected.last_hidden_state.shape
    assert got.pooler_output.shape == expected.pooler_output.shape
    assert rel_err(got.last_hidden_state, expected.last_hidden_state) <= tol
    assert rel_err(got.pooler_output, expected.pooler_output) <= tol


# ---------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------
def test_bucketed_layout_has_static_sizes():
    config = gf.VisionConfig(**TINY2)
    grid = torch.tensor(MIXED)
    plain = pack(grid, config, "cpu")
    padded = pack(grid, config, "cpu", bucket=1024)
    bounds = padded.cu_seqlens.tolist()
    assert padded.num_tokens == plain.num_tokens == 108 and padded.padded_tokens == 1024
    assert bounds[:len(plain.seqlens) + 1] == plain.cu_seqlens.tolist()       # real segments unchanged
    # Padding: segments of at most PAD_SEGMENT tokens, then empty segments up to a power-of-two count.
    assert padded.seqlens[len(plain.seqlens):] == [256, 256, 256, 148]
    assert max(padded.seqlens) <= PAD_SEGMENT and sum(padded.seqlens) == 1024
    assert padded.num_segments == 16 and bounds[len(padded.seqlens):] == [1024] * (17 - len(padded.seqlens))
    assert padded.max_seqlen == 256 and plain.max_seqlen == 24
    assert padded.cos.shape == (1024, 32) and padded.table_index.shape == (1024,)
    # Padding rows: position (0, 0), table row 0.
    assert torch.equal(padded.cos[108:], torch.ones(916, 32)) and not padded.table_index[108:].any()
    assert padded.item_tokens(4) == plain.item_tokens(4)
    # A different grid of the same class has the same shapes: the same graph replays it.
    other = pack(torch.tensor([[4, 2, 2], [3, 4, 4], [2, 2, 6]]), config, "cpu", bucket=1024)   # 9 + 4 segments
    assert (other.num_segments, other.max_seqlen, other.cos.shape) == (16, 256, (1024, 32))
    p1, p2 = padded.tile_plan(), other.tile_plan()
    assert p1.tiles.shape == p2.tiles.shape == (16 + 1024 // p1.block_m, 3)
    assert padded.tile_plan() is p1 and padded.attention_tiles is p1          # built once, kept on the layout
    with pytest.raises(ValueError, match="bucket"):
        pack(grid, config, "cpu", bucket=100)
    with pytest.raises(ValueError, match="multiple"):
        pack(grid, config, "cpu", bucket=1026)


def test_bucket_at_exact_size_has_no_padding():
    config = gf.VisionConfig(**TINY2)
    padded = pack(torch.tensor(MIXED), config, "cpu", bucket=108)
    assert padded.padded_tokens == 108 and sum(padded.seqlens) == 108
    assert padded.cu_seqlens.tolist()[-1] == 108 and padded.num_segments == 16      # 9 slices -> 16


@pytest.mark.parametrize("grid, expected", [
    (MIXED, [(0, 5, 128)]),                                           # everything fits the largest bucket
    ([[1, 4, 4]], [(0, 1, 16)]),                                      # exact size of the smallest bucket
    ([[1, 8, 8], [2, 8, 6], [1, 2, 2]], [(0, 1, 64), (1, 3, 128)]),   # split between items
    ([[1, 4, 4], [1, 12, 12], [1, 2, 2], [1, 4, 6]], [(0, 1, 16), (1, 2, None), (2, 4, 64)]),  # 144 > 128
])
def test_bucket_groups(grid, expected):
    runner = StaticShapeRunner(gf.VisionConfig(**TINY2), token_buckets=(128, 16, 64))
    assert runner.buckets == (16, 64, 128)
    assert runner.groups(torch.tensor(grid)) == expected
    assert gf.VisionModel(gf.VisionConfig(**TINY2), token_buckets=(128, 16, 64)).token_buckets == (16, 64, 128)


# ---------------------------------------------------------------------------------------------------------------
# Bucketed forward == plain forward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grids, buckets", [
    (MIXED, (64, 256)),                                   # padded: 108 -> 256
    (MIXED, (108,)),                                      # a bucket's exact size
    (MIXED, (32, 48)),                                    # above the largest bucket: 3 forwards
    ([[1, 4, 4], [1, 12, 12], [2, 2, 2], [1, 4, 6]], (16, 48)),   # one item (144) above every bucket, alone
])
def test_bucketed_equals_plain_sdpa(weights, grids, buckets):
    plain = _model(weights, kernels="torch", attn_backend="sdpa")
    bucketed = _model(weights, kernels="torch", attn_backend="sdpa", token_buckets=buckets)
    pv, grid = random_inputs(grids)
    with torch.no_grad():
        expected = plain.forward_features(pv, grid)
        _assert_same(bucketed.forward_features(pv, grid), expected)
        assert torch.equal(bucketed(pv, grid), bucketed.forward_features(pv, grid).pooler_output)
        per_item = bucketed.get_image_features(pv, grid)
        per_video = bucketed.get_video_features(pv, grid)
    sizes = (grid.prod(-1) // 4).tolist()
    assert [t.shape[0] for t in per_item] == [t.shape[0] for t in per_video] == sizes
    assert rel_err(torch.cat(per_item), expected.pooler_output) <= 1e-5


def test_bucketed_forward_in_grad_mode(weights):
    """Buckets also serve training: the gradients equal the plain forward's (padding contributes nothing)."""
    plain = _model(weights, kernels="torch", attn_backend="sdpa")
    bucketed = _model(weights, kernels="torch", attn_backend="sdpa", token_buckets=(32, 48))
    pv, grid = random_inputs([[1, 4, 6], [2, 2, 6], [1, 2, 2]])      # 52 patches: 48 + 4, padded to 48 and 32
    for model in (plain, bucketed):
        model(pv, grid).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), bucketed.parameters()):
        assert rel_err(b.grad, a.grad) <= 1e-5, name


@needs_triton
@masked_nan
@pytest.mark.parametrize("grids, buckets", [
    ([[1, 4, 6], [2, 2, 2], [1, 2, 2]], (128,)),           # 36 padded to 128: no-op tiles in the plan
    pytest.param([[1, 4, 6], [2, 2, 2], [1, 2, 2]], (36,), marks=pytest.mark.slow),            # exact size
    pytest.param([[1, 4, 6], [2, 2, 2], [1, 2, 2], [1, 6, 4]], (28,), marks=pytest.mark.slow),  # above the largest
])
def test_bucketed_equals_plain_triton(weights, grids, buckets):
    """Our Triton kernels and attention (the interpreter here): a fixed-size tile plan with no-op rows."""
    plain = _model(weights, kernels="triton", attn_backend="triton")
    bucketed = _model(weights, kernels="triton", attn_backend="triton", token_buckets=buckets)
    pv, grid = random_inputs(grids)
    with torch.no_grad():
        _assert_same(bucketed.forward_features(pv, grid), plain.forward_features(pv, grid), tol=1e-4)


@needs_triton
@masked_nan
def test_static_buffers_serve_every_layout_of_a_class(weights):
    """What a CUDA graph replays, run eagerly: layouts of one shape class share one set of static buffers,
    filled by device copies, and give the plain forward's outputs."""
    plain = _model(weights, kernels="torch", attn_backend="triton")
    model = _model(weights, kernels="torch", attn_backend="triton")
    runner = StaticShapeRunner(model.config, token_buckets=(128,), attn_backend="triton")
    outputs = []
    with torch.no_grad():
        for grids in ([[1, 4, 6], [2, 2, 2]], [[1, 6, 4], [1, 2, 2], [1, 2, 6]], [[3, 2, 4]]):
            pv, grid = random_inputs(grids)
            layout = model.layout(check_inputs(pv, grid, model.config), 128)
            got = runner.run_static(model, pv, layout, capture=False)
            _assert_same(got, plain.forward_features(pv, grid))
            outputs.append(got.pooler_output)
    assert len(runner.graphs) == 1                      # one class: 128 tokens, 4 segments, max_seqlen 128
    entry = next(iter(runner.graphs.values()))
    assert entry.graph is None and all(o.data_ptr() != entry.outputs.pooler_output.data_ptr() for o in outputs)


@needs_triton
@masked_nan
def test_attention_kernel_no_op_tiles_touch_nothing():
    """The padded tile plan's no-op rows (0, 0, 0): the kernel reads and writes nothing for them."""
    from glm4v_fast.kernels import TilePlan, varlen_attention, varlen_tile_plan

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 2, 16, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 24, 40, 40, 40], dtype=torch.int32)
    poison = torch.full((40, 2, 16), float("nan"))
    untouched = varlen_attention(q, k, v, cu, 24, tile_plan=TilePlan(torch.zeros(6, 3, dtype=torch.int32), 16),
                                 out=poison.clone())
    assert untouched.isnan().all()
    plan = varlen_tile_plan(cu.tolist(), 16, "cpu", block_m=16)
    padded = TilePlan(torch.cat([plan.tiles, torch.zeros(5, 3, dtype=torch.int32)]), 16)
    assert torch.equal(varlen_attention(q, k, v, cu, 24, tile_plan=padded, out=poison.clone()),
                       varlen_attention(q, k, v, cu, 24, tile_plan=plan))


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"token_buckets": (64, 30)}, "multiples"),
    ({"token_buckets": ()}, "non-empty"),
    ({"token_buckets": "64"}, "sequence"),
    ({"token_buckets": (64.0,)}, "ints"),
    ({"token_buckets": (0,)}, "positive"),
    ({"cuda_graphs": True}, "needs token_buckets"),
    ({"cuda_graphs": True, "token_buckets": (64,), "attn_backend": "sdpa"}, "sdpa"),
    ({"cuda_graphs": 1, "token_buckets": (64,)}, "True or False"),
])
def test_bad_static_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gf.VisionModel(gf.VisionConfig(**TINY2), **kwargs)


def test_options_flow_through_loaders(tmp_path, weights, recwarn):
    model = _model(weights)
    model.save_pretrained(tmp_path)
    loaded = gf.VisionModel.from_pretrained(tmp_path, token_buckets=[64, 16], cuda_graphs=True,
                                            attn_backend="triton")
    assert loaded.token_buckets == (16, 64) and loaded.cuda_graphs
    _, built, _ = gf.create_glm4v_vision_encoder(config=gf.VisionConfig(**TINY2), device="cpu",
                                                 token_buckets=(32,))
    assert built.token_buckets == (32,) and not built.cuda_graphs
    _, from_dir, _ = gf.create_glm4v_vision_encoder(checkpoint=tmp_path, device="cpu", token_buckets=(32,))
    assert from_dir.token_buckets == (32,)


def test_cuda_graphs_off_cuda_run_the_bucketed_forward_eagerly(weights):
    plain = _model(weights, kernels="torch", attn_backend="sdpa")
    model = _model(weights, kernels="torch", attn_backend="auto", token_buckets=(64,), cuda_graphs=True)
    pv, grid = random_inputs([[1, 4, 6], [1, 2, 2]])
    with torch.inference_mode():
        _assert_same(model.forward_features(pv, grid), plain.forward_features(pv, grid))
    assert not model._static.graphs


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs (GPU round)
# ---------------------------------------------------------------------------------------------------------------
def _capturable_backends():
    if not torch.cuda.is_available():
        return ["triton"]
    from glm4v_fast.attention import available_backends

    return [b for b in available_backends("cuda") if b != "sdpa"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _capturable_backends())
def test_cuda_graph_capture_and_replay_equal_eager(weights, backend):
    plain = _model(weights, "cuda", attn_backend=backend).to(torch.bfloat16)
    eager = _model(weights, "cuda", attn_backend=backend, token_buckets=(256, 1024)).to(torch.bfloat16)
    graphed = _model(weights, "cuda", attn_backend=backend, token_buckets=(256, 1024),
                     cuda_graphs=True).to(torch.bfloat16)
    first = [[1, 4, 6], [2, 2, 2], [1, 2, 2]]          # 36 patches, 4 segments + padding -> (256, 8, 256)
    second = [[1, 6, 4], [2, 2, 6], [1, 4, 4]]         # 64 patches, 5 segments: same class, replayed
    with torch.inference_mode():
        for grids in (first, second, first):
            pv, grid = random_inputs(grids)
            pv = pv.cuda()
            got = graphed.forward_features(pv, grid)
            _assert_same(got, eager.forward_features(pv, grid), tol=1e-2)
            # Padding segments and empty trailing segments change nothing for the real tokens on this backend.
            _assert_same(got, plain.forward_features(pv, grid), tol=2e-2)
            assert got.pooler_output.isfinite().all()
    assert len(graphed._static.graphs) == 1
    entry = next(iter(graphed._static.graphs.values()))
    assert entry.graph is not None
    graph = entry.graph
    with torch.no_grad():                               # no_grad replays too; a grad-mode call runs eagerly
        pv, grid = random_inputs(second)
        graphed(pv.cuda(), grid)
    assert entry.graph is graph and len(graphed._static.graphs) == 1
    from glm4v_fast.attention import FORWARD_ONLY

    if backend in FORWARD_ONLY:
        # A forward-only attention refuses a grad-mode call rather than return an output without gradient.
        with pytest.raises(ValueError, match="forward-only"):
            graphed(pv.cuda(), grid)
        return
    out = graphed(pv.cuda(), grid)
    assert out.requires_grad


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _capturable_backends())
def test_cached_forward_does_not_synchronize_on_cuda(weights, backend):
    """torch's sync debug mode raises on any synchronizing call (device-to-host reads, pageable copies)."""
    for graphs in (False, True):
        model = _model(weights, "cuda", attn_backend=backend, token_buckets=(256,),
                       cuda_graphs=graphs).to(torch.bfloat16)
        pv, grid = random_inputs([[1, 4, 6], [2, 2, 2], [1, 2, 2]])
        pv = pv.cuda()
        with torch.inference_mode():
            model(pv, grid)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(pv, grid)
                model.get_image_features(pv, grid)
            finally:
                torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_graphs_refuse_sdpa_when_auto_resolves_to_it(weights, monkeypatch):
    from glm4v_fast import attention

    monkeypatch.setattr(attention, "available_backends", lambda device, *a, **k: ["sdpa"])
    model = _model(weights, "cuda", attn_backend="auto", token_buckets=(256,), cuda_graphs=True)
    pv, grid = random_inputs([[1, 4, 6]])
    with torch.inference_mode(), pytest.raises(ValueError, match="sdpa"):
        model(pv.cuda(), grid)
