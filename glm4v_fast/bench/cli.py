"""The command: arguments, the run in order (peaks, encoder workloads, sweeps), the JSON and PNG files."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata as md
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from .. import attention as attn_dispatch
from ..config import VisionConfig
from ..pipeline import default_device
from .encoder import run_encoder_workload
from .models import build_models, import_transformers
from .report import evaluate_targets, finite, format_tables, write_plot
from .sweeps import run_attention_sweep, run_kernel_sweep
from .timing import measure_peaks
from .workloads import WORKLOAD_NAMES, small_config, workloads

DESCRIPTION = "`glm4v-fast bench`: the encoder against transformers, the kernel and attention sweeps, device peaks."


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _command_line(args) -> str:
    """The canonical command for these settings (reproducible, whatever entry point was used)."""
    parts = ["glm4v-fast", "bench", "--small" if args.small else "--full", "--device", str(args.device),
             "--workloads", ",".join(args.workloads), "--repeats", str(args.repeats), "--out", str(args.out),
             "--attn-backend", args.attn_backend, "--kernels", args.kernels, "--seed", str(args.seed)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    parts += [flag for flag, on in (("--no-hf", args.no_hf), ("--kernels-only", args.kernels_only),
                                    ("--encoder-only", args.encoder_only), ("--no-plot", args.no_plot)) if on]
    env = "TRITON_INTERPRET=1 " if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return env + " ".join(parts)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from ..model import KERNEL_CHOICES

    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", dest="small", action="store_true", default=None,
                      help="small tower (depth 2, hidden 128), grids / 4, fp32 (default on CPU)")
    size.add_argument("--full", dest="small", action="store_false",
                      help="the GLM-4.1V tower on the real workload sizes, bf16 on GPU (default on CUDA)")
    p.add_argument("--workloads", default=",".join(WORKLOAD_NAMES),
                   help=f"comma-separated subset of {','.join(WORKLOAD_NAMES)} (default: all)")
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda when available)")
    p.add_argument("--out", default="bench/results", metavar="DIR",
                   help="where <date>-<device>.json and its PNG go (default bench/results)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (its fields are null)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement, median reported (default 10 on "
                                               "GPU, x5 for the microsecond kernel and attention timings; 3 on CPU)")
    p.add_argument("--kernels-only", action="store_true",
                   help="skip the encoder workloads (peaks, kernel and attention sweeps only)")
    p.add_argument("--encoder-only", action="store_true",
                   help="skip the kernel and attention sweeps (e.g. the full tower on a CPU, where they take long)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--attn-backend", default="auto", choices=("auto",) + attn_dispatch.BACKENDS,
                   help="VisionModel attn_backend for the encoder workloads (default auto)")
    p.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                   help="VisionModel kernels for the encoder workloads (default auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice); on a shared "
                                               "machine 1 avoids stalls of threads waiting for busy cores")
    p.add_argument("--seed", type=int, default=0, help="weights seed; workload i uses seed + 1 + i for its "
                                                        "pixel_values (default 0)")


def run_bench(args) -> int:
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    args.device = str(device)
    if args.small is None:
        args.small = device.type != "cuda"
    names = [n.strip() for n in args.workloads.split(",") if n.strip()] if isinstance(args.workloads, str) \
        else list(args.workloads)
    args.workloads = names
    selected = workloads(args.small, names)                    # validates the names
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 10 if device.type == "cuda" else 3
    if args.kernels_only and args.encoder_only:
        raise ValueError("--kernels-only and --encoder-only exclude each other")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    mode = "small" if args.small else "full"
    config = small_config() if args.small else VisionConfig()
    # bf16 is what the encoder serves in on a GPU; CPUs have no fast bf16 matmul, so fp32 there.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with_hf = not args.no_hf and not args.kernels_only
    # Fail before any measurement: a missing transformers, kernels or attention backend that cannot run here.
    if with_hf:
        import_transformers()
    if not args.kernels_only:
        from ..model import select_ops

        select_ops(args.kernels, device)
        attn_dispatch.resolve_backend(args.attn_backend, device)
    notes: list[str] = []
    errors: list[str] = []
    if device.type == "cpu":
        notes.append(f"CPU run{' with small shapes' if args.small else ''}: absolute numbers mean little; "
                     "compare ratios")

    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"glm4v-fast bench: {device_name(device)}, {mode} shapes, {dtype}; measuring peaks ...", flush=True)
    with torch.inference_mode():
        peaks = measure_peaks(device, dtype, args.repeats)
        encoder_rows: list[dict] = []
        kernels_used = attn_used = None
        if not args.kernels_only:
            ours, hf = build_models(config, device, dtype, args.attn_backend, args.kernels, with_hf, args.seed)
            kernels_used, attn_used = ours.resolved()
            for wl in selected:
                print(f"  encoder {wl.name}: {wl.images} item(s), {wl.patches} patches ...", flush=True)
                seed = args.seed + 1 + WORKLOAD_NAMES.index(wl.name)
                encoder_rows.append(run_encoder_workload(wl, ours, hf, config, device, dtype, args.repeats,
                                                         peaks["bf16_tflops"], seed, errors, notes))
            del ours, hf
            if device.type == "cuda":
                torch.cuda.empty_cache()
        kernel_rows: list[dict] = []
        attention_rows: list[dict] = []
        if not args.encoder_only:
            print("  kernel sweep ...", flush=True)
            kernel_rows = run_kernel_sweep(config, mode, dtype, device, args.repeats, peaks["hbm_tbps"], notes,
                                           errors)
            print("  attention sweep ...", flush=True)
            attention_rows = run_attention_sweep(config, mode, dtype, device, args.repeats, notes, errors)

    result = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn", "flash_attn", "flash_attn_3", "flash-attn-3"),
        "transformers": _version("transformers"),
        "date": started.date().isoformat(),
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "command": _command_line(args),
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        "config": dataclasses.asdict(config),
        "kernels_used": kernels_used,
        "attn_backend_used": attn_used,
        "repeats": args.repeats,
        "timing": ("CUDA events, median of --repeats calls after warmup; encoder calls each start on an idle "
                   "stream; kernels run back to back after an L2 flush" if device.type == "cuda" else
                   "perf_counter wall time, median of --repeats calls after warmup"),
        "memory_note": ("peak MiB = torch.cuda.max_memory_allocated during one call minus what was allocated "
                        "before it" if device.type == "cuda" else "peak memory is not measured on CPU"),
        "peaks": peaks,
        "encoder": encoder_rows,
        "kernels": kernel_rows,
        "attention": attention_rows,
        "targets_apply": mode == "full" and device.type == "cuda",
        "notes": notes,
        "errors": errors,
    }
    result["targets"] = evaluate_targets(encoder_rows, kernel_rows)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['date']}-{_slug(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu')}"
    stem += "-small" if args.small else ""
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    result["plot"] = None
    if not args.no_plot:
        try:
            write_plot(result, png_path)
            result["plot"] = png_path.name
        except ImportError:
            notes.append("plot: matplotlib is missing (pip install 'glm4v-fast[plot]'); no PNG written")
    result = finite(result, errors)
    result["errors"] = errors
    json_path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    print()
    print(format_tables(result))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if result["plot"] else ""))
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm4v_fast.bench", description=DESCRIPTION)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"glm4v-fast bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
