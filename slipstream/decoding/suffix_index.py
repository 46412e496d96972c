"""Prompt lookup (ngram's and token recycling's drafts) from an index kept as the sequence
grows, instead of a pass per step.

The rule, vLLM's: the longest n in [min_n, max_n] such that the last n tokens occurred
earlier with a token after them; the earliest such occurrence; what followed it.

Scanning the whole token list every step (the list made an array, then the suffix grown
backwards among the matching positions) cost ~30 us a sequence in the running engine,
~0.4 ms of a 16-sequence step on 2 cores (benchmarks/step_overhead.py --concurrency 16).
The index maps each min_n-gram to the positions where it ends; a sequence appends its new
tokens (1-17 a step) and a lookup is one dict probe, then, where the latest min_n tokens
occurred before, the same backwards growth among those occurrences. Most steps of most
text find no earlier occurrence and stop at the probe. tests/decoding/test_suffix_index.py
checks every answer against the rule applied by brute force, on random and looping lists.
"""

from __future__ import annotations

from typing import Any


class SuffixIndex:
    """Where each min_n-gram of one growing token list ends (ascending positions).

    Example: min_n 2, tokens [1, 2, 3, 1, 2] -> {(1, 2): [1, 4], (2, 3): [2], (3, 1): [3]};
    match() -> the suffix [1, 2] occurred ending at 1, followed from 2: (2, 2).
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}

    @classmethod
    def of(cls, seq: Any, key: str, min_n: int, max_n: int) -> SuffixIndex:
        """The index a sequence keeps under `key` in its decoder_state, made on first use."""
        index = seq.decoder_state.get(key)
        if index is None:
            index = seq.decoder_state[key] = cls(min_n, max_n)
        assert isinstance(index, cls)
        return index

    def sync(self, tokens: list[int]) -> None:
        """Index the tokens appended since the last call. A list that is not the old one
        extended (shorter, or its last known token changed) is indexed anew."""
        known = len(self.tokens)
        if len(tokens) < known or (known and tokens[known - 1] != self.tokens[-1]):
            self.tokens, self.ends, known = [], {}, 0
        toks = self.tokens
        toks.extend(tokens[known:])
        m = self.min_n
        ends = self.ends
        for end in range(max(known, m - 1), len(toks)):
            key = tuple(toks[end - m + 1 : end + 1])
            found = ends.get(key)
            if found is None:
                ends[key] = [end]
            else:
                found.append(end)

    def match(self, tokens: list[int]) -> tuple[int, int]:
        """(where what followed the match starts, match length) for the earliest occurrence
        of the longest suffix of `tokens` (min_n..max_n tokens) that also occurred earlier
        with a token after it; (0, 0) where none did.

        Example: tokens [1, 2, 3, 4, 2, 3], min_n 2, max_n 3 -> [4, 2, 3] never occurred
        before; [2, 3] did, at index 1 -> what followed starts at 3, length 2: (3, 2)."""
        self.sync(tokens)
        toks = self.tokens
        total = len(toks)
        m = self.min_n
        if total - 1 < m:
            return 0, 0
        found = self.ends.get(tuple(toks[total - m :]))
        if found is None or len(found) < 2:  # only the suffix itself
            return 0, 0
        ends = found[:-1]  # the last entry is the suffix itself, at total - 1
        n = m
        while n < self.max_n and len(ends) > 1:
            want = toks[total - 1 - n]
            back = [e for e in ends if e >= n and toks[e - n] == want]
            if not back:
                break
            ends, n = back, n + 1
        if len(ends) == 1:
            end = ends[0]
            while n < self.max_n and end - n >= 0 and toks[end - n] == toks[total - 1 - n]:
                n += 1
        return ends[0] + 1, n

    def draft(self, tokens: list[int], k: int, factor: float | None = None) -> list[int]:
        """Up to k tokens that followed the match; with `factor`, at most factor x the
        match length of them.

        Why the factor: a suffix matched over 20 tokens is a copy or a loop and its
        continuation is likely; one matched over 3 tokens is a common phrase and may go
        anywhere. vLLM's suffix decoding bounds its drafts the same way (max_spec_factor,
        default 1.0). Offline, on 48 builtin prompts (5 tree nodes plus the chain), lookup
        bounds 3..32 with 16 tokens and factor 1 gave 2.05 tokens per step where 5..5 with
        8 tokens gave 1.98.
        Example: tokens [1, 2, 3, 9, 1, 2, 3], min_n 2, max_n 8, k 8, factor 1.0 ->
        [1, 2, 3] matched at index 0, followed by [9, 1, 2, 3] -> 3 tokens: [9, 1, 2]."""
        begin, n = self.match(tokens)
        if not n:
            return []
        if factor is not None:
            k = min(k, max(1, int(factor * n)))
        return self.tokens[begin : begin + k]
