"""SIGTERM drains in-flight requests and exits 0; one structured log line per request."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slipstream.server.logs import JsonFormatter, TextFormatter, configure_logging
from tests.server.conftest import live_server

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _serve(
    kind: str,
    tiny_model_dir: str,
    shutdown_timeout_s: float = 5.0,
    load_delay_s: float | None = None,
    ready: int = 200,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A `run_server` subprocess on an inherited socket; yields (process, url).

    "native" serves the tiny model with the engine loop on the main thread and HTTP on a
    helper thread, the way `slipstream serve` runs it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    model_args = [tiny_model_dir] if kind == "native" else []
    if load_delay_s is not None:
        model_args.append(str(load_delay_s))
    argv = [str(sock.fileno()), "0.02", str(shutdown_timeout_s), *model_args]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.server.serve_fake", *argv],
        pass_fds=[sock.fileno()],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
    )
    sock.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == ready:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(params=["fake", "native"])
def served(
    request: pytest.FixtureRequest, tiny_model_dir: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    with _serve(request.param, tiny_model_dir) as proc_and_url:
        yield proc_and_url


def test_sigterm_drains_in_flight_streams_and_exits_0(
    served: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, url = served
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"prompt": "drain me", "max_tokens": 50, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(10)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # No new connections once draining.
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
    reader.join(timeout=30)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"
    assert proc.wait(timeout=30) == 0
    assert proc.stderr is not None
    records = [json.loads(line) for line in proc.stderr.read().decode().splitlines() if line]
    requests = [r for r in records if r["message"] == "request" and r["path"] == "/v1/completions"]
    assert len(requests) == 1
    entry = requests[0]
    assert entry["status"] == 200 and entry["completion_tokens"] == 50
    assert entry["prompt_tokens"] > 0 and entry["latency_s"] > 0 and entry["request_id"]


def test_one_log_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="slipstream.server.access")
    with live_server(log_requests=True) as srv:
        body = {"prompt": "log me", "max_tokens": 3}
        resp = httpx.post(srv.url + "/v1/completions", json=body, headers={"X-Request-Id": "r-1"})
        assert resp.status_code == 200
        httpx.post(srv.url + "/v1/completions", json={"prompt": 1})
    records = [r for r in caplog.records if r.name == "slipstream.server.access"]
    ok = [r for r in records if getattr(r, "request_id", None) == "r-1"]
    assert len(ok) == 1
    assert ok[0].__dict__["status"] == 200 and ok[0].__dict__["completion_tokens"] == 3
    assert ok[0].__dict__["prompt_tokens"] == resp.json()["usage"]["prompt_tokens"]
    assert any(r.__dict__["status"] == 400 for r in records)


def test_formatters() -> None:
    record = logging.makeLogRecord(
        {"name": "x", "levelname": "INFO", "msg": "request", "request_id": "abc", "status": 200}
    )
    payload = json.loads(JsonFormatter().format(record))
    assert payload["message"] == "request" and payload["request_id"] == "abc"
    assert payload["status"] == 200 and payload["level"] == "info"
    assert "request_id=abc status=200" in TextFormatter().format(record)


def test_configure_logging_replaces_root_handlers() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json", "warning")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.WARNING
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_drain_is_bounded_by_the_shutdown_timeout() -> None:
    from tests.server.fake_engine import FakeConfig, FakeEngine

    engine = FakeEngine(FakeConfig(step_delay_s=0.02))
    with live_server(engine, shutdown_timeout_s=0.5) as srv:
        started = threading.Event()
        lines: list[str] = []

        def stream() -> None:
            body = {"prompt": "forever", "max_tokens": 250, "stream": True}
            try:
                with httpx.stream("POST", srv.url + "/v1/completions", json=body) as resp:
                    for line in resp.iter_lines():
                        lines.append(line)
                        started.set()
            except httpx.TransportError:
                pass  # the server cut the stream at the deadline

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(10)
        begin = time.monotonic()
        srv.server.should_exit = True
        srv.thread.join(timeout=10)
        assert not srv.thread.is_alive() and time.monotonic() - begin < 3
        reader.join(timeout=10)
        assert "data: [DONE]" not in lines  # cut short: 250 tokens take 5 s
        assert engine.aborted and engine.num_free_blocks() == engine.config.num_blocks


@pytest.mark.parametrize("kind", ["fake", "native"])
def test_requests_past_the_drain_deadline_end_with_a_503(kind: str, tiny_model_dir: str) -> None:
    """At the shutdown timeout, what still runs ends as an OpenAI error: a 503 body, or a
    stream's error event and [DONE]. Left to uvicorn, clients got a plain-text 500 or a
    stream cut mid-transfer, and the log a traceback per request."""
    with _serve(kind, tiny_model_dir, shutdown_timeout_s=0.3) as (proc, url):
        lines: list[str] = []
        plain: list[httpx.Response] = []
        started = threading.Event()
        # null: as many tokens as the context holds (~250 steps of >= 20 ms), far past the
        # 0.3 s drain.
        long = {"prompt": "never done", "max_tokens": None, "ignore_eos": True}

        def stream() -> None:
            body = {**long, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
                for line in resp.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        def whole() -> None:
            plain.append(httpx.post(url + "/v1/completions", json=long, timeout=30))

        readers = [threading.Thread(target=stream), threading.Thread(target=whole)]
        for reader in readers:
            reader.start()
        assert started.wait(20)
        time.sleep(0.2)
        begin = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(timeout=30)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - begin < 5
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert "shutting down" in error["message"]
        assert plain[0].status_code == 503
        assert "shutting down" in plain[0].json()["error"]["message"]
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        assert "Traceback" not in log and "Exception in ASGI application" not in log


def test_sigterm_while_the_model_loads_stops_the_load(tiny_model_dir: str) -> None:
    """The load stops too, and the process exits 0 at once: it used to go on loading after
    the HTTP server had exited (seconds for the default model, minutes for a large one)."""
    with _serve("native", tiny_model_dir, load_delay_s=60, ready=503) as (proc, _url):
        begin = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - begin < 10
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        assert "the engine did not start: the server is shutting down" in log
        assert "Traceback" not in log and "failed to start" not in log
