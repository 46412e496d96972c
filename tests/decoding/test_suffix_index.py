"""SuffixIndex: the incremental prompt lookup gives the rule's answer at every stage."""

from __future__ import annotations

import numpy as np

from slipstream.decoding.suffix_index import SuffixIndex


def _scan(tokens: list[int], min_n: int, max_n: int) -> tuple[int, int]:
    """The rule by brute force: the longest n in [min_n, max_n] whose suffix occurred
    earlier with a token after it, its earliest occurrence -> (what followed it, n)."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[len(tokens) - n :]
        for i in range(len(tokens) - n):
            if tokens[i : i + n] == suffix:
                return i + n, n
    return 0, 0


def find_draft(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    begin, n = _scan(tokens, min_n, max_n)
    return tokens[begin : begin + k] if n else []


def find_longest_draft(
    tokens: list[int], min_n: int, max_n: int, k: int, factor: float
) -> list[int]:
    begin, n = _scan(tokens, min_n, max_n)
    return tokens[begin : begin + min(k, max(1, int(factor * n)))] if n else []


def test_grown_step_by_step_it_answers_as_the_full_scan() -> None:
    rng = np.random.default_rng(0)
    for case in range(300):
        # Few distinct tokens repeat often; a looping tail is what the model drafts from.
        vocab = int(rng.integers(2, 8)) if case % 3 else 50
        tokens = rng.integers(0, vocab, int(rng.integers(1, 40))).tolist()
        if case % 2:
            period = tokens[-int(rng.integers(1, min(len(tokens), 12) + 1)) :]
            tokens += period * int(rng.integers(1, 6))
        lo = int(rng.integers(1, 5))
        hi = int(rng.integers(lo, 12))
        index = SuffixIndex(lo, hi)
        grown: list[int] = []
        for tok in tokens:
            grown.append(tok)  # the sequence's own list, appended in place
            if rng.random() < 0.5:
                continue  # several tokens arrive between lookups (accepted drafts)
            assert index.match(grown) == _scan(grown, lo, hi), (grown, lo, hi)
        assert index.match(grown) == _scan(grown, lo, hi), (grown, lo, hi)
        k = int(rng.integers(1, 10))
        assert index.draft(grown, k) == find_draft(grown, lo, hi, k)
        assert index.draft(grown, k, 1.0) == find_longest_draft(grown, lo, hi, k, 1.0)


def test_documented_examples() -> None:
    index = SuffixIndex(2, 8)
    assert index.match([1, 2, 3, 1, 2]) == (2, 2)
    assert index.ends[(1, 2)] == [1, 4]
    # [1, 2, 3] matched at 0, followed by [9, 1, 2, 3]; factor 1 keeps 3 of them
    assert SuffixIndex(2, 8).draft([1, 2, 3, 9, 1, 2, 3], 8, 1.0) == [9, 1, 2]
    assert SuffixIndex(2, 2).draft([1, 2, 3, 9, 1, 2, 3], 8, 1.0) == [9, 1]  # max_n caps
    assert SuffixIndex(3, 8).draft([1, 2], 8) == []  # shorter than min_n + 1
    assert SuffixIndex(2, 3).draft([1, 2, 3, 4], 4) == []  # nothing repeats


def test_a_list_that_is_not_the_old_one_extended_is_indexed_anew() -> None:
    index = SuffixIndex(2, 4)
    assert index.match([5, 6, 7, 5, 6]) == (2, 2)
    other = [1, 2, 9, 1, 2]  # as long as before, another last token
    assert index.match(other) == _scan(other, 2, 4) == (2, 2)
    assert index.tokens == other
    shorter = [4, 4, 4]
    assert index.match(shorter) == _scan(shorter, 2, 4)
    assert index.tokens == shorter
