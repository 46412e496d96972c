"""asyncio bridge to LLMEngine: one background thread steps the engine; callers await outputs.

The engine is not thread-safe, so every mutation (add, abort, step) happens on the loop
thread; asyncio callers only enqueue commands and read per-request queues.

Which thread steps the engine matters on small CPUs. torch's OpenMP runtime (GNU libgomp)
counts the process's main thread as one managed thread; a second thread that opens its own
2-thread team makes 3 managed threads on a 2-core machine, and libgomp then cuts the
workers' spin-wait from 300,000 to 100 spins, so every parallel region pays a futex wake.
Measured on the 2-core CI machine: a [1, 576] x [576, 3072] bf16 linear takes 100 us on the
main thread and 160 us on any other, and batch-1 decode TPOT is 27 ms vs 36 ms. So
`slipstream serve` runs HTTP on a helper thread and hands the main thread to the engine
(`claim_caller_thread` + `run_on_current_thread`); tests and embedders keep the default
background thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from slipstream.backends.base import EngineDeadError, EngineError, check_admission
from slipstream.config import EngineConfig
from slipstream.engine.engine import LLMEngine
from slipstream.engine.outputs import RequestOutput, StepStats
from slipstream.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long the idle loop sleeps between checks for new commands (seconds). Commands also
# wake it at once, so this only bounds shutdown latency.
_IDLE_WAIT_S = 0.05


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    arrival_time: float | None
    sink: Callable[[RequestOutput | BaseException], None]


@dataclass
class _Abort:
    request_id: str


class AsyncLLMEngine:
    """Runs LLMEngine.step() on a thread and streams RequestOutputs to asyncio callers."""

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None) -> None:
        self.config = config
        self.engine: LLMEngine | None = engine
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        # Sequences of the requests admitted and not yet ended (a request with n = 4
        # counts 4): what --max-queued-requests bounds, beyond the batch's max_num_seqs.
        self._admitted_seqs = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._listeners: list[Callable[[StepStats], None]] = []
        # Caller-thread mode (see the module docstring): start() asks, the caller's thread
        # loads the model and runs the loop, and says when it is ready and when it is done.
        self._caller_thread: threading.Thread | None = None
        self._start_requested = threading.Event()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._loop_done = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the model and start the loop (on its own thread, or the claimed caller's)."""
        if self._thread is not None:
            return
        if self._caller_thread is not None:
            self._start_requested.set()
            await asyncio.to_thread(self._loaded.wait)
            if self._load_error is not None:
                raise self._load_error
            self._thread = self._caller_thread
            return
        if self.engine is None:
            self.engine = await asyncio.to_thread(LLMEngine, self.config)
        self._thread = threading.Thread(target=self._run, name="slipstream-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the loop; unfinished requests get an EngineDeadError."""
        self._stopping = True
        self._commands.put(None)
        self._wake.set()
        self._start_requested.set()  # a caller thread still waiting for start() returns
        if self._thread is None:
            return
        if self._thread is self._caller_thread:
            await asyncio.to_thread(self._loop_done.wait, 10.0)
        else:
            await asyncio.to_thread(self._thread.join, 10.0)
        self._thread = None

    def claim_caller_thread(self) -> None:
        """Make start() use the calling thread, which must then call run_on_current_thread."""
        if self._thread is not None:
            raise RuntimeError("the engine loop is already running")
        self._caller_thread = threading.current_thread()

    def run_on_current_thread(self, keep_waiting: Callable[[], bool]) -> None:
        """Wait for start(), load the model here, run the loop here until shutdown().

        Returns early, without loading, once keep_waiting() is False before start() came
        (e.g. the HTTP server exited during start-up).
        """
        if self._caller_thread is not threading.current_thread():
            raise RuntimeError("call claim_caller_thread() on this thread first")
        try:
            while not self._start_requested.wait(0.1):
                if not keep_waiting():
                    return
            if self._stopping:
                self._load_error = EngineDeadError("the engine was shut down before it started")
                return
            try:
                if self.engine is None:
                    self.engine = LLMEngine(self.config)
            except BaseException as exc:
                self._load_error = exc
                return
            self._loaded.set()
            self._run()
        finally:
            self._loaded.set()  # never leave start() waiting
            self._loop_done.set()

    @property
    def loading(self) -> bool:
        """Whether run_on_current_thread has not yet loaded the model (nor given up)."""
        return not self._loaded.is_set()

    @property
    def is_running(self) -> bool:
        """The loop thread is alive and has not failed."""
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self._dead is None
            and not self._loop_done.is_set()
        )

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Call listener(stats) on the loop thread after every step."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ requests
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until finished; closing the iterator early aborts the request."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        self._admit(params.n)
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, item)

        self._commands.put(_Add(request_id, prompt_token_ids, params, prompt, arrival_time, sink))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await outbox.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._admitted_seqs -= params.n
            if not finished:
                self.abort(request_id)

    def _admit(self, n: int) -> None:
        """check_admission over the sequences admitted here. (Counting the engine's waiting
        list instead, an idle server with 8 free slots refused the second of two requests
        sent at once under a limit of 1, and every request under a limit of 0.)"""
        with self._lock:
            check_admission(self._admitted_seqs, n, self.config.scheduler)
            self._admitted_seqs += n

    def abort(self, request_id: str) -> None:
        """Abort a request (takes effect before the next engine step)."""
        self._commands.put(_Abort(request_id))
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        engine = self.engine
        assert engine is not None
        try:
            while not self._stopping:
                if self._drain_commands(engine) and not engine.has_unfinished_requests():
                    self._notify(engine.idle_stats())
                if not engine.has_unfinished_requests():
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                self._step(engine)
        except BaseException as exc:  # the loop must never die silently
            logger.exception("engine loop crashed")
            self._dead = exc
        finally:
            self._fail_all(EngineDeadError("the engine stopped"))

    def _drain_commands(self, engine: LLMEngine) -> bool:
        """Apply queued adds and aborts; True if anything was aborted."""
        aborted = False
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return aborted
            if cmd is None:
                return aborted
            if isinstance(cmd, _Add):
                try:
                    engine.add_request(
                        cmd.request_id,
                        cmd.prompt_token_ids,
                        cmd.params,
                        cmd.prompt,
                        cmd.arrival_time,
                    )
                except ValueError as exc:
                    cmd.sink(exc)
                    continue
                self._sinks[cmd.request_id] = cmd.sink
            else:
                aborted |= engine.abort_request(cmd.request_id) is not None
                self._sinks.pop(cmd.request_id, None)

    def _step(self, engine: LLMEngine) -> None:
        try:
            outputs = engine.step()
        except Exception as exc:
            # We cannot tell which request broke the step: fail those that were running,
            # keep serving the rest.
            logger.exception("engine step failed")
            for seq in list(engine.scheduler.running):
                self._fail(seq.request_id, EngineError(f"engine step failed: {exc}"))
                engine.abort_request(seq.request_id)
            return
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink(out)
                if out.finished:
                    del self._sinks[out.request_id]
        self._notify(engine.last_stats)

    def _notify(self, stats: StepStats) -> None:
        for listener in self._listeners:
            try:
                listener(stats)
            except Exception:
                logger.exception("stats listener failed")

    def _fail(self, request_id: str, exc: BaseException) -> None:
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._sinks):
            self._fail(request_id, exc)

    def num_free_blocks(self) -> int:
        """Free KV blocks now (read without locking: a snapshot)."""
        return 0 if self.engine is None else self.engine.block_manager.num_free_blocks

    def tokenizer(self) -> Any:
        """The engine's tokenizer (after start)."""
        return None if self.engine is None else self.engine.tokenizer
