"""`slipstream serve --backend vllm` on the tiny model, through the OpenAI client.

The server runs in the vLLM environment (`make vllm` builds .venv-vllm; override with
SLIPSTREAM_VLLM_PYTHON), as a subprocess, so these tests run from the main venv too. They
skip when no Python with vLLM is found. Each server start takes about a minute on CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from slipstream.backends.vllm_backend import VLLM_TINY_OVERRIDES

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-vllm"
START_TIMEOUT_S = 420.0
PROMPT = "The river ran slowly past the old mill, and the children"
# Repeats give the n-gram proposer matches, so drafts happen.
REPEATING_PROMPT = "one two three four one two three four one two three four one two"


def _vllm_python() -> str | None:
    """A Python that can import vllm: $SLIPSTREAM_VLLM_PYTHON, .venv-vllm, or this one."""
    candidates = [os.environ.get("SLIPSTREAM_VLLM_PYTHON"), str(REPO / ".venv-vllm/bin/python")]
    candidates.append(sys.executable)
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run(
            [
                python,
                "-c",
                "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)",
            ],
            capture_output=True,
            timeout=60,
        )
        if probe.returncode == 0:
            return python
    return None


@pytest.fixture(scope="session")
def vllm_python() -> str:
    python = _vllm_python()
    if python is None:
        pytest.skip("no Python with vLLM (run `make vllm`)")
    return python


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slipstream.testing.tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("vllm") / "tiny", **VLLM_TINY_OVERRIDES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`slipstream serve --backend vllm` in a subprocess, logging to a file."""

    def __init__(self, python: str, model: Path, log: Path, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        cmd = [
            python, "-m", "slipstream.cli", "serve", "--backend", "vllm",
            "--model", str(model), "--served-model-name", MODEL,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", "0.25",
            "--max-num-seqs", "8", "--enforce-eager", "--no-log-requests", *extra,
        ]  # fmt: skip
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the vllm server exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            time.sleep(1.0)
        pytest.fail(f"the vllm server was not ready in {START_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()


@contextlib.contextmanager
def running_server(python: str, model: Path, log: Path, *extra: str) -> Iterator[ServerProcess]:
    server = ServerProcess(python, model, log, *extra)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(
    vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("vllm-logs") / "standard.log"
    with running_server(vllm_python, tiny_model, log) as srv:
        yield srv


@pytest.fixture
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _complete(client: openai.OpenAI, prompt: str, **kw: Any) -> Any:
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


def _metric(text: str, name: str) -> float:
    """Sum of every sample of `name` (any labels) in a Prometheus text page."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([-+0-9.eEinfa]+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


# --------------------------------------------------------------------------- tests
def test_chat_completion(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello! How are you today?"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    choice = resp.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 8
    assert resp.usage.prompt_tokens > 5
    assert resp.model == MODEL


def test_completions_greedy_is_deterministic(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    first = _complete(oai, PROMPT, **kw)
    second = _complete(oai, PROMPT, **kw)
    assert first.choices[0].text == second.choices[0].text
    assert first.usage.completion_tokens == 12
    assert first.choices[0].finish_reason == "length"


def test_streaming_with_usage_matches_non_streaming(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = _complete(oai, PROMPT, **kw).choices[0].text
    stream = oai.completions.create(
        model=MODEL, prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kw
    )
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.text)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == whole
    assert reasons == ["length"]
    assert usage is not None and usage.completion_tokens == 10

    chat = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about rivers."}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(chat)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_stop_string(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    text = _complete(oai, PROMPT, **kw).choices[0].text
    # A stop string from the middle of the greedy text: plain letters, first occurrence.
    matches = [m for m in re.finditer(r"[A-Za-z]{2}", text) if m.start() > 0]
    if not matches:
        pytest.skip(f"the tiny model's greedy text has no plain letters: {text!r}")
    stop = matches[len(matches) // 2].group()
    cut = text.index(stop)
    resp = _complete(oai, PROMPT, stop=[stop], **kw)
    assert resp.choices[0].text == text[:cut]
    assert resp.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 16, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    a = _complete(oai, PROMPT, seed=123, **kw).choices[0].text
    b = _complete(oai, PROMPT, seed=123, **kw).choices[0].text
    c = _complete(oai, PROMPT, seed=124, **kw).choices[0].text
    assert a == b
    assert a != c


def test_abort_on_disconnect(server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [line for line, _ in zip(lines, range(6), strict=False) if line]
            assert got  # it was streaming
        # The connection is closed: the request must leave vLLM's running batch.
        deadline = time.monotonic() + 20
        running = -1.0
        while time.monotonic() < deadline:
            page = client.get(server.url + "/metrics").text
            running = _metric(page, "slipstream:num_requests_running")
            if running == 0:
                break
            time.sleep(0.25)
        assert running == 0
        generated = _metric(page, "slipstream:generation_tokens_total")
        time.sleep(1.0)
        page = client.get(server.url + "/metrics").text
        assert _metric(page, "slipstream:generation_tokens_total") == generated


def test_metrics_present(oai: openai.OpenAI, server: ServerProcess) -> None:
    _complete(oai, PROMPT, max_tokens=4, temperature=0)
    page = httpx.get(server.url + "/metrics", timeout=30).text
    for name in (
        "slipstream:prompt_tokens_total",
        "slipstream:generation_tokens_total",
        "slipstream:time_to_first_token_seconds_count",
        "slipstream:e2e_request_latency_seconds_count",
        "slipstream:iteration_tokens_total_count",
    ):
        assert _metric(page, name) > 0, name
    for gauge in ("slipstream:num_requests_running", "slipstream:kv_cache_usage_perc"):
        assert re.search(rf"^{re.escape(gauge)}(\{{|\s)", page, re.M), gauge


def test_research_decoder_is_a_startup_error(vllm_python: str, tiny_model: Path) -> None:
    result = subprocess.run(
        [vllm_python, "-m", "slipstream.cli", "serve", "--backend", "vllm",
         "--model", str(tiny_model), "--decoder", "token_recycling"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "needs the native backend" in result.stderr


def test_ngram_through_vllm_keeps_greedy_text(
    oai: openai.OpenAI,
    vllm_python: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    prompts = [PROMPT, REPEATING_PROMPT]
    kw: dict[str, Any] = {"max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    expected = [_complete(oai, p, **kw).choices[0].text for p in prompts]
    with running_server(
        vllm_python, tiny_model, tmp_path / "ngram.log", "--decoder", "ngram"
    ) as ng:
        client = openai.OpenAI(base_url=ng.url + "/v1", api_key="unused", max_retries=0)
        got = [_complete(client, p, **kw).choices[0].text for p in prompts]
        page = httpx.get(ng.url + "/metrics", timeout=30).text
        info = httpx.get(ng.url + "/v1/models", timeout=30).json()
    assert got == expected
    assert _metric(page, "slipstream:spec_decode_num_drafts_total") > 0
    assert info["data"][0]["id"] == MODEL
    # SIGTERM: exit 0 without a traceback (AsyncLLM.__del__ printed one at every exit).
    assert ng.proc.returncode == 0
    assert "Traceback" not in (tmp_path / "ngram.log").read_text(errors="replace")
