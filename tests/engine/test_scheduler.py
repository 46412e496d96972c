"""The real Scheduler driven by fake step results (no model, no tensors)."""

from __future__ import annotations

import pytest

from slipstream.config import SchedulerConfig
from slipstream.engine.batch import Batch
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.scheduler import LookaheadFn, Scheduler
from slipstream.engine.sequence import Sequence, SequenceStatus

BLOCK = 4


def make_seq(seq_id: int, prompt_len: int) -> Sequence:
    prompt = [100 + seq_id * 1000 + i for i in range(prompt_len)]  # no shared prefixes
    return Sequence(
        seq_id=seq_id,
        request_id=str(seq_id),
        prompt_token_ids=prompt,
        params=SamplingParams(max_tokens=100),
        arrival_time=0.0,
    )


def fake_step(sched: Scheduler, batch: Batch, token: int = 7) -> None:
    """What the engine does after a forward: advance computed counts, append samples."""
    for item in batch.items:
        seq = item.seq
        samples = item.samples
        seq.num_computed_tokens += item.num_new_tokens
        if samples:
            seq.token_ids.append(token)
        sched.block_manager.trim(seq)
        sched.block_manager.commit_computed(seq)


def make_scheduler(
    num_blocks: int = 64,
    max_seqs: int = 8,
    budget: int = 16,
    lookahead: LookaheadFn | None = None,
    prefill_tail: int = 0,
) -> Scheduler:
    bm = BlockManager(num_blocks, BLOCK)
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    if lookahead is None:
        return Scheduler(config, bm, prefill_tail=prefill_tail)
    return Scheduler(config, bm, lookahead, prefill_tail)


def test_chunked_prefill_splits_prompt_under_budget() -> None:
    sched = make_scheduler(budget=16)
    seq = make_seq(0, 40)
    sched.add(seq)
    chunks = []
    for _ in range(3):
        batch = sched.schedule()
        chunks.append([(i.seq.seq_id, i.num_new_tokens, i.samples) for i in batch.items])
        fake_step(sched, batch)
    assert chunks == [[(0, 16, False)], [(0, 16, False)], [(0, 8, True)]]
    assert seq.num_output_tokens == 1
    batch = sched.schedule()
    assert [(i.num_new_tokens, i.samples) for i in batch.items] == [(1, True)]


def test_decodes_and_prefill_share_one_step() -> None:
    sched = make_scheduler(budget=16)
    a = make_seq(0, 5)
    sched.add(a)
    fake_step(sched, sched.schedule())  # a prefilled, now decoding
    b = make_seq(1, 30)
    sched.add(b)
    batch = sched.schedule()
    assert [(i.seq.seq_id, i.num_new_tokens) for i in batch.items] == [(0, 1), (1, 15)]
    assert batch.num_new_tokens == 16


def test_max_num_seqs_limits_running() -> None:
    sched = make_scheduler(max_seqs=2, budget=64)
    seqs = [make_seq(i, 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [i.seq.seq_id for i in batch.items] == [0, 1]
    assert [s.seq_id for s in sched.waiting] == [2, 3]


def test_preemption_recomputes_newest_and_frees_its_blocks() -> None:
    # 6 blocks of 4 slots; two sequences of 8 tokens take 2 blocks each (+1 for decode).
    sched = make_scheduler(num_blocks=6, budget=64)
    a, b = make_seq(0, 8), make_seq(1, 8)
    sched.add(a)
    sched.add(b)
    fake_step(sched, sched.schedule())
    preempted = []
    for _ in range(8):
        batch = sched.schedule()
        preempted.extend(s.seq_id for s in batch.preempted)
        fake_step(sched, batch)
        sched.block_manager.check_invariants()
    assert preempted and preempted[0] == 1, "the newest sequence is preempted first"
    assert b.num_preemptions >= 1
    # a kept running throughout and grew by one token per step
    assert a.num_output_tokens == 9


def test_preempted_sequence_resumes_with_its_tokens() -> None:
    sched = make_scheduler(num_blocks=6, budget=64)
    a, b = make_seq(0, 8), make_seq(1, 8)
    sched.add(a)
    sched.add(b)
    for _ in range(6):
        fake_step(sched, sched.schedule())
    tokens_before = list(b.token_ids)
    # Finish a: b must come back and recompute everything it had.
    sched.finish(a)
    batch = sched.schedule()
    item = next(i for i in batch.items if i.seq is b)
    assert b.token_ids[: len(tokens_before)] == tokens_before
    assert item.num_new_tokens == b.num_uncomputed_tokens or b.status is SequenceStatus.RUNNING


def test_fcfs_head_of_line_blocks_later_requests() -> None:
    sched = make_scheduler(num_blocks=4, budget=64)
    big = make_seq(0, 30)  # needs 8 blocks: cannot fit now
    small = make_seq(1, 2)
    sched.add(big)
    sched.add(small)
    batch = sched.schedule()
    assert batch.is_empty
    assert list(sched.waiting) == [big, small]
    assert sched.block_manager.num_free_blocks == 4


def test_prefix_cache_queries_count_each_prompt_once() -> None:
    """A request waiting for blocks is looked up every step; it counts as queried once,
    when it is scheduled (it counted every step: 148 prompt tokens gave ~1590 queries)."""
    sched = make_scheduler(num_blocks=5, budget=64)
    first, second = make_seq(0, 12), make_seq(1, 12)  # 3 blocks each: second must wait
    sched.add(first)
    sched.add(second)
    queries = 0
    for _ in range(4):
        batch = sched.schedule()
        queries += batch.prefix_cache_queries
        fake_step(sched, batch)
    assert second.status is SequenceStatus.WAITING
    sched.finish(first)
    batch = sched.schedule()
    queries += batch.prefix_cache_queries
    assert second.status is SequenceStatus.RUNNING
    assert queries == first.num_prompt_tokens + second.num_prompt_tokens


def test_finish_frees_everything() -> None:
    sched = make_scheduler()
    free0 = sched.block_manager.num_free_blocks
    seqs = [make_seq(i, 10) for i in range(3)]
    for s in seqs:
        sched.add(s)
    fake_step(sched, sched.schedule())
    for s in seqs:
        sched.finish(s)
    assert sched.block_manager.num_free_blocks == free0
    assert sched.num_unfinished == 0
    sched.block_manager.check_invariants()


def test_lookahead_slots_reserved_only_for_decode() -> None:
    sched = make_scheduler(max_seqs=4, budget=64, lookahead=lambda seq, n: 5)
    seq = make_seq(0, 6)
    sched.add(seq)
    batch = sched.schedule()
    assert batch.items[0].num_lookahead_slots == 0  # prefill: no drafts
    fake_step(sched, batch)
    batch = sched.schedule()
    assert batch.items[0].num_lookahead_slots == 5
    # slots for the fed token plus 5 drafts: positions 6..11 -> 3 blocks
    assert len(seq.block_table) == 3


def test_drafts_without_room_are_not_scheduled() -> None:
    """Where the KV pool has no room for a sequence's draft slots, the step drops the drafts
    (before preempting anyone), and the batch says so: a draft fed into slots that were never
    allocated wrote past the sequence's block table (IndexError, a 500 for the whole
    batch)."""
    sched = make_scheduler(num_blocks=3, max_seqs=4, budget=64, lookahead=lambda seq, n: 6)
    seq = make_seq(0, 7)  # 2 blocks for the prompt and the first sample
    sched.add(seq)
    fake_step(sched, sched.schedule())
    # Position 7 fits the second block; 6 drafts (8..13) would need 2 more, 1 is free.
    batch = sched.schedule()
    assert [(i.num_new_tokens, i.num_lookahead_slots) for i in batch.items] == [(1, 0)]
    assert not batch.preempted
    assert len(seq.block_table) * BLOCK >= seq.num_computed_tokens + 1
    sched.block_manager.check_invariants()


@pytest.mark.parametrize("budget", [1, 3, 16])
def test_every_prompt_token_is_computed_once(budget: int) -> None:
    sched = make_scheduler(budget=budget, max_seqs=3)
    seqs = [make_seq(i, 5 + 3 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    fed = {s.seq_id: 0 for s in seqs}
    for _ in range(120):
        batch = sched.schedule()
        assert batch.num_new_tokens <= budget
        for item in batch.items:
            fed[item.seq.seq_id] += item.num_new_tokens
        fake_step(sched, batch)
        for s in seqs:
            if s.num_output_tokens >= 3 and not s.is_finished:
                sched.finish(s)
    for s in seqs:
        assert s.is_finished
        # every token but the last sampled one was fed exactly once
        assert fed[s.seq_id] == s.num_tokens - 1


def test_final_prefill_chunk_keeps_the_tail() -> None:
    """With prefill_tail 6 (a decoder reading the last 6 prompt tokens' queries at the end of
    the prefill), no chunk but the last leaves fewer than 6 tokens behind."""
    sched = make_scheduler(budget=16, prefill_tail=6)
    bm = sched.block_manager
    seq = make_seq(0, 35)  # 16 + 16 would leave 3: the second chunk stops at 29
    sched.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        batch = sched.schedule()
        chunks.append([i.num_new_tokens for i in batch.items])
        fake_step(sched, batch)
    assert chunks == [[16], [13], [6]]
    # A budget smaller than the tail could never hold the final chunk: no such rule then.
    small = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4), bm, 6)
    assert small.prefill_tail == 0


def test_drafts_leave_room_for_a_final_chunk() -> None:
    """A decode would draft 11 tokens of the 16-token budget; a prefill down to its final 6
    tokens (tail 6) needs them in one step, and the drafts, which are optional, shrink to
    leave that room rather than hold it back."""
    sched = make_scheduler(
        budget=16, lookahead=lambda seq, n: 11 if seq.seq_id == 0 else 0, prefill_tail=6
    )
    first, second = make_seq(0, 4), make_seq(1, 14)
    sched.add(first)
    fake_step(sched, sched.schedule())  # first prefilled: it decodes from now on
    sched.add(second)
    fed = []
    for _ in range(3):
        batch = sched.schedule()
        fed.append([(i.seq.seq_id, i.num_new_tokens, i.num_lookahead_slots) for i in batch.items])
        fake_step(sched, batch)
    # 14 -> 4 (10 left), 10 -> 4 (6 left: the final chunk), then 6 with the drafts at 9
    assert fed == [[(0, 1, 11), (1, 4, 0)], [(0, 1, 11), (1, 4, 0)], [(0, 1, 9), (1, 6, 0)]]
    assert second.num_output_tokens == 1
