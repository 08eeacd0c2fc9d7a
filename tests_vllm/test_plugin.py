"""The plugin inside vLLM: glm4v-fast's tower replaces vLLM's in GLM-4.1V and GLM-4.5V with the same outputs."""
from __future__ import annotations

import json
import os

import pytest
import torch

from _inputs import greedy, prompts
from conftest import KINDS, make_llm, visual_of


@pytest.fixture(scope="module", params=KINDS)
def llms(request, checkpoints):
    """(checkpoint path, LLM with glm4v-fast's tower, LLM with vLLM's tower) for one checkpoint."""
    path = checkpoints[request.param]
    fast = make_llm(path, fast=True, enable_mm_embeds=True)
    stock = make_llm(path, fast=False)
    yield path, fast, stock
    del fast, stock


def test_towers_in_use(llms):
    from vllm.model_executor.models.glm4_1v import Glm4vVisionTransformer

    from glm4v_fast.integrations.vllm.tower import VllmVisionTower

    _, fast, stock = llms
    assert type(visual_of(fast)) is VllmVisionTower
    assert type(visual_of(stock)) is Glm4vVisionTransformer


@pytest.mark.parametrize("case", ["one_image", "two_images", "video"])
def test_greedy_tokens_equal_vllm_tower(llms, case):
    _, fast, stock = llms
    prompt = prompts()[case]
    got, want = greedy(fast, [prompt])[0], greedy(stock, [prompt])[0]
    assert len(got) == 8
    assert got == want


def _hf_normalize(pixels: torch.Tensor, path) -> torch.Tensor:
    """transformers' processor normalization of 0-255 patch rows (channel-major rows: C x T x P x P)."""
    with open(os.path.join(path, "processor_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)["image_processor"]
    mean = torch.tensor(cfg["image_mean"], dtype=torch.float64)
    std = torch.tensor(cfg["image_std"], dtype=torch.float64)
    x = pixels.double().view(pixels.shape[0], 3, -1) * cfg["rescale_factor"]
    return ((x - mean[None, :, None]) / std[None, :, None]).view(pixels.shape[0], -1).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("grid_as", ["tensor", "list"])
def test_tower_matches_vllm_and_transformers(llms, grid_as):
    """float32: two images and a two-slice video packed in one call, 0-255 pixels as vLLM gives them."""
    from transformers import AutoModelForImageTextToText

    path, fast, stock = llms
    grids = [[1, 4, 6], [1, 2, 2], [2, 4, 4]]
    rows = sum(t * h * w for t, h, w in grids)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (rows, 1176), generator=gen, dtype=torch.uint8)
    grid = torch.tensor(grids) if grid_as == "tensor" else grids

    with torch.inference_mode():
        ours = visual_of(fast)(pixels, grid_thw=grid)
        theirs = visual_of(stock)(pixels, grid_thw=grid)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    # transformers' get_video_features runs a video as one (1, h, w) item per temporal slice.
    hf_grid = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 4, 4], [1, 4, 4]])
    with torch.no_grad():
        want = hf.model.visual(_hf_normalize(pixels, path), grid_thw=hf_grid, return_dict=True).pooler_output
    assert ours.shape == theirs.shape == want.shape == (rows // 4, 128)
    assert _rel(ours, want) <= 1e-5
    assert _rel(ours, theirs) <= 1e-5
    assert _rel(theirs, want) <= 1e-5        # the oracle agrees with vLLM's tower too


def test_data_parallel_encoder_mode(llms):
    """mm_encoder_tp_mode="data" calls the tower through vLLM's sharding helper with a list grid."""
    from vllm.model_executor.models.vision import run_dp_sharded_mrope_vision_model

    _, fast, stock = llms
    grids = [[1, 4, 6], [1, 2, 2]]
    pixels = torch.randint(0, 256, (28, 1176), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.inference_mode():
        sharded = run_dp_sharded_mrope_vision_model(visual_of(fast), pixels, grids, rope_type="rope_3d")
        direct = visual_of(stock)(pixels, grid_thw=torch.tensor(grids))
    assert [s.shape[0] for s in sharded] == [6, 1]
    assert _rel(torch.cat(sharded), direct) <= 1e-5


def test_embeds_route_gives_pixel_route_tokens(llms):
    """Embeddings from glm4v-fast's own pipeline (its processor and VisionModel) as vLLM input: same tokens."""
    import glm4v_fast as gf
    from glm4v_fast.integrations.vllm import embeds_to_multi_modal_data

    path, fast, _ = llms
    case = prompts()["two_images"]
    images = case["multi_modal_data"]["image"]
    _, model, _ = gf.create_glm4v_vision_encoder(checkpoint=str(path), dtype=torch.float32)
    # The checkpoint's processor config is transformers 5's nested processor_config.json, which
    # VisionProcessor.from_pretrained reads (create_glm4v_vision_encoder looks for preprocessor_config.json only).
    processor = gf.VisionProcessor.from_pretrained(path)
    info = gf.GLM4VEmbeddingPipeline(model=model, processor=processor).extract_image_embeddings(
        images, return_dict=True)
    data = embeds_to_multi_modal_data(info["embeddings"], info["grid_thw"])
    got = greedy(fast, [{"prompt": case["prompt"], "multi_modal_data": data}])[0]
    assert got == greedy(fast, [case])[0]


CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_chat_api_image_embeds_part_gives_pixel_route_tokens(llms):
    """The OpenAI chat content part (`image_embeds_content_part`) through vLLM's chat parsing: same tokens."""
    from vllm import SamplingParams

    import glm4v_fast as gf
    from glm4v_fast.integrations.vllm import image_embeds_content_part

    path, fast, _ = llms
    img = prompts()["two_images"]["multi_modal_data"]["image"][0]      # not resized: see _inputs.prompts
    model = gf.VisionModel.from_pretrained(path, dtype=torch.float32).eval()
    info = gf.GLM4VEmbeddingPipeline(model=model, processor=gf.VisionProcessor.from_pretrained(path)
                                     ).extract_image_embeddings([img], return_dict=True)
    text = {"type": "text", "text": "describe the image"}
    params = SamplingParams(max_tokens=8, temperature=0)

    def chat(part):
        out = fast.chat([{"role": "user", "content": [part, text]}], params, chat_template=CHAT_TEMPLATE,
                        use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    got = chat(image_embeds_content_part(info["embeddings"][0], info["grid_thw"][0]))
    assert got == chat({"type": "image_pil", "image_pil": img})


def _pipeline_video(path, frames, meta):
    """glm4v-fast's own video embeddings (its processor and VisionModel) of frames vLLM uses as given."""
    import glm4v_fast as gf

    model = gf.VisionModel.from_pretrained(path, dtype=torch.float32).eval()
    pipeline = gf.GLM4VEmbeddingPipeline(model=model, processor=gf.VisionProcessor.from_pretrained(path))
    return pipeline.extract_video_embeddings(frames, video_metadata={"fps": meta["fps"]}, do_sample_frames=False,
                                             return_dict=True)


def test_video_embeds_route_gives_pixel_route_tokens(llms):
    """A video as embeddings plus its slices' timestamps: the pixel route's prompt and greedy tokens."""
    from glm4v_fast.integrations.vllm import embeds_to_multi_modal_data

    path, fast, _ = llms
    case = prompts()["video"]          # 4 frames of 84x56: no processor resizes them
    frames, meta = case["multi_modal_data"]["video"]
    info = _pipeline_video(path, frames, meta)
    assert info["grid_thw"].tolist() == [[2, 4, 6]] and info["timestamps"] == [[0.0, 1.0]]
    data = embeds_to_multi_modal_data(info["embeddings"], info["grid_thw"], modality="video",
                                      timestamps=info["timestamps"])
    embeds_case = {"prompt": case["prompt"], "multi_modal_data": data}
    pixel_out = fast.generate([case], use_tqdm=False)[0]
    embeds_out = fast.generate([embeds_case], use_tqdm=False)[0]
    assert embeds_out.prompt_token_ids == pixel_out.prompt_token_ids     # same placeholder text and times
    got = greedy(fast, [embeds_case])[0]
    assert len(got) == 8
    assert got == greedy(fast, [case])[0]
    # the given times are what the prompt shows: other times, other prompt tokens
    later = embeds_to_multi_modal_data(info["embeddings"], info["grid_thw"], modality="video", timestamps=[[3.0, 4.0]])
    later_out = fast.generate([{"prompt": case["prompt"], "multi_modal_data": later}], use_tqdm=False)[0]
    vocab = fast.get_tokenizer().get_vocab()
    assert later_out.prompt_token_ids != pixel_out.prompt_token_ids
    assert {vocab["3"], vocab["4"]} <= set(later_out.prompt_token_ids)


def test_chat_api_video_embeds_part_gives_pixel_route_tokens(llms):
    """The OpenAI chat `video_embeds` part (`video_embeds_content_part`, timestamps as a JSON list) through vLLM's
    chat parsing: the offline pixel route's prompt and greedy tokens."""
    from vllm import SamplingParams

    from glm4v_fast.integrations.vllm import video_embeds_content_part

    path, fast, _ = llms
    case = prompts()["video"]
    frames, meta = case["multi_modal_data"]["video"]
    info = _pipeline_video(path, frames, meta)
    part = video_embeds_content_part(info["embeddings"][0], info["grid_thw"][0], info["timestamps"][0])
    assert part["video_embeds"]["timestamps"] == [0.0, 1.0]
    out = fast.chat([{"role": "user", "content": [part, {"type": "text", "text": "describe the video"}]}],
                    SamplingParams(max_tokens=8, temperature=0), chat_template=CHAT_TEMPLATE, use_tqdm=False)[0]
    pixel = fast.generate([case], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
    assert out.prompt_token_ids == pixel.prompt_token_ids
    assert list(out.outputs[0].token_ids) == list(pixel.outputs[0].token_ids)


def test_video_embeds_without_timestamps_is_refused(llms):
    _, fast, _ = llms
    data = {"video": {"video_embeds": torch.zeros(12, 128), "video_grid_thw": torch.tensor([[2, 4, 6]])}}
    with pytest.raises(ValueError, match="needs its slices' times"):
        fast.generate([{"prompt": prompts()["video"]["prompt"], "multi_modal_data": data}], use_tqdm=False)
    data["video"]["timestamps"] = torch.tensor([[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="has 2 temporal slices"):
        fast.generate([{"prompt": prompts()["video"]["prompt"], "multi_modal_data": data}], use_tqdm=False)
