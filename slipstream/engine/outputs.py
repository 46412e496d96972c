"""What the engine hands back: per-request outputs and per-step statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class Logprob:
    """One token's log-probability, with its decoded text."""

    token_id: int
    logprob: float
    decoded: str = ""


@dataclass
class TokenLogprobs:
    """The chosen token's logprob plus the top alternatives at that position."""

    chosen: Logprob
    top: list[Logprob] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One of a request's n completions, cumulative so far."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    # For finish_reason == "stop": the stop string or stop token id that ended it.
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        """Whether this completion is done."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after an engine step (cumulative, like vLLM's RequestOutput)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # Prompt tokens served from the prefix cache.
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    metrics: RequestMetrics | None = None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic()) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class StepStats:
    """What one engine step did; server/metrics.py turns this into Prometheus metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_prompt_tokens: int = 0  # prompt tokens computed this step (prefix-cache hits excluded)
    num_generation_tokens: int = 0  # output tokens this step (as the outputs keep them)
    num_forward_tokens: int = 0  # tokens fed through the model this step
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    # Speculative decoding (vLLM's spec_decode_* counters); zero for non-speculative decoders.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    # Decoder-specific numbers (e.g. "kv_read_fraction", "gates_fired").
    decoder: dict[str, float] = field(default_factory=dict)
    step_time_s: float = 0.0
