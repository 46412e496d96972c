"""Best-first draft trees from stored candidate probabilities, their template cache, and the
pick-order acceptance statistics that size them (pure functions, no engine)."""

from __future__ import annotations

import itertools

import numpy as np

from slipstream.decoding.calibration import PickOrderStats, TreeSizer
from slipstream.decoding.dynamic_tree import DynamicTrees, best_first_draft

K = 2


def _tables(
    rows: dict[int, list[tuple[int, float]]], vocab: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    matrix = np.zeros((vocab, K), dtype=np.int32)
    probs = np.zeros((vocab, K), dtype=np.float32)
    for tok, cands in rows.items():
        for r, (t, p) in enumerate(cands):
            matrix[tok, r], probs[tok, r] = t, p
    return matrix, probs


def test_best_first_follows_path_probability() -> None:
    # 5 -> 7 (0.9) | 9 (0.1); 7 -> 3 (0.8) | 4 (0.2); 3 -> 11 (0.5) | 12 (0.5)
    matrix, probs = _tables(
        {5: [(7, 0.9), (9, 0.1)], 7: [(3, 0.8), (4, 0.2)], 3: [(11, 0.5), (12, 0.5)]}
    )
    paths, tokens = best_first_draft(matrix, probs, root=5, size=2)
    assert paths == [(0,), (0, 0)] and tokens == [7, 3]  # 0.9, then 0.72
    paths, tokens = best_first_draft(matrix, probs, root=5, size=5)
    # 0.9, 0.72, then 0.36 and 0.36 (ties: picked in the order they were found), 0.18
    assert paths == [(0,), (0, 0), (0, 0, 0), (0, 0, 1), (0, 1)]
    assert tokens == [7, 3, 11, 12, 4]


def test_unknown_rows_are_expanded_last_and_cold_tables_give_rank_order() -> None:
    matrix, probs = _tables({})
    paths, _ = best_first_draft(matrix, probs, root=1, size=4)
    assert paths == [(0,), (1,), (0, 0), (1, 0)]  # all scores 0: first found, first picked
    # A known row's children (score > 0) come before any child of an unknown row (score 0).
    matrix, probs = _tables({1: [(2, 0.6), (3, 0.4)], 3: [(6, 0.9), (7, 0.1)]})
    paths, tokens = best_first_draft(matrix, probs, root=1, size=4)
    assert paths == [(0,), (1,), (1, 0), (1, 1)] and tokens == [2, 3, 6, 7]


def test_picks_are_the_most_probable_paths_and_form_a_subtree() -> None:
    rng = np.random.default_rng(0)
    vocab, k, depth = 64, 3, 4
    matrix = rng.integers(0, vocab, size=(vocab, k)).astype(np.int32)
    # Rows sorted best first, as the matrix update stores them (a softmax of sorted top-k).
    probs = -np.sort(-rng.dirichlet(np.ones(k) * 0.3, size=vocab).astype(np.float32), axis=1)
    scores: dict[tuple[int, ...], float] = {}
    tokens_of: dict[tuple[int, ...], int] = {}
    frontier: list[tuple[tuple[int, ...], int, float]] = [((), 3, 1.0)]
    while frontier:  # brute force: every path up to `depth`, 3 + 9 + 27 + 81 of them
        path, tok, score = frontier.pop()
        for r in range(k):
            child = (*path, r)
            scores[child] = score * float(probs[tok, r])
            tokens_of[child] = int(matrix[tok, r])
            if len(child) < depth:
                frontier.append((child, tokens_of[child], scores[child]))
    best = sorted(scores, key=lambda p: -scores[p])[:30]
    paths, tokens = best_first_draft(matrix, probs, root=3, size=30, max_depth=depth)
    assert set(paths) == set(best)
    assert tokens == [tokens_of[p] for p in paths]
    assert all(len(p) == 1 or p[:-1] in paths[:i] for i, p in enumerate(paths))  # parents first
    assert all(scores[a] >= scores[b] for a, b in itertools.pairwise(paths))


def test_templates_are_cached_and_number_nodes_by_pick_order() -> None:
    trees = DynamicTrees(K)
    paths = [(1,), (1, 0), (0,)]  # pick order: (1,) first
    tmpl = trees.tree(paths)
    assert trees.tree(list(paths)) is tmpl
    assert tmpl.paths == ((), (1,), (0,), (1, 0))  # by depth, then pick order
    assert tmpl.source_index == [0, 1, 3, 2]  # each node's pick order
    assert DynamicTrees.node_tokens(tmpl, 5, paths, [8, 9, 4]) == [5, 8, 4, 9]
    graft = trees.grafted(paths, 2)
    assert trees.grafted(paths, 2) is graft
    assert graft.tmpl.paths == ((), (1,), (0,), (2,), (1, 0), (2, 0))
    assert graft.tokens([5, 8, 4, 9], [30, 31]) == [5, 8, 4, 30, 9, 31]


def test_pick_order_stats_size_the_tree() -> None:
    stats = PickOrderStats(8)
    trees = DynamicTrees(K)
    tmpl = trees.tree([(0,), (0, 0), (1,)])
    for _ in range(50):  # the first two picks always accepted, the third never
        stats.record(tmpl, [1, 3])  # nodes (0,) and (0, 0); node 2 is (1,)
    a = stats.expected_accepted()
    assert a[2] > 1.8 and a[3] - a[2] < 0.1
    assert np.all(np.diff(a) >= 0)
    graft = trees.grafted([(0,)], 1)  # (0,) and a chain node (1,)
    before = stats.trials.copy()
    stats.record(graft.tmpl, [1, 2])  # both matched: the pick counts, the chain node not
    assert stats.trials[1] == before[1] + 1 and stats.trials.sum() == before.sum() + 1
    sizer = TreeSizer(stats, 8, calibration_rounds=0, explore_every=0)
    for n in range(1, 12):
        sizer.cost.add(n, 0.02 + 0.001 * n)  # a step costs 20 ms plus 1 ms per token
    assert sizer.best_size(1) == 2  # the third pick is never accepted: it does not pay
