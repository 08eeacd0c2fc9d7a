"""One GPU round in one device call: the checks that matter most first, each under its own timeout, the whole
within a wall-clock budget (default 7.5 minutes, setup included), the JSON and the log rewritten after every
step so that a call cut short still returns what was measured.

    python bench/gpu_quick.py [--out DIR] [--budget SECONDS] [--steps a,b,...] [--timeout STEP=SECONDS ...]
    python bench/gpu_quick.py --small        # the same steps on CPU with the small tower: a functional run

Steps, in order of importance (a step that does not fit in what is left of the budget is skipped):

  preflight           the GPU, versions, a C compiler and Python.h (Triton builds its launcher with them),
                      one kernel launch against its PyTorch twin
  kernels             pytest: the compiled kernels and their backward against their twins (the CUDA cases,
                      in parallel with pytest-xdist when it is installed)
  cuda-graphs         pytest: CUDA-graph capture and replay of the bucketed forward
  encoder             the full-size tower vs transformers' Glm4vVisionModel in bf16 on single-448, serving-mix,
                      hires-1120 and huge-image: time, peak memory, error (glm4v_fast.bench)
  graphs-timing       the bucketed forward with CUDA graphs on and off, against the plain forward
  attention-backends  the tower with each attention backend this machine has, against sdpa
  attention-sweep     glm4v_fast.bench's attention sweep (every backend over segment lengths)

Written to --out (default $OUT, else bench/results/gpu-quick): gpu_quick.json (every step: status, seconds,
records, errors) and gpu_quick.log (the steps' own output). Nothing is installed and nothing is downloaded:
run it from the repository root with the machine's packages (``PYTHONPATH=.`` is set for the steps).

How it runs: the pytest steps are subprocesses; the other steps run in one worker subprocess,
bench/gpu_quick_steps.py (one torch import, the tower built once), that reports each record as it is measured.
A step past its timeout has its process group killed; the worker is restarted for the steps after it.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JSON_NAME, LOG_NAME = "gpu_quick.json", "gpu_quick.log"
EVENTS_ENV = "GPU_QUICK_EVENTS"        # where the worker and the pytest plugin below append their events

ENCODER_WORKLOADS = ("single-448", "serving-mix", "hires-1120", "huge-image")
GRAPH_WORKLOADS = {"full": ("single-448", "hires-1120"),   # one small call (launch-bound) and one large
                   "small": ("single-448",)}
BACKEND_WORKLOADS = {"full": ("single-448", "serving-mix"), "small": ("single-448",)}

# The pytest selections the device runs; tests/test_gpu_round.py collects them under a simulated CUDA device.
PYTEST_SELECTIONS = {
    "kernels": ["-m", "gpu", "tests/test_kernels.py", "tests/test_kernels_backward.py",
                "tests/test_kernels_attention.py"],
    "cuda-graphs": ["-m", "gpu", "tests/test_model_static.py"],
}


@dataclass(frozen=True)
class Step:
    name: str
    kind: str               # "pytest" or "worker"
    timeout_s: float        # on a GPU
    small_timeout_s: float  # with --small on CPU
    what: str


STEPS = (
    Step("preflight", "worker", 60, 60, "GPU, versions, compiler, one kernel launch"),
    Step("kernels", "pytest", 150, 90, "compiled kernels and backward vs their twins (CUDA cases)"),
    Step("cuda-graphs", "pytest", 75, 90, "CUDA-graph capture and replay"),
    Step("encoder", "worker", 150, 60, "tower vs transformers: " + ", ".join(ENCODER_WORKLOADS)),
    Step("graphs-timing", "worker", 60, 60, "CUDA graphs on/off"),
    Step("attention-backends", "worker", 60, 60, "each attention backend in the tower"),
    Step("attention-sweep", "worker", 60, 60, "attention sweep"),
)
STEP_NAMES = tuple(s.name for s in STEPS)
MIN_STEP_S = 10             # a step is not started with less than this left of the budget
DEFAULT_BUDGET_S = 450      # 7.5 minutes: the round must end within 8, setup included


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/gpu_quick.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for gpu_quick.json and gpu_quick.log (default $OUT, else "
                                 "bench/results/gpu-quick)")
    p.add_argument("--small", action="store_true", help="the small tower on scaled-down workloads, on CPU (fp32): "
                                                        "a functional run of every step")
    p.add_argument("--budget", type=float, help=f"wall-clock seconds for the whole round (default "
                                                f"{DEFAULT_BUDGET_S}; 300 with --small)")
    p.add_argument("--steps", default=",".join(STEP_NAMES), help=f"comma-separated subset of {','.join(STEP_NAMES)}, "
                                                                   "run in the order above (default: all)")
    p.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                   help="override one step's timeout (repeatable)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement (default 5; 1 with --small)")
    args = p.parse_args(argv)

    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEP_NAMES]
    if unknown or not steps:
        raise ValueError(f"--steps: unknown step(s) {unknown}; choose from {', '.join(STEP_NAMES)}")
    args.steps = [s for s in STEP_NAMES if s in steps]
    timeouts = {s.name: (s.small_timeout_s if args.small else s.timeout_s) for s in STEPS}
    for item in args.timeout:
        name, sep, value = item.partition("=")
        if not sep or name not in timeouts:
            raise ValueError(f"--timeout {item!r}: expected STEP=SECONDS with STEP one of {', '.join(STEP_NAMES)}")
        try:
            timeouts[name] = float(value)
        except ValueError:
            raise ValueError(f"--timeout {item!r}: {value!r} is not a number of seconds") from None
        if timeouts[name] <= 0:
            raise ValueError(f"--timeout {item!r}: must be positive")
    args.timeouts = timeouts
    if args.budget is None:
        args.budget = 300.0 if args.small else float(DEFAULT_BUDGET_S)
    if args.budget <= 0:
        raise ValueError(f"--budget must be positive, got {args.budget}")
    if args.repeats is None:
        args.repeats = 1 if args.small else 5
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    args.out = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "results" / "gpu-quick")
    return args


# --------------------------------------------------------------------------------------------------------------
# Events: one JSON object per line, appended by the worker and by the pytest plugin
# --------------------------------------------------------------------------------------------------------------
def emit(event: dict) -> None:
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, default=str) + "\n")


def pytest_runtest_logreport(report):
    """pytest plugin hook (``-p gpu_quick``): one event per test outcome, so a killed run keeps its results.
    With pytest-xdist the controller reports every test; its workers stay silent."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or report.outcome != "passed":
        message = None
        if report.outcome != "passed":
            text = str(report.longrepr) if report.longrepr is not None else ""
            if report.skipped and isinstance(report.longrepr, tuple):
                text = report.longrepr[2]
            message = text.strip().splitlines()[-1][:300] if text.strip() else ""
        emit({"event": "test", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
              "seconds": round(report.duration, 3), "message": message})


class EventReader:
    """Reads the events appended to a file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind("\n") + 1]       # a line still being written waits for the next call
        self.offset += len(complete.encode("utf-8"))
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------------
# The round: runs the steps, rewrites the JSON after each
# --------------------------------------------------------------------------------------------------------------
class Round:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.monotonic()
        args.out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.log_path = args.out / JSON_NAME, args.out / LOG_NAME
        self.log_path.write_text("", encoding="utf-8")
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_quick-"))
        self.result = {
            "command": "python bench/gpu_quick.py " + " ".join(sys.argv[1:]),
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": "small" if args.small else "full",
            "budget_s": args.budget,
            "repeats": args.repeats,
            "host": platform.node(),
            "steps": [],
            "finished": False,
        }
        self.cuda = None            # known after preflight

    # ---- bookkeeping
    def remaining(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def say(self, line: str) -> None:
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"[gpu_quick {time.monotonic() - self.start:6.1f}s] {line}\n")

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.json_path)

    def new_step(self, name: str) -> dict:
        entry = {"name": name, "what": next(s.what for s in STEPS if s.name == name), "status": "running",
                 "seconds": None, "timeout_s": None, "records": [], "errors": [], "notes": []}
        self.result["steps"].append(entry)
        return entry

    def step_timeout(self, name: str) -> float:
        return max(0.0, min(self.args.timeouts[name], self.remaining()))

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "bench")] +
                                            ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        if not self.args.small:
            env.pop("TRITON_INTERPRET", None)      # compiled kernels on the GPU
        return env

    def spawn(self, cmd: list[str], events: Path) -> subprocess.Popen:
        env = dict(self.env(), **{EVENTS_ENV: str(events)})
        log = open(self.log_path, "a", encoding="utf-8")
        try:
            return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def finish(self, entry: dict, status: str, started: float) -> None:
        entry["status"] = status
        entry["seconds"] = round(time.monotonic() - started, 1)
        self.write()
        summary = entry.get("summary")
        self.say(f"{entry['name']}: {status} in {entry['seconds']}s" + (f" ({summary})" if summary else "")
                 + (f"; {len(entry['errors'])} error(s): {entry['errors'][0]}" if entry["errors"] else ""))

    def skip(self, name: str, why: str) -> None:
        entry = self.new_step(name)
        entry["status"], entry["reason"] = "skipped", why
        self.write()
        self.say(f"{name}: skipped ({why})")

    # ---- the run
    def run(self) -> int:
        self.say(f"gpu_quick: {self.result['mode']} round, steps {', '.join(self.args.steps)}, budget "
                 f"{self.args.budget:.0f}s; writing {self.json_path}")
        self.write()
        pending = list(self.args.steps)
        while pending:
            name = pending[0]
            if self.remaining() < MIN_STEP_S:
                for n in pending:
                    self.skip(n, "the round's time budget is spent")
                break
            if next(s for s in STEPS if s.name == name).kind == "pytest":
                pending.pop(0)
                self.run_pytest(name)
            else:
                batch = []
                while pending and next(s for s in STEPS if s.name == pending[0]).kind == "worker":
                    batch.append(pending.pop(0))
                self.run_worker(batch)
        self.result["finished"] = True
        self.write()
        self.say(summary_table(self.result))
        bad = [s["name"] for s in self.result["steps"] if s["status"] not in ("ok", "skipped")]
        return 1 if bad else 0

    def run_pytest(self, name: str) -> None:
        entry = self.new_step(name)
        timeout = entry["timeout_s"] = round(self.step_timeout(name), 1)
        events = self.tmp / f"{name}.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_quick", "-rfE",
               *PYTEST_SELECTIONS[name]]
        workers = self.xdist_workers(name)
        if workers:
            cmd += ["-n", str(workers)]
        entry["command"] = " ".join(cmd[1:])
        self.say(f"{name}: {entry['command']} (timeout {timeout:.0f}s)")
        started = time.monotonic()
        proc = self.spawn(cmd, events)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            rc = None
        tests = [e for e in EventReader(events).new() if e.get("event") == "test"]
        entry["records"] = tests
        counts: dict[str, int] = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        entry["counts"], entry["returncode"] = counts, rc
        entry["errors"] = [f"{t['nodeid']}: {t['message']}" for t in tests if t["outcome"] == "failed"]
        entry["summary"] = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran"
        if rc is None:
            status = "timeout"
        elif rc == 0:
            status = "ok"
        else:
            status = "failed"
            if not entry["errors"]:
                entry["errors"] = [f"pytest exited with status {rc}; see {LOG_NAME}"]
        self.finish(entry, status, started)

    def xdist_workers(self, name: str) -> int:
        """pytest-xdist workers for the kernel tests on a GPU: compiles and small launches overlap."""
        if name != "kernels" or self.args.small or not self.cuda or importlib.util.find_spec("xdist") is None:
            return 0
        return max(1, min(8, (os.cpu_count() or 2) // 2))

    def run_worker(self, batch: list[str]) -> None:
        """Run worker steps in one subprocess; restart it after a step that timed out or crashed."""
        while batch:
            events = self.tmp / f"worker-{len(self.result['steps'])}.jsonl"
            cmd = [sys.executable, str(Path(__file__).resolve().with_name("gpu_quick_steps.py")), "--steps",
                   ",".join(batch), "--repeats", str(self.args.repeats)] + (["--small"] if self.args.small else [])
            proc = self.spawn(cmd, events)
            reader = EventReader(events)
            current = self.new_step(batch[0])
            timeout = current["timeout_s"] = round(self.step_timeout(batch[0]), 1)
            started = deadline_from = time.monotonic()
            self.write()
            while True:
                exited = proc.poll() is not None
                for event in reader.new():
                    kind = event.get("event")
                    if kind == "record":
                        current["records"].append(event["record"])
                    elif kind in ("error", "note"):
                        current[kind + "s"].append(event["text"])
                    elif kind == "info":
                        current.update(event["info"])
                        if "cuda" in event["info"]:
                            self.cuda = event["info"]["cuda"]
                    elif kind == "end":
                        current["summary"] = event.get("summary")
                        if event.get("traceback"):
                            current["traceback"] = event["traceback"]
                        self.finish(current, event["status"], started)
                        batch.pop(0)
                        if not batch:
                            break
                        if self.remaining() < MIN_STEP_S:
                            self.kill(proc)
                            for n in batch:
                                self.skip(n, "the round's time budget is spent")
                            batch.clear()
                            break
                        current = self.new_step(batch[0])
                        timeout = current["timeout_s"] = round(self.step_timeout(batch[0]), 1)
                        started = deadline_from = time.monotonic()
                        self.write()
                    else:
                        continue
                    self.write()
                if not batch:
                    try:
                        proc.wait(timeout=30)          # the worker's own exit (CUDA teardown)
                    except subprocess.TimeoutExpired:
                        self.kill(proc)
                    return
                if exited:
                    current["errors"].append(f"the worker exited with status {proc.returncode} during this step; "
                                             f"see {LOG_NAME}")
                    self.finish(current, "crashed", started)
                    batch.pop(0)
                    break                               # restart the worker for the steps after it
                if time.monotonic() - deadline_from > timeout:
                    self.kill(proc)
                    for event in reader.new():          # records that arrived in the meantime
                        if event.get("event") == "record":
                            current["records"].append(event["record"])
                    current["errors"].append(f"timed out after {timeout:.0f}s")
                    self.finish(current, "timeout", started)
                    batch.pop(0)
                    break
                time.sleep(0.2)
            if batch and self.remaining() < MIN_STEP_S:
                for n in batch:
                    self.skip(n, "the round's time budget is spent")
                return


def summary_table(result: dict) -> str:
    lines = ["", f"{'step':<20} {'status':<9} {'seconds':>8}  summary"]
    for s in result["steps"]:
        seconds = f"{s['seconds']:.1f}" if s.get("seconds") is not None else "-"
        lines.append(f"{s['name']:<20} {s['status']:<9} {seconds:>8}  {s.get('summary') or s.get('reason') or ''}")
        for err in s.get("errors", [])[:3]:
            lines.append(f"{'':<20} ! {err[:160]}")
    for s in result["steps"]:
        if s["name"] == "encoder":
            lines += ["", "encoder (ours vs transformers):",
                      f"  {'workload':<12} {'patches':>8} {'ours ms':>9} {'hf ms':>9} {'speedup':>8} {'max err':>9} "
                      f"{'ours MiB':>9} {'hf MiB':>9}"]
            for r in s["records"]:
                if "workload" in r:
                    lines.append(f"  {r['workload']:<12} {r['patches']:>8} {_fmt(r['ours_ms'])} {_fmt(r['hf_ms'])} "
                                 f"{_fmt(r['speedup'], 8, '.2f')} {_fmt(r['max_rel_err_vs_hf'], 9, '.1e')} "
                                 f"{_fmt(r['ours_peak_mib'], 9, '.0f')} {_fmt(r['hf_peak_mib'], 9, '.0f')}")
    lines.append(f"\nelapsed {result.get('elapsed_s')}s of a {result['budget_s']:.0f}s budget")
    return "\n".join(lines)


def _fmt(value, width: int = 9, spec: str = ".2f") -> str:
    return f"{value:>{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"gpu_quick: error: {e}", file=sys.stderr)
        return 2
    return Round(args).run()


if __name__ == "__main__":
    sys.exit(main())
