"""GLM4VFastECConnector against a stand-in server (httpx's MockTransport): its start-up check, the scheduler-side
fetch, the worker side's encoder cache, and every failure ending with the engine's own tower, never an exception.

Engine-free: runs on every vLLM build (`make test-vllm`, `make test-vllm-0.33`, `make test-vllm-0.34`); the same
connector inside a running engine is tested in test_epd.py.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import httpx
import pytest
import torch
from safetensors.torch import save

URL = "http://encoder:8000"
PREFIX = "glm4v-fast:"


class StandIn:
    """A glm4v-fast serve stand-in: `mode` is "ok", "401", "down", "timeout" or "wrong-grid"; requests are kept."""

    def __init__(self, key: str | None = None):
        self.key, self.mode, self.requests = key, "ok", []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        import json

        self.requests.append(request)
        if self.mode == "down":
            raise httpx.ConnectError("Connection refused", request=request)
        if self.mode == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if self.mode == "401" or (self.key and request.headers.get("authorization") != f"Bearer {self.key}"):
            return httpx.Response(401, json={"error": {"message": "invalid API key in the Authorization header",
                                                       "type": "authentication_error"}})
        body = json.loads(request.content)
        if not body.get("images"):
            return httpx.Response(400, json={"error": {"message": "no images or videos in the request"}})
        n = len(body["images"])
        grid = [[1, 6, 4]] * n if self.mode == "wrong-grid" else [[1, 4, 6]] * n
        tensors = {f"embedding.{i}": torch.full((6, 8), float(i + 1)) for i in range(n)}
        tensors["grid_thw"] = torch.tensor(grid)
        return httpx.Response(200, content=save(tensors), headers={"content-type": "application/vnd.safetensors"})


@pytest.fixture
def server(monkeypatch):
    """The stand-in; every httpx.Client the connector makes talks to it."""
    stand_in = StandIn()
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(stand_in), **kw))
    return stand_in


@pytest.fixture
def warnings_logged():
    """The connector's log records (vLLM's logger may not propagate to pytest's handler)."""
    from glm4v_fast.integrations.vllm import ec_connector

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, old_level = Collect(level=logging.WARNING), ec_connector.logger.level
    ec_connector.logger.addHandler(handler)
    ec_connector.logger.setLevel(logging.INFO)
    yield records
    ec_connector.logger.removeHandler(handler)
    ec_connector.logger.setLevel(old_level)


def _config(**extra):
    from vllm.config import ECTransferConfig

    transfer = ECTransferConfig(ec_connector="GLM4VFastECConnector", ec_role="ec_consumer",
                                ec_connector_module_path="glm4v_fast.integrations.vllm.ec_connector",
                                ec_connector_extra_config={"server_url": URL, **extra})
    vision = SimpleNamespace(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    return SimpleNamespace(ec_transfer_config=transfer,
                           model_config=SimpleNamespace(hf_config=SimpleNamespace(vision_config=vision),
                                                        dtype=torch.float32))


def _connector(role: str = "SCHEDULER", **extra):
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole

    from glm4v_fast.integrations.vllm.ec_connector import GLM4VFastECConnector

    return GLM4VFastECConnector(_config(**extra), getattr(ECConnectorRole, role))


def _image(identifier: str, with_pixels: bool = True):
    data = None
    if with_pixels:
        rows = torch.randint(0, 256, (24, 1176), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        data = {"pixel_values": SimpleNamespace(data=rows),
                "image_grid_thw": SimpleNamespace(data=torch.tensor([1, 4, 6]))}
    return SimpleNamespace(identifier=identifier, modality="image", data=data)


def _request(request_id: str, *features):
    return SimpleNamespace(request_id=request_id, mm_features=list(features))


def _settle(connector, request) -> bool:
    """ensure_cache_available until the request's fetch (if any) has finished, as the scheduler's steps do."""
    first = connector.ensure_cache_available(request, 0)
    future = connector._in_flight.get(request.request_id)
    if future is not None:
        assert first is False                               # deferred while in transit
        future.result(timeout=30)
    return connector.ensure_cache_available(request, 0)


# ------------------------------------------------------------------------------------------------- start-up check
def test_startup_check_accepts_a_server_that_takes_the_key(server):
    server.key = "secret"
    _connector(api_key="secret")
    assert server.requests[-1].url.path == "/v1/embeddings"
    assert server.requests[-1].headers["authorization"] == "Bearer secret"


def test_startup_check_reads_the_key_from_the_environment(server, monkeypatch):
    server.key = "from-env"
    monkeypatch.setenv("GLM4V_FAST_API_KEY", "from-env")
    _connector()


def test_startup_check_names_the_fix(server, monkeypatch):
    monkeypatch.delenv("GLM4V_FAST_API_KEY", raising=False)
    server.key = "secret"
    with pytest.raises(RuntimeError, match=r"requires an API key and no key was sent .*invalid API key.*"
                                           r"ec_connector_extra_config\['api_key'\] or in the GLM4V_FAST_API_KEY"):
        _connector()
    with pytest.raises(RuntimeError, match="the key sent was refused"):
        _connector(api_key="wrong")
    server.mode = "down"
    with pytest.raises(RuntimeError, match=rf"no glm4v-fast serve answers at {URL} \(ConnectError.*Start it .*"
                                           r"or fix ec_connector_extra_config\['server_url'\]"):
        _connector()
    _connector(check_server=False)                          # skipped on request
    _connector("WORKER")                                    # the worker side fetches nothing: no check


# ------------------------------------------------------------------------------------------------- fetch and load
def test_fetch_on_the_scheduler_side_load_on_the_worker_side(server):
    scheduler = _connector()
    request = _request("r1", _image(PREFIX + "a"), _image("plain"), _image(PREFIX + "b"))
    assert _settle(scheduler, request) is True
    posted = server.requests[-1]
    assert posted.headers["accept"] == "application/vnd.safetensors"
    assert len(__import__("json").loads(posted.content)["images"]) == 2     # the two prefixed images, one request
    assert scheduler.has_cache_item(PREFIX + "a") and scheduler.has_cache_item(PREFIX + "b")
    assert not scheduler.has_cache_item("plain")                            # the engine's tower encodes it
    before = len(server.requests)
    assert scheduler.ensure_cache_available(request, 10) is True           # later steps: nothing fetched again
    assert len(server.requests) == before

    scheduler.update_state_after_alloc(request, 0)
    scheduler.update_state_after_alloc(request, 2)
    meta = scheduler.build_connector_meta(None)
    assert sorted(meta.embeddings) == [PREFIX + "a", PREFIX + "b"]
    assert scheduler.build_connector_meta(None).embeddings == {}           # sent once

    worker = _connector("WORKER")
    worker.bind_connector_metadata(meta)
    cache = {}
    worker.start_load_caches(cache)
    assert torch.equal(cache[PREFIX + "a"], torch.full((6, 8), 1.0))
    assert torch.equal(cache[PREFIX + "b"], torch.full((6, 8), 2.0))
    assert worker.fetched == 2

    scheduler.request_finished(request)
    assert not scheduler.has_cache_item(PREFIX + "a")                      # nothing kept after the request


@pytest.mark.parametrize("mode, reason", [("401", "answered 401: invalid API key"),
                                          ("down", "ConnectError"), ("timeout", "ReadTimeout"),
                                          ("wrong-grid", "same processor limits")])
def test_a_failed_fetch_leaves_the_images_to_vllms_tower(server, warnings_logged, mode, reason):
    scheduler = _connector(retry_after_s=0)
    server.mode = mode
    request = _request("r1", _image(PREFIX + "a"))
    assert _settle(scheduler, request) is True                              # scheduled, not raised
    assert not scheduler.has_cache_item(PREFIX + "a")                      # so vLLM's scheduler encodes it
    assert any("failed, vLLM's own tower encodes them" in m and reason in m for m in warnings_logged), \
        warnings_logged
    server.mode = "ok"                                                      # the server is back
    again = _request("r2", _image(PREFIX + "c"))
    assert _settle(scheduler, again) is True and scheduler.has_cache_item(PREFIX + "c")


def test_after_a_failure_the_server_rests_for_retry_after_s(server):
    scheduler = _connector(retry_after_s=3600)
    server.mode = "down"
    _settle(scheduler, _request("r1", _image(PREFIX + "a")))
    tried = len(server.requests)
    server.mode = "ok"
    assert scheduler.ensure_cache_available(_request("r2", _image(PREFIX + "b")), 0) is True
    assert len(server.requests) == tried and not scheduler.has_cache_item(PREFIX + "b")


def test_prefixed_videos_and_images_without_pixels_go_to_vllms_tower(server, warnings_logged):
    scheduler = _connector()
    clip = SimpleNamespace(identifier=PREFIX + "clip", modality="video", data={})
    request = _request("r1", clip, _image(PREFIX + "cached", with_pixels=False))
    before = len(server.requests)
    assert scheduler.ensure_cache_available(request, 0) is True            # nothing to wait for, nothing raised
    assert len(server.requests) == before
    assert not scheduler.has_cache_item(PREFIX + "clip") and not scheduler.has_cache_item(PREFIX + "cached")
    assert any("glm4v-fast:clip is encoded by vLLM's own tower" in m and "fetches images only" in m
               for m in warnings_logged)
    assert any("does not hold its pixels" in m for m in warnings_logged)


def test_bad_options_are_named(server):
    with pytest.raises(ValueError, match="needs ec_connector_extra_config\\['server_url'\\]"):
        _connector(server_url="encoder:8000")
    with pytest.raises(ValueError, match="check_server'\\] must be true or false"):
        _connector(check_server="maybe")


def test_patches_to_image_inverts_the_processor():
    import numpy as np

    import glm4v_fast as gf
    from glm4v_fast.integrations.vllm.ec_connector import patches_to_image

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)
    # glm4v-fast's processor without rescale/normalize gives the raw 0-255 patch rows vLLM holds
    out = gf.VisionProcessor(do_rescale=False, do_normalize=False)(images=[image])
    rows = out["pixel_values"].round().to(torch.uint8)
    assert np.array_equal(patches_to_image(rows, out["image_grid_thw"][0].tolist()), image)
    with pytest.raises(ValueError, match="mm_device_do_normalize"):
        patches_to_image(out["pixel_values"], out["image_grid_thw"][0].tolist())
