"""A vLLM EC connector whose encoder is a running `glm4v-fast serve`: no shared disk, no local vision tower.

    vllm serve GLM-4.1V --ec-transfer-config '{"ec_connector": "GLM4VFastECConnector",
        "ec_connector_module_path": "glm4v_fast.integrations.vllm.ec_connector", "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"server_url": "http://encoder:8000"}}'

Items whose identifier (the client's `multi_modal_uuids` entry) starts with the prefix ("glm4v-fast:" unless
`uuid_prefix` says otherwise) are fetched; any other item is encoded by the engine's own tower as usual. For a
fetched image the scheduler side takes the processed pixels vLLM already holds for the request (0-255 patch rows:
vLLM's `mm_device_do_normalize` input contract) and its grid; the worker side turns them back into the resized
RGB image (sides multiples of 28, so the server's processor keeps the size and the grid), posts all images of the
step in one `POST /v1/embeddings` with `Accept: application/vnd.safetensors`, checks each returned grid against
the request's, and puts the embeddings into vLLM's encoder cache: the engine runs no vision tower for them.

Options (`ec_connector_extra_config`): `server_url` (required), `api_key` (else the GLM4V_FAST_API_KEY environment
variable; sent as `Authorization: Bearer <key>`), `timeout_s` (60), `uuid_prefix` ("glm4v-fast:").
Images only: a video item with the prefix is refused with a ValueError naming it.
"""
from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorMetadata, ECConnectorRole

from ._version import check_vllm_version

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

check_vllm_version()

API_KEY_ENV = "GLM4V_FAST_API_KEY"
DEFAULT_PREFIX = "glm4v-fast:"
_SERVER_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ImageToFetch:
    identifier: str
    pixel_values: torch.Tensor           # (t*h*w, C*T*P*P) uint8, vLLM's processed patch rows
    grid_thw: list[int]


@dataclass
class GLM4VFastECMetadata(ECConnectorMetadata):
    items: list[ImageToFetch] = field(default_factory=list)


def patches_to_image(pixel_values: torch.Tensor, grid_thw, patch_size: int = 14, temporal_patch_size: int = 2,
                     merge_size: int = 2, channels: int = 3):
    """The (H, W, C) uint8 image whose patchify (transformers' GLM-4V / Qwen2-VL order) gives these rows."""
    import numpy as np

    t, h, w = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"an image has grid t=1, got grid_thw {list(grid_thw)}")
    if pixel_values.dtype != torch.uint8:
        raise ValueError(f"expected vLLM's raw 0-255 uint8 pixels (mm_device_do_normalize, the default), got "
                         f"{pixel_values.dtype}: GLM4VFastECConnector needs mm_device_do_normalize on")
    m, p, tp = merge_size, patch_size, temporal_patch_size
    if pixel_values.shape != (t * h * w, channels * tp * p * p):
        raise ValueError(f"pixel rows {tuple(pixel_values.shape)} do not match grid_thw {list(grid_thw)}")
    x = pixel_values.reshape(t, h // m, w // m, m, m, channels, tp, p, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * tp, channels, h * p, w * p)
    return np.ascontiguousarray(x[0].permute(1, 2, 0).numpy())       # the temporal copies of an image are equal


def _png_b64(image) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class GLM4VFastECConnector(ECConnectorBase):
    """Consumer-only EC connector: embeddings of prefixed items come from `glm4v-fast serve`."""

    def __init__(self, vllm_config: "VllmConfig", role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        config = vllm_config.ec_transfer_config
        extra = dict(config.ec_connector_extra_config or {}) if config is not None else {}
        if config is None or not config.is_ec_consumer or config.is_ec_producer:
            raise ValueError("GLM4VFastECConnector is a consumer: set ec_role to 'ec_consumer'")
        self.server_url = str(extra.get("server_url") or "").rstrip("/")
        if not self.server_url.startswith(("http://", "https://")):
            raise ValueError("GLM4VFastECConnector needs ec_connector_extra_config['server_url'], e.g. "
                             "'http://127.0.0.1:8000' (a running glm4v-fast serve)")
        self.api_key = extra.get("api_key") or os.environ.get(API_KEY_ENV) or None
        self.timeout_s = float(extra.get("timeout_s", 60))
        self.prefix = str(extra.get("uuid_prefix", DEFAULT_PREFIX))
        hf = vllm_config.model_config.hf_config.vision_config
        self.geometry = dict(patch_size=hf.patch_size, temporal_patch_size=hf.temporal_patch_size,
                             merge_size=hf.spatial_merge_size, channels=hf.in_channels)
        self.dtype = vllm_config.model_config.dtype
        self._pending: list[ImageToFetch] = []
        self._client = None
        self.fetched = 0               # items put into the encoder cache by this (worker-side) connector

    # ------------------------------------------------------------------ scheduler side
    def has_cache_item(self, identifier: str) -> bool:
        return isinstance(identifier, str) and identifier.startswith(self.prefix)

    def update_state_after_alloc(self, request: "Request", index: int) -> None:
        feature = request.mm_features[index]
        if not self.has_cache_item(feature.identifier):
            return
        if feature.modality != "image":
            raise ValueError(f"GLM4VFastECConnector fetches images only; the {feature.modality} item "
                             f"{feature.identifier!r} has the prefix {self.prefix!r}: give it another UUID")
        if feature.data is None:
            raise ValueError(f"item {feature.identifier!r} reached the scheduler without its pixels")
        pixels = feature.data["pixel_values"].data
        grid = feature.data["image_grid_thw"].data
        self._pending.append(ImageToFetch(feature.identifier, pixels, [int(v) for v in torch.as_tensor(grid)]))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> ECConnectorMetadata:
        meta = GLM4VFastECMetadata(items=self._pending)
        self._pending = []
        return meta

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        return False, None

    # ------------------------------------------------------------------ worker side
    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs) -> None:
        from vllm.platforms import current_platform

        metadata = self._get_connector_metadata()
        items = [i for i in getattr(metadata, "items", []) if i.identifier not in encoder_cache]
        if not items:
            return
        unique = list({i.identifier: i for i in items}.values())
        embeddings = self.fetch([i.pixel_values for i in unique], [i.grid_thw for i in unique])
        device = current_platform.device_type
        if current_platform.is_cuda_alike():
            device = f"{device}:{current_platform.current_device()}"
        for item, emb in zip(unique, embeddings):
            encoder_cache[item.identifier] = emb.to(device=device, dtype=self.dtype)
            self.fetched += 1

    def save_caches(self, encoder_cache, mm_hash, **kwargs) -> None:
        return None                    # consumer only

    def fetch(self, pixel_values: list[torch.Tensor], grids: list[list[int]]) -> list[torch.Tensor]:
        """Embeddings of these images from the server, each checked against its grid."""
        import httpx
        from safetensors.torch import load

        images = [_png_b64(patches_to_image(p, g, **self.geometry)) for p, g in zip(pixel_values, grids)]
        headers = {"Accept": "application/vnd.safetensors"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout_s)
        body = {"images": images, "dtype": _SERVER_DTYPES.get(self.dtype, "float32")}
        response = self._client.post(f"{self.server_url}/v1/embeddings", json=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"glm4v-fast serve at {self.server_url} answered {response.status_code}: "
                               f"{response.text[:500]}")
        tensors = load(response.content)
        got = tensors["grid_thw"].tolist()
        if got != [list(g) for g in grids]:
            raise RuntimeError(f"glm4v-fast serve resized the images to grids {got}, vLLM's processor gave "
                               f"{grids}: give both the same processor limits (min/max pixels)")
        return [tensors[f"embedding.{i}"] for i in range(len(grids))]

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        super().shutdown()
