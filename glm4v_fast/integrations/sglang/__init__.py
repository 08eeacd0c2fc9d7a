"""glm4v-fast inside SGLang (`pip install 'glm4v-fast[sglang]'`).

- The plugin (entry point `sglang.srt.plugins` -> `plugin.register`): SGLang's GLM-4.1V and GLM-4.5V models get
  glm4v-fast's vision tower (models.py, tower.py; the choice and how to force it: selection.py), and SGLang's
  GLM-4V processor takes precomputed image embeddings in both of SGLang's formats (processing.py).
- Precomputed embeddings (embeds.py): our encoder's output, or our server's answer, as SGLang's `image_data`
  (and `video_data`).

Importing this package does not import SGLang; each helper imports what it needs when called.
"""
from __future__ import annotations

from ..engines import lazy_exports
from ._version import TESTED_RANGE, check_sglang_version, installed_sglang_version

_LAZY = {
    "register": "plugin",
    "image_item": "embeds",
    "video_item": "embeds",
    "expand_video_tokens": "embeds",
    "image_item_from_server_response": "embeds",
    "video_item_from_server_response": "embeds",
    "expand_image_tokens": "embeds",
    "tokens_per_image": "embeds",
    "json_item": "embeds",
    "server_request_body": "embeds",
}

__all__ = ["TESTED_RANGE", "check_sglang_version", "installed_sglang_version", *_LAZY]


__getattr__ = lazy_exports(__name__, _LAZY)
