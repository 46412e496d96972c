"""Error cases over raw HTTP: every failure in OpenAI's envelope with the right status."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from slipstream.server.app import create_app, run_server
from slipstream.server.config import ServerConfig
from tests.server.conftest import MODEL, LiveServer, live_server
from tests.server.fake_engine import FakeConfig, FakeEngine

USER = [{"role": "user", "content": "hi"}]


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


def test_malformed_json(client: httpx.Client) -> None:
    for headers in ({"content-type": "application/json"}, {}):
        resp = client.post("/v1/chat/completions", content=b'{"messages": [', headers=headers)
        assert "Malformed JSON" in _error(resp, 400)["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": USER, "max_tokens": "5"}, "max_tokens"),
        ({"messages": USER, "max_tokens": 2.5}, "max_tokens"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": USER, "stop": [1, 2]}, "stop"),
    ],
)
def test_wrong_types(client: httpx.Client, body: dict[str, Any], param: str) -> None:
    error = _error(client.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param)


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"top_p": 0},
        {"top_p": 1.5},
        {"n": 0},
        {"n": 1000},
        {"max_tokens": 0},
        {"presence_penalty": 3},
        {"frequency_penalty": -3},
        {"top_logprobs": 21, "logprobs": True},
        {"top_logprobs": 2},
        {"top_k": -2},
        {"min_p": 1.5},
        {"repetition_penalty": 0},
        {"seed": 2**70},
        {"stop": [""]},
        {"min_tokens": 10, "max_tokens": 5},
        {"stop_token_ids": [100000]},
        {"stream_options": {"include_usage": True}},
        {"messages": []},
    ],
)
def test_out_of_range_values(client: httpx.Client, extra: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": USER, **extra}
    _error(client.post("/v1/chat/completions", json=body), 400)


@pytest.mark.parametrize(
    "extra",
    [
        {"prompt": ""},
        {"prompt": []},
        {"prompt": [999999]},
        {"prompt": "x", "logprobs": 21},
        {"prompt": "x", "suffix": "tail"},
        {"prompt": "x", "best_of": 3},
        {"prompt": "x", "logit_bias": {"five": 10}},
        {"prompt": "x", "logit_bias": {"999999": 10}},
        {"prompt": "x", "logit_bias": {"5": 100.5}},
        {"prompt": "x", "logit_bias": {"5": "a lot"}},
        {"prompt": "x", "max_tokens": -1},
    ],
)
def test_completions_bad_values(client: httpx.Client, extra: dict[str, Any]) -> None:
    _error(client.post("/v1/completions", json=extra), 400)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/completions", {"prompt": "hi"}),
    ],
)
def test_null_means_the_default(client: httpx.Client, path: str, body: dict[str, Any]) -> None:
    """OpenAI's schema marks these nullable, and clients send null for "not set"."""
    fields = ["n", "stream", "max_tokens", "temperature", "stop", "ignore_eos", "min_tokens"]
    fields += ["logprobs"] + (["echo"] if "prompt" in body else ["top_logprobs"])
    for field in fields:
        resp = client.post(path, json={"model": MODEL, **body, field: None})
        assert resp.status_code == 200, (field, resp.text)
        choices = resp.json()["choices"]
        assert len(choices) == 1 and choices[0].get("logprobs") is None, field
    required = "messages" if "messages" in body else "prompt"
    error = _error(client.post(path, json={"model": MODEL, **body, required: None}), 400)
    assert error["param"] is not None and error["param"].startswith(required)


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a \\ud800"}]}'),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
        ),
        ("/v1/completions", b'{"prompt": "abc \\ud800"}'),
        ("/v1/completions", b'{"prompt": ["ok", "abc \\ud800"]}'),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}',
        ),
        ("/tokenize", b'{"prompt": "abc \\ud800"}'),
    ],
)
def test_text_that_is_not_unicode_is_a_400(client: httpx.Client, path: str, raw: bytes) -> None:
    """JSON can escape an unpaired surrogate, which no tokenizer can encode."""
    resp = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert "surrogate" in _error(resp, 400)["message"]


def test_unknown_model(client: httpx.Client) -> None:
    resp = client.post("/v1/chat/completions", json={"model": "nope", "messages": USER})
    error = _error(resp, 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error"


def test_context_window_message_names_the_numbers(client: httpx.Client) -> None:
    resp = client.post("/v1/completions", json={"prompt": [5] * 200, "max_tokens": 100})
    error = _error(resp, 400)
    assert error["code"] == "context_length_exceeded"
    assert "256" in error["message"] and "300" in error["message"]
    assert "200" in error["message"] and "100" in error["message"]
    # No max_tokens: a prompt that fills the window leaves no room.
    resp = client.post("/v1/completions", json={"prompt": [5] * 256, "max_tokens": None})
    assert "256" in _error(resp, 400)["message"]


def test_a_prompt_no_context_could_hold_is_refused_before_tokenizing(
    client: httpx.Client, server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Megabytes of text are a 400 at once (they took seconds of tokenizing on the event
    loop first); text that might fit is tokenized on the tokenizer thread, not the loop."""
    tokenizer = server.engine.tokenizer
    threads: list[str] = []
    encode = tokenizer.encode

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", spy)
    huge = "hello " * 500_000  # 3 MB; the fake's window is 256 tokens
    for path, body in [
        ("/v1/completions", {"prompt": huge, "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}),
    ]:
        error = _error(client.post(path, json=body), 400)
        assert error["code"] == "context_length_exceeded"
        assert "bytes" in error["message"]
    assert threads == []  # refused without tokenizing
    ok = client.post("/v1/completions", json={"prompt": "hello there", "max_tokens": 2})
    assert ok.status_code == 200
    counted = client.post("/tokenize", json={"prompt": "hello " * 2000})  # no context check
    assert counted.status_code == 200 and counted.json()["count"] > 256
    assert threads and all(name.startswith("slipstream-tokenize") for name in threads)


def test_context_window_default_fills_the_rest(client: httpx.Client, server: LiveServer) -> None:
    resp = client.post("/v1/completions", json={"prompt": [5] * 250, "max_tokens": None})
    assert resp.status_code == 200
    assert resp.json()["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_unsupported_features_are_400(
    client: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    error = _error(client.post("/v1/chat/completions", json={"messages": USER, **extra}), 400)
    assert error["param"] == param and "not supported" in error["message"]


def test_unknown_fields_are_ignored(client: httpx.Client) -> None:
    body = {"messages": USER, "max_tokens": 2, "some_future_field": {"x": 1}, "user": "u1"}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    body = {"messages": USER, "max_tokens": 2, "response_format": {"type": "text"}}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_non_text_content_and_tool_messages(client: httpx.Client) -> None:
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    body = {"messages": [{"role": "user", "content": image}]}
    resp = client.post("/v1/chat/completions", json=body)
    assert "image_url" in _error(resp, 400)["message"]
    tool = [*USER, {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    _error(client.post("/v1/chat/completions", json={"messages": tool}), 400)
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    body = {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": parts}]}
    assert client.post("/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200


def test_unknown_route_is_404(client: httpx.Client) -> None:
    error = _error(client.get("/v1/nothing"), 404)
    assert "/v1/nothing" in error["message"]
    assert client.get("/v1/chat/completions").status_code == 405


def test_request_id_is_honoured_or_generated(client: httpx.Client) -> None:
    resp = client.get("/v1/models", headers={"X-Request-Id": "my-id-123"})
    assert resp.headers["x-request-id"] == "my-id-123"
    generated = client.get("/v1/models").headers["x-request-id"]
    assert len(generated) == 32
    # Unprintable or overlong ids are replaced, not echoed into logs.
    assert (
        client.get("/version", headers={"X-Request-Id": "a" * 500}).headers["x-request-id"]
        != "a" * 500
    )
    error_resp = client.post("/v1/completions", json={}, headers={"X-Request-Id": "e1"})
    assert error_resp.headers["x-request-id"] == "e1"


def test_engine_exception_fails_one_request_only(client: httpx.Client) -> None:
    resp = client.post("/v1/completions", json={"prompt": "RAISE_BEFORE", "max_tokens": 3})
    assert _error(resp, 500)["type"] == "server_error"
    resp = client.post("/v1/completions", json={"prompt": "FAIL_MIDSTREAM", "max_tokens": 20})
    assert _error(resp, 500)["type"] == "server_error"
    # Mid-stream: the 200 header is out; the error arrives as an event, then [DONE].
    body = {"prompt": "FAIL_MIDSTREAM", "max_tokens": 20, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 3}).status_code == 200
    assert client.get("/health").status_code == 200


def test_api_key() -> None:
    with live_server(api_key="s3cret") as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        body = {"messages": USER, "max_tokens": 2}
        error = _error(c.post("/v1/chat/completions", json=body), 401)
        assert error["type"] == "authentication_error"
        wrong = {"Authorization": "Bearer wrong"}
        _error(c.post("/v1/chat/completions", json=body, headers=wrong), 401)
        _error(c.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/chat/completions", json=body, headers=good).status_code == 200
        for path in ("/health", "/metrics", "/version", "/openapi.json", "/docs"):
            assert c.get(path).status_code == 200, path


def test_503_while_starting_then_ready() -> None:
    engine = FakeEngine(FakeConfig(start_delay_s=1.0))
    with live_server(engine, wait_ready=False) as srv, httpx.Client(base_url=srv.url) as c:
        error = _error(c.get("/health"), 503)
        assert error["type"] == "service_unavailable_error"
        resp = c.post("/v1/completions", json={"prompt": "x"})
        _error(resp, 503)
        assert resp.headers["retry-after"]
        assert c.get("/version").status_code == 200
        assert c.get("/metrics").status_code == 200
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def _exit_status(
    engine: FakeEngine, config: ServerConfig, bound: bool = True
) -> tuple[list[int], Any]:
    """run_server's return, run on a thread (on a socket bound here, or binding config's
    own address), as a list (empty if it did not return within 20 s), and the app."""
    app = create_app(engine, config)
    sock = None
    if bound:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_server(app, config, sock)))
    thread.start()
    thread.join(timeout=20)
    if sock is not None:
        sock.close()
    return result, app


def test_engine_failing_to_start_stops_the_server_with_status_1() -> None:
    config = ServerConfig(port=0, log_requests=False)
    status, app = _exit_status(FakeEngine(FakeConfig(fail_start=True)), config)
    assert status == [1]
    assert app.state.server.phase.value == "failed"


def test_a_setting_refused_at_start_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """A ValueError from the engine's start (a context the KV cache cannot hold, say) is
    logged as its message, without a traceback, and the server exits with status 1."""
    engine = FakeEngine(FakeConfig(fail_start=True, fail_start_error=ValueError("too long")))
    assert _exit_status(engine, ServerConfig(port=0, log_requests=False))[0] == [1]
    failed = [r for r in caplog.records if "failed to start" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is None
    assert failed[0].getMessage().endswith("too long")


def test_an_address_in_use_exits_with_status_1() -> None:
    """uvicorn cannot bind (another process holds the port): the server exited 0."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    config = ServerConfig(host="127.0.0.1", port=taken.getsockname()[1], log_requests=False)
    assert _exit_status(FakeEngine(FakeConfig()), config, bound=False)[0] == [1]
    taken.close()


def test_overload_gives_429_and_accepted_requests_complete() -> None:
    engine = FakeEngine(FakeConfig(max_num_seqs=2, max_queued_requests=2, step_delay_s=0.01))
    with live_server(engine) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:

        def send(i: int) -> httpx.Response:
            return c.post("/v1/completions", json={"prompt": f"burst {i}", "max_tokens": 20})

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(send, range(16)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) >= 1 and codes.count(200) >= 2
        for resp in responses:
            if resp.status_code == 429:
                assert _error(resp, 429)["type"] == "rate_limit_error"
                assert resp.headers["retry-after"] == "1"
            else:
                assert resp.json()["choices"][0]["finish_reason"] == "length"
                assert resp.json()["usage"]["completion_tokens"] == 20
        assert c.get("/health").status_code == 200
        assert engine.num_free_blocks() == engine.config.num_blocks
        after = c.post("/v1/completions", json={"prompt": "after", "max_tokens": 2})
        assert after.status_code == 200


def test_body_is_json_whatever_the_content_type(client: httpx.Client) -> None:
    # `curl -d '{...}'` labels the body application/x-www-form-urlencoded.
    body = b'{"prompt": "curl", "max_tokens": 2}'
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        resp = client.post("/v1/completions", content=body, headers={"content-type": content_type})
        assert resp.status_code == 200, resp.text
