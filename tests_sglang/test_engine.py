"""The plugin inside SGLang's offline Engine: greedy tokens with glm4v-fast's tower equal SGLang's tower's and
transformers'; precomputed embeddings (both SGLang formats) give the pixel route's tokens; a video as embeddings
gives transformers' tokens.

One engine per tower and checkpoint (starting one costs tens of seconds here): each fixture runs every case once
and the tests compare what it recorded. The GLM-4.5V engine with glm4v-fast's tower also uses SGLang's
data-parallel encoder path (`mm_enable_dp_encoder`), which calls the tower through
`run_dp_sharded_mrope_vision_model`.
"""
from __future__ import annotations

import pytest

from _inputs import VIDEO_FPS, VIDEO_PROMPT, cases, sampling, sglang_greedy, transformers_greedy, video_frames
from conftest import KINDS, engine

FORMATS = ("precomputed_embedding", "processor_output")


def _embeddings(path, images):
    """glm4v-fast's own embeddings of `images` (its pipeline and preprocessing), float32, with their grids."""
    from glm4v_fast.pipeline import GLM4VEmbeddingPipeline, create_glm4v_vision_encoder

    _, model, processor = create_glm4v_vision_encoder(checkpoint=path, device="cpu", dtype="float32")
    return GLM4VEmbeddingPipeline(model, processor).extract_image_embeddings(images, return_dict=True)


def _video_embeddings(path, frames):
    from glm4v_fast.pipeline import GLM4VEmbeddingPipeline, create_glm4v_vision_encoder

    _, model, processor = create_glm4v_vision_encoder(checkpoint=path, device="cpu", dtype="float32")
    return GLM4VEmbeddingPipeline(model, processor).extract_video_embeddings(
        frames, video_metadata={"fps": VIDEO_FPS}, do_sample_frames=False, return_dict=True)


def _video_route(llm, path, fmt: str) -> list[int]:
    """A video as embeddings: the prompt written out as transformers' processor does, sent as token ids (SGLang
    matches a text prompt's placeholders to its media and finds image tokens without images)."""
    from transformers import AutoTokenizer

    from glm4v_fast.integrations.sglang import expand_video_tokens, video_item

    info = _video_embeddings(path, video_frames())
    ids = AutoTokenizer.from_pretrained(path)(expand_video_tokens(VIDEO_PROMPT, info["grid_thw"], info["timestamps"]))
    out = llm.generate(input_ids=ids["input_ids"], video_data=[video_item(info, format=fmt)],
                       sampling_params=sampling())
    return list(out["output_ids"])


@pytest.fixture(scope="module", params=KINDS)
def run(request, checkpoints):
    """Everything one checkpoint's engines answer: {"stock": {case: tokens}, "fast": ..., "embeds": ..., ...}."""
    from glm4v_fast.integrations.sglang import expand_image_tokens, image_item

    kind = request.param
    path = checkpoints[kind]
    result = {"kind": kind, "stock": {}, "fast": {}, "embeds": {}, "hf": {}}
    with engine(path, fast=False) as llm:
        for name, (prompt, images) in cases().items():
            result["stock"][name] = sglang_greedy(llm, prompt, images)
    dp_encoder = dict(mm_enable_dp_encoder=True) if kind == "glm4v_moe" else {}
    with engine(path, fast=True, **dp_encoder) as llm:
        for name, (prompt, images) in cases().items():
            result["fast"][name] = sglang_greedy(llm, prompt, images)
            emb = _embeddings(path, images)
            for fmt in FORMATS:
                item = image_item(emb, format=fmt)
                result["embeds"][name, fmt] = sglang_greedy(llm, expand_image_tokens(prompt, emb["grid_thw"]), [item])
        for fmt in FORMATS:
            result["embeds"]["video", fmt] = _video_route(llm, path, fmt)
        prompt, images = cases()["one_image"]
        try:
            sglang_greedy(llm, prompt, [image_item(_embeddings(path, images))])
            result["unexpanded"] = None
        except Exception as error:          # SGLang re-raises the processor's error in the caller
            result["unexpanded"] = error
    for name, (prompt, images) in cases().items():
        result["hf"][name] = transformers_greedy(path, prompt, images)
    result["hf"]["video"] = transformers_greedy(path, VIDEO_PROMPT, video=video_frames())
    return result


@pytest.mark.parametrize("case", list(cases()))
def test_greedy_tokens_equal_sglang_tower(run, case):
    assert len(run["fast"][case]) == 8
    assert run["fast"][case] == run["stock"][case]


@pytest.mark.parametrize("case", list(cases()))
def test_greedy_tokens_equal_transformers(run, case):
    assert run["fast"][case] == run["hf"][case]
    assert run["stock"][case] == run["hf"][case]


def test_images_steer_the_tokens(run):
    """The comparisons above mean something only if the vision tokens change the answer."""
    assert run["fast"]["one_image"] != run["fast"]["two_images"]
    assert len(set(run["fast"]["one_image"] + run["fast"]["two_images"])) > 2


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(cases()))
def test_embeddings_routes_give_pixel_route_tokens(run, case, fmt):
    assert run["embeds"][case, fmt] == run["fast"][case]


@pytest.mark.parametrize("fmt", FORMATS)
def test_video_embeddings_give_transformers_tokens(run, fmt):
    assert len(run["hf"]["video"]) == 8
    assert run["embeds"]["video", fmt] == run["hf"]["video"]


def test_unexpanded_prompt_is_refused_with_the_fix(run):
    error = run["unexpanded"]
    assert error is not None
    assert "expand_image_tokens" in str(error)
