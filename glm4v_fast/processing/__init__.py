"""GLM-4V image and video preprocessing, equal to transformers' GLM-4V processors without importing transformers
or torchvision.

* :mod:`.image`: ``ImageProcessor``, images with either backend of transformers: ``"torchvision"``
  (``Glm4vImageProcessor``, transformers' default) or ``"pil"`` (``Glm4vImageProcessorPil``).
* :mod:`.video`: ``VideoProcessor``, videos as ``Glm4vVideoProcessor``.
* :mod:`.processor`: ``VisionProcessor``, both together, the one the rest of glm4v-fast uses.
* :mod:`.sizing` (``smart_resize`` and the pixel budgets), :mod:`.values` (rescale + normalize tables, the patch
  gather), :mod:`.threads` (torch's threads in the workers), :mod:`.config` (config files),
  :mod:`.arguments` (argument checks). The torch resize itself is :mod:`glm4v_fast.transforms`.
"""
from .arguments import BACKENDS, DEFAULT_BACKEND
from .config import IMAGE_CONFIG_NAME, VIDEO_CONFIG_NAME
from .image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from .processor import VisionProcessor
from .sizing import DEFAULT_IMAGE_SIZE, DEFAULT_VIDEO_SIZE, smart_resize
from .video import VideoProcessor

__all__ = ["VisionProcessor", "ImageProcessor", "VideoProcessor", "smart_resize", "OPENAI_CLIP_MEAN",
           "OPENAI_CLIP_STD", "DEFAULT_IMAGE_SIZE", "DEFAULT_VIDEO_SIZE", "BACKENDS", "DEFAULT_BACKEND",
           "IMAGE_CONFIG_NAME", "VIDEO_CONFIG_NAME"]
