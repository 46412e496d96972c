"""Choosing the draft-tree size from measured forward cost and measured node acceptance.

A step that feeds N tokens costs t(N); a sequence drafting s nodes emits 1 + A(s) tokens on
average, where A(s) is the summed acceptance rate of the s best nodes of the template. With
B sequences drafting, tokens per second are B (1 + A(s)) / t(B (1 + s)); we pick the s that
maximises it. t(N) is learnt online from the wall time of the steps in which each
sequence fed one new token (decodes and draft trees; see TreeSizer.end_step), so a 2-core
CPU (t grows ~linearly from N = 1) gets a small tree and a GPU (t flat to N ~ 100s) a large
one, and the tree shrinks to nothing as the batch fills.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable

import numpy as np

from slipstream.decoding.draft_tree import TreeTemplate


def _count_matches(
    trials: np.ndarray, hits: np.ndarray, tmpl: TreeTemplate, matched: list[int]
) -> None:
    """One trial for each node the draft's own tree drafted (indexed by source_index), one
    hit for each of those in `matched`; grafted chain nodes (source -1) count in neither."""
    src = tmpl.source_index
    trials[[s for s in src[1:] if s >= 0]] += 1
    hits[[src[n] for n in matched if src[n] >= 0]] += 1


class AcceptanceStats:
    """Per-node acceptance rates of a full template, with a prior so that a cold start works."""

    def __init__(self, full: TreeTemplate, prior_weight: float = 4.0) -> None:
        self.full = full
        n = full.num_tokens
        self.hits = np.zeros(n)  # [T] times the node was on the accepted path
        self.trials = np.zeros(n)  # [T] times the node was verified
        self.prior_weight = prior_weight
        # Prior: each step down halves, later ranks divide further ((0,) -> .5, (1,) -> .25).
        self.prior = np.array([math.prod(0.5 / (1 + r) for r in p) for p in full.paths])

    def record(self, tmpl: TreeTemplate, matched: list[int]) -> None:
        """One verified draft cut from the full template; `matched` = its nodes whose tokens
        are a prefix of what was emitted (see tree_verify.matching_nodes), root excluded.

        Every template node of the draft counts, whether or not the accepted path ran
        through it: where a grafted chain and a template branch drafted the same tokens, one
        of them wins the tie, but both would have been accepted. Chain nodes (source -1)
        are left to ChainStats.
        """
        _count_matches(self.trials, self.hits, tmpl, matched)

    def rates(self) -> np.ndarray:
        """[T] smoothed P(node accepted); never above its parent's, so top-s sets are subtrees."""
        m = self.prior_weight
        rate = (self.hits + self.prior * m) / (self.trials + m)
        rate[0] = 1.0
        for i, parent in enumerate(self.full.parents):
            if parent >= 0:
                rate[i] = min(rate[i], rate[parent])
        return rate

    def order(self) -> list[int]:
        """Draft nodes from most to least likely accepted (ties: template order)."""
        rate = self.rates()
        return sorted(range(1, self.full.num_tokens), key=lambda i: (-rate[i], i))

    def expected_accepted(self) -> np.ndarray:
        """[T] A(s): expected accepted draft tokens with the best s nodes, s = 0 .. T - 1."""
        rate = self.rates()
        best = np.array([rate[i] for i in self.order()])
        return np.concatenate([[0.0], np.cumsum(best)])


class PickOrderStats:
    """Acceptance rate of the i-th node a best-first (dynamic) tree picks, i = 1 .. max_size.

    Dynamic trees differ in shape every step, so nodes are counted by pick order: the first
    s picks of a step are exactly what a tree of s nodes would have drafted, so A(s) is the
    sum of the first s rates, as for a static template's best nodes.
    """

    def __init__(self, max_size: int, prior_weight: float = 4.0) -> None:
        self.hits = np.zeros(max_size + 1)  # [S + 1] index i: times the i-th pick was accepted
        self.trials = np.zeros(max_size + 1)  # [S + 1] times a step drafted >= i picks
        self.prior = np.array([1.0, *(0.5 / i for i in range(1, max_size + 1))])
        self.prior_weight = prior_weight

    def record(self, tmpl: TreeTemplate, matched: list[int]) -> None:
        """One verified dynamic tree (source_index = pick order, -1 for a grafted chain's
        nodes, which are left out); `matched` as in AcceptanceStats.record."""
        _count_matches(self.trials, self.hits, tmpl, matched)

    def expected_accepted(self) -> np.ndarray:
        """[S + 1] A(s): expected accepted draft tokens with the first s picks.

        NOTE: rates are not forced to fall with pick order. A node's path probability never
        exceeds its parent's, but acceptance is not ordered that way across branches: pick 2
        (the root's second candidate) may be accepted 5% of the time and pick 3 (the first
        pick's child) 40%; capping pick 3 at 5% chose trees far too small.
        """
        m = self.prior_weight
        rate = (self.hits + self.prior * m) / (self.trials + m)
        return np.concatenate([[0.0], np.cumsum(rate[1:])])


class ChainStats:
    """How deep grafted prompt-lookup chains are accepted, and how often a step carries one.

    rate[d] = P(the chain's first d tokens are accepted | it offered >= d). A chain counts
    as accepted as far as its tokens match what was emitted, whichever branch the accepted
    path took: with the tree's path winning ties, counting only the path undercounted chains
    where a (dynamic) tree drafted the same tokens, and the sizer then cut chains short
    (12 builtin prompts: 1.64x standard with the cut, 1.78x with full chains).
    """

    def __init__(self, max_len: int, prior_weight: float = 4.0) -> None:
        self.hits = np.zeros(max_len + 1)  # [L + 1] index d: chains accepted to depth >= d
        self.trials = np.zeros(max_len + 1)  # [L + 1] chains that offered depth d
        self.prior = np.array([0.7**d for d in range(max_len + 1)])  # ngram's ~3.9 of 4-5
        self.prior_weight = prior_weight
        self.lookups = 0  # sequence-steps that looked for a chain
        self.found = 0  # of which found one

    def record_lookup(self, found: bool) -> None:
        """One sequence-step's prompt lookup, whether or not its chain is then offered."""
        self.lookups += 1
        self.found += int(found)

    def record_chain(self, offered: int, accepted: int) -> None:
        """One verified chain: tokens offered and accepted (0 when the tree's path won)."""
        self.trials[1 : offered + 1] += 1
        self.hits[1 : min(accepted, offered) + 1] += 1

    def expected_accepted(self) -> np.ndarray:
        """[L + 1] A(l): expected accepted chain tokens when l are offered."""
        m = self.prior_weight
        rate = (self.hits + self.prior * m) / (self.trials + m)
        rate[0] = 1.0
        deeper = np.minimum.accumulate(rate)[1:]  # accepting d tokens needs the first d - 1
        return np.concatenate([[0.0], np.cumsum(deeper)])

    def graft_fraction(self) -> float:
        """Share of sequence-steps whose lookup finds a chain (prior 0.25 over 8 steps)."""
        return (self.found + 2.0) / (self.lookups + 8.0)


def choose_chain_length(
    num_seqs: int,
    tree_size: int,
    tree_expected: float,
    chain: ChainStats,
    cost: CostModel,
    max_len: int,
) -> int:
    """Longest-paying chain length l <= max_len, given each sequence drafts tree_size nodes.

    Only a fraction f of the sequences carries a chain, so a step feeds about
    B (1 + s) + f B l tokens and emits B (1 + A_tree(s)) + f B A_chain(l). (No min_gain
    here: gain and cost both scale with f, so a margin on the average would drop chains
    that pay well whenever a match exists, just because matches are rare.)
    """
    f = chain.graft_fraction()
    a_chain = chain.expected_accepted()
    return _fastest(
        max_len,
        cost,
        fed=lambda length: num_seqs * (1 + tree_size) + f * num_seqs * length,
        emitted=lambda length: num_seqs * (1.0 + tree_expected + f * float(a_chain[length])),
    )[0]


def _fastest(
    max_n: int,
    cost: CostModel,
    fed: Callable[[int], float],
    emitted: Callable[[int], float],
    min_gain: float = 0.0,
) -> tuple[int, float]:
    """The n in 0..max_n maximising emitted(n) / t(fed(n)) (ties: the smaller n), with that
    rate; 0 unless that rate beats n = 0's by at least min_gain (a fraction); (max_n, 0.0)
    before any cost has been measured."""
    best, best_rate, rate_0 = max_n, -1.0, 0.0
    for n in range(max_n + 1):
        t = cost.predict(fed(n))
        if t is None:
            return max_n, 0.0
        rate = emitted(n) / t
        if n == 0:
            rate_0 = rate
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = n, rate
    if best and best_rate < rate_0 * (1 + min_gain):
        return 0, rate_0
    return best, best_rate


class CostModel:
    """Step time as a function of tokens fed, from recent measurements (piecewise linear)."""

    def __init__(self, ratio: float = 1.15, window: int = 8) -> None:
        # Buckets of N on a geometric grid: 1.15 -> ~40 buckets up to 512 tokens.
        self.log_ratio = math.log(ratio)
        self.window = window
        self.samples: dict[int, deque[tuple[int, float]]] = {}
        # choose_size asks for up to 81 predictions in a row; recomputing ~40 bucket
        # medians for each took ~10% of a batch-1 step on CPU, so they wait for new data.
        self._points: list[tuple[float, float]] | None = None

    def add(self, num_tokens: int, seconds: float) -> None:
        """Record one step."""
        if num_tokens <= 0 or seconds <= 0:
            return
        key = round(math.log(num_tokens) / self.log_ratio)
        self.samples.setdefault(key, deque(maxlen=self.window)).append((num_tokens, seconds))
        self._points = None

    def points(self) -> list[tuple[float, float]]:
        """(mean N, median seconds) per bucket, by N."""
        if self._points is None:
            self._points = [
                (float(np.mean([n for n, _ in s])), float(np.median([t for _, t in s])))
                for s in (self.samples[key] for key in sorted(self.samples))
            ]
        return self._points

    def predict(self, num_tokens: float) -> float | None:
        """Predicted seconds for a step of num_tokens; None before any measurement."""
        pts = self.points()
        if not pts:
            return None
        if num_tokens <= pts[0][0]:
            return pts[0][1]
        for (n0, t0), (n1, t1) in itertools.pairwise(pts):
            if num_tokens <= n1:
                return t0 + (t1 - t0) * (num_tokens - n0) / max(n1 - n0, 1e-9)
        n_last, t_last = pts[-1]
        slope = 0.0
        if len(pts) >= 2:
            # NOTE: beyond the data, take the steeper of the last segment and the overall
            # trend: guessing too cheap would grow trees exactly where they hurt (big batches).
            last = (t_last - pts[-2][1]) / max(n_last - pts[-2][0], 1e-9)
            overall = (t_last - pts[0][1]) / max(n_last - pts[0][0], 1e-9)
            slope = max(last, overall, 0.0)
        else:
            slope = t_last / n_last
        return t_last + slope * (num_tokens - n_last)


def choose_size(
    num_seqs: int, expected: np.ndarray, cost: CostModel, max_size: int, min_gain: float = 0.0
) -> tuple[int, float]:
    """The draft size s <= max_size maximising num_seqs (1 + A(s)) / t(num_seqs (1 + s)),
    or 0 where no size predicts min_gain (a fraction) over not drafting.

    expected: [>= max_size + 1] A(s). Returns (s, predicted tokens/s); s = max_size if no
    cost has been measured yet.
    """
    return _fastest(
        max_size,
        cost,
        fed=lambda s: num_seqs * (1 + s),
        emitted=lambda s: num_seqs * (1.0 + float(expected[s])),
        min_gain=min_gain,
    )


class TreeSizer:
    """Start-up calibration (cycle through sizes), then the best size with some exploration."""

    # Start-up cycle, largest first: tree sizes at batch 1, i.e. steps of 81, 41, ... tokens
    # (size_for feeds the same token counts at any batch size).
    CYCLE = (80, 40, 20, 10, 5, 2, 0)
    LADDER = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80)

    def __init__(
        self,
        stats: AcceptanceStats | PickOrderStats,
        max_size: int,
        calibration_rounds: int = 2,
        explore_every: int = 16,
        min_gain: float = 0.0,
    ) -> None:
        self.stats = stats
        self.min_gain = min_gain
        self.cost = CostModel()
        self.max_size = max_size
        self.cycle = [min(s, max_size) for s in self.CYCLE]
        self.calibration_steps = calibration_rounds * len(self.cycle)
        self.explore_every = explore_every
        self.step = 0
        self._cache: dict[int, int] = {}
        self._chain_cache: dict[tuple[int, int], int] = {}
        self._expected = stats.expected_accepted()

    def best_size(self, num_running: int) -> int:
        """The size that pays best at this batch size, without exploration; the largest while
        the start-up calibration runs."""
        if self.step < self.calibration_steps:
            return self.max_size
        if num_running not in self._cache:
            self._cache[num_running] = choose_size(
                num_running, self._expected, self.cost, self.max_size, self.min_gain
            )[0]
        return self._cache[num_running]

    def size_for(self, num_running: int) -> int:
        """Draft nodes per sequence for the coming step."""
        if self.step < self.calibration_steps:
            # The cycle is a list of step sizes in tokens (1 + s at batch 1): at batch B the
            # same token counts come from trees 1/B as large. Cycling the batch-1 sizes at
            # batch 16 fed 16 x 81 = 1296 tokens in a step (~25x a decode step on 2 cores);
            # served at concurrency 16 that start-up cost 11% of a 32-request run.
            target = 1 + self.cycle[self.step % len(self.cycle)]
            return max(0, target // max(1, num_running) - 1)
        best = self.best_size(num_running)
        if self.explore_every and self.step % self.explore_every == 0:
            # Try a neighbouring size now and then, so costs at new batch sizes get measured.
            ladder = [s for s in self.LADDER if s <= self.max_size]
            pos = min(range(len(ladder)), key=lambda j: abs(ladder[j] - best))
            up = (self.step // self.explore_every) % 2 == 0
            return ladder[min(pos + 1, len(ladder) - 1)] if up else ladder[max(pos - 1, 0)]
        return best

    def chain_length_for(self, num_running: int, tree_size: int, chain: ChainStats) -> int:
        """Prompt-lookup tokens to graft beside a tree of tree_size nodes (all of them while
        calibrating: the cost points are measured first)."""
        max_len = len(chain.trials) - 1
        if self.step < self.calibration_steps:
            return max_len
        key = (num_running, tree_size)
        if key not in self._chain_cache:
            a_tree = float(self._expected[min(tree_size, len(self._expected) - 1)])
            self._chain_cache[key] = choose_chain_length(
                num_running, tree_size, a_tree, chain, self.cost, max_len
            )
        return self._chain_cache[key]

    def end_step(self, num_tokens: int, seconds: float, decode_only: bool = True) -> None:
        """Record the step's cost; re-plan every 8 steps (acceptance and cost drift slowly).

        Only steps where every sequence fed one new token (decodes and draft trees) are
        timed: a prefill chunk costs differently per token (with token recycling it also
        carries up to 128 logits rows that seed the matrix but are not fed tokens). In a
        16-slot run on 2 cores, prefill steps put 137-512 tokens at 0.6-0.7 ms a token into
        the model, where 16 decodes cost 1.7 ms a token: drafting at a full batch looked
        cheaper than it is. A prefill step is timed only while the model has nothing else,
        so that a server whose first steps all carry prefills does not, knowing no cost,
        draft the largest tree.
        """
        if decode_only or not self.cost.samples:
            self.cost.add(num_tokens, seconds)
        self.step += 1
        if self.step % 8 == 0:
            self._cache.clear()
            self._chain_cache.clear()
            self._expected = self.stats.expected_accepted()
