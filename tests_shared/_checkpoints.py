"""Tiny random-weight GLM-4.1V / GLM-4.5V checkpoints that vLLM and SGLang can serve on a CPU (shared by
tests_vllm/ and tests_sglang/, whose conftests put this folder on sys.path).

transformers writes the model from a small config; the tokenizer is a WordLevel vocabulary holding GLM-4V's
special tokens and a few hundred words, and the processor configs cap images and videos at a few hundred
patches so that the engines' profiling runs stay small. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>",
                  "[UNK]"]
WORDS = ["describe", "the", "image", "video", "and", "a", "of", "what", "is", "in", "this", "picture", "seconds",
         "compare", "two", "images"] + [f"{n}.{d}" for n in range(40) for d in range(10)] + [str(n) for n in range(100)]

# Small vision tower (head dim 16, a 4x4 position table), merger width = the text width.
VISION = dict(depth=2, hidden_size=64, num_heads=4, out_hidden_size=128, intermediate_size=96, image_size=56,
              patch_size=14, spatial_merge_size=2, temporal_patch_size=2, rms_norm_eps=1e-5)
# Text head dim 64 (vLLM's CPU attention takes it); mrope sections sum to the rotary half (64 * 0.5 / 2).
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                             "partial_rotary_factor": 0.5})
MOE = dict(head_dim=64, use_qk_norm=False, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
           n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
           routed_scaling_factor=1.0)

# Images up to 112x112 (64 patches), videos up to 4 frames of 112x112.
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 28 * 28, 112 * 112
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 28 * 28, 112 * 112 * 4


def vocabulary() -> dict[str, int]:
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}


def _tokenizer(vocab: dict[str, int]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:-1]})
    return fast


def _token_ids(vocab: dict[str, int]) -> dict[str, int]:
    return dict(image_token_id=vocab["<|image|>"], video_token_id=vocab["<|video|>"],
                image_start_token_id=vocab["<|begin_of_image|>"], image_end_token_id=vocab["<|end_of_image|>"],
                video_start_token_id=vocab["<|begin_of_video|>"], video_end_token_id=vocab["<|end_of_video|>"])


def build_config(kind: str):
    """A transformers config for a tiny "glm4v" (GLM-4.1V) or "glm4v_moe" (GLM-4.5V) model."""
    vocab = vocabulary()
    special = dict(vocab_size=len(vocab), eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    if kind == "glm4v":
        from transformers import Glm4vConfig
        return Glm4vConfig(text_config={**TEXT, **special}, vision_config=dict(VISION), **_token_ids(vocab))
    if kind == "glm4v_moe":
        from transformers import Glm4vMoeConfig
        return Glm4vMoeConfig(text_config={**TEXT, **MOE, **special}, vision_config=dict(VISION),
                              **_token_ids(vocab))
    raise ValueError(f"kind must be 'glm4v' or 'glm4v_moe', got {kind!r}")


def write_checkpoint(path: str | os.PathLike, kind: str = "glm4v", seed: int = 0, std: float = 0.05) -> str:
    """Write a tiny checkpoint (config, float32 safetensors weights, tokenizer, processor) into `path`."""
    from transformers import (AutoModelForImageTextToText, Glm4vImageProcessor, Glm4vProcessor,
                              Glm4vVideoProcessor)

    path = os.fspath(path)
    config = build_config(kind)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        # Wider than the 0.02 init so that the vision tokens visibly steer the greedy tokens.
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std if "visual" not in name else 0.2)
    model.save_pretrained(path)
    image_processor = Glm4vImageProcessor(size={"shortest_edge": IMAGE_MIN_PIXELS,
                                                "longest_edge": IMAGE_MAX_PIXELS})
    video_processor = Glm4vVideoProcessor(size={"shortest_edge": VIDEO_MIN_PIXELS,
                                                "longest_edge": VIDEO_MAX_PIXELS},
                                          max_image_size={"longest_edge": VIDEO_MAX_PIXELS}, num_frames=4)
    processor = Glm4vProcessor(image_processor=image_processor, tokenizer=_tokenizer(vocabulary()),
                               video_processor=video_processor)
    processor.save_pretrained(path)
    # transformers 4's file too: `glm4v-fast serve --checkpoint` reads its processor limits from it.
    image_processor.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": vocabulary()["<|endoftext|>"], "do_sample": False}, f)
    return path
