"""Prompts and media of the vLLM tests (random pixels; seeded)."""
from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_PROMPT = "<|begin_of_image|><|image|><|end_of_image|> describe the image"
TWO_IMAGES_PROMPT = ("<|begin_of_image|><|image|><|end_of_image|> <|begin_of_image|><|image|><|end_of_image|> "
                     "compare the two images")
VIDEO_PROMPT = "<|begin_of_video|><|video|><|end_of_video|> describe the video"


def image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def video(frames: int = 4, width: int = 84, height: int = 56, seed: int = 7):
    """(frames, metadata): every frame used as given (2 fps), as vLLM's video input takes them."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    meta = {"total_num_frames": frames, "fps": 2.0, "duration": frames / 2.0, "frames_indices": list(range(frames)),
            "video_backend": "opencv", "do_sample_frames": False}
    return array, meta


def prompts() -> dict[str, dict]:
    """The two images' sides are multiples of 28 and 2*h*w stays within the checkpoint's pixel limit (GLM-4V's
    resize counts the two temporal copies), so no processor resizes them; the single image is resized (to 56x84).
    Photos that every processor resizes, through every route: test_resized_routes.py."""
    return {
        "one_image": {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image(112, 84, 0)}},
        "two_images": {"prompt": TWO_IMAGES_PROMPT, "multi_modal_data": {"image": [image(56, 84, 1),
                                                                                    image(112, 56, 2)]}},
        "video": {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": video()}},
    }


def greedy(llm, prompt_list, max_tokens: int = 8) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(prompt_list, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
