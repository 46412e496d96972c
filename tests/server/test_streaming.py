"""SSE framing, character-safe deltas, and client disconnects freeing KV blocks."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from slipstream.server.streaming import TextDelta
from tests.server.conftest import LiveServer, live_server
from tests.server.fake_engine import FakeConfig, FakeEngine


def _events(client: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    # Every event is exactly "data: ...\n\n".
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1])
    return [b.removeprefix("data: ") for b in blocks[:-1]]


def test_chat_sse_framing(client: httpx.Client) -> None:
    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 9,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = _events(client, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # Role first for each choice, with usage null on every chunk but the last.
    assert [c["choices"][0]["delta"]["role"] for c in chunks[:2]] == ["assistant", "assistant"]
    assert all(c["usage"] is None for c in chunks[:-1])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 18
    assert usage["total_tokens"] == usage["prompt_tokens"] + 18
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        finishes = [c["finish_reason"] for c in mine]
        # finish_reason only on the last chunk of the choice, which still carries content.
        assert finishes[-1] == "length" and not any(finishes[:-1])
        assert "content" in mine[-1]["delta"]


def test_completion_sse_without_usage(client: httpx.Client) -> None:
    events = _events(client, "/v1/completions", {"prompt": "hi", "max_tokens": 5, "stream": True})
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_continuous_usage_stats(client: httpx.Client) -> None:
    body = {
        "prompt": "hi",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    chunks = [json.loads(e) for e in _events(client, "/v1/completions", body)[:-1]]
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 4


def test_stream_with_stop_string_never_leaks_it(client: httpx.Client, server: LiveServer) -> None:
    base = {"prompt": "stop test", "max_tokens": 40, "seed": 1}
    full = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = full[12:16]
    body = {**base, "stop": [stop], "stream": True}
    chunks = [json.loads(e) for e in _events(client, "/v1/completions", body)[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["stop_reason"] == stop


def test_deltas_never_split_a_character(client: httpx.Client) -> None:
    # The script has é, 😀, 日本語 and ✓, each spread over several byte-level tokens.
    for seed in range(6):
        body = {"prompt": "x", "max_tokens": 60, "seed": seed, "stream": True}
        chunks = [json.loads(e) for e in _events(client, "/v1/completions", body)[:-1]]
        deltas = [c["choices"][0]["text"] for c in chunks]
        assert all("\ufffd" not in d for d in deltas[:-1])
        full = client.post("/v1/completions", json={**body, "stream": False}).json()
        assert "".join(deltas) == full["choices"][0]["text"]


@pytest.mark.parametrize(
    ("steps", "stops", "expected"),
    [
        (["ab", "ab\ufffd", "ab\ufffd\ufffd", "ab日"], (), ["ab", "", "", "日"]),
        (["x", "xS", "xST", "xSTOP"], ("STOP",), ["x", "", "", "STOP"]),
        (["x", "xS", "xSa"], ("STOP",), ["x", "", "Sa"]),
        (["a\ufffd"], (), ["a"]),
    ],
)
def test_text_delta(steps: list[str], stops: tuple[str, ...], expected: list[str]) -> None:
    delta = TextDelta(stops)
    assert [delta.step(text, finished=False) for text in steps] == expected


def test_text_delta_flushes_when_finished() -> None:
    delta = TextDelta(("END",))
    assert delta.step("abE\ufffd", finished=False) == "ab"
    assert delta.step("abE\ufffd", finished=True) == "E\ufffd"


def _wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_disconnect_mid_stream_frees_kv_blocks() -> None:
    engine = FakeEngine(FakeConfig(step_delay_s=0.02, num_blocks=512))
    with live_server(engine) as srv:
        start_blocks = engine.num_free_blocks()

        async def open_and_drop(i: int) -> int:
            body = {"prompt": f"disconnect {i}", "max_tokens": 200, "stream": True}
            seen = 0
            async with (
                httpx.AsyncClient(base_url=srv.url, timeout=10) as client,
                client.stream("POST", "/v1/completions", json=body) as resp,
            ):
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                    if seen >= 3:
                        break  # leaving the block closes the connection mid-stream
            return seen

        async def main() -> list[int]:
            return await asyncio.gather(*(open_and_drop(i) for i in range(8)))

        assert asyncio.run(main()) == [3] * 8
        assert _wait_for(lambda: engine.num_free_blocks() == start_blocks)
        assert len(engine.aborted) == 8 and not engine.finished
        # The server still serves.
        resp = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert resp.status_code == 200


def test_disconnect_while_waiting_for_a_non_streaming_answer_aborts() -> None:
    engine = FakeEngine(FakeConfig(step_delay_s=0.02))
    with live_server(engine) as srv:
        start_blocks = engine.num_free_blocks()
        body = {"prompt": "slow", "max_tokens": 200}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=0.3)
        assert _wait_for(lambda: engine.num_free_blocks() == start_blocks)
        assert len(engine.aborted) == 1
