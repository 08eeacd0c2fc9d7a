"""Ahead-of-time compilation specs: every kernel configuration a launcher can choose, as data.

Each kernel module exposes ``aot_specs() -> list[AotSpec]``. ``tests/test_aot.py`` (``pytest -m aot``)
compiles every spec for sm_90a and sm_80 with the installed triton's compiler on a machine without a GPU,
and checks that the GLM bf16/fp16 configurations compile without register spills.

The compile side (:func:`compile_spec`, :func:`main`) needs kernels built as ``JITFunction``s, i.e. triton
imported without ``TRITON_INTERPRET=1``; the test suite sets it, so the tests run :func:`main` in a
subprocess (``python -c "from glm4v_fast.kernels._aot import main; main()" --json out.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ARCHS", "AotSpec", "compile_spec", "discover", "kernel_modules", "main"]

#: Targets by name -> CUDA compute capability (``GPUTarget("cuda", cap, 32)``; 90 compiles for sm_90a).
ARCHS = {"sm_90a": 90, "sm_80": 80}

_PACKAGE = "glm4v_fast.kernels"


@dataclass(frozen=True)
class AotSpec:
    """One kernel configuration, described the way a real launch would specialise it.

    name: a readable id, e.g. ``"rms_norm/bf16/C=1536"``.
    kernel: the ``@triton.jit`` function.
    signature: every runtime (non-constexpr) argument -> triton type string (``"*bf16"``, ``"*fp32"``,
        ``"*i32"``, ``"i32"``, ``"i64"``, ``"fp32"``), in the kernel's argument order.
    constexprs: every ``tl.constexpr`` argument -> its value.
    num_warps, num_stages: the launch options the launcher passes.
    aligned: arguments a real launch specialises as divisible by 16 (pointers 16-byte aligned; integer
        strides and sizes multiples of 16, as GLM's are).
    no_spills: True for the bf16/fp16 configurations GLM shapes use: they must compile without spills
        (asserted for sm_90a, the target of the GPU image; sm_80 figures are recorded).
    slow: compiles for many seconds (ptxas on a spilling kernel): scheduled first, so that parallel
        workers finish together.
    extra: recorded with the compile figures; ``extra["config"]``, a short description of the tile sizes,
        is shown in the report.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()
    no_spills: bool = False
    slow: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ discovery
def kernel_modules() -> list[str]:
    """Names of the kernel modules of glm4v_fast.kernels (private helpers such as _utils excluded)."""
    package = importlib.import_module(_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def discover(modules: list[str] | None = None) -> dict[str, list[AotSpec] | str]:
    """module name -> its specs, or the reason it has none (no ``aot_specs()``)."""
    found: dict[str, list[AotSpec] | str] = {}
    for name in kernel_modules() if modules is None else modules:
        module = importlib.import_module(f"{_PACKAGE}.{name}")
        make = getattr(module, "aot_specs", None)
        found[name] = list(make()) if callable(make) else f"{_PACKAGE}.{name} defines no aot_specs()"
    return found


# ------------------------------------------------------------------------------------------------ compiling
def _source(spec: AotSpec):
    """The ``ASTSource`` of a spec, with the divisibility attributes a real launch gives.

    The form of triton 3.6 (the GPU image) and 3.9 (CI), both checked: the signature names every argument,
    constexprs as ``"constexpr"``; attributes map ``(argument index,)`` to ``[["tt.divisibility", 16]]``, as
    ``JITFunction._pack_args`` builds them. Triton <= 3.2 took an ``AttrsDescriptor`` instead: refused.
    """
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 3):
        raise RuntimeError(f"ahead-of-time specs need triton >= 3.3 (ASTSource with string signatures), "
                           f"found {triton.__version__}")
    fn = spec.kernel
    names = list(getattr(fn, "arg_names", ()))
    if not names or not hasattr(fn, "cache_key"):
        raise ValueError(f"{spec.name}: {fn!r} is not a compiled-mode @triton.jit function (is TRITON_INTERPRET set?)")
    unknown = (set(spec.signature) | set(spec.constexprs)) - set(names)
    missing = set(names) - set(spec.signature) - set(spec.constexprs)
    both = set(spec.signature) & set(spec.constexprs)
    if unknown or missing or both:
        raise ValueError(f"{spec.name}: signature/constexprs do not match {fn.__name__}{tuple(names)}: "
                         f"unknown {sorted(unknown)}, missing {sorted(missing)}, in both {sorted(both)}")
    bad_align = [a for a in spec.aligned if a not in spec.signature or spec.signature[a].startswith("fp")]
    if bad_align:
        raise ValueError(f"{spec.name}: aligned names {bad_align} are not pointer or integer arguments")
    signature = {n: spec.signature.get(n, "constexpr") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in spec.aligned}
    return triton.compiler.ASTSource(fn, signature, dict(spec.constexprs), attrs)


_PTXAS_RE = {
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "regs": re.compile(r"Used (\d+) registers"),
}


def _ptxas_figures(log: str) -> dict[str, int]:
    figures = {}
    for key, pattern in _PTXAS_RE.items():
        match = pattern.search(log)
        if match is None:
            raise RuntimeError(f"no '{key}' in the ptxas log (TRITON_DUMP_PTXAS_LOG unsupported?): {log[:500]!r}")
        figures[key] = int(match.group(1))
    return figures


def _compile_env() -> None:
    """Make every compile run ptxas and print its log (read by triton's knobs at each compile)."""
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    # The GPU image's triton 3.6 fuses multiply-adds by default; 3.9 warns that its default will change.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def compile_spec(spec: AotSpec, arch: str) -> dict:
    """Compile one spec for ``arch`` (a key of :data:`ARCHS`); returns its figures, or the error.

    regs / spill_stores / spill_loads / stack_frame (bytes per thread) come from ``ptxas -v``, which triton
    runs on every compile and prints when ``TRITON_DUMP_PTXAS_LOG=1``, with ``TRITON_ALWAYS_COMPILE=1`` so
    that a cache hit does not skip it: this sets both in the process environment. ``shared`` is the kernel's static shared memory
    (bytes); ``wgmma``: the TTGIR has a ``warp_group_dot`` and the PTX a ``wgmma.mma_async``;
    ``cp_async``: the PTX has ``cp.async`` loads (the software pipeline's asynchronous copies);
    ``sass_hgmma``: HGMMA instructions in the SASS (nvdisasm, shipped with triton; counted only where the
    TTGIR has wgmma, None without nvdisasm).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    row: dict[str, Any] = {"name": spec.name, "arch": arch, "num_warps": spec.num_warps,
                           "num_stages": spec.num_stages, "no_spills": spec.no_spills,
                           "config": f"w{spec.num_warps} s{spec.num_stages}", **spec.extra}
    _compile_env()
    started = time.perf_counter()
    try:
        src = _source(spec)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton_compile(src, target=GPUTarget("cuda", ARCHS[arch], 32),
                                    options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        row.update(_ptxas_figures(log.getvalue()))
        ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
        wgmma = "warp_group_dot" in ttgir and "wgmma.mma_async" in ptx
        row.update(ok=True, shared=int(kernel.metadata.shared), wgmma=wgmma, cp_async="cp.async" in ptx,
                   sass_hgmma=_count_sass(kernel.asm["cubin"], "HGMMA") if wgmma else 0)
    except Exception as e:  # noqa: BLE001 - reported per spec; the test names the failure
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def _count_sass(cubin: bytes, opcode: str) -> int | None:
    """Occurrences of ``opcode`` in the SASS of ``cubin``, from the nvdisasm that ships with triton."""
    import triton.backends.nvidia as nvidia_backend

    nvdisasm = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, f.name], capture_output=True, text=True, check=True).stdout
    return len(re.findall(rf"\b{opcode}\b", sass))


# The worker processes inherit the discovered specs through fork (kernels are not picklable).
_JOBS: list[tuple[AotSpec, str]] = []


def _run_job(index: int) -> dict:
    spec, arch = _JOBS[index]
    return compile_spec(spec, arch)


def compile_all(specs: list[AotSpec], archs: list[str], jobs: int = 1) -> list[dict]:
    """compile_spec for every (spec, arch), on ``jobs`` forked worker processes; rows in input order."""
    import concurrent.futures
    import multiprocessing

    jobs_list = [(spec, arch) for spec in specs for arch in archs]
    order = sorted(range(len(jobs_list)), key=lambda i: not jobs_list[i][0].slow)   # stable: slow ones first
    _JOBS[:] = [jobs_list[i] for i in order]
    if jobs <= 1 or len(_JOBS) <= 1:
        rows = [_run_job(i) for i in range(len(_JOBS))]
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_run_job, range(len(_JOBS))))
    out: list[dict] = [{}] * len(rows)
    for position, i in enumerate(order):
        out[i] = rows[position]
    return out


def main(argv: list[str] | None = None) -> int:
    """Discover every module's specs, compile them for each arch, write the rows as JSON."""
    p = argparse.ArgumentParser(prog="glm4v_fast.kernels._aot", description=main.__doc__)
    p.add_argument("--json", required=True, help="output file")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {','.join(ARCHS)}")
    p.add_argument("--modules", help="comma-separated kernel modules (default: all)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="worker processes (default: one per core, at most 8)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET is set: kernels would be interpreted, not compiled")
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise SystemExit(f"unknown arch(s) {unknown}; choose from {list(ARCHS)}")
    _compile_env()
    import triton

    with tempfile.TemporaryDirectory(prefix="glm4v-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        found = discover(args.modules.split(",") if args.modules else None)
        specs = [s for v in found.values() if isinstance(v, list) for s in v]
        started = time.perf_counter()
        rows = compile_all(specs, archs, args.jobs)
    result = {
        "triton": triton.__version__,
        "archs": archs,
        "modules": {name: (len(v) if isinstance(v, list) else v) for name, v in found.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)   # extra may hold non-JSON values (dtypes)
    failed = [r for r in rows if not r["ok"]]
    print(f"compiled {len(rows) - len(failed)}/{len(rows)} in {result['seconds']} s with triton "
          f"{triton.__version__}", file=sys.stderr)
    return 0
