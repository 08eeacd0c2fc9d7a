"""The `glm4v-fast` command: demo, encode, info, serve, bench."""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a GLM-4V checkpoint dir (full GLM-4.1V/4.5V/4.6V or save_pretrained output); "
                        "default: the GLM-4.1V architecture with seeded random weights")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")


def _encoder(args):
    import torch

    from .pipeline import create_glm4v_vision_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the random-weights notice is printed by the command itself
        config, model, processor = create_glm4v_vision_encoder(checkpoint=args.checkpoint, device=args.device,
                                                               dtype=args.dtype)
    weights = args.checkpoint or "RANDOM weights (seeded; GLM-4.1V architecture; embeddings are meaningless)"
    kernels, backend = model.resolved()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {weights}")
    print(f"       device={model.device} dtype={str(model.dtype).removeprefix('torch.')} kernels={kernels} "
          f"attention={backend} torch={torch.__version__}")
    return config, model, processor


# --------------------------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    import torch

    from .pipeline import GLM4VEmbeddingPipeline
    from .reference import ReferenceVisionModel

    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if Path(args.images).is_dir() else []
    if not paths:
        raise ValueError(f"no example images in {args.images}")
    config, model, processor = _encoder(args)
    pipe = GLM4VEmbeddingPipeline(model, processor)

    # The slow reference path, same weights, in float32 on the CPU: the agreement column.
    reference = ReferenceVisionModel(config).eval()
    reference.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})

    from PIL import Image

    print(f"\n{'image':<26} {'size':>9} {'grid (t,h,w)':>14} {'tokens':>7} {'embedding':>13} {'time':>9} "
          f"{'max rel err vs reference':>25}")
    for path in paths:
        with Image.open(path) as im:
            size = f"{im.width}x{im.height}"
        batch = processor(images=[str(path)])
        start = time.perf_counter()
        (emb,) = pipe.extract_image_embeddings([str(path)])
        if emb.is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        with torch.inference_mode():
            expected = reference(batch["pixel_values"], batch["image_grid_thw"])
        err = ((emb.float().cpu() - expected).abs().max() / expected.abs().max()).item()
        grid = tuple(batch["image_grid_thw"][0].tolist())
        print(f"{path.name:<26} {size:>9} {str(grid):>14} {emb.shape[0]:>7} {str(tuple(emb.shape)):>13} "
              f"{elapsed * 1e3:>7.0f}ms {err:>25.2e}")
    return 0


# --------------------------------------------------------------------------------------------------- encode
def _expand_inputs(inputs: list[str]) -> list[str]:
    found: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found += sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {item!r}")
            found += [m for m in matches if os.path.isfile(m)]
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise FileNotFoundError(f"input {item!r} does not exist")
    unknown = [f for f in found if not f.lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES)]
    if unknown:
        raise ValueError(f"not an image or video file (by extension): {unknown[0]}")
    if not found:
        raise ValueError("no image or video files among the inputs")
    return list(dict.fromkeys(found))


def cmd_encode(args) -> int:
    import torch
    from safetensors.torch import save_file

    from .pipeline import GLM4VEmbeddingPipeline

    files = _expand_inputs(args.inputs)
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    videos = [f for f in files if f.lower().endswith(VIDEO_SUFFIXES)]
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must name a .safetensors file, got {args.out!r}")
    _, model, processor = _encoder(args)
    pipe = GLM4VEmbeddingPipeline(model, processor)
    tensors: dict[str, torch.Tensor] = {}
    if images:
        out = pipe.extract_image_embeddings(images, return_dict=True, batch_size=args.batch_size, progress=True)
        for path, emb, grid in zip(images, out["embeddings"], out["grid_thw"]):
            tensors[path] = emb.float().cpu()
            tensors[f"{path}::grid_thw"] = grid.clone()
    if videos:
        from tqdm.auto import tqdm

        for path in tqdm(videos, unit="video", desc="encoding videos"):
            out = pipe.extract_video_embeddings(path, return_dict=True)
            tensors[path] = out["embeddings"][0].float().cpu()
            tensors[f"{path}::grid_thw"] = out["grid_thw"][0].clone()
            tensors[f"{path}::timestamps"] = torch.tensor(out["timestamps"][0], dtype=torch.float64)
    metadata = {"inputs": json.dumps(images + videos), "checkpoint": args.checkpoint or "random-weights",
                "format": "glm4v-fast embeddings: key=input path; '<path>::grid_thw' and '<path>::timestamps'"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {len(images)} image and {len(videos)} video embeddings to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    import importlib.metadata as md
    import platform

    import torch

    from . import __version__, kernels
    from .attention import available_backends
    from .pipeline import default_device

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    device = default_device().type
    print(f"glm4v-fast {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  triton {version('triton')}  "
          f"flash-attn {version('flash-attn')}  transformers (test oracle only) {version('transformers')}")
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        print(f"device: cpu ({os.cpu_count()} cores); no CUDA device")
    print(f"triton kernels: {'available' if kernels.triton_available() else 'unavailable'}"
          f"{' (interpreter: TRITON_INTERPRET=1)' if os.environ.get('TRITON_INTERPRET') == '1' else ''}")
    print(f"attention backends on {device}: {', '.join(available_backends(device))}")
    return 0


# --------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4v-fast", description="The GLM-4V vision encoder, fast and exact.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="encode the example images and compare with the reference path")
    _add_model_arguments(p)
    p.add_argument("--images", default=str(EXAMPLES), help="a directory of images (default: the repo's examples)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("encode", help="encode images and videos into a .safetensors file")
    p.add_argument("inputs", nargs="+", help="files, directories or globs of images and videos")
    p.add_argument("--out", required=True, metavar="FILE.safetensors")
    p.add_argument("--batch-size", type=int, default=8, help="images per packed forward (default 8)")
    _add_model_arguments(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("info", help="versions, device and available attention backends")
    p.set_defaults(func=cmd_info)

    _add_optional_command(sub, "serve", "the embedding server (pip install glm4v-fast[serve])", "serving",
                          "add_serve_arguments", "run_server",
                          "the server stack (starlette, uvicorn, prometheus-client)", extra="serve")
    _add_optional_command(sub, "bench", "encoder workloads vs transformers, kernel sweep; writes bench/results JSON",
                          "bench", "add_bench_arguments", "run_bench", "transformers and matplotlib",
                          extra="test,plot")
    return parser


def _add_optional_command(sub, name: str, help: str, module: str, add_arguments: str, run: str, needs: str,
                          extra: str) -> None:
    """A subcommand whose module may need an extra: without it, the command says what to install."""
    p = sub.add_parser(name, help=help)
    try:
        mod = importlib.import_module(f"glm4v_fast.{module}")
    except ImportError:
        p.set_defaults(func=lambda args: _missing(name, needs, extra))
        return
    getattr(mod, add_arguments)(p)
    p.set_defaults(func=getattr(mod, run))


def _missing(command: str, what: str, extra: str) -> int:
    print(f"glm4v-fast {command} needs {what}: pip install 'glm4v-fast[{extra}]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"glm4v-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
