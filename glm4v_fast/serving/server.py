"""`glm4v-fast serve`: command-line options, model loading, and uvicorn with a draining shutdown.

`add_serve_arguments` needs none of the server dependencies (starlette, uvicorn, prometheus-client), so a CLI
can always build its parser; `run_server` imports them.

Shutdown on SIGTERM/SIGINT (a drain): uvicorn closes its listening socket (new connections are refused, which
load balancers and clients treat as "try another replica") and the idle keep-alive connections; a request already
being received when the signal came gets 503; requests already admitted are encoded and answered (up to
--drain-timeout), then the app's lifespan stops the batcher and the process exits 0. The log says exactly this.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading

from ..options import COMPILE_CHOICES
from ..processing import VisionProcessor
from .settings import SECURITY, ServeSettings, add_settings_arguments, settings_from_args

logger = logging.getLogger("glm4v_fast.serving")

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `serve` options to `parser` (used by `glm4v-fast serve` and `python -m glm4v_fast.serving`)."""
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
                   help="weights and compute dtype (auto: the checkpoint's stored dtype where this device "
                        "computes it natively, else float32; the choice is logged)")
    g.add_argument("--attn-backend", default="auto", help="VisionModel attn_backend (default: auto)")
    g.add_argument("--kernels", default="auto", help="VisionModel kernels: auto, triton or torch (default: auto)")
    g.add_argument("--compile", default="auto", choices=COMPILE_CHOICES,
                   help="VisionModel compile: the compiled CPU path (default auto: on a CPU where measured faster)")
    g.add_argument("--model-name", default="glm4v-vision", help="name reported in responses")

    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    # One full-size image at the processor's default pixel budget, for the --max-patches-per-request help.
    full_size = VisionProcessor().max_image_patches
    groups = {"server": g}
    add_settings_arguments(groups, parser,
                           full_size=f"; one full-size image is at most {full_size:,} patches at the default budget")
    g = groups[SECURITY]
    g.add_argument("--ssl-certfile", metavar="FILE",
                   help="serve HTTPS with this certificate (PEM; a chain may follow it), through uvicorn's TLS")
    g.add_argument("--ssl-keyfile", metavar="FILE", help="the certificate's private key (PEM)")

    g = parser.add_argument_group("logging")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    g.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    return parser


def guarded_protocol(settings: ServeSettings):
    """uvicorn's h11 protocol with what it lacks: a header timeout, and a cap on open connections.

    uvicorn times out idle keep-alive connections but not a client that opens a connection and sends its headers
    slowly or never (each one holds a file descriptor for good), and `limit_concurrency` answers 503 only once a
    request's headers have arrived. Here a connection over `max_connections` gets a 503 at once and is closed, and
    a request whose headers are not complete `header_timeout_s` after the connection (or after the request's first
    byte, on a kept-alive connection) gets a 408 and is closed.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    def canned(status: str, message: str, kind: str) -> bytes:
        body = json.dumps({"error": {"message": message, "type": kind}}).encode()
        return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode() + body

    refusal = canned("503 Service Unavailable", f"too many open connections (--max-connections "
                     f"{settings.max_connections}); retry later", "server_overloaded")
    timed_out = canned("408 Request Timeout", f"request headers did not arrive within --header-timeout "
                       f"{settings.header_timeout_s:g} s", "request_timeout")

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None
        _refused = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.server_state.connections) > settings.max_connections:
                self._refused = True
                transport.write(refusal)
                # Closing with the client's request unread would reset the connection and lose the 503; give
                # the request a moment to arrive (it is discarded), then close.
                self.loop.call_later(0.5, transport.close)
                return
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm_header_timer()     # a request has begun (or not) but its headers are incomplete
            else:
                self._cancel_header_timer()  # headers complete: the app's --body-timeout takes over

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(settings.header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.cycle is None or self.cycle.response_complete:
                    self.transport.write(timed_out)
                self.transport.close()

    return GuardedH11Protocol


def build_server(service, settings: ServeSettings, host: str, port: int, log_level: str = "info",
                 access_log: bool = False, ssl_certfile: str | None = None, ssl_keyfile: str | None = None):
    """The uvicorn server for `service` with every connection limit and timeout of `settings` (used by
    run_server, and by tests that run the server in a thread); HTTPS when given a certificate."""
    import uvicorn

    from .app import create_app

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level, access_log=access_log,
                            lifespan="on", timeout_graceful_shutdown=settings.drain_timeout_s,
                            http=guarded_protocol(settings), timeout_keep_alive=settings.keep_alive_timeout_s,
                            # requests beyond this many in flight get uvicorn's 503 (connections are capped above)
                            limit_concurrency=settings.max_connections + 1,
                            ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    return _draining_server(uvicorn, config, service)


def _check_tls_files(certfile: str | None, keyfile: str | None) -> None:
    if keyfile and not certfile:
        raise ValueError("--ssl-keyfile needs --ssl-certfile (the certificate the key belongs to)")
    for option, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{option} {path!r}: no such file")


def _raise_fd_limit(wanted: int) -> None:
    """Raise the soft open-files limit towards `wanted` (every connection is a file descriptor): with the usual
    soft limit of 1024, --max-connections 1000 would otherwise end in 'Too many open files' instead of 503s."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run_server(args: argparse.Namespace) -> int:
    """Load the model and serve until SIGTERM/SIGINT; returns the process exit code."""
    from ..pipeline import create_glm4v_vision_encoder
    from .app import EmbeddingService

    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(args.log_level.upper())
    try:
        settings = settings_from_args(args)
        _check_tls_files(args.ssl_certfile, args.ssl_keyfile)
        logging.captureWarnings(True)     # the random-weights notice goes to the log
        _, model, processor = create_glm4v_vision_encoder(
            config=args.config_json, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
            attn_backend=args.attn_backend, kernels=args.kernels, compile=args.compile, seed=args.seed,
            max_image_pixels=settings.max_image_pixels)
        if model.config.in_channels != 3:
            raise ValueError(f"the server decodes RGB images; the model expects in_channels={model.config.in_channels}")
    except (ValueError, FileNotFoundError, OSError) as exc:
        logger.error("cannot start: %s", exc)
        return 2
    kernels, backend = model.resolved()
    logger.info("model: %s on %s, %s, kernels=%s, attention=%s, compiled=%s", args.checkpoint or "random weights",
                model.device, str(model.dtype).removeprefix("torch."), kernels, backend, model.compiled()[1])

    service = EmbeddingService(model, processor, settings, model_name=args.model_name)
    _raise_fd_limit(settings.max_connections + 256)
    if settings.api_key and not args.ssl_certfile and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("--api-key without --ssl-certfile on %s: the key crosses the network in clear text; serve "
                       "HTTPS, or put a TLS-terminating proxy in front", args.host)
    server = build_server(service, settings, args.host, args.port, args.log_level, args.access_log,
                          args.ssl_certfile, args.ssl_keyfile)
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
                logger.info("%s received: draining: new connections are refused and idle ones closed, requests "
                            "still arriving get 503, the %d admitted are finished (up to --drain-timeout %g s)",
                            _signal_name(sig), service.batcher.depth, service.settings.drain_timeout_s)
            service.start_draining()
            super().handle_exit(sig, frame)

    return DrainingServer(config)
