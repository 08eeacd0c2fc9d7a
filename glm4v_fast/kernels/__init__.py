"""Triton kernels for the GLM-4V vision tower.

Each op lives in its own module with its Triton kernel, a host wrapper (input checks, optional ``out=``)
and a pure-PyTorch twin ``*_reference`` that mirrors transformers' numerics. Every launcher is registered as
``torch.ops.glm4v_fast.*``, which torch.compile traces as single ops; eager calls launch directly.

Autograd: rms_norm (with its residual add), apply_rotary / apply_rotary_qk, swiglu and layer_norm_gelu are
differentiable through Triton backward kernels (``torch.autograd.Function``s used only when a gradient is
needed; otherwise the plain forward runs). varlen_attention is forward-only and raises when its inputs
require grad. Each op module also lists its CUDA compile configurations in ``aot_specs()``.

The kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
first imported. Importing this package never needs triton; calling a kernel without it raises.
Use :func:`can_run_on` to decide between the kernels and the PyTorch path.
"""
from ._utils import can_run_on, interpreter_enabled, triton_available
from .layer_norm_gelu import layer_norm_gelu, layer_norm_gelu_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rotary import apply_rotary, apply_rotary_qk, apply_rotary_qk_reference, apply_rotary_reference
from .swiglu import swiglu, swiglu_reference
from .varlen_attention import TilePlan, varlen_attention, varlen_attention_reference, varlen_tile_plan

__all__ = [
    "TilePlan",
    "apply_rotary",
    "apply_rotary_qk",
    "apply_rotary_qk_reference",
    "apply_rotary_reference",
    "can_run_on",
    "interpreter_enabled",
    "layer_norm_gelu",
    "layer_norm_gelu_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "triton_available",
    "varlen_attention",
    "varlen_attention_reference",
    "varlen_tile_plan",
]
