"""The names and defaults of the library's options, importable without torch.

The CLI builds its parser from them (`glm4v-fast --help` must stay quick); the modules that take the options
import them from here, so there is one list of each.
"""
from __future__ import annotations

ATTN_BACKENDS = ("flash_attn", "torch_varlen", "triton", "sdpa")   # attention.BACKENDS; "auto" picks one
KERNEL_CHOICES = ("auto", "triton", "torch")                       # VisionModel(kernels=...)
COMPILE_CHOICES = ("auto", "cpu", "off")                          # VisionModel(compile=...): the compiled CPU path
DTYPE_NAMES = ("float32", "bfloat16", "float16")                   # compute and storage dtypes by name
# PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS with its default setting): beyond this many pixels PIL raises
# DecompressionBombError. The default of VisionProcessor.max_image_pixels (imageio).
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
