"""Streaming OpenAI client that records when every piece of each response arrived."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from slipstream.loadtest.datasets import SampleRequest

_ERROR_BODY_CHARS = 300


@dataclass
class RequestRecord:
    """Timings and outcome of one request; times are seconds from the run's start."""

    index: int
    scheduled: float
    # Prompt tokens by our tokenizer (None if not counted); the server's count is prompt_tokens.
    prompt_len: int | None = None
    category: str | None = None
    start: float = 0.0
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    # Arrival of every chunk that carried text, relative to `start`.
    chunk_times: list[float] = field(default_factory=list)
    # From the server's usage chunk; None when it sent none.
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    generated_text: str = ""
    finish_reason: str | None = None
    error_type: str = ""
    error: str = ""

    @property
    def queue_time(self) -> float:
        """Time spent waiting for a concurrency slot after the request was due."""
        return max(0.0, self.start - self.scheduled)

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive text chunks."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    def fail(self, error_type: str, message: str) -> None:
        """Mark the request failed."""
        self.success = False
        self.error_type = error_type
        self.error = message[:_ERROR_BODY_CHARS]


@dataclass(frozen=True)
class Target:
    """Where and how to send requests."""

    base_url: str
    model: str
    endpoint: str
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False

    @property
    def url(self) -> str:
        """Full URL of the completion route."""
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        return f"{api_root(self.base_url)}/{path}"

    def headers(self) -> dict[str, str]:
        """Request headers, with the bearer key when there is one."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def payload(self, sample: SampleRequest, max_tokens: int) -> dict[str, Any]:
        """The JSON body: streaming, usage requested, the prompt in the endpoint's field."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "chat":
            body["messages"] = sample.prompt
        else:
            body["prompt"] = sample.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension, also accepted by slipstream
        return body


def api_root(base_url: str) -> str:
    """`http://h:p`, `http://h:p/` or `http://h:p/v1` -> `http://h:p/v1`."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else f"{root}/v1"


def server_root(base_url: str) -> str:
    """The server's root URL (where /health and /metrics live)."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yield the data of each server-sent event (multi-line data joined by newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


async def send_request(
    client: httpx.AsyncClient,
    target: Target,
    sample: SampleRequest,
    max_tokens: int,
    record: RequestRecord,
    clock_zero: float,
    timeout_s: float,
) -> None:
    """Send one streaming request and fill `record`; never raises except on cancellation."""
    record.start = time.perf_counter() - clock_zero
    try:
        async with asyncio.timeout(timeout_s):
            await _stream(client, target, sample, max_tokens, record, clock_zero)
    except TimeoutError:
        record.fail("Timeout", f"no complete response within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        record.fail(type(exc).__name__, str(exc) or repr(exc))
    record.latency = time.perf_counter() - clock_zero - record.start


async def _stream(
    client: httpx.AsyncClient,
    target: Target,
    sample: SampleRequest,
    max_tokens: int,
    record: RequestRecord,
    clock_zero: float,
) -> None:
    body = target.payload(sample, max_tokens)
    async with client.stream("POST", target.url, json=body, headers=target.headers()) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            record.fail(f"HTTP {resp.status_code}", _error_message(text))
            return
        text_parts: list[str] = []
        done = False
        async for data in iter_sse_data(resp.aiter_lines()):
            now = time.perf_counter() - clock_zero - record.start
            if data.strip() == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                record.fail("BadChunk", f"not JSON: {data[:80]!r}")
                return
            if isinstance(chunk, dict) and "error" in chunk:
                record.fail("ServerError", _error_message(json.dumps(chunk)))
                return
            piece = _absorb_chunk(chunk, target.endpoint, record)
            if piece:
                if not record.chunk_times:
                    record.ttft = now
                record.chunk_times.append(now)
                text_parts.append(piece)
    record.generated_text = "".join(text_parts)
    if not done:
        record.fail("IncompleteStream", "the stream ended without data: [DONE]")
    elif not record.chunk_times:
        record.fail("EmptyResponse", "the stream carried no text")
    else:
        record.success = True


def _absorb_chunk(chunk: Any, endpoint: str, record: RequestRecord) -> str:
    # Returns the text this chunk carried and keeps its usage / finish_reason.
    if not isinstance(chunk, dict):
        return ""
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            record.output_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            record.prompt_tokens = usage["prompt_tokens"]
    pieces = []
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
        if endpoint == "chat":
            delta = choice.get("delta") or {}
            # Reasoning models stream thinking separately; it is still generated output.
            pieces.append(delta.get("content") or delta.get("reasoning_content") or "")
        else:
            pieces.append(choice.get("text") or "")
    return "".join(p for p in pieces if isinstance(p, str))


def _error_message(text: str) -> str:
    # OpenAI errors are {"error": {"message": ...}}; fall back to the raw body.
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text[:_ERROR_BODY_CHARS]
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(err, str):
        return err
    return text[:_ERROR_BODY_CHARS]
