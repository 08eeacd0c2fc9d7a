"""The `glm4v-fast` command: demo, encode, info, serve, bench.

Only the standard library is imported at module level: torch, PIL and the server or bench stacks are imported by
the command that needs them, so that `--help` and argument errors are quick.
"""
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
# Package data (pyproject.toml), so the demo works after a normal install; examples/images links here.
EXAMPLES = Path(__file__).resolve().parent / "example_images"
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970      # imageio.DEFAULT_MAX_IMAGE_PIXELS (PIL's own hard limit)
ATTN_BACKENDS = ("auto", "flash_attn", "torch_varlen", "triton", "sdpa")   # attention.BACKENDS, without importing it
KERNELS = ("auto", "triton", "torch")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a GLM-4V checkpoint dir (full GLM-4.1V/4.5V/4.6V or save_pretrained output); "
                        "default: the GLM-4.1V architecture with seeded random weights")
    p.add_argument("--device", help="cpu, cuda, cuda:1, gpu (= cuda) ... (default: cuda when available); a "
                                    "device this machine lacks is an error")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="the model's compute dtype; default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--attn-backend", choices=ATTN_BACKENDS, default="auto",
                   help="attention implementation (default auto: the fastest available on the device)")
    p.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="norm/rotary/MLP kernels (default auto: Triton on CUDA, PyTorch elsewhere)")


def _pixel_limit(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels or 'none', got {value!r}")
    return limit


def _encoder(args):
    import torch

    from .pipeline import create_glm4v_vision_encoder

    limit = {"max_image_pixels": args.max_image_pixels} if "max_image_pixels" in args else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the random-weights notice is printed by the command itself
        config, model, processor = create_glm4v_vision_encoder(checkpoint=args.checkpoint, device=args.device,
                                                               dtype=args.dtype, attn_backend=args.attn_backend,
                                                               kernels=args.kernels, **limit)
        if "max_image_pixels" in args and args.max_image_pixels is None:
            processor.max_image_pixels = None       # create_... reads None as "the processor's default"
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
    """Files named by the arguments, in order, each file once however it is spelt (relative, absolute, ./x,
    through a symlink): the first spelling is its key in the output."""
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
    unique: dict[str, str] = {}
    for f in found:
        unique.setdefault(os.path.realpath(f), f)
    return list(unique.values())


ENCODE_EPILOG = """\
A bad input (corrupt, truncated or empty file, too many pixels, aspect ratio
over 200, undecodable video) does not stop the run: everything else is encoded
and written, each failed input is listed on stderr with its reason (and in the
file's metadata under "failed"), and the exit status is 1. Missing inputs and
bad options are argument errors (exit status 2, nothing is encoded). Ctrl-C
writes what is finished (exit status 130). This is what --skip-bad does in
examples/ray_embed_dir.py (the Ray example), here always on.

Output: one tensor per input, keyed by the path as first named (a file named
several ways is encoded once), plus '<path>::grid_thw' and, for videos,
'<path>::timestamps'. Embeddings are stored as --out-dtype (default float32,
whatever --dtype the model computed in: bfloat16 and float16 values convert to
float32 exactly); the metadata records both dtypes.
"""


def cmd_encode(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .pipeline import GLM4VEmbeddingPipeline

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must name a .safetensors file, got {args.out!r}")
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a directory")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    files = _expand_inputs(args.inputs)
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    videos = [f for f in files if f.lower().endswith(VIDEO_SUFFIXES)]
    _, model, processor = _encoder(args)
    pipe = GLM4VEmbeddingPipeline(model, processor)
    out_dtype = getattr(torch, args.out_dtype)

    tensors: dict[str, torch.Tensor] = {}
    done: list[str] = []
    failed: dict[str, str] = {}
    tokens = {"image": 0, "video": 0}
    start = time.perf_counter()
    images_end = None
    interrupted = False
    try:
        if images:
            with tqdm(total=len(images), unit="image", desc="encoding images") as bar:
                for result in pipe.iter_image_embeddings(images, batch_size=args.batch_size, skip_bad=True):
                    path = images[result.index]
                    if result.error is not None:
                        failed[path] = result.error
                    else:
                        tensors[path] = result.embedding.to("cpu", out_dtype).clone()
                        tensors[f"{path}::grid_thw"] = result.grid_thw.cpu().clone()
                        tokens["image"] += result.embedding.shape[0]
                        done.append(path)
                    bar.update(1)
        images_end = time.perf_counter()
        for path in tqdm(videos, unit="video", desc="encoding videos", disable=not videos):
            try:
                out = pipe.extract_video_embeddings(path, return_dict=True)
            except Exception as exc:        # as for images: report it and go on with the rest
                failed[path] = f"{type(exc).__name__}: {exc}"
                continue
            tensors[path] = out["embeddings"][0].to("cpu", out_dtype).clone()
            tensors[f"{path}::grid_thw"] = out["grid_thw"][0].clone()
            tensors[f"{path}::timestamps"] = torch.tensor(out["timestamps"][0], dtype=torch.float64)
            tokens["video"] += out["embeddings"][0].shape[0]
            done.append(path)
    except KeyboardInterrupt:
        interrupted = True
    seconds = time.perf_counter() - start
    image_seconds = (images_end or time.perf_counter()) - start

    model_dtype = str(model.dtype).removeprefix("torch.")
    metadata = {"inputs": json.dumps(done), "failed": json.dumps(failed),
                "checkpoint": args.checkpoint or "random-weights", "dtype": args.out_dtype, "model_dtype": model_dtype,
                "format": "glm4v-fast embeddings: key=input path; '<path>::grid_thw' and '<path>::timestamps'"}
    _save(tensors, args.out, metadata)

    for path, reason in failed.items():
        print(f"glm4v-fast encode: failed: {path}: {reason}", file=sys.stderr)
    n_images = sum(1 for p in done if p.lower().endswith(IMAGE_SUFFIXES))
    n_videos = len(done) - n_images
    rate = f", {n_images / image_seconds:.2f} images/s" if n_images and image_seconds > 0 else ""
    print(f"encoded {n_images} images ({tokens['image']} tokens) and {n_videos} videos ({tokens['video']} tokens) "
          f"in {seconds:.2f} s{rate}; {len(failed)} failed")
    print(f"wrote {len(done)} embeddings ({args.out_dtype}; model ran in {model_dtype}) to {args.out}")
    if interrupted:
        print(f"glm4v-fast encode: interrupted: {len(files) - len(done) - len(failed)} inputs not encoded",
              file=sys.stderr)
        return 130
    return 1 if failed else 0


def _save(tensors: dict, path: str, metadata: dict[str, str]) -> None:
    """Write through a temporary file in the same folder, so that a crash never leaves a half-written output."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `command`, the serve and bench modules are imported only if it names them
    (their imports cost seconds that `--help` and the other commands need not pay)."""
    parser = argparse.ArgumentParser(prog="glm4v-fast", description="The GLM-4V vision encoder, fast and exact.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.glm4v_command = command     # read by _add_optional_command

    p = sub.add_parser("demo", help="encode the example images and compare with the reference path")
    _add_model_arguments(p)
    p.add_argument("--images", default=str(EXAMPLES), help="a directory of images (default: the bundled examples)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("encode", help="encode images and videos into a .safetensors file",
                       description="Encode images and videos into a .safetensors file.", epilog=ENCODE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="files, directories (searched recursively) or globs of images and videos")
    p.add_argument("--out", required=True, metavar="FILE.safetensors")
    p.add_argument("--batch-size", type=int, default=8, help="images per packed forward (default 8)")
    p.add_argument("--out-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the embeddings are stored in (default float32)")
    p.add_argument("--max-image-pixels", type=_pixel_limit, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"refuse images and video frames with more pixels (decompression bombs); 'none': no "
                        f"limit (default {DEFAULT_MAX_IMAGE_PIXELS})")
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
    selected = getattr(sub, "glm4v_command", None)
    if selected is not None and selected != name:
        return          # another command runs: its options are never parsed
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
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    args = build_parser(command).parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()      # here, so that a closed pipe (`glm4v-fast info | head -1`) is caught below
        return code
    except (ValueError, FileNotFoundError) as e:
        print(f"glm4v-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away: stop quietly, and point stdout at devnull so that the interpreter's final
        # flush does not raise again (the recipe in Python's `signal` documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141      # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
