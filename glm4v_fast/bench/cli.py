"""The command, in four steps: the arguments (`plan_from_args`), the run in order (`measure`: peaks, encoder
workloads, sweeps), the JSON and PNG files (`result_record`, `write_result`), the printed tables."""
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
from dataclasses import dataclass, field
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
from .workloads import WORKLOAD_NAMES, Workload, small_config, workloads

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


@dataclass
class BenchPlan:
    """What one run measures, from the arguments with their defaults filled in and checked."""

    device: torch.device
    small: bool
    config: VisionConfig
    dtype: torch.dtype
    workloads: list[Workload]
    repeats: int
    seed: int
    with_hf: bool
    encoder: bool                 # run the encoder workloads
    sweeps: bool                  # run the kernel and attention sweeps
    attn_backend: str
    kernels: str
    command: str                  # the canonical command line of this run

    @property
    def mode(self) -> str:
        return "small" if self.small else "full"


@dataclass
class Measurements:
    peaks: dict
    encoder: list[dict] = field(default_factory=list)
    kernels: list[dict] = field(default_factory=list)
    attention: list[dict] = field(default_factory=list)
    kernels_used: str | None = None
    attn_used: str | None = None
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def plan_from_args(args) -> BenchPlan:
    """Check the arguments and fill in the defaults that depend on the device; fail before any measurement
    when transformers, the kernels or the attention backend cannot run here."""
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    args.device = str(device)
    if args.small is None:
        args.small = device.type != "cuda"
    if isinstance(args.workloads, str):
        args.workloads = [n.strip() for n in args.workloads.split(",") if n.strip()]
    selected = workloads(args.small, args.workloads)                    # validates the names
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
    with_hf = not args.no_hf and not args.kernels_only
    if with_hf:
        import_transformers()
    if not args.kernels_only:
        from ..model import select_ops

        select_ops(args.kernels, device)
        attn_dispatch.resolve_backend(args.attn_backend, device)
    return BenchPlan(
        device=device, small=args.small, config=small_config() if args.small else VisionConfig(),
        # bf16 is what the encoder serves in on a GPU; CPUs have no fast bf16 matmul, so fp32 there.
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        workloads=selected, repeats=args.repeats, seed=args.seed, with_hf=with_hf, encoder=not args.kernels_only,
        sweeps=not args.encoder_only, attn_backend=args.attn_backend, kernels=args.kernels,
        command=_command_line(args))


def measure(plan: BenchPlan) -> Measurements:
    """Peaks, then the encoder workloads, then the sweeps, in one process on one device."""
    device, config, dtype, repeats = plan.device, plan.config, plan.dtype, plan.repeats
    with torch.inference_mode():
        m = Measurements(peaks=measure_peaks(device, dtype, repeats))
        if device.type == "cpu":
            m.notes.append(f"CPU run{' with small shapes' if plan.small else ''}: absolute numbers mean little; "
                           "compare ratios")
        if plan.encoder:
            ours, hf = build_models(config, device, dtype, plan.attn_backend, plan.kernels, plan.with_hf, plan.seed)
            m.kernels_used, m.attn_used = ours.resolved()
            for wl in plan.workloads:
                print(f"  encoder {wl.name}: {wl.images} item(s), {wl.patches} patches ...", flush=True)
                seed = plan.seed + 1 + WORKLOAD_NAMES.index(wl.name)
                m.encoder.append(run_encoder_workload(wl, ours, hf, config, device, dtype, repeats,
                                                      m.peaks["bf16_tflops"], seed, m.errors, m.notes))
            del ours, hf
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if plan.sweeps:
            print("  kernel sweep ...", flush=True)
            m.kernels = run_kernel_sweep(config, plan.mode, dtype, device, repeats, m.peaks["hbm_tbps"], m.notes,
                                         m.errors)
            print("  attention sweep ...", flush=True)
            m.attention = run_attention_sweep(config, plan.mode, dtype, device, repeats, m.notes, m.errors)
    return m


def result_record(plan: BenchPlan, m: Measurements, started: datetime.datetime) -> dict:
    """The JSON record of a run: where and how it ran, what it measured, the targets."""
    cuda = plan.device.type == "cuda"
    targets_apply = plan.mode == "full" and cuda
    return {
        "device": device_name(plan.device),
        "device_type": plan.device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn", "flash_attn", "flash_attn_3", "flash-attn-3"),
        "transformers": _version("transformers"),
        "date": started.date().isoformat(),
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "command": plan.command,
        "mode": plan.mode,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "config": dataclasses.asdict(plan.config),
        "kernels_used": m.kernels_used,
        "attn_backend_used": m.attn_used,
        "repeats": plan.repeats,
        "timing": ("CUDA events, median of --repeats calls after warmup; encoder calls each start on an idle "
                   "stream; kernels run back to back after an L2 flush" if cuda else
                   "perf_counter wall time, median of --repeats calls after warmup"),
        "memory_note": ("peak MiB = torch.cuda.max_memory_allocated during one call minus what was allocated "
                        "before it" if cuda else "peak memory is not measured on CPU"),
        "peaks": m.peaks,
        "encoder": m.encoder,
        "kernels": m.kernels,
        "attention": m.attention,
        "targets_apply": targets_apply,
        "notes": m.notes,
        "errors": m.errors,
        "targets": evaluate_targets(m.encoder, m.kernels, speed_targets=targets_apply),
    }


def write_result(result: dict, out_dir: Path, plan: BenchPlan, plot: bool) -> tuple[dict, Path, Path | None]:
    """Write `<date>-<device>[-small].json` (and its PNG) under out_dir; returns the record as written (non-finite
    values nulled and recorded as errors) and the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = plan.device
    stem = f"{result['date']}-{_slug(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu')}"
    stem += "-small" if plan.small else ""
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    result["plot"] = None
    if plot:
        try:
            write_plot(result, png_path)
            result["plot"] = png_path.name
        except ImportError:
            result["notes"].append("plot: matplotlib is missing (pip install 'glm4v-fast[plot]'); no PNG written")
    errors = result["errors"]
    result = finite(result, errors)
    result["errors"] = errors
    json_path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return result, json_path, png_path if result["plot"] else None


def run_bench(args) -> int:
    """The command: plan, measure, write the JSON (and PNG), print the tables. Exit status 1 if any
    measurement failed (the rest is still written)."""
    plan = plan_from_args(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"glm4v-fast bench: {device_name(plan.device)}, {plan.mode} shapes, {plan.dtype}; measuring peaks ...",
          flush=True)
    measured = measure(plan)
    result, json_path, png_path = write_result(result_record(plan, measured, started), Path(args.out), plan,
                                               plot=not args.no_plot)
    print()
    print(format_tables(result))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 1 if result["errors"] else 0


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
