"""BlockManager: allocation, prefix cache, eviction, fork, rollback, compaction."""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from slipstream.engine.block_manager import BlockManager
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.sequence import Sequence


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    """A waiting sequence whose prompt is `tokens`."""
    return Sequence(seq_id, f"req-{seq_id}", list(tokens), SamplingParams(), 0.0)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Allocate and 'run' every uncomputed token, then commit (one prefill step)."""
    assert bm.allocate_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)


def ref_count(bm: BlockManager, block: int) -> int:
    """A block's ref count, read through the manager's private table (tests only)."""
    return bm._ref_counts[block]


def test_allocate_and_free_restore_free_count() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(0, list(range(10)))
    assert bm.can_allocate(seq, 10)
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 7
    assert bm.usage == pytest.approx(0.3)
    bm.check_invariants()
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    bm.check_invariants()


def test_allocate_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(0, list(range(8)))
    assert bm.allocate_slots(a, 8)
    b = make_seq(1, list(range(9)))
    assert not bm.can_allocate(b, 9)
    assert not bm.allocate_slots(b, 9)
    assert b.block_table == [] and bm.num_free_blocks == 1
    # Lookahead counts too: 8 computed + 1 new + 4 drafts need 4 blocks, a holds 2, 1 free.
    a.num_computed_tokens = 8
    table = list(a.block_table)
    assert not bm.allocate_slots(a, 1, num_lookahead=4)
    assert a.block_table == table and bm.num_free_blocks == 1
    assert bm.allocate_slots(a, 1, num_lookahead=3)
    assert bm.num_free_blocks == 0
    bm.check_invariants()


def test_prefix_hit_across_two_sequences() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    shared = [5, 6, 7, 8, 9, 10, 11, 12]
    a = make_seq(0, [*shared, 100, 101, 102])
    compute_all(bm, a)
    assert bm.num_cached_blocks == 2
    b = make_seq(1, [*shared, 200, 201])
    assert bm.match_prefix(b) == 8
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert [ref_count(bm, blk) for blk in b.block_table] == [2, 2]
    assert bm.allocate_slots(b, b.num_uncomputed_tokens)
    assert len(b.block_table) == 3 and b.block_table[2] != a.block_table[2]
    bm.check_invariants()


def test_hit_after_first_sequence_freed_reuses_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute_all(bm, a)
    old_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8  # cached blocks are free (evictable)
    b = make_seq(1, [1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    assert bm.match_prefix(b) == 8
    assert b.block_table == old_blocks[:2]
    assert bm.num_free_blocks == 6
    bm.check_invariants()


def test_never_matches_the_whole_prompt() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(0, list(range(8)))
    compute_all(bm, a)
    same = make_seq(1, list(range(8)))
    # Both blocks are cached, but the last token must be fed to get its logits.
    assert bm.match_prefix(same) == 4
    assert same.num_uncomputed_tokens == 4
    longer = make_seq(2, list(range(9)))
    assert bm.match_prefix(longer) == 8
    bm.check_invariants()


def test_eviction_takes_least_recently_used_cached_block() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    seqs = [make_seq(i, [i, i]) for i in range(3)]
    for seq in seqs:
        compute_all(bm, seq)
    blocks = [seq.block_table[0] for seq in seqs]
    for seq in seqs:
        bm.free(seq)
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == 4
    # A hit makes seq 0's block the most recently used, so seq 1's is now the oldest.
    probe = make_seq(10, [0, 0, 99])
    assert bm.match_prefix(probe) == 2
    bm.free(probe)
    big = make_seq(11, [7] * 7)
    assert bm.allocate_slots(big, 4)  # the uncached block first, then one eviction
    assert blocks[1] in big.block_table
    assert blocks[0] not in big.block_table and blocks[2] not in big.block_table
    assert bm.num_cached_blocks == 2
    assert bm.match_prefix(make_seq(12, [1, 1, 5])) == 0
    assert bm.match_prefix(make_seq(13, [2, 2, 5])) == 2
    bm.check_invariants()


def test_fork_shares_full_blocks_and_free_returns_counts() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    parent = make_seq(0, list(range(10)))
    compute_all(bm, parent)
    free_before = bm.num_free_blocks
    children = [make_seq(i, list(parent.token_ids)) for i in range(1, 4)]
    for child in children:
        bm.fork(parent, child)
        bm.check_invariants()
    assert [ref_count(bm, blk) for blk in parent.block_table] == [4, 4, 1]
    assert all(child.num_computed_tokens == 10 for child in children)
    assert bm.num_free_blocks == free_before - 3
    for child in children:
        bm.free(child)
        bm.check_invariants()
    assert [ref_count(bm, blk) for blk in parent.block_table] == [1, 1, 1]
    assert bm.num_free_blocks == free_before
    bm.free(parent)
    assert bm.num_free_blocks == 16


def test_fork_copies_partial_last_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(0, list(range(10)))
    compute_all(bm, parent)
    child = make_seq(1, list(parent.token_ids))
    copies = bm.fork(parent, child)
    assert child.block_table[:2] == parent.block_table[:2]
    assert child.block_table[2] != parent.block_table[2]
    assert copies == [(parent.block_table[2], child.block_table[2])]
    # Block-aligned parent: nothing partial, nothing to copy.
    aligned = make_seq(2, list(range(8)))
    compute_all(bm, aligned)
    child2 = make_seq(3, list(aligned.token_ids))
    assert bm.fork(aligned, child2) == []
    assert child2.block_table == aligned.block_table
    bm.check_invariants()


def test_fork_without_free_block_recomputes_partial_block() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    parent = make_seq(0, list(range(10)))
    compute_all(bm, parent)
    child = make_seq(1, list(parent.token_ids))
    assert bm.fork(parent, child) == []
    assert child.num_computed_tokens == 8 and child.block_table == parent.block_table[:2]
    bm.check_invariants()


def test_rollback_across_block_boundary_frees_and_unhashes() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(9)))
    compute_all(bm, seq)
    assert bm.num_cached_blocks == 2
    last = seq.block_table[2]
    # Rejected drafts: positions 6..8 are dropped, so block 1 becomes partial again.
    del seq.token_ids[6:]
    bm.rollback(seq, 3)
    assert seq.num_computed_tokens == 6 and len(seq.block_table) == 2
    assert ref_count(bm, last) == 0
    assert bm.num_cached_blocks == 1  # block 1 will be overwritten: no longer cached
    assert bm.num_free_blocks == 6
    bm.check_invariants()
    assert bm.match_prefix(make_seq(1, [*range(8), 50])) == 4


def test_rollback_keeps_blocks_for_uncomputed_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(9)))
    compute_all(bm, seq)
    bm.rollback(seq, 3)  # tokens kept: they will be fed again into the same blocks
    assert seq.num_computed_tokens == 6 and len(seq.block_table) == 3
    assert bm.num_cached_blocks == 1
    bm.check_invariants()


def test_rollback_into_shared_block_releases_it() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(0, list(range(9)))
    compute_all(bm, parent)
    parent.num_computed_tokens = 8
    bm.trim(parent)
    child = make_seq(1, list(parent.token_ids))
    bm.fork(parent, child)
    del child.token_ids[6:]
    bm.rollback(child, 2)
    # Block 1 is shared with the parent, so the child may not write into it.
    assert child.block_table == parent.block_table[:1]
    assert child.num_computed_tokens == 4
    assert ref_count(bm, parent.block_table[1]) == 1
    assert bm.num_cached_blocks == 2  # the parent's block keeps its valid hash
    bm.check_invariants()


def test_trim_frees_unused_lookahead() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(5)))
    assert bm.allocate_slots(seq, 5, num_lookahead=8)
    assert len(seq.block_table) == 4
    seq.num_computed_tokens = 5
    seq.token_ids.append(77)
    bm.trim(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    bm.check_invariants()


def test_compaction_moves_hand_written() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, list(range(8)))
    seq.block_table = [7, 2]
    # Positions 3..6 were fed; keep local 0, 2, 3 -> positions 3, 4, 5.
    assert bm.compaction_moves(seq, base=3, keep=[0, 2, 3]) == [(9, 8), (10, 9)]
    # Crossing a block boundary: position 5 (slot 9) -> position 3 (slot 31).
    assert bm.compaction_moves(seq, base=2, keep=[0, 3]) == [(9, 31)]
    assert bm.compaction_moves(seq, base=2, keep=[0, 1, 2]) == []
    assert bm.slots_for(seq, 2, 4) == [30, 31, 8, 9]
    with pytest.raises(AssertionError):
        bm.compaction_moves(seq, base=0, keep=[2, 1])


def test_adopt_moves_child_kv_to_parent() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(0, list(range(6)))
    compute_all(bm, parent)
    child = make_seq(1, list(parent.token_ids))
    bm.fork(parent, child)
    child.token_ids += [40, 41, 42]
    compute_all(bm, child)
    child_table = list(child.block_table)
    bm.adopt(parent, child)
    assert parent.block_table == child_table and parent.num_computed_tokens == 9
    assert parent.token_ids == [*range(6), 40, 41, 42]
    assert child.block_table == [] and child.num_computed_tokens == 0
    bm.check_invariants()
    bm.free(parent)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_identical_concurrent_blocks_register_once() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(0, list(range(9))), make_seq(1, list(range(9)))
    assert bm.allocate_slots(a, 9) and bm.allocate_slots(b, 9)
    for seq in (a, b):
        seq.num_computed_tokens = 9
        bm.commit_computed(seq)
    assert bm.num_cached_blocks == 2
    bm.check_invariants()
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_prefix_caching_disabled_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq(0, list(range(9)))
    compute_all(bm, a)
    assert bm.num_cached_blocks == 0
    b = make_seq(1, list(range(9)))
    assert bm.match_prefix(b) == 0 and b.block_table == []
    bm.free(a)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_reset_prefix_cache_drops_only_unheld_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(0, [1] * 5), make_seq(1, [2] * 5)
    compute_all(bm, a)
    compute_all(bm, b)
    bm.free(a)
    assert bm.reset_prefix_cache() == 1
    assert bm.num_cached_blocks == 1 and bm.num_free_blocks == 6
    assert bm.match_prefix(make_seq(2, [1] * 5)) == 0
    bm.check_invariants()


def test_cached_tokens_reported_for_first_admission_only() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    compute_all(bm, make_seq(0, list(range(9))))
    seq = make_seq(1, [*range(8), 20, 21])
    assert bm.match_prefix(seq) == 8 and seq.num_cached_tokens == 8
    compute_all(bm, seq)
    bm.free(seq)  # preempted: its own blocks are now cached too
    seq.num_preemptions += 1
    assert bm.match_prefix(seq) == 8
    assert seq.num_cached_tokens == 8


# ---- randomized: every op keeps the invariants and the KV content right --------------------


class FakeKV:
    """The model runner's KV cache, as a slot -> 'KV of token_ids[:pos+1]' map."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.slots: dict[int, tuple[int, ...]] = {}

    def write(self, seq: Sequence, start: int, count: int) -> None:
        """Run the model on positions start..start+count-1 of seq."""
        for pos, slot in enumerate(self.bm.slots_for(seq, start, count), start):
            self.slots[slot] = tuple(seq.token_ids[: pos + 1])

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-fork)."""
        bs = self.bm.block_size
        for src, dst in copies:
            for off in range(bs):
                if src * bs + off in self.slots:
                    self.slots[dst * bs + off] = self.slots[src * bs + off]

    def assert_valid(self, seq: Sequence) -> None:
        """Every computed position of seq holds the KV of its own prefix."""
        for pos in range(seq.num_computed_tokens):
            got = self.slots.get(self.bm.slot(seq, pos))
            assert got == tuple(seq.token_ids[: pos + 1]), f"seq {seq.seq_id} pos {pos}"


# Prompts 0 and 1 share their first 4 tokens; prefixes of one prompt share everything.
PROMPTS = ([0, 1, 0, 1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 1, 0, 1])
OP_KINDS = ["admit", "step", "step", "speculate", "fork", "free", "rollback", "adopt"]
OPS = st.tuples(st.sampled_from(OP_KINDS), st.integers(0, 255), st.integers(0, 255))


@settings(max_examples=250, deadline=None)
@given(
    ops=st.lists(OPS, min_size=10, max_size=80),
    num_blocks=st.integers(1, 12),
    block_size=st.sampled_from([1, 2, 4]),
    caching=st.booleans(),
)
def test_random_ops_keep_invariants_and_kv(
    ops: list[tuple[str, int, int]], num_blocks: int, block_size: int, caching: bool
) -> None:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    kv = FakeKV(bm)
    live: list[Sequence] = []
    ids = iter(range(10_000))
    for op, x, y in ops:
        seq = live[x % len(live)] if live else None
        if op == "admit" or seq is None:
            new = make_seq(next(ids), PROMPTS[x % 3][: 1 + y % 9])
            event(f"prefix hit: {bm.match_prefix(new) > 0}")
            assert new.num_uncomputed_tokens >= 1
            live.append(new)
        elif op == "step":
            _step(bm, kv, seq, num_new=1 + x % 6, num_lookahead=y % 3, token=y & 1)
        elif op == "speculate":
            _speculate(bm, kv, seq, num_drafts=x % 4, pick=y)
        elif op == "fork":
            child = make_seq(next(ids), list(seq.token_ids))
            kv.copy_blocks(bm.fork(seq, child))
            live.append(child)
        elif op == "free":
            bm.free(seq)
            live.remove(seq)
        elif op == "rollback":
            n = y % (seq.num_computed_tokens + 1)
            if n and x & 1:  # the caller also drops the rolled-back tokens
                del seq.token_ids[max(seq.num_computed_tokens - n, 1) :]
            bm.rollback(seq, n)
        elif op == "adopt":
            # A trial fork that took another token, ran one step and won.
            child = make_seq(next(ids), [*seq.token_ids, x & 1])
            kv.copy_blocks(bm.fork(seq, child))
            _step(bm, kv, child, num_new=8, num_lookahead=0, token=y & 1)
            event(f"adopt grows KV: {child.num_computed_tokens > seq.num_computed_tokens}")
            bm.adopt(seq, child)
        bm.check_invariants()
        for s in live:
            kv.assert_valid(s)
    for s in live:
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == num_blocks
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    bm.check_invariants()


def _step(
    bm: BlockManager, kv: FakeKV, seq: Sequence, num_new: int, num_lookahead: int, token: int
) -> None:
    """One engine step for seq: feed up to num_new tokens, sample if the chunk ends."""
    num_new = min(num_new, seq.num_uncomputed_tokens)
    if num_new == 0 or not bm.allocate_slots(seq, num_new, num_lookahead):
        return
    kv.write(seq, seq.num_computed_tokens, num_new)
    seq.num_computed_tokens += num_new
    if seq.num_computed_tokens == seq.num_tokens:
        seq.token_ids.append(token)
    bm.commit_computed(seq)
    bm.trim(seq)


def _speculate(bm: BlockManager, kv: FakeKV, seq: Sequence, num_drafts: int, pick: int) -> None:
    """Verify a flat draft tree (every draft a child of the root) and compact the winner."""
    if seq.num_uncomputed_tokens != 1 or not bm.allocate_slots(seq, 1, num_drafts):
        return
    base = seq.num_computed_tokens
    drafts = [(pick >> (2 + i)) & 1 for i in range(num_drafts)]
    prefix = tuple(seq.token_ids)
    slots = bm.slots_for(seq, base, 1 + num_drafts)
    kv.slots[slots[0]] = prefix
    # Each draft's KV sees the root only, so it is valid at position base + 1 alone.
    for i, draft in enumerate(drafts):
        kv.slots[slots[1 + i]] = (*prefix, draft)
    winner = pick % (num_drafts + 1)  # 0 = every draft rejected
    keep = [0, winner] if winner else [0]
    moves = bm.compaction_moves(seq, base, keep)
    event(f"compaction moves: {bool(moves)}")
    for src, dst in moves:
        kv.slots[dst] = kv.slots[src]
    seq.token_ids += ([drafts[winner - 1]] if winner else []) + [pick & 1]
    seq.num_computed_tokens = base + len(keep)
    bm.commit_computed(seq)
    bm.trim(seq)


def test_prefix_hit_leaves_the_last_tokens_to_compute() -> None:
    """keep = n: a prefix hit never covers the last n tokens (Decoder.prefill_tail)."""
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(20, 38))  # 18 tokens: 4 full blocks cached after computing it
    compute_all(bm, make_seq(0, prompt))
    assert bm.match_prefix(make_seq(1, prompt)) == 16  # keep 1: all 4 full blocks
    assert bm.match_prefix(make_seq(2, prompt), keep=6) == 12  # 18 - 6 = 12: 3 blocks
    assert bm.match_prefix(make_seq(3, prompt), keep=7) == 8
    assert bm.match_prefix(make_seq(4, prompt), keep=30) == 0
