"""Recycled candidates keyed by the last two tokens, beside token recycling's one-token rows.

Token recycling's matrix keys a row by one token: M[t] holds the top-k of the logits at the
latest position whose token was t, whatever came before it. The row of "of" written after
"one" then drafts for "of" after "made". Keying by (previous token, token) keeps the
candidates of the context they came from; where a pair has never been seen the one-token
row still answers. This is the same store one level up: the top-k of a logits row the
forward computed anyway, written by the last writer.

Measured offline (teacher-forced top-8 of the default model's own greedy answers, a
simulator of the best-first draft with 5 nodes plus the lookup chain; 48 builtin prompts):
2.5% more tokens per step hot (1.89 -> 1.97) and cold (1.84 -> 1.91); on 24 unseen
prompts 2.19 -> 2.27 and 2.14 -> 2.20.

The table is bounded: `capacity` pairs in a ring, the oldest overwritten first. 256k pairs
x 8 candidates x (int32 + 2 float32) = 24 MB; the default model's 256-token answers write
~300-600 pairs each, so the ring holds the last few hundred requests.
"""

from __future__ import annotations

import numpy as np


class PairRows:
    """Candidate rows keyed by (previous token, token), a bounded ring of `capacity` rows."""

    def __init__(self, capacity: int, k: int) -> None:
        if capacity < 1:
            raise ValueError(f"pair rows need capacity >= 1, got {capacity}")
        self.capacity = capacity
        self.ids = np.zeros((capacity, k), dtype=np.int32)  # [capacity, k] candidate tokens
        self.probs = np.zeros((capacity, k), dtype=np.float32)  # [capacity, k] their p
        self.logits = np.zeros((capacity, k), dtype=np.float32)  # [capacity, k] raw logits
        self._slot: dict[tuple[int, int], int] = {}
        self._keys: list[tuple[int, int] | None] = [None] * capacity  # slot -> its key
        self._next = 0  # ring position of the next new pair

    def __len__(self) -> int:
        return len(self._slot)

    def find(self, prev: int, token: int) -> int:
        """The slot of (prev, token), or -1 if that pair has no row."""
        return self._slot.get((prev, token), -1)

    def write(
        self,
        prevs: list[int],
        tokens: list[int],
        ids: np.ndarray,  # [R, k'] candidates, k' <= k, best first
        probs: np.ndarray,  # [R, k'] their probabilities
        logits: np.ndarray | None = None,  # [R, k'] their raw logits (0 where not given)
    ) -> None:
        """Row r becomes the candidates of (prevs[r], tokens[r]); prev < 0 (no previous
        token, a sequence's first position) writes nothing."""
        width = ids.shape[1]
        for r, key in enumerate(zip(prevs, tokens, strict=True)):
            if key[0] < 0:
                continue
            slot = self._slot.get(key)
            if slot is None:
                slot = self._next
                self._next = (slot + 1) % self.capacity
                old = self._keys[slot]
                if old is not None:
                    del self._slot[old]
                self._keys[slot] = key
                self._slot[key] = slot
            self.ids[slot, :width] = ids[r]
            self.probs[slot, :width] = probs[r]
            self.logits[slot, :width] = 0.0 if logits is None else logits[r]

    def clear(self) -> None:
        """Forget every pair."""
        self._slot.clear()
        self._keys = [None] * self.capacity
        self._next = 0
        self.probs[:] = 0.0
        self.logits[:] = 0.0
        self.ids[:] = 0
