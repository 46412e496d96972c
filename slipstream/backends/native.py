"""The native (embedded) backend: slipstream's own engine behind the EngineClient protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from slipstream.backends.base import EngineDeadError, GenerateRequest, ModelInfo, served_name
from slipstream.config import EngineConfig
from slipstream.engine.async_engine import AsyncLLMEngine
from slipstream.engine.engine import LLMEngine
from slipstream.engine.outputs import RequestOutput, StepStats


class NativeEngineClient:
    """EngineClient over AsyncLLMEngine. The only backend with the research decoders."""

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None) -> None:
        self.config = config
        self._async = AsyncLLMEngine(config, engine)

    @property
    def model_info(self) -> ModelInfo:
        """The served model (available after start)."""
        engine = self._engine()
        return ModelInfo(
            name=served_name(engine.loaded.path, self.config.model.model),
            max_model_len=engine.max_model_len,
            vocab_size=engine.loaded.arch.vocab_size,
            decoder=self.config.decoder.name,
        )

    @property
    def tokenizer(self) -> Any:
        """The model's transformers tokenizer."""
        return self._engine().tokenizer

    @property
    def engine(self) -> LLMEngine:
        """The underlying engine (tests inspect it)."""
        return self._engine()

    def _engine(self) -> LLMEngine:
        if self._async.engine is None:
            raise EngineDeadError("the engine has not started")
        return self._async.engine

    async def start(self) -> None:
        """Load the model and start the engine loop."""
        await self._async.start()

    def claim_caller_thread(self) -> None:
        """Run the loop on the calling thread (the server's main thread) instead of a new one."""
        self._async.claim_caller_thread()

    def run_on_current_thread(self, keep_waiting: Callable[[], bool]) -> None:
        """Load the model and step the engine on this thread until shutdown."""
        self._async.run_on_current_thread(keep_waiting)

    @property
    def loading(self) -> bool:
        """Whether the model is not loaded yet (nor failed to load)."""
        return self._async.loading

    async def shutdown(self) -> None:
        """Stop the engine thread."""
        await self._async.shutdown()

    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs of one request."""
        return self._async.generate(
            request.request_id,
            request.prompt_token_ids,
            request.params,
            request.prompt,
            request.arrival_time,
        )

    async def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed before the next step."""
        self._async.abort(request_id)

    async def check_health(self) -> None:
        """Raise EngineDeadError unless the engine loop is alive."""
        if not self._async.is_running:
            raise EngineDeadError("the engine loop is not running")

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Per-step statistics for the metrics exporter."""
        self._async.add_stats_listener(listener)

    def num_free_blocks(self) -> int:
        """Free KV blocks now."""
        return self._async.num_free_blocks()
