"""GLM-4V vision towers on a CPU, in one process: glm4v-fast compiled and eager, vLLM's own, transformers'.

    PYTHONPATH=.:tests_vllm/cpu_wheels .venv-vllm/bin/python bench/cpu_towers.py --dtype bfloat16
    PYTHONPATH=. .venv/bin/python bench/cpu_towers.py --dtype float32 --no-vllm     # without vLLM

One JSON per run under bench/results/ (one dtype per process: vLLM builds one engine per dtype). Towers:

- `glm4v_fast_compiled`: the compiled CPU path (`VisionModel(compile="cpu")`; glm4v_fast/compiled_cpu.py), as the
  library runs it (unfrozen: the weights are graph inputs);
- `glm4v_fast_eager`: the same model with the compiled path off (the eager packed forward);
- `glm4v_fast_compiled_frozen` / `_unfrozen` (--alt-freeze WORKLOADS): the compiled path with the other setting of
  inductor's freezing, on the same weights;
- `vllm`: vLLM's own tower (`model.visual` of a GLM-4.1V model vLLM built with random weights, its CPU linears
  repacked for oneDNN as for a real checkpoint);
- `transformers`: transformers' Glm4vVisionModel (attention "sdpa").

All take the same 0-255 pixel rows and vLLM's input normalisation (glm4v-fast's towers as the vLLM plugin's
VllmVisionTower, transformers' after the same `input_norm`), at full width and --depth blocks, random weights
(timing only; the outputs' equality is tested elsewhere). Calls alternate between towers; each workload gets one
warm-up call per tower, then --repeats timed rounds; median and range per tower, and a decision between two towers
only where their ranges do not overlap. Workloads: one 448x448 image, a batch of 4 mixed-size images, one ~1 MP
image, and a sequence of single images whose sizes change every call (new sizes each round: a tower that compiles
per shape would recompile in every round; the dynamo frame counts before and after are recorded).

Per workload, one profiled call per tower (torch.profiler, self CPU time): time in linears (GEMM ops), attention,
and the rest (wall minus both), against the CPU's GEMM peak measured in the same run (F.linear at the tower's
shapes, before and after the timing). The JSON records the CPU's flags, the load average, versions, the command.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")    # the model lives in this process
_HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

PATCH = 14
# (t, h, w) grids in patches (h, w even: whole 2x2 merge blocks).
WORKLOADS = {
    "448": [[1, 32, 32]],
    "batch4_mixed": [[1, 32, 32], [1, 16, 24], [1, 24, 40], [1, 12, 12]],
    "1mp": [[1, 72, 72]],                       # 1008 x 1008 pixels
}
SEQUENCE_BASE = [[1, 16, 16], [1, 20, 28], [1, 36, 24], [1, 28, 28]]   # +2 patches per side every round
ALT = ("glm4v_fast_compiled_frozen", "glm4v_fast_compiled_unfrozen")
TOWER_ORDER = ("glm4v_fast_compiled", "glm4v_fast_eager") + ALT + ("vllm", "transformers")

LINEAR_WORDS = ("mm", "linear", "matmul", "gemm", "onednn", "mkldnn", "conv")
ATTENTION_WORDS = ("attention", "sdpa", "softmax")


# ---------------------------------------------------------------------------------------------------------------
# Machine facts
# ---------------------------------------------------------------------------------------------------------------
def cpu_facts() -> dict:
    flags, model = set(), platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma")
    return {"model": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "flags": {f: f in flags for f in wanted}}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def gemm_peak(dtype: torch.dtype, hidden: int, mlp: int, repeats: int = 5) -> dict:
    """Median TFLOP/s of F.linear at the tower's GEMM shapes (4096 tokens); the best of them is the peak."""
    import torch.nn.functional as F

    m = 4096
    shapes = {"qkv": (hidden, 3 * hidden), "mlp_up": (hidden, mlp), "mlp_down": (mlp, hidden)}
    out = {}
    with torch.inference_mode():
        for name, (k, n) in shapes.items():
            x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
            F.linear(x, w)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                F.linear(x, w)
                times.append(time.perf_counter() - start)
            out[name] = round(2 * m * k * n / statistics.median(times) / 1e12, 3)
    return {"tflops_by_shape": out, "peak_tflops": max(out.values())}


# ---------------------------------------------------------------------------------------------------------------
# Towers
# ---------------------------------------------------------------------------------------------------------------
def write_config_checkpoint(path: str, depth: int) -> None:
    from vllm_tower import write_config_checkpoint as write

    write(path, depth, 1008)


class Towers:
    """The towers of one run, each a callable on (uint8 pixel rows, grid)."""

    def __init__(self, dtype: torch.dtype, depth: int, use_vllm: bool, alt_freeze: bool):
        from glm4v_fast.compiled_cpu import CompiledCpuForward
        from glm4v_fast.config import VisionConfig
        from glm4v_fast.integrations.vllm.tower import VllmVisionTower

        self.tmp = tempfile.TemporaryDirectory()
        self.calls, self.info = {}, {}
        if use_vllm:
            from vllm import LLM

            write_config_checkpoint(self.tmp.name, depth)
            self.llm = LLM(model=self.tmp.name, load_format="dummy", dtype=str(dtype).removeprefix("torch."),
                           enforce_eager=True, max_model_len=2048, max_num_seqs=1,
                           limit_mm_per_prompt={"image": 1, "video": 0}, kv_cache_memory_bytes=64 * 2**20,
                           additional_config={"glm4v_fast": False})
            vmodel = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
            theirs = vmodel.visual
            vision_config = vmodel.config.vision_config.to_dict()
            input_norm = theirs.input_norm
            self.calls["vllm"] = lambda pixels, grid: theirs(pixels, grid_thw=grid)
        else:
            from transformers.models.glm4v.configuration_glm4v import Glm4vVisionConfig

            vision_config = Glm4vVisionConfig(depth=depth).to_dict()
            input_norm = _InputNorm()
        self.config = VisionConfig.from_dict(vision_config)

        ours = VllmVisionTower(self.config, input_norm=input_norm, compile="cpu").to(dtype).eval()
        ours.reset_parameters(seed=0)
        compiled = ours._compiled
        self.ours = ours
        self.compiled = compiled

        def run_ours(forward):
            def call(pixels, grid):
                ours._compiled = forward
                return ours(pixels, grid)
            return call

        self.calls["glm4v_fast_compiled"] = run_ours(compiled)
        self.calls["glm4v_fast_eager"] = run_ours(None)
        if alt_freeze:
            alt = CompiledCpuForward("cpu")
            alt.freeze = not compiled.frozen(ours)
            self.calls[ALT[0] if alt.freeze else ALT[1]] = run_ours(alt)

        from transformers.models.glm4v.modeling_glm4v import Glm4vVisionConfig, Glm4vVisionModel

        hf_config = Glm4vVisionConfig(**{k: v for k, v in vision_config.items() if k in Glm4vVisionConfig().to_dict()})
        hf_config._attn_implementation = "sdpa"
        hf = Glm4vVisionModel(hf_config).to(dtype).eval()
        self.calls["transformers"] = lambda pixels, grid: hf(input_norm(pixels, dtype), grid_thw=grid)
        self.calls = {name: self.calls[name] for name in TOWER_ORDER if name in self.calls}


class _InputNorm(torch.nn.Module):
    """vLLM's input_norm for GLM-4V (OpenAI CLIP mean/std on 0-255 pixels), for runs without vLLM."""

    def __init__(self):
        super().__init__()
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
        per_col = lambda v: v.repeat_interleave(2 * PATCH * PATCH)     # (C, T, P, P) flattened, C outermost
        self.register_buffer("scale", per_col(1 / (255 * std)))
        self.register_buffer("shift", per_col(mean / std))

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (pixels.float() * self.scale - self.shift).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Workloads, timing, profiles
# ---------------------------------------------------------------------------------------------------------------
def pixels_for(grids) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.tensor(grids)
    n = int(grid.prod(-1).sum())
    return torch.randint(0, 256, (n, 3 * 2 * PATCH * PATCH), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(n)), grid


def sequence_round(r: int) -> list[list[list[int]]]:
    """Single-image calls of sizes new in round r (-1: the warm-up's)."""
    step = 2 * (r + 1)
    return [[[1, h + step, w + step]] for _, h, w in SEQUENCE_BASE]


def calls_of(workload: str, r: int) -> list:
    if workload == "sequence":
        return [pixels_for(g) for g in sequence_round(r)]
    return [pixels_for(WORKLOADS[workload])]


def grids_of(workload: str, r: int = 0) -> list:
    return sequence_round(r) if workload == "sequence" else [WORKLOADS[workload]]


def run_calls(fn, calls) -> float:
    start = time.perf_counter()
    for pixels, grid in calls:
        fn(pixels, grid)
    return time.perf_counter() - start


def classify(name: str) -> str:
    low = name.lower()
    if any(w in low for w in ATTENTION_WORDS):
        return "attention"
    if any(w in low for w in LINEAR_WORDS):
        return "linear"
    return "rest"


def profile_call(fn, calls) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = run_calls(fn, calls)
    sums = {"linear": 0.0, "attention": 0.0}
    top = []
    for evt in prof.key_averages():
        kind = classify(evt.key)
        if kind != "rest":
            sums[kind] += evt.self_cpu_time_total / 1e6
        top.append((evt.self_cpu_time_total / 1e6, evt.key, kind))
    top.sort(reverse=True)
    return {"wall_s": wall, "linear_s": sums["linear"], "attention_s": sums["attention"],
            "rest_s": max(wall - sums["linear"] - sums["attention"], 0.0),
            "top_ops": [{"op": k, "self_s": round(t, 4), "kind": c} for t, k, c in top[:8]]}


def flop_split(workload: str, config, r: int = 0) -> dict:
    from glm4v_fast.packing import flops

    seqlens = [h * w for grids in grids_of(workload, r) for _, h, w in grids]
    total = sum(flops([h * w for _, h, w in grids], config) for grids in grids_of(workload, r))
    attention = config.depth * sum(4 * s * s * config.hidden_size for s in seqlens)
    return {"total": total, "attention": attention, "linear": total - attention}


def summarize(times: dict[str, list[float]]) -> dict:
    out = {}
    for name, ts in times.items():
        out[name] = {"median_ms": round(statistics.median(ts) * 1e3, 1), "min_ms": round(min(ts) * 1e3, 1),
                     "max_ms": round(max(ts) * 1e3, 1), "all_ms": [round(t * 1e3, 1) for t in ts]}
    return out


def decisions(summary: dict, ours: str = "glm4v_fast_compiled") -> dict:
    """ours vs each other tower: ratio of medians, and a decision only where the ranges do not overlap.

    Also the paired view: the towers alternate within a round, so each round gives one ratio (other / ours) under
    the same load; `paired_decision` is made only when every round's ratio is on the same side of 1 (with 7
    rounds, a sign test at p = 2/128).
    """
    out = {}
    a = summary[ours]
    for name, b in summary.items():
        if name == ours:
            continue
        ratio = b["median_ms"] / a["median_ms"]
        few = min(len(a["all_ms"]), len(b["all_ms"])) < 3
        if few:
            verdict = "fewer than 3 rounds: no decision"
        elif a["max_ms"] < b["min_ms"]:
            verdict = f"{ours} faster"
        elif b["max_ms"] < a["min_ms"]:
            verdict = f"{name} faster"
        else:
            verdict = "ranges overlap: no decision"
        pairs = [y / x for x, y in zip(a["all_ms"], b["all_ms"])]
        if few:
            paired = "fewer than 3 rounds: no decision"
        elif min(pairs) > 1:
            paired = f"{ours} faster in every round"
        elif max(pairs) < 1:
            paired = f"{name} faster in every round"
        else:
            paired = "per-round ratios on both sides of 1: no decision"
        out[name] = {"speedup": round(ratio, 3), "decision": verdict,
                     "paired_ratio": {"median": round(statistics.median(pairs), 3), "min": round(min(pairs), 3),
                                      "max": round(max(pairs), 3)},
                     "paired_decision": paired}
    return out


def dynamo_frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def warm_cache_first_call(dtype: str, depth: int) -> dict:
    """The first compiled call (448x448) of a fresh process on this run's compile cache, filled by the run."""
    code = ("import sys, time, json, torch; sys.path.insert(0, 'bench'); import cpu_towers as b;"
            "import glm4v_fast as gf; cfg = gf.VisionConfig(depth=%d);"
            "m = gf.VisionModel(cfg, compile='cpu').to(torch.%s).eval(); px, g = b.pixels_for(b.WORKLOADS['448']);"
            "x = px.to(m.dtype); t = time.perf_counter();"
            "torch.inference_mode().__enter__(); m(x, g); first = time.perf_counter() - t;"
            "t = time.perf_counter(); m(x, g); print(json.dumps({'first_call_s': first, "
            "'second_call_s': time.perf_counter() - t}))" % (depth, dtype))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.join(_HERE, ".."))
    if proc.returncode:
        raise SystemExit(f"compile-cost child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    """The run's tables for docs/results.md: times and decisions, then the profile split per workload."""
    after = result.get("gemm_peak_after", {}).get("peak_tflops", "not reached")
    lines = [f"{result['dtype']}, depth {result['depth']}, {result['repeats']} rounds, load average "
             f"{result['load_average_start']} -> {result['load_average_end']}, GEMM peak "
             f"{result['gemm_peak_before']['peak_tflops']} / {after} TFLOP/s (before / after)", "",
             "| workload | tower | median ms | range ms | compiled's speedup (medians) | ranges | per-round ratio "
             "(median, range) | per round |", "|---|---|---|---|---|---|---|---|"]
    for workload, entry in result["workloads"].items():
        dec = decisions(entry["summary"])       # recomputed: files written before the paired view have it too
        for name, s in entry["summary"].items():
            d = dec.get(name)
            cells = ["", "", "", ""]
            if d:
                p = d["paired_ratio"]
                cells = [f"{d['speedup']}x", d["decision"], f"{p['median']}x ({p['min']}-{p['max']})",
                         d["paired_decision"]]
            lines.append(f"| {workload} | {name} | {s['median_ms']:.0f} | {s['min_ms']:.0f}-{s['max_ms']:.0f} | "
                         + " | ".join(cells) + " |")
    # The higher of the two peak measurements: a peak taken while other jobs ran is low.
    peak = max(result["gemm_peak_before"]["peak_tflops"], result.get("gemm_peak_after", {}).get("peak_tflops", 0))
    lines += ["", f"Profile of one call per tower (self CPU time by op; peak = {peak} TFLOP/s):", "",
              "| workload | tower | wall ms | linears ms | linears TFLOP/s (of peak) | attention ms | rest ms | "
              "tower TFLOP/s (of peak) |", "|---|---|---|---|---|---|---|---|"]
    for workload, entry in result["workloads"].items():
        total = entry["flops"]["total"]
        for name, p in entry.get("profile", {}).items():
            tower = total / p["wall_s"] / 1e12
            lines.append(f"| {workload} | {name} | {p['wall_s'] * 1e3:.0f} | {p['linear_s'] * 1e3:.0f} | "
                         f"{p['linear_tflops']} ({p['linear_tflops'] / peak:.0%}) | {p['attention_s'] * 1e3:.0f} | "
                         f"{p['rest_s'] * 1e3:.0f} | {tower:.2f} ({tower / peak:.0%}) |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--depth", type=int, default=24, help="tower blocks (GLM-4.1V: 24); width stays full")
    parser.add_argument("--workloads", nargs="+", default=["448", "batch4_mixed", "1mp", "sequence"],
                        choices=list(WORKLOADS) + ["sequence"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-vllm", action="store_true", help="leave vLLM's tower out (no vLLM installed)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--alt-freeze", nargs="*", default=[],
                        help="workloads that also time the compiled path with the other freezing setting")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--compile-cost", action="store_true",
                        help="at the end, time the first compiled call of a fresh process on the run's compile cache "
                             "(the run's own first compiled call is the cold-cache one when the cache starts empty)")
    parser.add_argument("--out", default=os.path.join(_HERE, "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--table", metavar="JSON", help="print a result file's tables (markdown) and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.table, encoding="utf-8") as f:
            print(markdown(json.load(f)))
        return
    dtype = getattr(torch, args.dtype)

    from importlib import metadata

    started = dt.datetime.now(dt.timezone.utc)
    result = {
        "benchmark": "cpu_towers", "date": started.date().isoformat(),
        "started_utc": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "bench/cpu_towers.py"] + sys.argv[1:]),
        "cpu": cpu_facts(), "load_average_start": load_average(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": metadata.version("transformers")},
        "dtype": args.dtype, "depth": args.depth,
        "width": "GLM-4.1V (hidden 1536, 12 heads, MLP 4096, merger 4096/13696)",
        "repeats": args.repeats,
        "timing": "perf_counter wall time per workload call(s), towers alternating, one warm-up each, median "
                  "and range of --repeats rounds; the machine may be shared: see load_average_*",
        "notes": ["random weights: timing only (equality is tested in tests/ and tests_vllm/)",
                  "every tower includes vLLM's input normalisation of 0-255 pixels"],
    }
    try:
        import vllm
        result["versions"]["vllm"] = vllm.__version__
    except ImportError:
        pass
    from glm4v_fast.compiled_cpu import cache_dir

    cache = cache_dir()
    result["compile_cache"] = {"dir": cache, "empty_at_start": not any(os.scandir(cache))}

    towers = Towers(dtype, args.depth, use_vllm=not args.no_vllm, alt_freeze=bool(args.alt_freeze))
    if args.no_transformers:
        towers.calls.pop("transformers", None)
    config = towers.config
    peak_before = gemm_peak(dtype, config.hidden_size, config.out_hidden_size)
    result["gemm_peak_before"] = peak_before
    print("GEMM peak", peak_before, flush=True)
    result["compiled_path"] = {"compiled": towers.ours.compiled(), "frozen": towers.compiled.frozen(towers.ours),
                               "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}

    result["workloads"] = {}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{result['date']}-cpu-towers-{args.dtype}-depth{args.depth}{args.tag}.json")

    def save():         # after every workload: a run cut short keeps what it measured
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)

    with torch.inference_mode():
        for workload in args.workloads:
            names = [n for n in towers.calls if n not in ALT or workload in args.alt_freeze]
            entry = {"grids": grids_of(workload, 0) if workload != "sequence" else
                     {"round_0": sequence_round(0), "rule": "+2 patches per side every round, warm-up at -1"},
                     "flops": flop_split(workload, config)}
            warm = {}
            for name in names:
                warm[name] = round(run_calls(towers.calls[name], calls_of(workload, -1)), 2)
                print(f"{workload} warm-up {name}: {warm[name]} s", flush=True)
            entry["warmup_s"] = warm
            frames_before = dynamo_frames()
            times = {n: [] for n in names}
            for r in range(args.repeats):
                calls = calls_of(workload, r)
                for name in names:
                    times[name].append(run_calls(towers.calls[name], calls))
                print(f"{workload} round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}" for n in names), flush=True)
            entry["dynamo_frames_compiled_while_timed"] = dynamo_frames() - frames_before
            entry["summary"] = summarize(times)
            entry["decisions_vs_compiled"] = decisions(entry["summary"])
            if "glm4v_fast_eager" in entry["summary"]:
                entry["decisions_vs_eager"] = decisions(entry["summary"], "glm4v_fast_eager")
            if not args.no_profile:
                prof = {}
                calls = calls_of(workload, 0)
                fl = entry["flops"]
                peak = peak_before["peak_tflops"]
                for name in names:
                    p = profile_call(towers.calls[name], calls)
                    p["linear_tflops"] = round(fl["linear"] / p["linear_s"] / 1e12, 3) if p["linear_s"] else None
                    p["linear_fraction_of_gemm_peak"] = (round(p["linear_tflops"] / peak, 3)
                                                         if p["linear_tflops"] else None)
                    median_s = entry["summary"][name]["median_ms"] / 1e3
                    p["tower_fraction_of_gemm_peak"] = round(fl["total"] / median_s / 1e12 / peak, 3)
                    prof[name] = p
                entry["profile"] = prof
            result["workloads"][workload] = entry
            result["load_average_end"] = load_average()
            save()
            print(json.dumps({workload: {k: entry[k] for k in ("summary", "decisions_vs_compiled")}}), flush=True)

    result["gemm_peak_after"] = gemm_peak(dtype, config.hidden_size, config.out_hidden_size)
    first = args.workloads[0]
    result["compile_cache"]["first_compiled_call_s"] = result["workloads"][first]["warmup_s"]["glm4v_fast_compiled"]
    result["compile_cache"]["first_compiled_call_workload"] = first
    if args.compile_cost:
        del towers                      # free the towers' memory for the child
        print("first compiled call of a fresh process on the filled cache ...", flush=True)
        result["compile_cache"]["fresh_process_448"] = warm_cache_first_call(args.dtype, args.depth)
        print(result["compile_cache"], flush=True)
    result["load_average_end"] = load_average()
    result["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    save()
    print("wrote", path)


if __name__ == "__main__":
    main()
