"""The worker of bench/gpu_quick.py: the steps that are not pytest runs, in one process (one torch import, the
tower built once and shared by the steps after the encoder's).

    python bench/gpu_quick_steps.py --steps preflight,encoder [--repeats N] [--small]

Each measurement is reported as it is made, as an event line appended to the file that $GPU_QUICK_EVENTS
names (bench/gpu_quick.py reads them, and kills this process when a step outlives its timeout). The timing,
workloads and towers are glm4v_fast.bench's.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback

from gpu_quick import BACKEND_WORKLOADS, ENCODER_WORKLOADS, GRAPH_WORKLOADS, STEP_NAMES, emit


class Recorder:
    """What a worker step reports: records (measurements), errors, notes; each an event as it happens."""

    def __init__(self):
        self.errors: list[str] = []
        self.notes: list[str] = []
        self._sent_errors = self._sent_notes = 0

    def record(self, row: dict) -> None:
        emit({"event": "record", "record": row})

    def info(self, **info) -> None:
        emit({"event": "info", "info": info})

    def flush(self) -> None:
        """Send the errors and notes that glm4v_fast.bench's helpers appended to the lists since last time."""
        for text in self.errors[self._sent_errors:]:
            emit({"event": "error", "text": text})
        for text in self.notes[self._sent_notes:]:
            emit({"event": "note", "text": text})
        self._sent_errors, self._sent_notes = len(self.errors), len(self.notes)


class Worker:
    def __init__(self, small: bool, repeats: int):
        import torch

        self.small, self.repeats = small, repeats
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            # As in tests/conftest.py: before triton is imported, so the kernels can run on CPU tensors.
            os.environ.setdefault("TRITON_INTERPRET", "1")
            # One thread: on a shared CPU, threads waiting for busy cores stall each op (a functional run).
            torch.set_num_threads(1)
        from glm4v_fast.bench import small_config
        from glm4v_fast.config import VisionConfig

        self.torch = torch
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda and not small else torch.float32
        self.config = small_config() if small else VisionConfig()
        self.mode = "small" if small else "full"
        self.ours = None            # the tower, built by the encoder step (or the first step that needs it)

    def workload(self, name: str):
        from glm4v_fast.bench import workloads

        return workloads(self.small, [name], merge=self.config.spatial_merge_size)[0]

    def seed_for(self, name: str) -> int:
        from glm4v_fast.bench import WORKLOAD_NAMES

        return 1 + WORKLOAD_NAMES.index(name)     # as glm4v-fast bench does with --seed 0

    def model(self, **kwargs):
        """A tower with the encoder step's weights (built now, without transformers, if that step did not run)."""
        from glm4v_fast.bench import build_models
        from glm4v_fast.model import VisionModel

        if self.ours is None:
            self.ours, _ = build_models(self.config, self.device, self.dtype, with_hf=False)
        if not kwargs:
            return self.ours
        with self.torch.device("meta"):
            model = VisionModel(self.config, **kwargs)
        model = model.to(self.dtype).to_empty(device=self.device).eval()
        model.load_state_dict(self.ours.state_dict(), strict=True)
        return model

    def run(self, steps: list[str]) -> None:
        for name in steps:
            rec = Recorder()
            emit({"event": "start", "step": name})
            status, summary, tb = "ok", None, None
            try:
                with self.torch.inference_mode():
                    summary = getattr(self, "step_" + name.replace("-", "_"))(rec)
            except Exception as e:  # noqa: BLE001 - reported in the JSON; the round goes on
                rec.errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
                tb = traceback.format_exc()[-3000:]
                print(tb, flush=True)
            rec.flush()
            if rec.errors:
                status = "failed"
            if self.cuda:
                self.torch.cuda.empty_cache()
            emit({"event": "end", "step": name, "status": status, "summary": summary, "traceback": tb})

    # ---- steps (each returns a one-line summary)
    def step_preflight(self, rec: Recorder) -> str:
        torch = self.torch
        import glm4v_fast.kernels as K
        from glm4v_fast.bench import max_rel_err

        info = {
            "cuda": self.cuda, "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "triton": _dist_version("triton"),
            "transformers": _dist_version("transformers"), "flash_attn": _dist_version("flash-attn", "flash_attn"),
            "hypothesis": _dist_version("hypothesis"), "pytest_xdist": _dist_version("pytest-xdist"),
            "c_compiler": shutil.which(os.environ.get("CC", "")) if os.environ.get("CC") else
            (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
            "python_h": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
            "interpreter": K.interpreter_enabled(), "cpu_count": os.cpu_count(),
        }
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                        memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
            info["nvidia_smi"] = _nvidia_smi()
        else:
            from glm4v_fast.bench import device_name

            info["device"] = device_name(self.device)
        rec.info(**info)
        rec.record({"kind": "environment", **info})
        if self.cuda and not info["c_compiler"]:
            rec.errors.append("no C compiler on PATH: Triton cannot build its launcher")
        if self.cuda and not info["python_h"]:
            rec.errors.append("Python.h is missing: Triton cannot build its launcher")
        # One launch of a kernel, against its twin (on CPU under the interpreter).
        rows, cols = (4096, 1536) if self.cuda else (8, 64)
        gen = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(rows, cols, generator=gen, device=self.device).to(self.dtype)
        w = torch.randn(cols, generator=gen, device=self.device).to(self.dtype)
        t0 = time.perf_counter()
        y = K.rms_norm(x, w, 1e-6)
        if self.cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        err = max_rel_err(y, K.rms_norm_reference(x.double(), w.double(), 1e-6))
        rec.record({"kind": "kernel-launch", "kernel": "rms_norm", "shape": f"{rows}x{cols}",
                    "dtype": str(self.dtype).removeprefix("torch."), "first_call_s": round(first_s, 3),
                    "max_rel_err_vs_fp64": err})
        if not err < 2e-2:
            rec.errors.append(f"rms_norm launch: relative error {err:.2e} vs float64")
        return f"{info['device']}; torch {info['torch']}, triton {info['triton']}; rms_norm err {err:.1e}"

    def step_encoder(self, rec: Recorder) -> str:
        from glm4v_fast.bench import build_models, measure_peaks, run_encoder_workload

        with_hf = importlib.util.find_spec("transformers") is not None
        if not with_hf:
            rec.notes.append("transformers is not installed: ours is timed alone")
        self.ours, hf = build_models(self.config, self.device, self.dtype, with_hf=with_hf)
        kernels_used, attn_used = self.ours.resolved()
        rec.info(kernels_used=kernels_used, attn_backend_used=attn_used, dtype=str(self.dtype).removeprefix("torch."))
        peaks = measure_peaks(self.device, self.dtype, self.repeats)
        rec.record({"kind": "peaks", **peaks})
        parts = []
        for name in ENCODER_WORKLOADS:
            wl = self.workload(name)
            row = run_encoder_workload(wl, self.ours, hf, self.config, self.device, self.dtype, self.repeats,
                                       peaks["bf16_tflops"], self.seed_for(name), rec.errors, rec.notes)
            rec.record(row)
            rec.flush()
            speedup = row.get("speedup")
            parts.append(f"{name} x{speedup:.2f}" if speedup else f"{name} {row.get('ours_ms')} ms")
        del hf
        return "; ".join(parts)

    def step_graphs_timing(self, rec: Recorder) -> str:
        from glm4v_fast.bench import guard, max_rel_err, time_ms

        parts = []
        for name in GRAPH_WORKLOADS[self.mode]:
            wl = self.workload(name)
            pv = wl.pixel_values(self.config, self.dtype, self.device, self.seed_for(name))
            grid = wl.grid_tensor()
            plain = self.model()
            expected = plain(pv, grid)
            variants = {"plain": plain}
            for graphs in (False, True):
                variants["graphs" if graphs else "bucketed"] = self.model(token_buckets=(wl.patches,),
                                                                         cuda_graphs=graphs)
            for variant, model in variants.items():
                ms = guard(rec.errors, f"{name} {variant}", time_ms, lambda: model(pv, grid), self.device,
                           self.repeats, 3)
                err = guard(rec.errors, f"{name} {variant} error", lambda: max_rel_err(model(pv, grid), expected))
                rec.record({"workload": name, "patches": wl.patches, "variant": variant,
                            "token_buckets": list(model.token_buckets or ()), "cuda_graphs": model.cuda_graphs,
                            "attn_backend": model.resolved()[1], "ms": ms, "max_rel_err_vs_plain": err})
                if variant != "plain" and ms:
                    parts.append(f"{name} {variant} {ms:.2f} ms")
            rec.flush()
            del variants
        return "; ".join(parts)

    def step_attention_backends(self, rec: Recorder) -> str:
        from glm4v_fast.attention import available_backends
        from glm4v_fast.bench import guard, max_rel_err, time_ms

        backends = available_backends(self.device, self.dtype)
        rec.info(backends=backends)
        parts = []
        for name in BACKEND_WORKLOADS[self.mode]:
            wl = self.workload(name)
            pv = wl.pixel_values(self.config, self.dtype, self.device, self.seed_for(name))
            grid = wl.grid_tensor()
            expected = self.model(attn_backend="sdpa")(pv, grid)
            for backend in backends:
                model = self.model(attn_backend=backend)
                ms = guard(rec.errors, f"{name} {backend}", time_ms, lambda: model(pv, grid), self.device,
                           self.repeats, 2)
                err = guard(rec.errors, f"{name} {backend} error", lambda: max_rel_err(model(pv, grid), expected))
                rec.record({"workload": name, "patches": wl.patches, "backend": backend,
                            "kernels": model.resolved()[0], "ms": ms, "max_rel_err_vs_sdpa": err})
                if ms:
                    parts.append(f"{name} {backend} {ms:.2f} ms")
                del model
            rec.flush()
        return "; ".join(parts)

    def step_attention_sweep(self, rec: Recorder) -> str:
        from glm4v_fast.bench import run_attention_sweep

        # At most 2 repeats (the sweep takes 5x that for short segments): the last step, and a bounded one.
        rows = run_attention_sweep(self.config, self.mode, self.dtype, self.device, min(self.repeats, 2),
                                   rec.notes, rec.errors)
        for row in rows:
            rec.record(row)
        best = max((r for r in rows if r.get("tflops")), key=lambda r: r["tflops"], default=None)
        return f"{len(rows)} cells" + (f"; best {best['backend']} L={best['seqlen']} {best['tflops']:.1f} TFLOP/s"
                                       if best else "")


def _dist_version(*names: str) -> str | None:
    import importlib.metadata as md

    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def _nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"failed: {e}"
    return out.stdout.strip() or out.stderr.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_quick_steps.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", required=True, help=f"comma-separated, from {', '.join(STEP_NAMES)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true")
    args = p.parse_args(argv)
    steps = args.steps.split(",")
    unknown = [s for s in steps if not hasattr(Worker, "step_" + s.replace("-", "_"))]
    if unknown:
        p.error(f"not a worker step: {unknown}")
    Worker(args.small, args.repeats).run(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
