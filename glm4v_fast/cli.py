"""The `glm4v-fast` command: demo, encode, info, serve, bench.

Only the standard library and the option names (glm4v_fast.options) are imported at module level: torch, PIL
and the server or bench stacks are imported by the command that needs them, so that `--help` and argument errors
are quick.
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

from .options import ATTN_BACKENDS, COMPILE_CHOICES, DEFAULT_MAX_IMAGE_PIXELS, DTYPE_NAMES, KERNEL_CHOICES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
# Package data (pyproject.toml), so the demo works after a normal install.
EXAMPLES = Path(__file__).resolve().parent / "example_images"
# The demo's agreement with the float32 reference: float32 within this relative error (docs/design.md §7); bf16 and
# fp16 within twice the error of the reference itself run in that dtype, plus this much.
DEMO_FLOAT32_TOLERANCE = 1e-5
DEMO_REDUCED_SLACK = 1e-3


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a GLM-4V checkpoint dir (full GLM-4.1V/4.5V/4.6V or save_pretrained output); "
                        "default: the GLM-4.1V architecture with seeded random weights")
    p.add_argument("--device", help="cpu, cuda, cuda:1, gpu (= cuda) ... (default: cuda when available); a "
                                    "device this machine lacks is an error")
    p.add_argument("--dtype", choices=("auto",) + DTYPE_NAMES, default="auto",
                   help="the model's compute dtype; default auto: the checkpoint's stored dtype (bfloat16 for GLM-4V "
                        "checkpoints and random weights) where the device computes it natively (CUDA; CPUs with "
                        "AMX or AVX512-BF16), else float32; the choice and its reason are printed")
    p.add_argument("--attn-backend", choices=("auto",) + ATTN_BACKENDS, default="auto",
                   help="attention implementation (default auto: the fastest available on the device)")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="norm/rotary/MLP kernels (default auto: Triton on CUDA, PyTorch elsewhere)")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help="the compiled CPU path (torch.compile; default auto: on a CPU in float32 and bfloat16, "
                        "where it was measured faster; the first call compiles, cached on disk)")


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

    from .pipeline import create_glm4v_vision_encoder, resolve_device
    from .precision import auto_dtype

    limit = {"max_image_pixels": args.max_image_pixels} if "max_image_pixels" in args else {}
    choice = auto_dtype(resolve_device(args.device), args.checkpoint) if args.dtype in (None, "auto") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the random-weights notice is printed by the command itself
        config, model, processor = create_glm4v_vision_encoder(
            checkpoint=args.checkpoint, device=args.device, dtype=choice.dtype if choice else args.dtype,
            attn_backend=args.attn_backend, kernels=args.kernels, compile=args.compile, **limit)
        if "max_image_pixels" in args and args.max_image_pixels is None:
            processor.max_image_pixels = None       # create_... reads None as "the processor's default"
    weights = args.checkpoint or "RANDOM weights (seeded; GLM-4.1V architecture; embeddings are meaningless)"
    kernels, backend = model.resolved()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {weights}")
    print(f"       device={model.device} dtype={str(model.dtype).removeprefix('torch.')} kernels={kernels} "
          f"attention={backend} compiled={'yes' if model.compiled()[0] else 'no'} torch={torch.__version__}")
    if choice is not None:
        print(f"       {choice.message()}")
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
    reduced = model.dtype != torch.float32

    # The slow reference path, same weights, in float32 on the CPU: the agreement column. In bf16/fp16 the
    # reference also runs in the model's dtype on its device, to show how far that precision alone moves it.
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    reference = ReferenceVisionModel(config).eval()
    reference.load_state_dict({k: v.float().cpu() for k, v in weights.items()})
    reference_reduced = None
    if reduced:
        reference_reduced = ReferenceVisionModel(config).to(model.dtype).to(model.device).eval()
        reference_reduced.load_state_dict(weights)

    from PIL import Image

    print(f"\n{'image':<26} {'size':>9} {'grid (t,h,w)':>14} {'tokens':>7} {'embedding':>13} {'time':>9} "
          f"{'max rel err vs reference':>25}")
    worst = []          # (error, allowed) per image
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
            err = _rel_err(emb, expected)
            allowed = DEMO_FLOAT32_TOLERANCE
            if reference_reduced is not None:
                own = reference_reduced(batch["pixel_values"].to(model.device, model.dtype), batch["image_grid_thw"])
                allowed = 2 * _rel_err(own, expected) + DEMO_REDUCED_SLACK
        worst.append((err, allowed))
        grid = tuple(batch["image_grid_thw"][0].tolist())
        print(f"{path.name:<26} {size:>9} {str(grid):>14} {emb.shape[0]:>7} {str(tuple(emb.shape)):>13} "
              f"{elapsed * 1e3:>7.0f}ms {err:>25.2e}")
    passed = all(err <= allowed for err, allowed in worst)
    print(_demo_verdict(args, model, passed, max(err for err, _ in worst), reduced))
    return 0 if passed else 1


def _rel_err(got, expected) -> float:
    got, expected = got.float().cpu(), expected.float().cpu()
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _demo_verdict(args, model, passed: bool, worst: float, reduced: bool) -> str:
    """The demo's last line: what the table showed, and what to try next."""
    dtype = str(model.dtype).removeprefix("torch.")
    rule = (f"twice the error of the reference itself in {dtype}, + {DEMO_REDUCED_SLACK:g}" if reduced
            else f"{DEMO_FLOAT32_TOLERANCE:g}")
    shown = (f"{'PASS' if passed else 'FAIL'}: the fast encoder {'agrees' if passed else 'does NOT agree'} with the "
             f"float32 reference (worst max relative error {worst:.1e}; tolerance: {rule}) on {model.device.type} "
             f"in {dtype}")
    steps = []
    if args.checkpoint is None:
        steps.append("a real checkpoint (--checkpoint DIR)")
    steps.append("--dtype float32 (the exact path)" if reduced else "--dtype bfloat16 (faster on GPUs and on CPUs "
                                                                    "with AMX or AVX512-BF16)")
    steps.append("the server: glm4v-fast serve" + (" --checkpoint DIR" if args.checkpoint is None else
                                                    f" --checkpoint {args.checkpoint}"))
    return f"{shown}. Next: {'; '.join(steps)}."


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
            from .imageio import check_local_path

            check_local_path(item, "input")  # raises: a URL (nothing is downloaded), else a missing file
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

    from .pipeline import GLM4VEmbeddingPipeline
    from .progress import ProgressBar, block_progress
    from .weights import save_safetensors

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
            # Moved on by each block of the tower, so that a batch minutes long on a CPU shows progress and a rate.
            with ProgressBar(len(images), "image", "encoding images") as bar:
                # Errors call each image by its file: the CLI user never sees the list's numbering.
                for result in pipe.iter_image_embeddings(images, batch_size=args.batch_size, skip_bad=True,
                                                         progress=bar.to, names=[f"image {p!r}" for p in images]):
                    path = images[result.index]
                    if result.error is not None:
                        failed[path] = result.error
                    else:
                        tensors[path] = result.embedding.to("cpu", out_dtype).clone()
                        tensors[f"{path}::grid_thw"] = result.grid_thw.cpu().clone()
                        tokens["image"] += result.embedding.shape[0]
                        done.append(path)
        images_end = time.perf_counter()
        with ProgressBar(len(videos), "video", "encoding videos", disable=not videos) as bar:
            for k, path in enumerate(videos):
                try:
                    with block_progress(model, lambda fraction: bar.to(k + fraction)):
                        out = pipe.extract_video_embeddings(path, return_dict=True)
                except Exception as exc:        # as for images: report it and go on with the rest
                    failed[path] = f"{type(exc).__name__}: {exc}"
                    continue
                finally:
                    bar.to(k + 1)
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
    save_safetensors(tensors, args.out, metadata)

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
    print(f"triton kernels: {_triton_line(kernels, device)}")
    print(f"attention backends on {device}: {', '.join(available_backends(device))}")
    return 0


def _triton_line(kernels, device: str) -> str:
    """Where the Triton kernels run in this process, and what runs instead where they do not."""
    if not kernels.triton_available():
        return "not installed: the PyTorch kernels run on every device"
    if device == "cuda":
        return "run on cuda (the default kernels there)"
    if kernels.can_run_on(device):
        return (f"run on {device} in triton's interpreter (TRITON_INTERPRET=1: slow, for tests); the default "
                f"kernels on {device} are PyTorch's")
    return (f"installed, but they run on CUDA devices only and this machine has none: on {device} the PyTorch "
            f"kernels run (TRITON_INTERPRET=1 runs the Triton ones in an interpreter, slowly, for tests)")


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
