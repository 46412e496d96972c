"""SSE parsing and the streaming client's handling of failures, against the stub server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from slipstream.loadtest.client import (
    RequestRecord,
    Target,
    api_root,
    iter_sse_data,
    send_request,
    server_root,
)
from slipstream.loadtest.datasets import SampleRequest
from tests.loadtest.stub_server import StubBehaviour, run_stub


async def _lines(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


def _collect(items: list[str]) -> list[str]:
    async def go() -> list[str]:
        return [d async for d in iter_sse_data(_lines(items))]

    return asyncio.run(go())


def test_sse_events_split_on_blank_lines() -> None:
    lines = [": keep-alive", "", 'data: {"a": 1}', "", "event: x", "data:two", "data: lines", ""]
    lines += ["data: [DONE]"]  # no trailing blank line: still dispatched at EOF
    assert _collect(lines) == ['{"a": 1}', "two\nlines", "[DONE]"]


def test_urls_accept_a_trailing_v1() -> None:
    assert api_root("http://h:1/") == "http://h:1/v1"
    assert api_root("http://h:1/v1/") == "http://h:1/v1"
    assert server_root("http://h:1/v1") == "http://h:1"


def _send(
    base_url: str, prompt: str, endpoint: str = "chat", timeout: float = 5.0
) -> RequestRecord:
    async def go() -> RequestRecord:
        target = Target(base_url, "stub-model", endpoint, api_key="k", ignore_eos=True)
        record = RequestRecord(0, 0.0)
        async with httpx.AsyncClient() as client:
            sample = SampleRequest([{"role": "user", "content": prompt}])
            if endpoint == "completions":
                sample = SampleRequest(prompt)
            await send_request(client, target, sample, 8, record, time.perf_counter(), timeout)
        return record

    return asyncio.run(go())


def test_streamed_request_records_text_usage_and_body() -> None:
    with run_stub(StubBehaviour(ttft_s=0.0, interval_s=0.0, num_chunks=4)) as (url, state):
        chat = _send(url, "hello")
        comp = _send(url, "hello", endpoint="completions")
    for r in (chat, comp):
        assert r.success, r.error
        assert r.generated_text == "tok " * 4 and len(r.chunk_times) == 4
        assert (r.output_tokens, r.prompt_tokens, r.finish_reason) == (4, 7, "length")
    chat_body, comp_body = state.bodies
    assert chat_body["stream_options"] == {"include_usage": True}
    assert chat_body["ignore_eos"] is True and chat_body["max_tokens"] == 8
    assert "messages" in chat_body and comp_body["prompt"] == "hello"


@pytest.mark.parametrize(
    ("prompt", "error_type", "message"),
    [
        ("FAIL500", "HTTP 500", "stub failure"),
        ("ERRCHUNK", "ServerError", "stub error mid-stream"),
    ],
)
def test_server_errors_are_typed(prompt: str, error_type: str, message: str) -> None:
    with run_stub(StubBehaviour(ttft_s=0.0, interval_s=0.0)) as (url, _):
        r = _send(url, prompt)
    assert not r.success
    assert (r.error_type, r.error) == (error_type, message)


def test_per_request_timeout_stops_a_hung_stream() -> None:
    with run_stub() as (url, _):
        t0 = time.perf_counter()
        r = _send(url, "HANG", timeout=0.3)
        elapsed = time.perf_counter() - t0
    assert (r.success, r.error_type) == (False, "Timeout")
    assert 0.3 <= r.latency < 1.0 and elapsed < 2.0


def test_connection_refused_is_reported() -> None:
    r = _send("http://127.0.0.1:9", "hi")  # port 9 (discard): nothing listens on loopback
    assert not r.success and r.error_type == "ConnectError"
