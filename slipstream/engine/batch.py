"""The scheduler's output: which sequences run this step and how many tokens each feeds."""

from __future__ import annotations

from dataclasses import dataclass, field

from slipstream.engine.sequence import Sequence


@dataclass
class ScheduledSeq:
    """One sequence in this step.

    `num_new_tokens` uncomputed tokens are fed (a prefill chunk, or 1 in decode).
    `num_lookahead_slots` extra KV slots were reserved after them for decoder drafts.
    """

    seq: Sequence
    num_new_tokens: int
    num_lookahead_slots: int = 0

    @property
    def samples(self) -> bool:
        """This chunk reaches the end of the known tokens, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class Batch:
    """Sequences scheduled for one forward pass, in a fixed order."""

    items: list[ScheduledSeq] = field(default_factory=list)
    # Sequences preempted while making room for this batch.
    preempted: list[Sequence] = field(default_factory=list)
    # Of them, those whose KV the engine copies out before this step's forward overwrites
    # their blocks: (sequence, the blocks that held it, tokens they held).
    swap_out: list[tuple[Sequence, list[int], int]] = field(default_factory=list)
    # Sequences resumed with their KV copied back into their new blocks before the forward.
    swap_in: list[Sequence] = field(default_factory=list)
    # Prompt tokens looked up in / found in the prefix cache while admitting this batch.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @property
    def is_empty(self) -> bool:
        """Nothing to run."""
        return not self.items

    @property
    def num_new_tokens(self) -> int:
        """Scheduled tokens, all sequences together (drafts not included)."""
        return sum(item.num_new_tokens for item in self.items)
