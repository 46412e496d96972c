"""A stub OpenAI server with controlled delays, for testing the load tester.

It streams `num_chunks` chunks, the first after `ttft_s` and the rest `interval_s` apart,
each carrying `tokens_per_chunk` words ("tok"), and exports vLLM-style spec-decode counters
(one draft step per chunk, `tokens_per_chunk - 1` accepted of `draft_len`). Prompts
containing FAIL500, ERRCHUNK or HANG make a request fail in that way.
Run standalone (for `bench decoders` tests): python -m tests.loadtest.stub_server --port P
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass
class StubBehaviour:
    """How the stub answers; mutable so a test can change it between runs."""

    ttft_s: float = 0.05
    interval_s: float = 0.02
    num_chunks: int = 10
    tokens_per_chunk: int = 1
    send_usage: bool = True
    draft_len: int = 3
    # "" = no spec-decode metrics at all.
    metric_prefix: str = "slipstream:"
    model: str = "stub-model"
    decoder: str = "standard"


@dataclass
class StubState:
    """What the stub observed: arrival times, concurrency, request bodies, counters."""

    arrivals: list[float] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)


def create_app(behaviour: StubBehaviour, state: StubState) -> FastAPI:
    """The stub's ASGI app."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": behaviour.model, "object": "model"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics_text(behaviour, state))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _complete(await request.json(), "chat", behaviour, state)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(await request.json(), "completions", behaviour, state)

    return app


async def _complete(body: dict[str, Any], kind: str, b: StubBehaviour, state: StubState) -> Any:
    state.arrivals.append(time.perf_counter())
    state.bodies.append(body)
    prompt = json.dumps(body.get("messages") or body.get("prompt"))
    if "FAIL500" in prompt:
        return JSONResponse({"error": {"message": "stub failure", "type": "server"}}, 500)
    if not body.get("stream"):
        return JSONResponse({"error": {"message": "stub only streams"}}, 400)
    return StreamingResponse(_events(body, kind, prompt, b, state), media_type="text/event-stream")


async def _events(
    body: dict[str, Any], kind: str, prompt: str, b: StubBehaviour, state: StubState
) -> AsyncIterator[str]:
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        tokens = min(int(body.get("max_tokens") or 10**9), b.num_chunks * b.tokens_per_chunk)
        num_chunks = math.ceil(tokens / b.tokens_per_chunk)
        if "HANG" in prompt:
            await asyncio.sleep(3600)
        await asyncio.sleep(b.ttft_s)
        sent = 0
        for i in range(num_chunks):
            if i:
                await asyncio.sleep(b.interval_s)
            n = min(b.tokens_per_chunk, tokens - sent)
            sent += n
            _count_draft(b, state, n)
            yield _sse(_chunk(kind, "tok " * n, b.model))
            if "ERRCHUNK" in prompt:
                yield _sse({"error": {"message": "stub error mid-stream", "code": 500}})
                return
        yield _sse(_chunk(kind, "", b.model, finish="length"))
        if b.send_usage:
            usage = {"prompt_tokens": 7, "completion_tokens": sent, "total_tokens": 7 + sent}
            yield _sse({"id": "x", "object": "chunk", "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        state.in_flight -= 1


def _chunk(kind: str, text: str, model: str, finish: str | None = None) -> dict[str, Any]:
    if kind == "chat":
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
    return {"id": "x", "object": "chunk", "model": model, "choices": [choice]}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _count_draft(b: StubBehaviour, state: StubState, tokens: int) -> None:
    # One draft step per chunk: the chunk's tokens are the accepted drafts plus one bonus token.
    accepted = max(0, min(tokens - 1, b.draft_len))
    state.drafts += 1
    state.draft_tokens += b.draft_len
    state.accepted += accepted
    while len(state.accepted_per_pos) < b.draft_len:
        state.accepted_per_pos.append(0)
    for pos in range(accepted):
        state.accepted_per_pos[pos] += 1


def _metrics_text(b: StubBehaviour, state: StubState) -> str:
    lines = ["# TYPE stub_requests counter", f"stub_requests_total {len(state.arrivals)}"]
    if b.metric_prefix:
        p = b.metric_prefix
        label = f'decoder="{b.decoder}"'
        for name, value in (
            ("spec_decode_num_drafts", state.drafts),
            ("spec_decode_num_draft_tokens", state.draft_tokens),
            ("spec_decode_num_accepted_tokens", state.accepted),
        ):
            lines += [f"# TYPE {p}{name} counter", f"{p}{name}_total{{{label}}} {value}"]
        name = f"{p}spec_decode_num_accepted_tokens_per_pos"
        lines.append(f"# TYPE {name} counter")
        for pos, value in enumerate(state.accepted_per_pos):
            lines.append(f'{name}_total{{{label},position="{pos}"}} {value}')
    return "\n".join(lines) + "\n"


@contextmanager
def run_stub(behaviour: StubBehaviour | None = None) -> Iterator[tuple[str, StubState]]:
    """Serve the stub on 127.0.0.1 (a free port) in a thread; yields (base_url, state)."""
    state = StubState()
    app = create_app(behaviour or StubBehaviour(), state)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("stub server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)


def main() -> None:
    """Run the stub as a process (used to test `bench decoders`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--decoder", default="standard")
    parser.add_argument("--decoder-config", default="{}", help='e.g. {"tokens_per_chunk": 3}')
    parser.add_argument("--startup-delay", type=float, default=0.0)
    args = parser.parse_args()
    time.sleep(args.startup_delay)  # lets a test see /health wait for a slow start
    options = json.loads(args.decoder_config)
    behaviour = StubBehaviour(decoder=args.decoder, ttft_s=0.01, interval_s=0.002, **options)
    app = create_app(behaviour, StubState())
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
