"""Run the README's vLLM-on-CPU steps as written, in a fresh environment, with the package installed from a wheel.

    python tests_vllm/envs/cpu_steps.py WORKDIR --python .venv-vllm/bin/python      (make test-vllm-cpu-steps)

The steps are the bash block between `<!-- vllm-cpu-steps -->` and `<!-- /vllm-cpu-steps -->` in README.md. Two
substitutions only: `pip install glm4v-fast` installs the wheel built from this checkout (not the repository), and
`DIR` is a tiny checkpoint (written by `--python`, an interpreter with transformers: tests_shared/_checkpoints.py).
Every line but the last runs in one bash (`set -e`) from WORKDIR; the last, the server, is started in the background
with a local address and a chat template added (the tiny checkpoint has none), then asked a chat question with an
image; its log must show the plugin's tower choice. Exit status 0 when all of that works.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BEGIN, END = "<!-- vllm-cpu-steps -->", "<!-- /vllm-cpu-steps -->"


def readme_steps() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    lines = [line for line in block.strip().splitlines() if not line.startswith("```")]
    return [line for line in lines if line.strip()]


def build_wheel(out: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, ROOT], check=True)
    (wheel,) = [os.path.join(out, n) for n in os.listdir(out) if n.startswith("glm4v_fast-") and n.endswith(".whl")]
    return wheel


def write_checkpoint(python: str, path: str) -> None:
    code = ("import sys; sys.path.insert(0, %r); from _checkpoints import write_checkpoint; write_checkpoint(%r)"
            % (os.path.join(ROOT, "tests_shared"), path))
    # transformers' video processor imports torchvision: the tests' start-up hook (tests_vllm/cpu_wheels)
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests_vllm", "cpu_wheels")}
    subprocess.run([python, "-c", code], check=True, cwd="/", env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def substitute(line: str, wheel: str, checkpoint: str) -> str:
    line = re.sub(r"\bpip install glm4v-fast\b(?![\[\w.-])", f"pip install {wheel}", line)
    return re.sub(r"\bDIR\b", checkpoint, line)


def chat_with_an_image(url: str) -> str:
    import urllib.request

    import numpy as np
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)).save(png, "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
        import json

        model = json.load(r)["data"][0]["id"]
    body = {"model": model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                      {"type": "text", "text": "describe the image"}]}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--python", required=True, help="an interpreter with transformers (writes the checkpoint)")
    parser.add_argument("--serve-timeout", type=float, default=900)
    args = parser.parse_args()
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    started = time.monotonic()
    wheel = build_wheel(os.path.join(work, "dist"))
    checkpoint = os.path.join(work, "checkpoint")
    write_checkpoint(os.path.abspath(args.python), checkpoint)
    steps = [substitute(line, wheel, checkpoint) for line in readme_steps()]
    setup, serve = steps[:-1], steps[-1]
    print("the README's steps, as run:\n  " + "\n  ".join(steps), flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "GLM4V_FAST_VLLM")}
    subprocess.run(["bash", "-c", "set -ex\n" + "\n".join(setup)], cwd=work, env=env, check=True)
    print(f"set-up steps done in {time.monotonic() - started:.0f} s", flush=True)

    activate = next(line for line in setup if "activate" in line)
    template = os.path.join(work, "template.jinja")
    with open(template, "w") as f:
        f.write("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    port = free_port()
    log_path = os.path.join(work, "serve.log")
    command = f"{activate.split('&&')[-1].strip()} && exec {serve} --host 127.0.0.1 --port {port} " \
              f"--chat-template {template} --max-model-len 1024 --limit-mm-per-prompt '{{\"image\": 1, \"video\": 0}}'"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(["bash", "-c", command], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.monotonic() + args.serve_timeout
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited:\n{open(log_path).read()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not come up:\n{open(log_path).read()[-4000:]}")
            time.sleep(2)
        answer = chat_with_an_image(url)
        log_text = open(log_path).read()
        if "glm4v-fast: Glm4vForConditionalGeneration uses" not in log_text:
            raise SystemExit(f"the server's log has no line of the plugin:\n{log_text[-4000:]}")
        print(f"chat answer {answer!r}; plugin: "
              f"{re.search(r'glm4v-fast: Glm4vForConditionalGeneration uses [^(]*', log_text).group(0).strip()}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"PASS: the README's vLLM-on-CPU steps work from a wheel ({time.monotonic() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
