"""Prompt lookup from an index kept as the sequence grows, instead of a pass per step.

ngram.longest_suffix_match scans the whole token list every step: in the running engine
~30 us a sequence (the list becomes an array, then one comparison per token), ~0.4 ms of a
16-sequence step on 2 cores (benchmarks/step_overhead.py --concurrency 16). The index maps
each min_n-gram to the positions where it ends; a sequence appends its new tokens (1-17 a
step) and a lookup is one dict probe, then, where the latest min_n tokens occurred before,
the same backwards growth among those occurrences as longest_suffix_match. Most steps of
most text find no earlier occurrence and stop at the probe.

The answer is longest_suffix_match's, position for position (tests/decoding/test_suffix_index.py
compares them on random and looping token lists).
"""

from __future__ import annotations


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
        with a token after it; (0, 0) where none did. As ngram.longest_suffix_match."""
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
        """Up to k tokens that followed the match (ngram.find_draft), or, with `factor`, at
        most factor x the match length of them (ngram.find_longest_draft)."""
        begin, n = self.match(tokens)
        if not n:
            return []
        if factor is not None:
            k = min(k, max(1, int(factor * n)))
        return self.tokens[begin : begin + k]
