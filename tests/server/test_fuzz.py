"""Hypothesis-generated request bodies: never a 5xx, never a hang, errors always enveloped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL, LiveServer, live_server
from tests.server.fake_engine import FakeConfig, FakeEngine

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _or_junk(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values, sometimes anything."""
    return st.one_of(strategy, strategy, JSON)


TEXT_PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=20)}
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": _or_junk(st.sampled_from(["system", "user", "assistant", "developer", "tool"])),
        "content": _or_junk(st.text(max_size=40) | st.lists(TEXT_PART, max_size=2)),
    }
)
COMMON: dict[str, st.SearchStrategy[Any]] = {
    "model": _or_junk(st.sampled_from([MODEL, "other"])),
    "max_tokens": _or_junk(st.integers(-2, 300) | st.none()),
    "temperature": _or_junk(st.floats(-1, 3)),
    "top_p": _or_junk(st.floats(-0.5, 1.5)),
    "top_k": _or_junk(st.integers(-3, 600)),
    "min_p": _or_junk(st.floats(-0.5, 1.5)),
    "n": _or_junk(st.integers(-1, 4)),
    "seed": _or_junk(st.integers(-(2**65), 2**65)),
    "stop": _or_junk(st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3)),
    "stop_token_ids": _or_junk(st.lists(st.integers(-2, 600), max_size=3)),
    "presence_penalty": _or_junk(st.floats(-3, 3)),
    "frequency_penalty": _or_junk(st.floats(-3, 3)),
    "repetition_penalty": _or_junk(st.floats(-1, 3)),
    "ignore_eos": _or_junk(st.booleans()),
    "min_tokens": _or_junk(st.integers(-1, 20)),
    "stream": _or_junk(st.booleans()),
    "stream_options": _or_junk(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logit_bias": JSON,
}
CHAT_BODY = st.fixed_dictionaries(
    {"messages": _or_junk(st.lists(MESSAGE, max_size=3))},
    optional={
        **COMMON,
        "max_completion_tokens": _or_junk(st.integers(-1, 300)),
        "logprobs": _or_junk(st.booleans()),
        "top_logprobs": _or_junk(st.integers(-1, 25)),
        "tools": JSON,
        "response_format": _or_junk(
            st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})
        ),
    },
)
PROMPT = (
    st.text(max_size=40)
    | st.lists(st.integers(-2, 600), max_size=20)
    | st.lists(st.text(max_size=10), max_size=3)
)
COMPLETION_BODY = st.fixed_dictionaries(
    {"prompt": _or_junk(PROMPT)},
    optional={
        **COMMON,
        "echo": _or_junk(st.booleans()),
        "logprobs": _or_junk(st.integers(-1, 25)),
        "best_of": JSON,
        "suffix": JSON,
    },
)
TOKENIZE_BODY = st.fixed_dictionaries(
    {},
    optional={
        "prompt": _or_junk(st.text(max_size=30)),
        "messages": _or_junk(st.lists(MESSAGE, max_size=2)),
        "add_special_tokens": JSON,
    },
)
DETOKENIZE_BODY = st.fixed_dictionaries(
    {"tokens": _or_junk(st.lists(st.integers(-2, 700), max_size=10))}
)
SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
CASES = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), CHAT_BODY | JSON),
    st.tuples(st.just("/v1/completions"), COMPLETION_BODY | JSON),
    st.tuples(st.just("/tokenize"), TOKENIZE_BODY),
    st.tuples(st.just("/detokenize"), DETOKENIZE_BODY),
)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LiveServer]:
    with live_server(FakeEngine(FakeConfig(name=MODEL, step_delay_s=0.0))) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(fuzz_server: LiveServer) -> Iterator[httpx.Client]:
    # A hang shows up as a timeout, which fails the example.
    with httpx.Client(base_url=fuzz_server.url, timeout=15) as client:
        yield client


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=CASES)
def test_fuzzed_bodies_never_5xx(http: httpx.Client, case: tuple[str, Any]) -> None:
    path, body = case
    resp = http.post(path, content=json.dumps(body))
    assert resp.status_code < 500, (resp.status_code, resp.text)
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert error["message"] and error["type"]
    elif resp.headers["content-type"].startswith("text/event-stream"):
        assert resp.text.endswith("data: [DONE]\n\n")
        assert '"error"' not in resp.text
    else:
        assert isinstance(resp.json(), dict)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=st.binary(max_size=64)
    | st.sampled_from([b'{"prompt": NaN}', b'{"prompt": "x", "n": Infinity}', b"[]", b"null"])
)
def test_garbage_bytes_are_400(http: httpx.Client, raw: bytes) -> None:
    resp = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert resp.json()["error"]["type"] == "invalid_request_error"


def test_server_still_healthy_after_fuzzing(http: httpx.Client, fuzz_server: LiveServer) -> None:
    assert http.get("/health").status_code == 200
    engine = fuzz_server.engine
    assert engine.num_free_blocks() == engine.config.num_blocks  # type: ignore[attr-defined]
