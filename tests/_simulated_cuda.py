"""pytest plugin (``-p _simulated_cuda``, with tests/ on PYTHONPATH): the test selection as a CUDA machine sees it.

torch reports one CUDA device and the Triton interpreter is off (TRITON_INTERPRET is dropped before triton is
imported), which is what tests/conftest.py meets on a GPU machine. Nothing can run on that device: this is for
collecting the selection, and for running its tests that need no GPU, on a CPU-only machine (CI).

With ``SIMULATED_CUDA_REPORT`` set to a path, the collected items are written there as JSON: node id, marker
names, and the reason of each skip mark that was added at collection.
"""
import json
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1


def pytest_collection_finish(session):
    path = os.environ.get("SIMULATED_CUDA_REPORT")
    if not path:
        return
    items = [{"nodeid": item.nodeid,
              "markers": sorted({m.name for m in item.iter_markers()}),
              "skips": [m.kwargs.get("reason", m.args[0] if m.args else "") for m in item.iter_markers("skip")]}
             for item in session.items]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(items, f)
