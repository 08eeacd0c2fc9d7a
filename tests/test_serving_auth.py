"""The API key (`--api-key` / GLM4V_FAST_API_KEY: `Authorization: Bearer` on /v1/embeddings, /health and /metrics
open) and HTTPS through uvicorn's TLS options, with a self-signed certificate made here. On 127.0.0.1 only."""
from __future__ import annotations

import argparse
import datetime
import io
import ipaddress
import ssl

import numpy as np
import pytest

# The serve extra (starlette, uvicorn, prometheus-client): skipped without it.
pytest.importorskip("uvicorn")
pytest.importorskip("glm4v_fast.serving.app")

from PIL import Image  # noqa: E402

from glm4v_fast.serving.client import EmbeddingClient, ServerError  # noqa: E402

from _serving import Server, error_of, httpx, live_fixture, live_server  # noqa: E402
from _tiny import b64, png_bytes, rel_err, save_tiny_checkpoint  # noqa: E402

KEY = "test-key-0123456789"


locked = live_fixture(max_wait_ms=2, cache_mb=0, api_key=KEY)


def offline(server, data: bytes) -> np.ndarray:
    return server.pipeline.extract_image_embeddings([Image.open(io.BytesIO(data))])[0].float().numpy()


def test_embeddings_need_the_bearer_key(locked, monkeypatch):
    import hmac

    body = {"images": [b64(png_bytes(40, 40, seed=1))]}
    r = locked.post(body)
    error = error_of(r, 401)
    assert "Authorization" in error["message"] and error["type"] == "authentication_error"
    assert r.headers["www-authenticate"].startswith("Bearer")
    for header, needle in ((f"Bearer {KEY}x", "invalid API key"), (f"Basic {KEY}", "Bearer <API key>"),
                           ("Bearer", "Bearer <API key>")):
        r = locked.post(body, headers={"Authorization": header})
        assert needle in error_of(r, 401)["message"] and r.headers["www-authenticate"].startswith("Bearer")
    # The right key: served, compared in constant time.
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(len(a)) or real(a, b))
    r = locked.post(body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    assert r.json()["data"] == locked.post(body, headers={"authorization": f"bearer {KEY}"}).json()["data"]
    assert compared == [len(KEY), len(KEY)]
    # /health for load balancers and /metrics for scrapers stay open; refusals are counted.
    assert httpx.get(locked.url + "/health", timeout=10).status_code == 200
    assert locked.metric('glm4v_requests_total{route="/v1/embeddings",status="401"}') >= 4


def test_shipped_client_passes_the_key(locked, monkeypatch):
    data = png_bytes(56, 40, seed=2)
    (embedding,) = EmbeddingClient(locked.url, api_key=KEY).embed([data])
    assert rel_err(embedding, offline(locked, data)) <= 1e-5
    monkeypatch.setenv("GLM4V_FAST_API_KEY", KEY)               # the key from the environment
    (again,) = EmbeddingClient(locked.url).embed([data])
    np.testing.assert_array_equal(again, embedding)
    monkeypatch.delenv("GLM4V_FAST_API_KEY")
    with pytest.raises(ServerError, match="401 authentication_error: missing Authorization header") as caught:
        EmbeddingClient(locked.url).embed([data])
    assert caught.value.status == 401
    assert EmbeddingClient(locked.url).health()["status"] == "ok"


def test_api_key_option_and_environment(monkeypatch):
    from glm4v_fast.serving import ServeSettings, add_serve_arguments
    from glm4v_fast.serving.settings import settings_from_args

    def parse(*argv):
        return settings_from_args(add_serve_arguments(argparse.ArgumentParser()).parse_args(list(argv)))

    monkeypatch.delenv("GLM4V_FAST_API_KEY", raising=False)
    assert parse().api_key is None
    assert parse("--api-key", "abc").api_key == "abc"
    monkeypatch.setenv("GLM4V_FAST_API_KEY", "from-env")
    assert parse().api_key == "from-env" and parse("--api-key", "abc").api_key == "abc"
    assert "from-env" not in repr(parse())                      # the key never reaches a log line
    help_text = add_serve_arguments(argparse.ArgumentParser()).format_help()
    assert "from-env" not in help_text and "GLM4V_FAST_API_KEY" in help_text
    with pytest.raises(ValueError, match="api_key must be a non-empty string"):
        ServeSettings(api_key="").validate()


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def test_https_with_the_key(tmp_path_factory):
    pytest.importorskip("cryptography")
    certfile, keyfile = _self_signed(tmp_path_factory.mktemp("tls"))
    server = live_server(tmp_path_factory, max_wait_ms=2, cache_mb=0, api_key=KEY,
                         server_options={"ssl_certfile": certfile, "ssl_keyfile": keyfile})
    trust = ssl.create_default_context(cafile=certfile)
    try:
        assert server.url.startswith("https://")
        assert httpx.get(server.url + "/health", verify=trust, timeout=10).json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError):   # an unknown certificate is refused by a verifying client
            httpx.get(server.url + "/health", timeout=10)
        data = png_bytes(48, 64, seed=3)
        client = EmbeddingClient(server.url, api_key=KEY, ssl_context=trust)
        (embedding,) = client.embed([data])
        assert rel_err(embedding, offline(server, data)) <= 1e-5
    finally:
        server.stop()


def test_serve_command_with_key_from_environment_and_tls(tmp_path):
    """`python -m glm4v_fast.serving --ssl-certfile --ssl-keyfile` with GLM4V_FAST_API_KEY set: HTTPS, key needed."""
    pytest.importorskip("cryptography")
    certfile, keyfile = _self_signed(tmp_path)
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", seed=3)
    trust = ssl.create_default_context(cafile=certfile)
    server = Server(checkpoint, tmp_path / "server.log", "--ssl-certfile", certfile, "--ssl-keyfile", keyfile,
                    env={"GLM4V_FAST_API_KEY": KEY}, verify=trust)
    try:
        body = {"images": [b64(png_bytes(40, 40, seed=4))]}
        url = server.url + "/v1/embeddings"
        assert httpx.post(url, json=body, verify=trust, timeout=30).status_code == 401
        r = httpx.post(url, json=body, verify=trust, timeout=30, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and len(r.json()["data"]) == 1
        assert KEY not in server.output()
    finally:
        server.stop()


def test_tls_options_are_checked_before_the_model_loads(tmp_path, caplog):
    from glm4v_fast.serving import add_serve_arguments, run_server

    parser = add_serve_arguments(argparse.ArgumentParser())
    assert run_server(parser.parse_args(["--ssl-keyfile", str(tmp_path / "key.pem")])) == 2
    assert "--ssl-keyfile needs --ssl-certfile" in caplog.text
    assert run_server(parser.parse_args(["--ssl-certfile", str(tmp_path / "nope.pem")])) == 2
    assert "nope.pem'" in caplog.text and "no such file" in caplog.text
