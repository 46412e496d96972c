"""The EngineClient protocol: what the HTTP server needs from an engine backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from slipstream.config import SchedulerConfig
from slipstream.engine.models.default_model import DEFAULT_MODEL_NAME
from slipstream.engine.outputs import RequestOutput, StepStats
from slipstream.engine.sampling_params import SamplingParams


class EngineError(RuntimeError):
    """The engine failed while serving a request."""


class QueueFullError(EngineError):
    """The waiting queue is at max_queued_requests; retry later (HTTP 429)."""


class EngineDeadError(EngineError):
    """The engine loop has stopped; nothing more can be served (HTTP 503)."""


def check_admission(admitted_seqs: int, n: int, scheduler: SchedulerConfig) -> None:
    """--max-queued-requests: QueueFullError where n more sequences (a request's n choices)
    would leave more than that many waiting beyond the batch's max_num_seqs. Counted over
    the sequences admitted and not yet ended, not a waiting list: a request waits there
    until the next step schedules it, batch slot free or not."""
    limit = scheduler.max_queued_requests
    if limit is not None and admitted_seqs + n > scheduler.max_num_seqs + limit:
        raise QueueFullError(f"the waiting queue is full ({limit} requests)")


@dataclass(frozen=True)
class GenerateRequest:
    """One request as the engine sees it: token ids plus sampling parameters."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    # time.monotonic() when the HTTP request arrived (queue time is measured from here).
    arrival_time: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the server tells clients about the served model."""

    name: str
    max_model_len: int
    vocab_size: int
    decoder: str = "standard"
    extra: dict[str, Any] = field(default_factory=dict)


def served_name(path: str, requested: str | None) -> str:
    """The name clients use: the default model's own name, else the folder or file name given."""
    if requested is None:
        return DEFAULT_MODEL_NAME
    return Path(requested.rstrip("/")).name or path


class EngineClient(Protocol):
    """An engine behind the server: native (embedded) or vLLM."""

    @property
    def model_info(self) -> ModelInfo:
        """The served model."""
        ...

    @property
    def tokenizer(self) -> Any:
        """A transformers tokenizer (encode, decode, apply_chat_template)."""
        ...

    async def start(self) -> None:
        """Load and begin serving (idempotent)."""
        ...

    async def shutdown(self) -> None:
        """Stop the engine loop and free resources."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs after each engine step, ending with one whose finished is True.

        Raises QueueFullError when the waiting queue is full. Closing the iterator early
        (e.g. the client disconnected) aborts the request.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free everything it holds."""
        ...

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine cannot serve."""
        ...

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Call `listener` with every engine step's statistics (for Prometheus)."""
        ...

    def num_free_blocks(self) -> int:
        """Free KV blocks now (tests check that aborts give them back)."""
        ...


@runtime_checkable
class CallerThreadEngine(Protocol):
    """An engine that can run its loop on a thread the server hands it (the main thread).

    The native engine wants this: see slipstream/engine/async_engine.py for why the main
    thread decodes faster on small CPUs. The server calls claim_caller_thread() before the
    HTTP thread starts, then run_on_current_thread() until the engine shuts down.
    """

    def claim_caller_thread(self) -> None:
        """Make start() use the calling thread instead of a new one."""
        ...

    def run_on_current_thread(self, keep_waiting: Callable[[], bool]) -> None:
        """Load and run the engine loop here; return early if keep_waiting() turns False."""
        ...

    @property
    def loading(self) -> bool:
        """Whether the model is not loaded yet (nor failed to load)."""
        ...
