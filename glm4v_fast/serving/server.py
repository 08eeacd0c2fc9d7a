"""`glm4v-fast serve`: command-line options, model loading, and uvicorn with a draining shutdown.

`add_serve_arguments` needs none of the server dependencies (starlette, uvicorn, prometheus-client), so a CLI
can always build its parser; `run_server` imports them.

Shutdown on SIGTERM/SIGINT: the app answers new embedding requests with 503 at once, uvicorn stops accepting
connections and waits for the open ones, then the app's lifespan drains the batcher; the process exits 0.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading

from .settings import ServeSettings

logger = logging.getLogger("glm4v_fast.serving")

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `serve` options to `parser` (used by `glm4v-fast serve` and `python -m glm4v_fast.serving`)."""
    d = ServeSettings()
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR",
                   help="a dir written by VisionModel.save_pretrained, or a GLM-4.1V/4.5V/4.6V checkpoint dir. "
                        "Without it the server runs the architecture of --config-json (default: GLM-4.1V) with "
                        "seeded RANDOM weights: for load testing only, the embeddings mean nothing")
    g.add_argument("--config-json", metavar="FILE",
                   help="vision config (config.json or a dir holding one) for the random-weights model")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weights and compute dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--attn-backend", default="auto", help="VisionModel attn_backend (default: auto)")
    g.add_argument("--kernels", default="auto", help="VisionModel kernels: auto, triton or torch (default: auto)")
    g.add_argument("--model-name", default="glm4v-vision", help="name reported in responses")

    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    g.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, metavar="N",
                   help=f"patch tokens per batched forward (default: {d.max_batch_tokens})")
    g.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, metavar="MS",
                   help=f"how long a request may wait for others to batch with (default: {d.max_wait_ms})")
    g.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help=f"requests waiting for the model before new ones get 503 (default: {d.max_queue})")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, metavar="N",
                   help=f"largest decoded image, width*height; larger ones get 413 (default: {d.max_image_pixels})")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_mb, metavar="N",
                   help=f"largest request body in MiB; larger ones get 413 (default: {d.max_body_mb:g})")
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, metavar="S",
                   help=f"seconds shutdown waits for open requests (default: {d.drain_timeout_s:g})")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    g.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    return parser


def _settings(args: argparse.Namespace) -> ServeSettings:
    settings = ServeSettings(max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, max_image_pixels=args.max_image_pixels,
                             max_body_mb=args.max_body_mb, drain_timeout_s=args.drain_timeout)
    settings.validate()
    return settings


def run_server(args: argparse.Namespace) -> int:
    """Load the model and serve until SIGTERM/SIGINT; returns the process exit code."""
    import uvicorn

    from ..pipeline import create_glm4v_vision_encoder
    from .app import EmbeddingService, create_app

    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(args.log_level.upper())
    try:
        settings = _settings(args)
        logging.captureWarnings(True)     # the random-weights notice goes to the log
        _, model, processor = create_glm4v_vision_encoder(
            config=args.config_json, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
            attn_backend=args.attn_backend, kernels=args.kernels, seed=args.seed,
            max_image_pixels=settings.max_image_pixels)
        if model.config.in_channels != 3:
            raise ValueError(f"the server decodes RGB images; the model expects in_channels={model.config.in_channels}")
    except (ValueError, FileNotFoundError, OSError) as exc:
        logger.error("cannot start: %s", exc)
        return 2
    kernels, backend = model.resolved()
    logger.info("model: %s on %s, %s, kernels=%s, attention=%s", args.checkpoint or "random weights",
                model.device, str(model.dtype).removeprefix("torch."), kernels, backend)

    service = EmbeddingService(model, processor, settings, model_name=args.model_name)
    config = uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, lifespan="on",
                            timeout_graceful_shutdown=settings.drain_timeout_s)
    server = _draining_server(uvicorn, config, service)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal that stopped it once it has shut down, which would kill the process
        # with that signal; this handler lets a drained server exit 0 instead. Before uvicorn installs its own
        # handlers (and after, if the drain is already done) a signal still ends the process at once.
        def after_drain(sig, frame):
            if not server.should_exit:
                raise SystemExit(128 + sig)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, after_drain)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        return exc.code if isinstance(exc.code, int) else 1
    if not server.started:
        return 1
    logger.info("drained and stopped")
    return 0


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _draining_server(uvicorn, config, service):
    """A uvicorn.Server that flips the service into draining mode the moment a shutdown signal arrives."""

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                logger.info("%s received: draining (new requests get 503)", _signal_name(sig))
            service.start_draining()
            super().handle_exit(sig, frame)

    return DrainingServer(config)
