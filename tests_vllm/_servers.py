"""Servers the vLLM tests start as subprocesses (glm4v-fast serve, vLLM's OpenAI server), on loopback only."""
from __future__ import annotations

import socket
import subprocess
import time
from typing import Callable

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, name: str, timeout_s: float, output: Callable[[], str]) -> None:
    """Poll `url`/health until it answers 200; raise with the process's output if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{output()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{name} did not come up in {timeout_s:.0f} s:\n{output()[-3000:]}")
