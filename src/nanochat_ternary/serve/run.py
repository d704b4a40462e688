"""``nanochat-train serve``: open a checkpoint, start the engine, run uvicorn until SIGTERM / Ctrl-C.

On SIGTERM uvicorn stops accepting connections and lets the in-flight responses, streams
included, finish (at most ``DRAIN_TIMEOUT`` seconds); then the engine stops and the process exits
0. Ctrl-C drains the same way, then exits 130 as any interrupted command.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys

import torch

from ..checkpoint import open_checkpoint
from ..errors import UserError
from .app import create_app
from .engine import Engine
from .service import Service

DRAIN_TIMEOUT = 60.0  # seconds; a reply is bounded by the context, so this is generous
API_KEY_ENV = "NANOCHAT_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_checkpoint(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                     max_batch: int = 8, max_queue: int = 64, device: str = "auto", threads: int = 0,
                     log_level: str = "info", stream_interval_ms: float = 0.0, truncation: str = "disabled") -> int:
    """Serve ``checkpoint`` until stopped; returns the exit status (0 after a graceful stop)."""
    import uvicorn  # the [serve] extra

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be 0..65535")
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be >= 1 (requests decoded together)")
    if max_queue < 0:
        raise UserError(f"--max-queue {max_queue}: must be >= 0 (requests waiting beyond --max-batch)")
    if threads < 0:
        raise UserError(f"--threads {threads}: must be >= 0 (0: torch's default)")
    if not 0 <= stream_interval_ms <= 1000:
        raise UserError(f"--stream-interval {stream_interval_ms}: must be 0..1000 ms")
    if truncation not in ("disabled", "auto"):
        raise UserError(f"--truncation {truncation}: must be disabled or auto")
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key: the key is empty")
    if threads:
        torch.set_num_threads(threads)
    opened = open_checkpoint(checkpoint, device)
    tok = opened.require_tokenizer()
    if tok.vocab_size > opened.config.model.vocab_size:
        raise UserError(f"{opened.path}: the tokenizer has {tok.vocab_size} ids but the model only "
                        f"{opened.config.model.vocab_size}")
    engine = Engine(opened.model, max_batch=max_batch, max_queue=max_queue)
    service = Service(opened.name, tok, engine, opened.config.model.max_seq_len,
                      stream_interval=stream_interval_ms / 1000, truncation=truncation)
    app = create_app(service, api_key=api_key)
    if not _is_loopback(host) and api_key is None:
        print(f"warning: serving on {host} (not loopback) without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    kind = "chat" if service.template is not None else "base (completions only)"
    print(f"serving {opened.name} ({kind}, context {service.context}) on http://{host}:{port}/ "
          f"(batch {max_batch}, queue {max_queue}{', API key required' if api_key else ''})", file=sys.stderr)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=DRAIN_TIMEOUT,
                            access_log=log_level == "debug")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has drained, with the handler that was
    # installed before it ran; a handler that does nothing makes a drained SIGTERM exit 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (it has logged the OS error)
        if server.started:
            raise
        raise UserError(f"could not listen on {host}:{port} (in use, or not an address of this machine)") from None
    finally:
        engine.close()
        signal.signal(signal.SIGTERM, previous)
    return 0
