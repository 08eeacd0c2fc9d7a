"""Load test of the embedding server: normal clients next to one attacker of each kind, on loopback.

    python bench/load_server.py --duration 30 --clients 4            # a small random-weights tower on CPU
    python bench/load_server.py --checkpoint DIR --device cuda --clients 32

Starts `python -m glm4v_fast.serving` on 127.0.0.1 (a free port), then for --duration seconds runs --clients
normal clients (each POSTs one or two small photos and waits for the answer, in a loop) and, unless
--no-attackers, one attacker of each kind, each in a loop:

  budget     5,000 1x1 PNGs in one request; a 60-byte GIF declaring a 6000x6000 screen
  decode     a progressive JPEG repeating one scan 300 times; a JPEG whose header says 65500x320
  slowloris  keeps up to 200 connections sending partial headers, one byte now and then
  badinput   a JSON integer of 5,000 digits; a corrupt BLP; truncated PNGs
  bigbody    30 MB JSON bodies (a near-limit image list of junk base64)
  abandon    requests of 4 images whose client disconnects right after sending them
  health     GET /health ten times a second (its latency is reported)

Reports, for the normal clients: requests/s, p50/p99 latency, errors; /health p50/p99; every attacker's status
codes; the server's RSS (start, peak, end) and how many 5xx it answered. Nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
from PIL import Image

ATTACKERS = "budget,decode,slowloris,badinput,bigbody,abandon"
SMALL_CONFIG = {"depth": 2, "hidden_size": 128, "num_heads": 4, "out_hidden_size": 128, "intermediate_size": 256,
                "image_size": 336, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}


# ---------------------------------------------------------------------------------------------------------------
# payloads
# ---------------------------------------------------------------------------------------------------------------
def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / w, yy * 255.0 / h, (xx * yy) % 251], -1)
    return (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _body(images: list[bytes]) -> bytes:
    return json.dumps({"images": [_b64(d) for d in images], "encoding_format": "base64"}).encode()


def payloads() -> dict[str, list[bytes]]:
    photos = [_encode(Image.fromarray(_photo(h, w, i)), "JPEG", quality=90)
              for i, (w, h) in enumerate([(320, 240), (224, 224), (400, 180), (200, 300)])]
    gif = bytearray(_encode(Image.new("P", (1, 1)), "GIF"))
    gif[6:10] = (6000).to_bytes(2, "little") * 2
    progressive = _encode(Image.fromarray(_photo(320, 640, 9)), "JPEG", progressive=True)
    last_sos, end = progressive.rindex(b"\xff\xda"), progressive.rindex(b"\xff\xd9")
    many_scans = progressive[:end] + progressive[last_sos:end] * 290 + progressive[end:]
    tall = bytearray(_encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = tall.index(b"\xff\xc0")
    tall[sof + 5:sof + 9] = (320).to_bytes(2, "big") + (65500).to_bytes(2, "big")
    blp = bytearray(_encode(Image.fromarray(_photo(8, 8, 1)).convert("P"), "BLP", blp_version="BLP1"))
    blp[4:8] = (7).to_bytes(4, "little")
    png = _encode(Image.fromarray(_photo(200, 200, 3)), "PNG")
    return {
        "normal": [_body([photos[i % 4]] + ([photos[(i + 1) % 4]] if i % 2 else [])) for i in range(8)],
        "budget": [_body([_encode(Image.new("RGB", (1, 1)), "PNG")] * 5000), _body([bytes(gif)])],
        "decode": [_body([many_scans]), _body([bytes(tall)])],
        "badinput": [b'{"images": [' + b"7" * 5000 + b"]}", _body([bytes(blp)]), _body([png[:len(png) // 2]])],
        "bigbody": [json.dumps({"images": ["QUFB" * (7 * 1024 * 1024 // 4)] * 4}).encode()],  # 28 MiB
        "abandon": [_body(photos)],
    }


# ---------------------------------------------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------------------------------------------
def _request(path: str, body: bytes, port: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def normal_client(url: str, bodies: list[bytes], stop: float, latencies: list, errors: collections.Counter):
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        i = 0
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                r = await client.post("/v1/embeddings", content=bodies[i % len(bodies)],
                                      headers={"content-type": "application/json"})
                if r.status_code != 200:
                    errors[r.status_code] += 1
                elif time.monotonic() <= stop:
                    latencies.append(time.monotonic() - started)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
            i += 1


async def posting_attacker(url: str, bodies: list[bytes], stop: float, codes: collections.Counter):
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        i = 0
        while time.monotonic() < stop:
            try:
                r = await client.post("/v1/embeddings", content=bodies[i % len(bodies)],
                                      headers={"content-type": "application/json"})
                codes[r.status_code] += 1
            except httpx.HTTPError as exc:
                codes[type(exc).__name__] += 1
            i += 1


async def abandoning_attacker(port: int, body: bytes, stop: float, codes: collections.Counter):
    while time.monotonic() < stop:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_request("/v1/embeddings", body, port))
            await writer.drain()
            writer.close()
            codes["sent and left"] += 1
        except OSError as exc:
            codes[type(exc).__name__] += 1
        await asyncio.sleep(0.05)


async def slowloris(port: int, stop: float, codes: collections.Counter, connections: int = 200):
    async def one():
        while time.monotonic() < stop:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
                while time.monotonic() < stop and not reader.at_eof():
                    writer.write(b"X")
                    await writer.drain()
                    try:
                        reply = await asyncio.wait_for(reader.read(64), 1.0)
                        if reply:
                            codes[reply[:12].decode(errors="replace")] += 1
                        break
                    except asyncio.TimeoutError:
                        pass
                writer.close()
            except OSError as exc:
                codes[type(exc).__name__] += 1
                await asyncio.sleep(0.1)

    await asyncio.gather(*(one() for _ in range(connections)))


async def health_prober(url: str, stop: float, latencies: list, codes: collections.Counter):
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                r = await client.get("/health")
                latencies.append(time.monotonic() - started)
                codes[r.status_code] += 1
            except httpx.HTTPError as exc:
                codes[type(exc).__name__] += 1
            await asyncio.sleep(0.1)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def run_load(url: str, port: int, pid: int, args) -> dict:
    data = payloads()
    stop = time.monotonic() + args.duration
    latencies, errors, health, attackers = [], collections.Counter(), [], {}
    tasks = [normal_client(url, data["normal"], stop, latencies, errors) for _ in range(args.clients)]
    attackers["health"] = collections.Counter()
    tasks.append(health_prober(url, stop, health, attackers["health"]))
    kinds = [] if args.no_attackers else args.attackers.split(",")
    for kind in kinds:
        attackers[kind] = collections.Counter()
        if kind in ("budget", "decode", "badinput", "bigbody"):
            tasks.append(posting_attacker(url, data[kind], stop, attackers[kind]))
        elif kind == "abandon":
            tasks.append(abandoning_attacker(port, data["abandon"][0], stop, attackers[kind]))
        elif kind == "slowloris":
            tasks.append(slowloris(port, stop, attackers[kind]))
        else:
            raise SystemExit(f"unknown attacker {kind!r}; choose from {ATTACKERS}")
    peak = [rss_mb(pid)]

    async def sample_rss():
        while time.monotonic() < stop:
            peak[0] = max(peak[0], rss_mb(pid))
            await asyncio.sleep(0.2)

    started = time.monotonic()
    running = [asyncio.ensure_future(t) for t in (*tasks, sample_rss())]
    _, late = await asyncio.wait(running, timeout=args.duration + 10)
    for task in late:  # requests still in flight long after the end (counted as not served in time)
        task.cancel()
    elapsed = min(time.monotonic(), stop) - started
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if xs else None  # noqa: E731
    return {"normal": {"requests_per_s": round(len(latencies) / elapsed, 2), "ok": len(latencies),
                       "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "errors": dict(errors)},
            "health": {"p50_ms": pct(health, 50), "p99_ms": pct(health, 99)},
            "attackers": {k: dict(v) for k, v in attackers.items()}, "rss_peak_mb": round(peak[0], 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default: 30)")
    parser.add_argument("--clients", type=int, default=4, help="normal clients (default: 4)")
    parser.add_argument("--no-attackers", action="store_true", help="normal clients only (the baseline)")
    parser.add_argument("--attackers", default=ATTACKERS, help=f"comma-separated kinds (default: {ATTACKERS})")
    parser.add_argument("--checkpoint", help="serve this checkpoint (default: a small random-weights tower)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="FILE", help="also write the report here")
    parser.add_argument("server_args", nargs="*", help="extra `serve` options, after --")
    args = parser.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        model = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--config-json", _small_config(tmp)]
        cmd = [sys.executable, "-m", "glm4v_fast.serving", *model, "--device", args.device, "--port", str(port),
               "--log-level", "error", *args.server_args]
        log = open(os.path.join(tmp, "server.log"), "wb")
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    log.flush()
                    print(open(log.name).read(), file=sys.stderr)
                    return 1
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start in 120 s")
                time.sleep(0.3)
            rss_start = rss_mb(server.pid)
            report = asyncio.run(run_load(url, port, server.pid, args))
            time.sleep(2)  # let abandoned and timed-out work finish
            report["rss_start_mb"], report["rss_end_mb"] = round(rss_start, 1), round(rss_mb(server.pid), 1)
            metrics = httpx.get(url + "/metrics", timeout=10).text
            report["server_5xx"] = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                                       if line.startswith("glm4v_requests_total{") and 'status="5' in line
                                       and 'status="503"' not in line)
            report["command"] = " ".join(["python", "bench/load_server.py", *(argv or sys.argv[1:])])
        finally:
            server.kill()
            server.wait(timeout=30)
            log.close()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _small_config(directory: str) -> str:
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump(SMALL_CONFIG, f)
    return path


if __name__ == "__main__":
    sys.exit(main())
