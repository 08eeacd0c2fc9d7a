"""Print a wheel's requirements for this platform, one a line, leaving out the packages named after --without.

The environments of the vLLM releases without a CPU build (Makefile: `lock-vllm-MINOR`) install vLLM's CUDA wheel
with --no-deps and its other requirements from this list: the CUDA-only kernel packages (and torch, which the
shared base provides) are left out, since nothing that runs without vLLM's compiled ops imports them.

    python wheel_requirements.py vllm-0.34.0-...whl --without torch torchvision flashinfer-python ...
"""
from __future__ import annotations

import argparse
import re
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def requirements(wheel: str, without: set[str]) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        metadata = Parser().parsestr(archive.read(name).decode("utf-8"))
    kept = []
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue                     # another platform, or an optional extra
        if canonicalize_name(req.name) in without:
            continue
        req.marker = None
        kept.append(str(req))
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel")
    parser.add_argument("--without", nargs="*", default=[])
    args = parser.parse_args()
    print("\n".join(requirements(args.wheel, {canonicalize_name(n) for n in args.without})))


if __name__ == "__main__":
    main()
