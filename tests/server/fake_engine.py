"""A fake EngineClient for server tests: deterministic tokens from the tiny tokenizer.

It honours max_tokens, stop strings, stop_token_ids, EOS/ignore_eos, n, logprobs and
prompt logprobs; runs a step loop with max_num_seqs and a bounded waiting queue; keeps a
KV free-block count that finishing and aborting give back; and fails on demand: a prompt
containing RAISE_BEFORE raises RuntimeError before any output, FAIL_MIDSTREAM raises
EngineError after two steps.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from slipstream.backends.base import (
    EngineDeadError,
    EngineError,
    GenerateRequest,
    ModelInfo,
    QueueFullError,
)
from slipstream.engine.outputs import (
    CompletionOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
    StepStats,
    TokenLogprobs,
)
from slipstream.testing.tiny_tokenizer import build_tiny_tokenizer

# What the fake "model" says; multi-byte characters span several byte-level tokens.
SCRIPT_TEXT = "The quick brown fox jumps over the lazy dog. Café naïve 😀 日本語 ✓ done. "


@dataclass
class FakeConfig:
    """Knobs of the fake engine."""

    name: str = "tiny-fake"
    vocab_size: int = 512
    max_model_len: int = 256
    num_blocks: int = 1024
    block_size: int = 16
    max_num_seqs: int = 64
    max_queued_requests: int | None = None
    step_delay_s: float = 0.001
    start_delay_s: float = 0.0
    fail_start: bool = False
    fail_start_error: Exception | None = None  # what a failed start raises (a RuntimeError)
    decoder: str = "standard"
    # Emit EOS after this many tokens unless the request sets ignore_eos; None = never.
    eos_after: int | None = None
    # Report speculative-decoding counters (3-token drafts) every step.
    spec_stats: bool = False


@dataclass
class _Request:
    request: GenerateRequest
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    completions: list[CompletionOutput] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    blocks: int = 0
    steps: int = 0
    done: bool = False
    metrics: RequestMetrics | None = None
    prompt_text: str = ""


class FakeEngine:
    """An EngineClient whose "model" recites SCRIPT_TEXT, one token per step."""

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self._tokenizer: Any = build_tiny_tokenizer(self.config.vocab_size)
        self.script = list(self._tokenizer.encode(SCRIPT_TEXT))
        # Start offsets that begin a character (so every completion decodes cleanly).
        self.starts = [
            i
            for i in range(len(self.script))
            if not self._tokenizer.decode(self.script[i : i + 1]).startswith("\ufffd")
        ]
        self.eos_token_id = int(self._tokenizer.eos_token_id)
        self._free_blocks = self.config.num_blocks
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._listeners: list[Callable[[StepStats], None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.started = False
        self.dead = False
        self.submitted: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.results: dict[str, RequestOutput] = {}

    # ---- EngineClient ---------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        """The fake model."""
        return ModelInfo(
            name=self.config.name,
            max_model_len=self.config.max_model_len,
            vocab_size=self.config.vocab_size,
            decoder=self.config.decoder,
        )

    @property
    def tokenizer(self) -> Any:
        """The tiny tokenizer."""
        return self._tokenizer

    async def start(self) -> None:
        """Start the step loop (after an optional delay; may fail on purpose)."""
        if self.started:
            return
        if self.config.start_delay_s:
            await asyncio.sleep(self.config.start_delay_s)
        if self.config.fail_start:
            raise self.config.fail_start_error or RuntimeError("fake engine failed to start")
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop())
        self.started = True

    async def shutdown(self) -> None:
        """Stop the loop; pending requests fail with EngineDeadError."""
        self.dead = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for req in [*self._waiting, *self._running]:
            req.queue.put_nowait(EngineDeadError("engine shut down"))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs, one per step."""
        if self.dead or not self.started:
            raise EngineDeadError("the fake engine is not running")
        prompt_text = self._tokenizer.decode(request.prompt_token_ids)
        if "RAISE_BEFORE" in prompt_text:
            raise RuntimeError("fake engine crashed before the first token")
        limit = self.config.max_queued_requests
        if limit is not None and len(self._waiting) >= limit:
            raise QueueFullError(f"{len(self._waiting)} requests waiting")
        req = _Request(request, prompt_text=prompt_text)
        self.submitted.append(request)
        self._waiting.append(req)
        self._wake.set()
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not req.done:
                self._drop(req, aborted=True)

    async def abort(self, request_id: str) -> None:
        """Drop the request and free its blocks now."""
        for req in [*self._waiting, *self._running]:
            if req.request.request_id == request_id:
                self._drop(req, aborted=True)

    async def check_health(self) -> None:
        """Dead after shutdown."""
        if self.dead:
            raise EngineDeadError("the fake engine is dead")

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Receive every step's StepStats."""
        self._listeners.append(listener)

    def num_free_blocks(self) -> int:
        """Free KV blocks."""
        return self._free_blocks

    # ---- the step loop ------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self._running and not self._waiting:
                await self._wake.wait()
                self._wake.clear()
                continue
            stats = StepStats()
            self._admit(stats)
            for req in list(self._running):
                self._advance(req, stats)
            self._emit(stats)
            if not self._running and not self._waiting:
                self._emit(StepStats(kv_cache_usage=self._usage()))  # idle: gauges to zero
            await asyncio.sleep(self.config.step_delay_s)

    def _admit(self, stats: StepStats) -> None:
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            req = self._waiting[0]
            params = req.request.params
            prompt_len = len(req.request.prompt_token_ids)
            max_tokens = params.max_tokens or self.config.max_model_len - prompt_len
            blocks = params.n * math.ceil((prompt_len + max_tokens) / self.config.block_size)
            if blocks > self._free_blocks:
                break
            self._waiting.popleft()
            self._free_blocks -= blocks
            req.blocks = blocks
            now = time.monotonic()
            arrival = req.request.arrival_time or now
            req.metrics = RequestMetrics(arrival_time=arrival, first_scheduled_time=now)
            base = params.seed if params.seed is not None else sum(req.request.prompt_token_ids)
            req.offsets = [self.starts[(base + 3 * i) % len(self.starts)] for i in range(params.n)]
            req.completions = [CompletionOutput(i, "", []) for i in range(params.n)]
            self._running.append(req)
            stats.num_prompt_tokens += prompt_len
            stats.num_forward_tokens += prompt_len
            stats.prefix_cache_queries += prompt_len

    def _advance(self, req: _Request, stats: StepStats) -> None:
        req.steps += 1
        if "FAIL_MIDSTREAM" in req.prompt_text and req.steps > 2:
            self._drop(req, aborted=False)
            req.queue.put_nowait(EngineError("fake engine failed mid-stream"))
            return
        for i, completion in enumerate(req.completions):
            if completion.finished:
                continue
            self._next_token(req, i, completion)
            stats.num_generation_tokens += 1
            stats.num_forward_tokens += 1
        assert req.metrics is not None
        now = time.monotonic()
        req.metrics.first_token_time = req.metrics.first_token_time or now
        req.metrics.last_token_time = now
        finished = all(c.finished for c in req.completions)
        if finished:
            req.metrics.finished_time = now
            self._drop(req, aborted=False)
            self.finished.append(req.request.request_id)
        output = self._snapshot(req, finished)
        if finished:
            self.results[req.request.request_id] = output
        req.queue.put_nowait(output)

    def _next_token(self, req: _Request, i: int, c: CompletionOutput) -> None:
        params = req.request.params
        position = len(c.token_ids)
        token = self.script[(req.offsets[i] + position) % len(self.script)]
        eos_after = self.config.eos_after
        if eos_after is not None and position >= eos_after and not params.ignore_eos:
            token = self.eos_token_id
        c.token_ids.append(token)
        if params.logprobs is not None:
            c.logprobs = (c.logprobs or []) + [self._logprobs(token, position, params.logprobs)]
        if token in params.stop_token_ids or (token == self.eos_token_id and not params.ignore_eos):
            c.finish_reason = "stop"
            c.stop_reason = token if token in params.stop_token_ids else None
            c.text = self._tokenizer.decode(c.token_ids[:-1])
            return
        c.text = self._tokenizer.decode(c.token_ids)
        for stop in params.stop:
            at = c.text.find(stop)
            if at >= 0:
                end = at + len(stop) if params.include_stop_str_in_output else at
                c.text, c.finish_reason, c.stop_reason = c.text[:end], "stop", stop
                return
        room = self.config.max_model_len - len(req.request.prompt_token_ids)
        if len(c.token_ids) >= min(params.max_tokens or room, room):
            c.finish_reason = "length"

    def _logprobs(self, token: int, position: int, num_top: int) -> TokenLogprobs:
        chosen = Logprob(token, -0.05 - 0.1 * (position % 5))
        others = [
            Logprob((token + j) % self.config.vocab_size, chosen.logprob - j)
            for j in range(1, num_top)
        ]
        return TokenLogprobs(chosen=chosen, top=[chosen, *others][:num_top])

    def _snapshot(self, req: _Request, finished: bool) -> RequestOutput:
        """A cumulative output; lists are copied so later steps do not change it."""
        params = req.request.params
        prompt_logprobs: list[TokenLogprobs | None] | None = None
        if params.prompt_logprobs is not None:
            prompt_ids = req.request.prompt_token_ids
            prompt_logprobs = [None] + [
                TokenLogprobs(Logprob(t, -1.0), [Logprob(t, -1.0)]) for t in prompt_ids[1:]
            ]
        outputs = [
            CompletionOutput(
                c.index,
                c.text,
                list(c.token_ids),
                c.finish_reason,
                c.stop_reason,
                list(c.logprobs) if c.logprobs is not None else None,
            )
            for c in req.completions
        ]
        return RequestOutput(
            request_id=req.request.request_id,
            prompt=req.request.prompt,
            prompt_token_ids=list(req.request.prompt_token_ids),
            outputs=outputs,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            metrics=RequestMetrics(**vars(req.metrics)) if req.metrics else None,
        )

    def _drop(self, req: _Request, aborted: bool) -> None:
        """Remove a request and give its blocks back (idempotent)."""
        if req.done:
            return
        req.done = True
        if req in self._running:
            self._running.remove(req)
        if req in self._waiting:
            self._waiting.remove(req)
        self._free_blocks += req.blocks
        req.blocks = 0
        if aborted:
            self.aborted.append(req.request.request_id)

    def _usage(self) -> float:
        return 1.0 - self._free_blocks / self.config.num_blocks

    def _emit(self, stats: StepStats) -> None:
        stats.num_running = len(self._running)
        stats.num_waiting = len(self._waiting)
        stats.kv_cache_usage = self._usage()
        if self.config.spec_stats and stats.num_generation_tokens:
            stats.spec_num_drafts = stats.num_generation_tokens
            stats.spec_num_draft_tokens = 3 * stats.num_generation_tokens
            stats.spec_num_accepted_tokens = 2 * stats.num_generation_tokens
            stats.spec_accepted_per_pos = [stats.num_generation_tokens] * 2 + [0]
            stats.decoder = {"fake_acceptance": 2 / 3}
        for listener in self._listeners:
            listener(stats)
