"""Fixtures: a real uvicorn server on 127.0.0.1 (random free port) in front of a fake engine."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from slipstream.backends.base import EngineClient
from slipstream.server.app import build_server, create_app
from slipstream.server.config import ServerConfig
from tests.server.fake_engine import FakeConfig, FakeEngine

MODEL = "tiny-fake"


class LiveServer:
    """uvicorn serving create_app(engine, config) from a background thread."""

    def __init__(self, engine: EngineClient, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.app = create_app(engine, config)
        # NOTE: IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto
        # says TCP, and without it every response waits ~40 ms for a delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = build_server(self.app, config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def base_url(self) -> str:
        """The OpenAI client's base_url."""
        return self.url + "/v1"

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> LiveServer:
        """Start serving; by default wait until /health answers 200."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        while wait_ready:
            if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the server never became healthy")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@contextlib.contextmanager
def live_server(
    engine: EngineClient | None = None,
    wait_ready: bool = True,
    ready_timeout: float = 20.0,
    **config: Any,
) -> Iterator[LiveServer]:
    """A started LiveServer, stopped on exit (config: ServerConfig fields)."""
    cfg = replace(ServerConfig(port=0, log_requests=False, shutdown_timeout_s=5), **config)
    server = LiveServer(engine or FakeEngine(), cfg)
    server.start(wait_ready=wait_ready, timeout=ready_timeout)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """A shared server on a fast fake engine (one per test module)."""
    with live_server(FakeEngine(FakeConfig(name=MODEL))) as srv:
        yield srv


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    """Raw httpx against the shared server."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
