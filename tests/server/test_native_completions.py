"""Completions and chat details against the native engine on the tiny model: streamed
offsets, echo without generation, a prompt list's shared steps, prefilled assistant turns."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import LiveServer, live_server

pytestmark = pytest.mark.slow

FFFD = "\ufffd"


@pytest.fixture(scope="module")
def srv(tiny_model_dir: str) -> Iterator[LiveServer]:
    from slipstream.backends.native import NativeEngineClient
    from slipstream.testing.engines import tiny_engine_config

    engine = NativeEngineClient(tiny_engine_config(tiny_model_dir, num_blocks=256, max_num_seqs=8))
    with live_server(engine, served_model_name="tiny") as server:  # type: ignore[arg-type]
        yield server


def _post(srv: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60)


def _stream_chunks(srv: LiveServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


def test_streamed_offsets_equal_the_whole_response_with_text_held_back(
    srv: LiveServer,
) -> None:
    """Text that may grow into a stop string is held back from the stream; the offsets of
    its tokens must not be (they were all the offset of the text sent so far)."""
    # Held back whenever the text ends in one of these letters (the stops never complete).
    stops = [f"{c}\u2603\u2603" for c in "aeiou tns"]
    body = {
        "prompt": "The river ran slowly past the old mill",
        "max_tokens": 24,
        "temperature": 0,
        "logprobs": 1,
        "stop": stops,
        "ignore_eos": True,
    }
    whole = _post(srv, "/v1/completions", body).json()["choices"][0]
    offsets = whole["logprobs"]["text_offset"]
    assert len(offsets) == 24 and offsets == sorted(offsets)
    assert offsets[-1] <= len(whole["text"])
    streamed: list[int] = []
    text = ""
    for chunk in _stream_chunks(srv, {**body, "stream": True}):
        for choice in chunk["choices"]:
            text += choice["text"]
            if choice["logprobs"]:
                streamed.extend(choice["logprobs"]["text_offset"])
    assert text == whole["text"]
    assert streamed == offsets


def test_echo_with_max_tokens_zero_scores_the_prompt(srv: LiveServer) -> None:
    """lm-eval-harness's log-likelihood request: the prompt and its logprobs, no tokens."""
    prompt = "The children sat on the bank"
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}
    resp = _post(srv, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    choice, usage = out["choices"][0], out["usage"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert usage["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == usage["prompt_tokens"]
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == prompt
    # The same scores as the prompt part of an echo that generates.
    longer = _post(srv, "/v1/completions", {**body, "max_tokens": 3}).json()
    n = usage["prompt_tokens"]
    assert longer["choices"][0]["logprobs"]["token_logprobs"][:n] == lp["token_logprobs"]
    # Streamed: one chunk with the prompt, then the usage.
    chunks = _stream_chunks(
        srv, {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    texts = [c["text"] for ch in chunks for c in ch["choices"]]
    assert "".join(texts) == prompt
    assert chunks[-1]["usage"]["completion_tokens"] == 0
    # Without echo, 0 is refused, naming the field.
    refused = _post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    # min_tokens above 0 is refused against the 0 the client sent (it named a 1).
    refused = _post(srv, "/v1/completions", {**body, "min_tokens": 2})
    assert refused.status_code == 400 and "max_tokens (0)" in refused.json()["error"]["message"]
    # A prompt filling the whole window: a 400 that says so (it counted a phantom token).
    window = srv.engine.model_info.max_model_len
    full = _post(srv, "/v1/completions", {**body, "prompt": [5] * window})
    assert full.status_code == 400 and "max_model_len - 1" in full.json()["error"]["message"]


def _steps(srv: LiveServer) -> float:
    metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    match = re.search(r"^slipstream:engine_steps_total\{[^}]*\} ([0-9.e+]+)$", metrics, re.M)
    assert match is not None
    return float(match.group(1))


def test_a_prompt_list_shares_the_engine_steps(srv: LiveServer) -> None:
    """Six prompts of one request prefill together (they waited for each other's first
    token: 8 steps where 2 do)."""
    prompts = [f"Prompt number {i} about the river" for i in range(6)]
    before = _steps(srv)
    resp = _post(
        srv,
        "/v1/completions",
        {"prompt": prompts, "max_tokens": 2, "temperature": 0, "ignore_eos": True},
    )
    assert resp.status_code == 200
    assert [c["index"] for c in resp.json()["choices"]] == list(range(6))
    assert _steps(srv) - before <= 3  # a prefill step (maybe two) and a decode step


def test_a_refused_prompt_in_a_list_leaves_nothing_running(tiny_model_dir: str) -> None:
    """Prompts start together; where the engine's queue refuses some, the request is a 429
    and the prompts it took are aborted: nothing keeps running or holds KV."""
    from slipstream.backends.native import NativeEngineClient
    from slipstream.testing.engines import tiny_engine_config

    config = tiny_engine_config(
        tiny_model_dir, num_blocks=64, max_num_seqs=1, max_queued_requests=2
    )
    engine = NativeEngineClient(config)
    with live_server(engine, served_model_name="tiny") as small:  # type: ignore[arg-type]
        free = engine.num_free_blocks()
        prompts = [f"prompt {i} about the mill" for i in range(6)]
        body = {"prompt": prompts, "max_tokens": 200, "ignore_eos": True}
        resp = _post(small, "/v1/completions", body)
        assert resp.status_code == 429, resp.text
        # The refusal does not wait for the admitted prompts (they ran to the end, 200
        # tokens each thrown away, holding their slots meanwhile).
        assert engine.engine.get_stats()["generation_tokens"] < 200
        metrics = httpx.get(small.url + "/metrics", timeout=10).text
        assert re.search(r"^slipstream:num_requests_running\{[^}]*\} 0\.0$", metrics, re.M)
        assert re.search(r"^slipstream:num_requests_waiting\{[^}]*\} 0\.0$", metrics, re.M)
        assert engine.num_free_blocks() == free
        # And the server goes on answering.
        one = _post(small, "/v1/completions", {"prompt": "hello", "max_tokens": 2})
        assert one.status_code == 200


def test_continue_final_message_continues_the_assistant_turn(srv: LiveServer) -> None:
    """vLLM's assistant prefill: the last message stays open (no end-of-turn after it)."""
    messages = [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the"},
    ]
    body = {"messages": messages, "add_generation_prompt": False}
    closed = _post(srv, "/tokenize", body).json()["tokens"]
    opened = _post(srv, "/tokenize", {**body, "continue_final_message": True}).json()["tokens"]
    detok = _post(srv, "/detokenize", {"tokens": opened}).json()["prompt"]
    assert detok.endswith("Why did the")
    assert closed[: len(opened)] == opened and len(closed) > len(opened)  # <|im_end|> cut
    chat = _post(
        srv,
        "/v1/chat/completions",
        {**body, "continue_final_message": True, "max_tokens": 3, "temperature": 0},
    )
    assert chat.status_code == 200
    assert chat.json()["usage"]["prompt_tokens"] == len(opened)
    both = _post(
        srv, "/v1/chat/completions", {"messages": messages, "continue_final_message": True}
    )
    assert both.status_code == 400
    assert both.json()["error"]["param"] == "continue_final_message"


def test_the_largest_seed_works_for_every_choice(srv: LiveServer) -> None:
    """Choice i is seeded with seed + i, which wrapped past torch's range for n > 1."""
    body = {"prompt": "hi", "seed": 2**64 - 1, "n": 2, "max_tokens": 4, "temperature": 1.0}
    first = _post(srv, "/v1/completions", body)
    assert first.status_code == 200, first.text
    again = _post(srv, "/v1/completions", body)
    texts = [c["text"] for c in first.json()["choices"]]
    assert texts == [c["text"] for c in again.json()["choices"]]
    # Choice 0 is the request's own seed, as with n = 1.
    single = _post(srv, "/v1/completions", {**body, "n": 1}).json()["choices"][0]["text"]
    assert single == texts[0]


def test_a_client_gone_while_its_prompts_start_leaves_nothing_running(
    tiny_model_dir: str,
) -> None:
    """Prompt 0 has started and prompts 1-2 wait for the batch slot when the client leaves:
    all three are aborted (prompt 0, already started, was left to run to its end)."""
    from slipstream.backends.native import NativeEngineClient
    from slipstream.testing.engines import tiny_engine_config

    engine = NativeEngineClient(tiny_engine_config(tiny_model_dir, num_blocks=64, max_num_seqs=1))
    engine.add_stats_listener(lambda _: time.sleep(0.01))  # steps of >= 10 ms
    with live_server(engine, served_model_name="tiny") as small:  # type: ignore[arg-type]
        free = engine.num_free_blocks()
        body = {"prompt": ["one", "two", "three"], "max_tokens": 200, "ignore_eos": True}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(small.url + "/v1/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 10
        while engine.num_free_blocks() != free and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.num_free_blocks() == free
        assert engine.engine.get_stats()["generation_tokens"] < 200
