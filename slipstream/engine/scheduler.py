"""Continuous batching under a token budget: chunked prefill, decode, preemption.

Policy only: the scheduler sees sequences and block ids, never tensors (nano-vllm's rule),
so it is tested on CPU with fake step results. One number per sequence describes every
case (vLLM v1's contract): how many of its uncomputed tokens it feeds this step. Prefill,
chunked prefill, decode and resuming after preemption all reduce to that. A preempted
sequence's KV is swapped out (the engine copies it, see Batch.swap_out) and resumes with
its computed tokens restored; where the engine keeps no copy (trials, or a caller that does
not swap) it is recomputed from the start.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from slipstream.config import SchedulerConfig
from slipstream.engine.batch import Batch, ScheduledSeq
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

# (seq, num_running) -> extra KV slots the decoder wants after the sequence's next token.
LookaheadFn = Callable[[Sequence, int], int]


def _no_lookahead(seq: Sequence, num_running: int) -> int:
    return 0


class Scheduler:
    """FCFS continuous batching: running sequences first, then admit waiting ones."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        lookahead: LookaheadFn = _no_lookahead,
        prefill_tail: int = 0,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.lookahead = lookahead
        # Last tokens of a prefill its final chunk computes (Decoder.prefill_tail); not kept
        # where a step's whole budget is smaller, or such a chunk would never be scheduled.
        self.prefill_tail = prefill_tail if prefill_tail <= config.max_num_batched_tokens else 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        """Sequences waiting or running."""
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (FCFS)."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Insert an already-computed sequence (a fork) right after the running ones."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def schedule(self) -> Batch:
        """Pick sequences and token counts for the next forward pass."""
        batch = Batch()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(batch, budget)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: Batch, budget: int) -> int:
        scheduled: set[int] = set()
        # Prefills down to their final chunk (prefill_tail) need it whole in one step: the
        # drafts, which are optional, leave it room, so that they cannot hold it back.
        reserve = sum(
            s.num_uncomputed_tokens
            for s in self.running
            if not s.paused and 1 < s.num_uncomputed_tokens <= self.prefill_tail
        )
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.paused:
                i += 1
                continue
            num_new = self._chunk(seq, budget)
            if num_new == 0:  # its final chunk does not fit this step (prefill_tail)
                i += 1
                continue
            lookahead = 0
            if num_new == seq.num_uncomputed_tokens == 1:
                room = budget - num_new - reserve
                lookahead = max(0, min(self.lookahead(seq, len(self.running)), room))
            elif num_new == seq.num_uncomputed_tokens <= self.prefill_tail:
                reserve -= num_new  # this final chunk got its room
            granted = self._make_room(seq, num_new, lookahead, batch, scheduled)
            if granted is None:
                continue  # seq itself was preempted; self.running shrank
            lookahead = granted  # 0 where the drafts' slots did not fit
            batch.items.append(ScheduledSeq(seq, num_new, lookahead))
            scheduled.add(seq.seq_id)
            budget -= num_new + lookahead
            i += 1
        return budget

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens seq feeds this step: all it has left, or as many as the budget takes, but
        a chunk that is not the last leaves the final one prefill_tail tokens at least; 0
        when only a final chunk fits and the budget cannot take it."""
        left = seq.num_uncomputed_tokens
        num_new = min(left, budget)
        if num_new < left and left - num_new < self.prefill_tail:
            num_new = max(0, left - self.prefill_tail)
        return num_new

    def _make_room(
        self, seq: Sequence, num_new: int, lookahead: int, batch: Batch, scheduled: set[int]
    ) -> int | None:
        """Allocate slots for seq, preempting the newest other running sequences if needed.
        Returns the lookahead slots granted (the drafts' slots are dropped before anyone is
        preempted), or None where seq itself had to be preempted."""
        while not self.block_manager.allocate_slots(seq, num_new, lookahead):
            if lookahead:
                lookahead = 0  # drafts are optional: drop them before preempting anyone
                continue
            victim = self._pick_victim(seq, scheduled)
            self._preempt(victim, batch)
            if victim is seq:
                return None
        return lookahead

    def _pick_victim(self, seq: Sequence, scheduled: set[int]) -> Sequence:
        """The most recently admitted running sequence not already in this batch."""
        for candidate in reversed(self.running):
            if candidate.seq_id not in scheduled:
                return candidate
        return seq

    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        # The KV is swapped out: the engine copies it from the freed blocks before the step's
        # forward can overwrite them, and copies it back when the sequence resumes. Recompute
        # (prefilling prompt + outputs again) gave other KV where the outputs had been decoded
        # differently from a prefill (sparse attention prunes decodes, not prefills), and
        # then another answer. Trials (cautious sampling's forks) are still recomputed: a
        # paused one has nothing left to feed, which a resumed swap needs.
        if seq.num_computed_tokens and not seq.is_trial:
            bs = self.block_manager.block_size
            blocks = seq.block_table[: -(-seq.num_computed_tokens // bs)]
            batch.swap_out.append((seq, list(blocks), seq.num_computed_tokens))
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        logger.debug("preempted seq %d (%d tokens)", seq.seq_id, seq.num_tokens)

    def _schedule_waiting(self, batch: Batch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            swapped = seq.num_swapped_tokens
            queried = hits = 0
            if swapped:  # its KV comes back from the swap: slots for all of it
                seq.num_computed_tokens = swapped
            elif not seq.block_table:
                hits = self.block_manager.match_prefix(seq, self.prefill_tail)
                queried = seq.num_tokens
            num_new = self._chunk(seq, budget)
            if num_new == 0 or not self.block_manager.allocate_slots(seq, num_new):
                # FCFS: do not let a later request jump the queue. Give back the prefix hit.
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                if not swapped:
                    seq.num_cached_tokens = 0
                break
            if swapped:
                seq.num_swapped_tokens = 0
                batch.swap_in.append(seq)
            # Counted once the sequence is scheduled: a head of the queue that waits for
            # blocks looked its prefix up again every step (148 prompt tokens counted ~1590
            # queries under a full cache).
            batch.prefix_cache_queries += queried
            batch.prefix_cache_hits += hits
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.items.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted, or dropped) sequence and free its KV."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
