"""The FastAPI app factory, its lifespan (engine start/stop) and the uvicorn runner."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from slipstream import __version__
from slipstream.backends.base import CallerThreadEngine, EngineClient
from slipstream.server.config import ServerConfig
from slipstream.server.errors import install_error_handlers
from slipstream.server.metrics import ServerMetrics
from slipstream.server.middleware import ServerMiddleware
from slipstream.server.routes import build_router
from slipstream.server.serving import interrupt_generations
from slipstream.server.state import Phase, ServerState

logger = logging.getLogger(__name__)

# Token-count histogram buckets reach this far when the context length is not yet known.
_DEFAULT_MAX_MODEL_LEN = 131072


def create_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    """An app serving `engine`; the engine starts in the background once the app starts."""
    max_len = config.engine.model.max_model_len or _DEFAULT_MAX_MODEL_LEN
    state = ServerState(engine=engine, config=config, metrics=ServerMetrics(max_len))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The engine loads in the background so /health can answer 503 meanwhile.
        state.loop = asyncio.get_running_loop()
        starter = asyncio.create_task(_start_engine(state))
        try:
            yield
        finally:
            await _stop_engine(state, starter)

    extra: dict[str, Any] = {}
    if "strict_content_type" in inspect.signature(FastAPI).parameters:
        # Parse the body as JSON whatever the Content-Type (curl -d sends a form type).
        extra["strict_content_type"] = False
    app = FastAPI(
        title="slipstream",
        version=__version__,
        description="OpenAI-compatible LLM inference server with pluggable decoders.",
        lifespan=lifespan,
        **extra,
    )
    app.state.server = state
    app.state.started_at = int(time.time())
    install_error_handlers(app)
    app.include_router(build_router())
    app.add_middleware(ServerMiddleware, state=state)
    return app


async def _start_engine(state: ServerState) -> None:
    """Start the engine, bind metric labels, then serve; on failure, ask the server to exit."""
    try:
        await state.engine.start()
        info = state.engine.model_info
        state.metrics.bind(state.model_name, info.decoder)
        state.engine.add_stats_listener(state.metrics.record_step)
    except Exception as exc:
        if state.phase is Phase.DRAINING:  # a signal stopped the load: not a failure
            logger.info("the engine did not start: the server is shutting down (%s)", exc)
            return
        _start_failed(state, exc)
        return
    if state.phase is Phase.STARTING:
        state.phase = Phase.READY
        logger.info(
            "serving",
            extra={
                "model": state.model_name,
                "decoder": info.decoder,
                "max_model_len": info.max_model_len,
            },
        )


def _start_failed(state: ServerState, exc: Exception) -> None:
    """Log why the engine failed to start, and ask the server to exit."""
    if isinstance(exc, ValueError | FileNotFoundError):
        # A setting that cannot work (found once the model is read: a context longer than
        # the model's or the KV cache's, a missing folder): one line, as the CLI's own
        # checks give, not a traceback.
        logger.error("the engine failed to start: %s", exc)
    else:
        logger.error("the engine failed to start", exc_info=exc)
    state.phase = Phase.FAILED
    if state.on_fatal is not None:
        state.on_fatal()


async def _stop_engine(state: ServerState, starter: asyncio.Task[None]) -> None:
    if state.phase is not Phase.FAILED:
        state.phase = Phase.STOPPED
    if not starter.done():
        starter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starter
    try:
        await state.engine.shutdown()
    except Exception:
        logger.exception("engine shutdown failed")


class _Server(uvicorn.Server):
    """uvicorn, plus: a signal first moves the app to DRAINING (new requests get 503)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.app_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Stop accepting; uvicorn then waits (bounded) for in-flight requests."""
        state = self.app_state
        if state.phase in (Phase.READY, Phase.STARTING):
            state.phase = Phase.DRAINING
            logger.info("draining", extra={"signal": signal.Signals(sig).name})
            if state.loop is not None:
                # Requests still running shortly before uvicorn's deadline end with a 503
                # (streams: an error event and [DONE]); see interrupt_generations.
                timeout = state.config.shutdown_timeout_s
                delay = max(0.0, timeout - min(0.5, timeout / 4))
                loop = state.loop
                loop.call_soon_threadsafe(loop.call_later, delay, interrupt_generations, state)
        super().handle_exit(sig, frame)


def build_server(app: FastAPI, config: ServerConfig) -> uvicorn.Server:
    """A uvicorn server for `app`: our logging, no access log, bounded graceful shutdown."""
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(config.shutdown_timeout_s),
        # NOTE: no "Server: uvicorn" header; clients do not need to know.
        server_header=False,
    )
    state: ServerState = app.state.server
    server = _Server(uv_config, state)

    def stop() -> None:
        server.should_exit = True

    state.on_fatal = stop
    return server


def run_server(app: FastAPI, config: ServerConfig, sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a graceful drain, 1 if the engine or the HTTP
    server (its address taken or not valid) failed to start."""
    server = build_server(app, config)
    state: ServerState = app.state.server
    sockets = [sock] if sock is not None else None
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        # uvicorn re-raises the signal that stopped it once it is done; these handlers turn
        # that re-raise into a no-op, so a drained server exits with status 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _after_shutdown)
    if on_main and isinstance(state.engine, CallerThreadEngine):
        _serve_with_engine_on_this_thread(server, state.engine, sockets)
    else:
        with contextlib.suppress(SystemExit):  # uvicorn's way out when it cannot bind
            server.run(sockets=sockets)
    if not server.started and state.phase is not Phase.FAILED:
        logger.error("the HTTP server did not start on %s:%d", config.host, config.port)
        return 1
    return 1 if state.phase is Phase.FAILED else 0


def _serve_with_engine_on_this_thread(
    server: uvicorn.Server, engine: CallerThreadEngine, sockets: list[socket.socket] | None
) -> None:
    """HTTP on a helper thread, the engine loop here (the main thread: ~25% faster decode
    on a 2-core CPU, see slipstream/engine/async_engine.py); signals reach uvicorn from here."""
    engine.claim_caller_thread()
    http = threading.Thread(
        target=server.run, kwargs={"sockets": sockets}, name="slipstream-http", daemon=True
    )

    def on_signal(sig: int, frame: FrameType | None) -> None:
        server.handle_exit(sig, frame)
        if engine.loading:
            # This thread is loading the model (or waiting to): stop that too. It went on
            # loading after the HTTP server had exited (seconds here; minutes for a large
            # model). Loading writes nothing in place (the default model's conversion
            # renames a finished folder), so leaving it half done is safe.
            raise _StopLoading("a signal stopped the model's load")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    http.start()
    try:
        try:
            engine.run_on_current_thread(keep_waiting=http.is_alive)
        except _StopLoading as exc:  # before the load began (else start() reports it)
            logger.info("the engine did not start: the server is shutting down (%s)", exc)
        while http.is_alive():  # short joins keep this thread responsive to signals
            http.join(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _StopLoading(Exception):
    """SIGTERM or SIGINT reached the main thread while it loaded the model."""


def _after_shutdown(sig: int, frame: FrameType | None) -> None:
    logger.debug("signal %s after shutdown ignored", sig)
