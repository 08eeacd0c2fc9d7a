"""Prompts and images of the SGLang tests (random pixels, seeded), and greedy decoding with SGLang and transformers.

Every image's sides are multiples of 28 and its pixels within the checkpoint's limit, so no processor resizes it:
SGLang's processor (transformers') and glm4v-fast's preprocessing then give the same pixels, and the embeddings
routes (glm4v-fast's embeddings, SGLang's language model) can be compared with the pixel route.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_PROMPT = "<|user|> <|begin_of_image|><|image|><|end_of_image|> describe the image <|assistant|>"
TWO_IMAGES_PROMPT = ("<|user|> <|begin_of_image|><|image|><|end_of_image|> <|begin_of_image|><|image|><|end_of_image|> "
                     "compare the two images <|assistant|>")
VIDEO_PROMPT = "<|user|> <|begin_of_video|><|video|><|end_of_video|> describe the video <|assistant|>"
MAX_NEW_TOKENS = 8
VIDEO_FPS = 2.0


def image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def cases() -> dict[str, tuple[str, list[Image.Image]]]:
    """name -> (prompt, images)."""
    return {"one_image": (IMAGE_PROMPT, [image(84, 56, 1)]),
            "two_images": (TWO_IMAGES_PROMPT, [image(56, 84, 2), image(112, 56, 3)])}


def video_frames(frames: int = 4, width: int = 84, height: int = 56, seed: int = 7):
    """(frames, height, width, 3) uint8, used as given (no sampling) at VIDEO_FPS: two temporal slices."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def sampling() -> dict:
    return {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0}


def sglang_greedy(llm, prompt: str, image_data: list) -> list[int]:
    return list(llm.generate(prompt=prompt, image_data=image_data, sampling_params=sampling())["output_ids"])


def transformers_greedy(path, prompt: str, images: list | None = None, video=None) -> list[int]:
    """Greedy tokens of transformers' GLM-4V model and processor, float32 (the oracle)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    if video is not None:
        meta = {"total_num_frames": len(video), "fps": VIDEO_FPS, "duration": len(video) / VIDEO_FPS,
                "frames_indices": list(range(len(video)))}
        inputs = processor(text=[prompt], videos=[video], video_metadata=[meta], do_sample_frames=False,
                           return_tensors="pt")
    else:
        inputs = processor(text=[prompt], images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
