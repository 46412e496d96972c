"""One sequence: a request's tokens, KV blocks, status and sampling state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from slipstream.engine.outputs import FinishReason, TokenLogprobs
from slipstream.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A prompt plus the tokens generated so far.

    NOTE: `token_ids[:num_computed_tokens]` have KV in the cache; the rest (one token in
    plain decode, the whole prompt before prefill, prompt + outputs after a preemption) are
    fed to the model in the next steps. This one rule covers prefill, chunked prefill,
    decode, recompute after preemption and speculative verification.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    # Which of the request's n completions this is.
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt tokens found in the prefix cache at first scheduling.
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # params.prompt_logprobs: entry j scores prompt token j (entry 0 is None), filled as
    # prefill chunks run (engine/prompt_logprobs.py).
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # torch.Generator for seeded sampling (kept opaque here: the scheduler sees no tensors).
    generator: Any = None
    # A trial fork (cautious sampling): internal, never reported as its own completion.
    parent_seq_id: int | None = None
    # While True, new tokens are kept back from streaming (e.g. an uncommitted trial).
    hold_output: bool = False
    # While True, the scheduler skips it: it keeps its KV but feeds nothing (e.g. a trial
    # that finished before its siblings). Preemption may still free it.
    paused: bool = False
    num_preemptions: int = 0
    # Preempted with its KV kept (swapped out): the first tokens it holds KV for, and that
    # KV, [layers, 2, blocks, block size, KV heads, head size] on the host (opaque here).
    num_swapped_tokens: int = 0
    swapped_kv: Any = None
    # Per-sequence state owned by the active decoder.
    decoder_state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Tokens generated so far."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """How many tokens were generated."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed before the next sample (1 in plain decode)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than one token is waiting to be fed."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        """Whether the sequence is done."""
        return self.status is SequenceStatus.FINISHED

    @property
    def is_trial(self) -> bool:
        """An internal fork of another sequence."""
        return self.parent_seq_id is not None
