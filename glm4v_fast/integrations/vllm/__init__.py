"""glm4v-fast inside vLLM (`pip install 'glm4v-fast[vllm]'`).

- The plugin (entry point `vllm.general_plugins` -> `plugin.register`): vLLM's GLM-4.1V and GLM-4.5V models get
  glm4v-fast's vision tower (models.py, tower.py; the choice and how to force it: selection.py), and their
  processing (processing.py) accepts precomputed image embeddings and video embeddings with their timestamps.
- Precomputed embeddings (embeds.py): our encoder's output as vLLM's `multi_modal_data` or as OpenAI chat
  `image_embeds` / `video_embeds` content parts.
- Disaggregated encoding (EPD): `ECProducer` (ec_producer.py) writes embeddings where vLLM's
  `ECExampleConnector` reads them; `GLM4VFastECConnector` (ec_connector.py, for `ec_connector_module_path`)
  fetches them from a running `glm4v-fast serve` (a failed fetch leaves the item to vLLM's own tower).
- vLLM on a CPU with PyPI's CUDA torchvision (cpu_torchvision.py, the `glm4v-fast-vllm-cpu` command): a start-up
  hook that makes torchvision importable next to a CPU torch.

Importing this package does not import vLLM; each helper imports what it needs when called.
"""
from __future__ import annotations

from ..engines import lazy_exports
from ._version import TESTED_RANGE, check_vllm_version, installed_vllm_version

_LAZY = {
    "register": "plugin",
    "embeds_to_multi_modal_data": "embeds",
    "image_embeds_content_part": "embeds",
    "video_embeds_content_part": "embeds",
    "embeddings_from_server_response": "embeds",
    "video_embeddings_from_server_response": "embeds",
    "server_request_body": "embeds",
    "ECProducer": "ec_producer",
    "GLM4VFastECConnector": "ec_connector",
}

__all__ = ["TESTED_RANGE", "check_vllm_version", "installed_vllm_version", *_LAZY]


__getattr__ = lazy_exports(__name__, _LAZY)
