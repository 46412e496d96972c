"""Paged KV blocks: ref counts, prefix-cache hashes, fork, rollback and compaction moves.

Pure Python: the scheduler drives it and never touches tensors. Operations whose KV must
move (copy-on-fork, speculative compaction) return (src, dst) lists for the model runner.

NOTE: the rules that keep shared KV safe:
- Only fully computed blocks (every slot holds KV of `token_ids`) are ever shared or hashed.
- A block that will be written (it holds a position >= num_computed_tokens) is private
  (ref count 1) and unhashed. `trim` restores this after num_computed_tokens goes down, so
  lower it only through `rollback` (or call `trim` before the next write).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from slipstream.engine.sequence import Sequence

# (chain hash of the previous block, None for the first; the block's token ids). Keying the
# cache by the tokens themselves, not a bare hash, makes a false hit need a 64-bit collision
# of the whole prefix chain rather than of one block.
BlockKey = tuple[int | None, tuple[int, ...]]


@dataclass
class _SeqState:
    """What the manager remembers about one sequence holding blocks."""

    seq: Sequence
    # hashes[i] = chain hash of the sequence's block i; only fully computed blocks.
    hashes: list[int] = field(default_factory=list)


class BlockManager:
    """Hands out fixed-size KV blocks to sequences and caches full blocks by content."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_keys: list[BlockKey | None] = [None] * num_blocks
        self._cached: dict[BlockKey, int] = {}
        # Popped from the end, so block 0 is handed out first.
        self._free_uncached = list(range(num_blocks - 1, -1, -1))
        # Cached blocks nobody holds, least recently used first: evicted only when no
        # uncached block is free.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._states: dict[int, _SeqState] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, including cached ones that can be evicted."""
        return len(self._free_uncached) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (held or not)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some sequence, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ---- prefix cache -------------------------------------------------------------------

    def match_prefix(self, seq: Sequence, keep: int = 1) -> int:
        """Take the longest run of cached full blocks that starts seq; return tokens matched.

        Sets num_computed_tokens (and num_cached_tokens before any preemption). At least
        the last `keep` tokens (>= 1) stay uncomputed: the last so that the model produces
        logits for it, more for a decoder that reads their queries (Decoder.prefill_tail).
        `free` undoes it.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, (
            f"seq {seq.seq_id} already holds KV; free it before matching"
        )
        state = self._state(seq)
        state.hashes = []
        # Prompt logprobs need the logits of every prompt position, so a sequence still owing
        # some computes its prompt (vLLM does the same); its blocks are cached for others.
        owes_prompt_logprobs = (
            seq.params.prompt_logprobs is not None
            and len(seq.prompt_logprobs) < seq.num_prompt_tokens
        )
        if self.enable_prefix_caching and not owes_prompt_logprobs:
            bs = self.block_size
            parent: int | None = None
            for i in range(max(0, seq.num_tokens - max(1, keep)) // bs):
                key = (parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
                block = self._cached.get(key)
                if block is None:
                    break
                self._take_ref(block)
                seq.block_table.append(block)
                parent = hash(key)
                state.hashes.append(parent)
        matched = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = matched
        # Usage reports the prompt tokens the first admission found; a re-admission after
        # preemption mostly hits the sequence's own blocks and would overstate it.
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = min(matched, seq.num_prompt_tokens)
        return matched

    def commit_computed(self, seq: Sequence) -> None:
        """Register the blocks that became fully computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        state = self._state(seq)
        bs = self.block_size
        for i in range(len(state.hashes), seq.num_computed_tokens // bs):
            key = (state.hashes[-1] if i else None, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            state.hashes.append(hash(key))
            block = seq.block_table[i]
            current = self._block_keys[block]
            assert current is None or current == key, f"block {block} holds other content"
            # An identical block may already be cached (two requests prefilled the same
            # prompt at once); this copy then stays unregistered and is freed plainly.
            if current is None and key not in self._cached:
                self._block_keys[block] = key
                self._cached[key] = block

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that no sequence holds; return how many."""
        for block in self._evictable:
            self._unregister(block)
            self._free_uncached.append(block)
        num_dropped = len(self._evictable)
        self._evictable.clear()
        return num_dropped

    # ---- allocation ---------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0) -> bool:
        """Whether allocate_slots(seq, num_new_tokens, num_lookahead) would succeed."""
        return self._num_missing_blocks(seq, num_new_tokens + num_lookahead) <= (
            self.num_free_blocks
        )

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0) -> bool:
        """Cover num_computed + num_new_tokens + num_lookahead slots; False changes nothing."""
        num_missing = self._num_missing_blocks(seq, num_new_tokens + num_lookahead)
        if num_missing > self.num_free_blocks:
            return False
        self._state(seq)
        self._assert_private_tail(seq)
        seq.block_table.extend(self._pop_free() for _ in range(num_missing))
        return True

    def trim(self, seq: Sequence) -> None:
        """Free blocks beyond what num_tokens needs; unhash blocks that will be rewritten.

        A shared block in the rewritten region is released instead (others still read it),
        so the table may end short (allocate_slots tops it up) and num_computed_tokens may
        drop to that block's start (those tokens are recomputed).
        """
        state = self._state(seq)
        bs = self.block_size
        table = seq.block_table
        assert seq.num_computed_tokens <= seq.num_tokens, f"seq {seq.seq_id} computed > tokens"
        num_full = seq.num_computed_tokens // bs
        del state.hashes[num_full:]
        keep = min(len(table), -(-seq.num_tokens // bs))
        for i in range(num_full, keep):
            block = table[i]
            if self._ref_counts[block] > 1:
                keep = i
                seq.num_computed_tokens = min(seq.num_computed_tokens, i * bs)
                break
            if self._block_keys[block] is not None:
                self._unregister(block)
        # Released blocks that stay hashed hold valid KV for their key, so they stay cached.
        for block in reversed(table[keep:]):
            self._release(block)
        del table[keep:]

    def rollback(self, seq: Sequence, num_slots: int) -> None:
        """Forget the KV of the last num_slots computed tokens, then trim."""
        assert 0 <= num_slots <= seq.num_computed_tokens, f"cannot roll back {num_slots} slots"
        seq.num_computed_tokens -= num_slots
        self.trim(seq)

    def free(self, seq: Sequence) -> None:
        """Drop seq's hold on all its blocks (hashed ones stay cached); it computes nothing."""
        # Tail first, so LRU eviction takes a prefix's tail before its head: a tail block
        # can only be hit after its head is.
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._states.pop(seq.seq_id, None)

    # ---- forks --------------------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Share parent's full blocks with child; return (src, dst) block copies to run.

        The parent's partially filled last block gets a private copy, since both would
        write into it. With no block free, the child recomputes those tokens instead.
        """
        assert child is not parent and not child.block_table, "child must hold no KV"
        num_computed = parent.num_computed_tokens
        assert child.token_ids[:num_computed] == parent.token_ids[:num_computed], (
            "child's tokens must extend parent's computed tokens"
        )
        num_full = num_computed // self.block_size
        shared = parent.block_table[:num_full]
        for block in shared:
            self._take_ref(block)
        child.block_table = list(shared)
        self._state(child).hashes = self._state(parent).hashes[:num_full]
        copies: list[tuple[int, int]] = []
        if num_computed % self.block_size:
            if self.num_free_blocks:
                dst = self._pop_free()
                child.block_table.append(dst)
                copies.append((parent.block_table[num_full], dst))
            else:
                num_computed = num_full * self.block_size
        child.num_computed_tokens = num_computed
        child.num_cached_tokens = parent.num_cached_tokens
        return copies

    def adopt(self, parent: Sequence, child: Sequence) -> None:
        """Parent takes child's tokens, blocks and computed count; child is left empty."""
        for block in reversed(parent.block_table):
            self._release(block)
        # The KV describes the child's tokens, so the parent must carry them too.
        parent.token_ids = list(child.token_ids)
        parent.block_table = child.block_table
        parent.num_computed_tokens = child.num_computed_tokens
        self._state(parent).hashes = self._state(child).hashes
        child.block_table = []
        child.num_computed_tokens = 0
        self._states.pop(child.seq_id, None)

    # ---- slots --------------------------------------------------------------------------

    def slot(self, seq: Sequence, position: int) -> int:
        """The KV cache slot holding seq's token at position."""
        block_idx, offset = divmod(position, self.block_size)
        assert position >= 0 and block_idx < len(seq.block_table), (
            f"position {position} is outside seq {seq.seq_id}'s blocks"
        )
        return seq.block_table[block_idx] * self.block_size + offset

    def slots_for(self, seq: Sequence, start: int, count: int) -> list[int]:
        """Slots of positions start..start+count-1."""
        return [self.slot(seq, pos) for pos in range(start, start + count)]

    def compaction_moves(self, seq: Sequence, base: int, keep: list[int]) -> list[tuple[int, int]]:
        """(src_slot, dst_slot) moves bringing fed tokens `keep` to positions base, base+1...

        Example (block_size 4, block_table [7, 2], base 3, keep [0, 2, 3]):
            position 5 -> 4 and 6 -> 5, i.e. slots [(9, 8), (10, 9)]; keep[0] stays put.
        Applying the moves in order is safe: keep ascends, so each destination lies before
        its source and every later source (a gather-then-scatter of all of them is safe too).
        """
        moves: list[tuple[int, int]] = []
        for j, k in enumerate(keep):
            assert k >= j and (j == 0 or k > keep[j - 1]), f"keep must ascend: {keep}"
            if k != j:
                moves.append((self.slot(seq, base + k), self.slot(seq, base + j)))
        return moves

    # ---- checks -------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if ref counts, free lists or hashes are inconsistent."""
        bs = self.block_size
        holders: Counter[int] = Counter()
        for seq_id, state in self._states.items():
            seq = state.seq
            _check(seq.seq_id == seq_id, f"seq {seq.seq_id} filed under {seq_id}")
            _check(len(set(seq.block_table)) == len(seq.block_table), f"seq {seq_id} repeats")
            _check(seq.num_computed_tokens <= len(seq.block_table) * bs, f"seq {seq_id} no KV")
            _check(seq.num_computed_tokens <= seq.num_tokens, f"seq {seq_id} computed > tokens")
            _check(len(state.hashes) <= seq.num_computed_tokens // bs, f"seq {seq_id} hashes")
            holders.update(seq.block_table)
            for i, block in enumerate(seq.block_table):
                full = (i + 1) * bs <= seq.num_computed_tokens
                key = self._block_keys[block]
                private = self._ref_counts[block] == 1 and key is None
                _check(full or private, f"seq {seq_id} will write shared block {block}")
                if key is not None and i < len(state.hashes):
                    _check(hash(key) == state.hashes[i], f"block {block} hash != seq {seq_id}")
        free = set(self._free_uncached) | set(self._evictable)
        _check(len(free) == len(self._free_uncached) + len(self._evictable), "free lists overlap")
        for block in range(self.num_blocks):
            ref = self._ref_counts[block]
            _check(ref == holders[block], f"block {block}: ref {ref}, held {holders[block]}")
            _check((ref == 0) == (block in free), f"block {block}: ref {ref} vs free list")
            key = self._block_keys[block]
            _check(key is None or self._cached.get(key) == block, f"block {block} key unfiled")
            in_evictable = block in self._evictable
            _check(in_evictable == (ref == 0 and key is not None), f"block {block} evictable")
        _check(len(self._cached) == sum(k is not None for k in self._block_keys), "cache size")

    # ---- internals ----------------------------------------------------------------------

    def _state(self, seq: Sequence) -> _SeqState:
        state = self._states.get(seq.seq_id)
        if state is None:
            state = self._states[seq.seq_id] = _SeqState(seq)
        assert state.seq is seq, f"two live sequences share seq_id {seq.seq_id}"
        return state

    def _num_missing_blocks(self, seq: Sequence, num_slots_ahead: int) -> int:
        num_slots = seq.num_computed_tokens + num_slots_ahead
        return max(0, -(-num_slots // self.block_size) - len(seq.block_table))

    def _assert_private_tail(self, seq: Sequence) -> None:
        for block in seq.block_table[seq.num_computed_tokens // self.block_size :]:
            assert self._ref_counts[block] == 1 and self._block_keys[block] is None, (
                f"seq {seq.seq_id} would write shared or cached block {block}; call trim"
            )

    def _take_ref(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            del self._evictable[block]
        self._ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        assert self._ref_counts[block] >= 0, f"block {block} released twice"
        if self._ref_counts[block] == 0:
            if self._block_keys[block] is None:
                self._free_uncached.append(block)
            else:
                self._evictable[block] = None

    def _pop_free(self) -> int:
        if self._free_uncached:
            block = self._free_uncached.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._unregister(block)
        self._ref_counts[block] = 1
        return block

    def _unregister(self, block: int) -> None:
        key = self._block_keys[block]
        assert key is not None
        del self._cached[key]
        self._block_keys[block] = None


def _check(condition: bool, message: str) -> None:
    # Explicit raise rather than assert: invariant checks must survive `python -O`.
    if not condition:
        raise AssertionError(message)
