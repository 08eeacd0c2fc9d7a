"""A vLLM EC connector whose encoder is a running `glm4v-fast serve`: no shared disk, no local vision tower.

    vllm serve GLM-4.1V --ec-transfer-config '{"ec_connector": "GLM4VFastECConnector",
        "ec_connector_module_path": "glm4v_fast.integrations.vllm.ec_connector", "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"server_url": "http://encoder:8000"}}'

Images whose identifier (the client's `multi_modal_uuids` entry) starts with the prefix ("glm4v-fast:" unless
`uuid_prefix` says otherwise) are fetched; any other item is encoded by the engine's own tower as usual.

Where: the scheduler side, through vLLM's `ensure_cache_available` hook, which defers a request while its items are
in transit. For a request's prefixed images it takes the processed pixels vLLM already holds (0-255 patch rows:
vLLM's `mm_device_do_normalize` input contract) and their grids, turns them back into the resized RGB images (sides
multiples of 28, so the server's processor keeps the size and the grid), posts them in one `POST /v1/embeddings`
with `Accept: application/vnd.safetensors` on a background thread, and checks each returned grid against the
request's. The embeddings travel to the worker side in the step's connector metadata and go into vLLM's encoder
cache: the engine runs no vision tower for them.

Failures never stop the engine. At start-up the scheduler side checks the server (reachable, API key accepted)
and refuses to start with an error naming the fix. Later, a fetch that fails (server gone, 401, timeout, a wrong
grid) is logged as a warning and its images are encoded by the engine's own tower, as unprefixed ones are; after a
failure the connector sends every image to the local tower for `retry_after_s` before trying the server again.
A prefixed video, or an image whose pixels the scheduler does not hold, goes to the local tower too (logged once):
the server encodes images from their pixels, and vLLM's video rows are frame pairs the server would re-sample.

Options (`ec_connector_extra_config`): `server_url` (required), `api_key` (else the GLM4V_FAST_API_KEY environment
variable; sent as `Authorization: Bearer <key>`), `timeout_s` (60), `uuid_prefix` ("glm4v-fast:"),
`retry_after_s` (10), `check_server` (true: the start-up check).
"""
from __future__ import annotations

import base64
import io
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
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


# A child of vLLM's logger: its handler and level (VLLM_LOGGING_LEVEL) apply.
logger = logging.getLogger("vllm.glm4v_fast")


@dataclass
class ImageToFetch:
    identifier: str
    pixel_values: torch.Tensor           # (t*h*w, C*T*P*P) uint8, vLLM's processed patch rows
    grid_thw: list[int]


@dataclass
class GLM4VFastECMetadata(ECConnectorMetadata):
    """The embeddings fetched for this step's scheduled items, by identifier (scheduler side -> worker side)."""
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


class ServerError(RuntimeError):
    """glm4v-fast serve could not give embeddings (unreachable, refused, a wrong answer)."""


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
    """Consumer-only EC connector: embeddings of prefixed images come from `glm4v-fast serve`."""

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
        self.retry_after_s = float(extra.get("retry_after_s", 10))
        self.prefix = str(extra.get("uuid_prefix", DEFAULT_PREFIX))
        hf = vllm_config.model_config.hf_config.vision_config
        self.geometry = dict(patch_size=hf.patch_size, temporal_patch_size=hf.temporal_patch_size,
                             merge_size=hf.spatial_merge_size, channels=hf.in_channels)
        self.dtype = vllm_config.model_config.dtype
        self._client = None
        self._init_state()
        self.fetched = 0               # items put into the encoder cache by this (worker-side) connector
        check = _flag(extra.get("check_server", True))
        if role == ECConnectorRole.SCHEDULER:
            self._http()               # made once here: the fetch threads share it
            if check:
                self.check_server()

    def _init_state(self) -> None:
        self._ready: dict[str, torch.Tensor] = {}            # fetched, waiting to be scheduled
        self._local: set[str] = set()                        # left to the engine's own tower
        self._in_flight: dict[str, Future] = {}              # request id -> its fetch
        self._resolved: set[str] = set()                     # requests whose prefixed items are all decided
        self._users: dict[str, set[str]] = {}                # identifier -> requests that hold it
        self._to_send: dict[str, torch.Tensor] = {}          # this step's embeddings for the worker side
        self._down_until = 0.0
        self._warned: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ the server
    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/vnd.safetensors"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _http(self):
        import httpx

        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout_s)
        return self._client

    def check_server(self) -> None:
        """Raise a RuntimeError naming the fix unless the server answers and accepts our API key.

        An empty embeddings request costs the server nothing: the key is checked first (401), then the body (400).
        """
        import httpx

        try:
            response = self._http().post(f"{self.server_url}/v1/embeddings", json={}, headers=self._headers())
        except httpx.HTTPError as exc:
            raise RuntimeError(
                f"GLM4VFastECConnector: no glm4v-fast serve answers at {self.server_url} ({type(exc).__name__}: "
                f"{exc}). Start it (glm4v-fast serve --checkpoint DIR --host ... --port ...) or fix "
                f"ec_connector_extra_config['server_url']; 'check_server': false skips this check") from exc
        if response.status_code == 401:
            how = ("the key sent was refused" if self.api_key else "no key was sent")
            raise RuntimeError(
                f"GLM4VFastECConnector: glm4v-fast serve at {self.server_url} requires an API key and {how} "
                f"({_server_message(response)}). Give the server's key as ec_connector_extra_config['api_key'] "
                f"or in the {API_KEY_ENV} environment variable of the vLLM process")
        if response.status_code == 404:
            raise RuntimeError(f"GLM4VFastECConnector: {self.server_url} has no /v1/embeddings route (404): is it "
                               f"a glm4v-fast serve?")
        if response.status_code >= 500:
            raise RuntimeError(f"GLM4VFastECConnector: glm4v-fast serve at {self.server_url} answered "
                               f"{response.status_code}: {_server_message(response)}")

    def fetch(self, pixel_values: list[torch.Tensor], grids: list[list[int]]) -> list[torch.Tensor]:
        """Embeddings of these images from the server, each checked against its grid; a ServerError otherwise."""
        import httpx
        from safetensors.torch import load

        images = [_png_b64(patches_to_image(p, g, **self.geometry)) for p, g in zip(pixel_values, grids)]
        body = {"images": images, "dtype": _SERVER_DTYPES.get(self.dtype, "float32")}
        try:
            response = self._http().post(f"{self.server_url}/v1/embeddings", json=body, headers=self._headers())
        except httpx.HTTPError as exc:
            raise ServerError(f"glm4v-fast serve at {self.server_url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise ServerError(f"glm4v-fast serve at {self.server_url} answered {response.status_code}: "
                              f"{_server_message(response)}")
        tensors = load(response.content)
        got = tensors["grid_thw"].tolist()
        if got != [list(g) for g in grids]:
            raise ServerError(f"glm4v-fast serve resized the images to grids {got}, vLLM's processor gave "
                              f"{grids}: give both the same processor limits (min/max pixels)")
        return [tensors[f"embedding.{i}"] for i in range(len(grids))]

    # ------------------------------------------------------------------ scheduler side
    def has_cache_item(self, identifier: str) -> bool:
        return identifier in self._ready

    def _prefixed(self, feature) -> bool:
        identifier = getattr(feature, "identifier", None)
        return isinstance(identifier, str) and identifier.startswith(self.prefix)

    def _keep_local(self, identifier: str, why: str) -> None:
        self._local.add(identifier)
        if why not in self._warned:
            self._warned.add(why)
            logger.warning("glm4v-fast: %s is encoded by vLLM's own tower: %s", identifier, why)

    def ensure_cache_available(self, request: "Request", num_computed_tokens: int) -> bool:
        """Start or finish the fetch of a request's prefixed images; False (defer the request) while in transit."""
        request_id = request.request_id
        if request_id in self._resolved:
            return True
        future = self._in_flight.get(request_id)
        if future is not None:
            if not future.done():
                return False
            del self._in_flight[request_id]
            self._take(request_id, future)
            self._resolved.add(request_id)
            return True
        wanted = []
        for feature in request.mm_features or []:
            if not self._prefixed(feature) or feature.identifier in self._ready or feature.identifier in self._local:
                continue
            if feature.modality != "image":
                self._keep_local(feature.identifier, f"the {feature.modality} items with the prefix {self.prefix!r}: "
                                                      "GLM4VFastECConnector fetches images only")
            elif feature.data is None:
                self._keep_local(feature.identifier, "the scheduler does not hold its pixels (vLLM's processor "
                                                     "cache), so it cannot send them")
            elif time.monotonic() < self._down_until:
                self._local.add(feature.identifier)
            else:
                grid = [int(v) for v in torch.as_tensor(feature.data["image_grid_thw"].data)]
                wanted.append(ImageToFetch(feature.identifier, feature.data["pixel_values"].data, grid))
        for feature in request.mm_features or []:
            if self._prefixed(feature):
                self._users.setdefault(feature.identifier, set()).add(request_id)
        if not wanted:
            self._resolved.add(request_id)
            return True
        wanted = list({item.identifier: item for item in wanted}.values())
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="glm4v-fast-ec")
        future = self._pool.submit(self._fetch_items, wanted)
        self._in_flight[request_id] = future
        return False

    def _fetch_items(self, items: list[ImageToFetch]) -> tuple[list[ImageToFetch], list[torch.Tensor] | Exception]:
        try:
            return items, self.fetch([i.pixel_values for i in items], [i.grid_thw for i in items])
        except Exception as exc:           # logged by _take, on the scheduler's thread; the engine goes on
            return items, exc

    def _take(self, request_id: str, future: Future) -> None:
        items, result = future.result()
        if isinstance(result, Exception):
            self._down_until = time.monotonic() + self.retry_after_s
            logger.warning("glm4v-fast: fetching %d image(s) of request %s failed, vLLM's own tower encodes them "
                           "(and every image for the next %g s): %s", len(items), request_id, self.retry_after_s,
                           result)
            self._local.update(item.identifier for item in items)
            return
        for item, embedding in zip(items, result):
            self._ready[item.identifier] = embedding

    def update_state_after_alloc(self, request: "Request", index: int) -> None:
        identifier = request.mm_features[index].identifier
        if identifier in self._ready:
            self._to_send[identifier] = self._ready[identifier]

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> ECConnectorMetadata:
        meta = GLM4VFastECMetadata(embeddings=self._to_send)
        self._to_send = {}
        return meta

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        request_id = request.request_id
        self._resolved.discard(request_id)
        self._in_flight.pop(request_id, None)
        for feature in request.mm_features or []:
            users = self._users.get(feature.identifier)
            if users is None:
                continue
            users.discard(request_id)
            if not users:              # nobody holds it any more: forget it (a later request fetches again)
                del self._users[feature.identifier]
                self._ready.pop(feature.identifier, None)
                self._local.discard(feature.identifier)
        return False, None

    # ------------------------------------------------------------------ worker side
    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs) -> None:
        from vllm.platforms import current_platform

        metadata = self._get_connector_metadata()
        embeddings = getattr(metadata, "embeddings", {})
        if not embeddings:
            return
        device = current_platform.device_type
        if current_platform.is_cuda_alike():
            device = f"{device}:{current_platform.current_device()}"
        for identifier, embedding in embeddings.items():
            if identifier not in encoder_cache:
                encoder_cache[identifier] = embedding.to(device=device, dtype=self.dtype)
                self.fetched += 1

    def save_caches(self, encoder_cache, mm_hash, **kwargs) -> None:
        return None                    # consumer only

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None
        super().shutdown()


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "on", "yes"):
        return True
    if text in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"ec_connector_extra_config['check_server'] must be true or false, got {value!r}")


def _server_message(response) -> str:
    """The server's own error message (its JSON `error.message`), else the start of the body."""
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except ValueError:
        pass
    return response.text[:500] or "(empty body)"
