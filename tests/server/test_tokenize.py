"""/tokenize, /detokenize, /version, /docs and /openapi.json."""

from __future__ import annotations

import httpx

from slipstream import __version__
from slipstream.engine.tokenizer import apply_chat_template
from tests.server.conftest import MODEL, LiveServer


def test_tokenize_prompt_and_detokenize(client: httpx.Client, server: LiveServer) -> None:
    resp = client.post(
        "/tokenize", json={"model": MODEL, "prompt": "Hello there", "return_token_strs": True}
    )
    body = resp.json()
    ids = list(server.engine.tokenizer.encode("Hello there"))
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["max_model_len"] == 256 and len(body["token_strs"]) == len(ids)
    back = client.post("/detokenize", json={"tokens": ids}).json()
    assert back == {"prompt": "Hello there"}


def test_tokenize_messages_uses_the_chat_template(client: httpx.Client, server: LiveServer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    body = client.post("/tokenize", json={"messages": messages}).json()
    assert body["tokens"] == apply_chat_template(server.engine.tokenizer, messages)
    without = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
    assert without.json()["count"] < body["count"]


def test_tokenize_errors(client: httpx.Client) -> None:
    assert client.post("/tokenize", json={}).status_code == 400
    both = {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    assert client.post("/tokenize", json=both).status_code == 400
    assert client.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404
    resp = client.post("/detokenize", json={"tokens": [1, 99999]})
    assert resp.status_code == 400 and "99999" in resp.json()["error"]["message"]


def test_version_and_docs(client: httpx.Client) -> None:
    assert client.get("/version").json() == {"version": __version__}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/version",
        "/metrics", "/tokenize", "/detokenize",
    ):  # fmt: skip
        assert path in paths, path
