"""glm4v-fast's tower vs vLLM's own GLM-4V tower, in one vLLM process, on one image; JSON under bench/results/.

    PYTHONPATH=tests_vllm/cpu_wheels .venv-vllm/bin/python bench/vllm_tower.py --dtype bfloat16 --depth 24

Runs in the vLLM test environment (`make test-vllm` builds it). vLLM builds a GLM-4.1V model from a config with
random weights (`load_format="dummy"`, its CPU path then repacks its linear weights for oneDNN as for a real
checkpoint) and keeps its own tower; glm4v-fast's tower (the plugin's VllmVisionTower, with vLLM's input_norm)
is built beside it at the same width and depth. Both take the same 0-255 pixel rows; calls alternate, median of
--repeats after one warm-up each. The language model is one small layer: only the towers are timed. For the
plugin's CPU default, bench/cpu_towers.py is the measurement (more workloads and repeats, the compiled path, ranges).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")    # the model lives in this process
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests_shared"))

import torch  # noqa: E402


def write_config_checkpoint(path: str, depth: int, side: int) -> None:
    """config.json (GLM-4.1V's vision tower at `depth`, a 1-layer text model of the merger's width), tokenizer and
    processor capped at side x side pixels; no weights (vLLM's dummy loader makes them)."""
    from transformers import Glm4vConfig, Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    from _checkpoints import _token_ids, _tokenizer, vocabulary

    vocab = vocabulary()
    text = dict(hidden_size=4096, intermediate_size=512, num_hidden_layers=1, num_attention_heads=32,
                num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=4096,
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12],
                                 "partial_rotary_factor": 0.5})
    Glm4vConfig(text_config=text, vision_config={"depth": depth}, **_token_ids(vocab)).save_pretrained(path)
    limits = {"shortest_edge": 28 * 28, "longest_edge": side * side}
    Glm4vProcessor(image_processor=Glm4vImageProcessor(size=limits), tokenizer=_tokenizer(vocab),
                   video_processor=Glm4vVideoProcessor(size=limits, max_image_size={"longest_edge": side * side})
                   ).save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--depth", type=int, default=24, help="tower blocks (GLM-4.1V: 24); width stays full")
    parser.add_argument("--side", type=int, default=448, help="image side in pixels (multiple of 28)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if args.side % 28:
        raise SystemExit("--side must be a multiple of 28")

    from importlib import metadata

    from vllm import LLM

    import glm4v_fast
    from glm4v_fast.config import VisionConfig
    from glm4v_fast.integrations.vllm.tower import VllmVisionTower

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as ckpt:
        write_config_checkpoint(ckpt, args.depth, args.side)
        llm = LLM(model=ckpt, load_format="dummy", dtype=args.dtype, enforce_eager=True, max_model_len=2048,
                  max_num_seqs=1, limit_mm_per_prompt={"image": 1, "video": 0}, kv_cache_memory_bytes=64 * 2**20,
                  additional_config={"glm4v_fast": False})
        model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        theirs = model.visual
        ours = VllmVisionTower(VisionConfig.from_dict(model.config.vision_config.to_dict()),
                               input_norm=theirs.input_norm).to(dtype).eval()

        grid_side = args.side // 14
        grid = torch.tensor([[1, grid_side, grid_side]])
        pixels = torch.randint(0, 256, (grid_side * grid_side, 1176), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        times = {"vllm": [], "glm4v_fast": []}
        towers = {"vllm": theirs, "glm4v_fast": ours}
        with torch.inference_mode():
            for name, tower in towers.items():
                out = tower(pixels, grid_thw=grid)                  # warm-up
                assert out.shape == (grid_side * grid_side // 4, model.config.vision_config.out_hidden_size)
            for _ in range(args.repeats):
                for name, tower in towers.items():
                    start = time.perf_counter()
                    tower(pixels, grid_thw=grid)
                    times[name].append((time.perf_counter() - start) * 1e3)
        kernels, attention = ours.resolved()

    vllm_ms, ours_ms = statistics.median(times["vllm"]), statistics.median(times["glm4v_fast"])
    now = dt.datetime.now(dt.timezone.utc)
    device = "cpu" if not torch.cuda.is_available() else "cuda"
    result = {
        "device": (torch.cuda.get_device_name() if device == "cuda" else
                   f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads)"),
        "device_type": device, "date": now.date().isoformat(), "timestamp_utc": now.isoformat(timespec="seconds"),
        "command": "PYTHONPATH=tests_vllm/cpu_wheels .venv-vllm/bin/python bench/vllm_tower.py "
                   + " ".join(sys.argv[1:]),
        "versions": {"torch": torch.__version__, "vllm": glm4v_fast.integrations.vllm.installed_vllm_version(),
                     "transformers": metadata.version("transformers"), "glm4v_fast": metadata.version("glm4v-fast")},
        "dtype": args.dtype, "depth": args.depth, "width": "GLM-4.1V (hidden 1536, 12 heads, merger 4096)",
        "image": f"{args.side}x{args.side}", "patches": int(grid.prod()), "repeats": args.repeats,
        "timing": "perf_counter wall time per tower call, calls alternating, median after one warm-up each",
        "glm4v_fast": {"kernels": kernels, "attention": attention},
        "vllm_tower_ms": vllm_ms, "glm4v_fast_tower_ms": ours_ms, "speedup_vs_vllm": vllm_ms / ours_ms,
        "all_ms": times,
        "notes": ["random weights (vLLM's dummy loader; glm4v-fast's own init): timing only, the outputs' "
                  "equality is tested in tests_vllm"],
    }
    os.makedirs(args.out, exist_ok=True)
    name = f"{result['date']}-vllm-{device}-{args.dtype}-depth{args.depth}.json"
    with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("device", "dtype", "depth", "vllm_tower_ms", "glm4v_fast_tower_ms",
                                             "speedup_vs_vllm")}))
    print("wrote", os.path.join(args.out, name))


if __name__ == "__main__":
    main()
