"""What the app knows at run time: the engine, its config, metrics and lifecycle phase."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from slipstream.backends.base import EngineClient, ModelInfo
from slipstream.server.config import ServerConfig
from slipstream.server.errors import APIError, unavailable
from slipstream.server.logprobs import TokenText
from slipstream.server.metrics import ServerMetrics


class Phase(enum.Enum):
    """Lifecycle: only READY serves generation requests; the rest answer 503."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class RequestLog:
    """Per-request facts the handlers leave for the access-log line (in scope["state"])."""

    request_id: str
    arrival_time: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class ServerState:
    """One app's engine, config, metrics and phase (app.state.server)."""

    engine: EngineClient
    config: ServerConfig
    metrics: ServerMetrics
    phase: Phase = Phase.STARTING
    # Set by the CLI: asks uvicorn to exit when the engine fails to start.
    on_fatal: Callable[[], None] | None = None
    _token_text: TokenText | None = None
    _max_token_bytes: int | None = None
    # Engine requests in flight (serving.Generation), so that a drain whose time is up can
    # end them with an error rather than leave them to uvicorn's cancellation.
    generations: set[Any] = field(default_factory=set)
    # Set once the drain's time is up (interrupt_generations).
    interrupted: bool = False
    loop: asyncio.AbstractEventLoop | None = None  # the server's, once the app runs

    @property
    def token_text(self) -> TokenText:
        """Token id -> logprob display text, cached for the app's life."""
        if self._token_text is None:
            self._token_text = TokenText(self.tokenizer)
        return self._token_text

    @property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of prompt text one token can stand for: its
        longest vocabulary piece (pieces spell their text, a byte-level BPE's 2 UTF-8 bytes
        for each byte) times 4 for normalisers that shorten text ("ﬁ" -> "fi")."""
        if self._max_token_bytes is None:
            vocab = self.tokenizer.get_vocab()
            longest = max((len(str(piece).encode("utf-8")) for piece in vocab), default=1)
            self._max_token_bytes = 4 * max(1, longest)
        return self._max_token_bytes

    @property
    def model_info(self) -> ModelInfo:
        """The engine's model (valid once READY)."""
        return self.engine.model_info

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer (valid once READY)."""
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        """The name clients pass as `model` and see in responses."""
        return self.config.served_model_name or self.model_info.name

    def accepted_model_names(self) -> set[str]:
        """The served name plus the engine's own name and the --model value (aliases)."""
        names = {self.model_name, self.model_info.name}
        if self.config.engine.model.model:
            names.add(self.config.engine.model.model)
        return names

    def require_ready(self) -> None:
        """Raise 503 unless the engine is serving."""
        if self.phase is Phase.READY:
            return
        if self.phase is Phase.STARTING:
            raise unavailable("The server is starting (loading the model); retry shortly.")
        raise unavailable(f"The server is not serving (state: {self.phase.value}).")

    def check_model(self, model: str | None) -> None:
        """404 for a `model` this server does not serve (None means the served one), as
        OpenAI and vLLM answer it."""
        if model is None or model in self.accepted_model_names():
            return
        raise APIError(
            404,
            f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
            param="model",
            code="model_not_found",
            error_type="invalid_request_error",
        )


def get_state(request: Request) -> ServerState:
    """The ServerState of the app serving `request`."""
    state: ServerState = request.app.state.server
    return state


def get_request_log(request: Request) -> RequestLog | None:
    """The access-log record the middleware attached to this request."""
    log = request.scope.get("state", {}).get("request_log")
    return log if isinstance(log, RequestLog) else None


def ready_state(request: Request) -> ServerState:
    """The state, after checking that the engine serves (503 otherwise)."""
    state = get_state(request)
    state.require_ready()
    return state


__all__ = [
    "APIError",
    "Phase",
    "RequestLog",
    "ServerState",
    "get_request_log",
    "get_state",
    "ready_state",
]
