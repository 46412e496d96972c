"""Best-first draft trees from stored candidate probabilities, their template cache, and the
pick-order acceptance statistics that size them (pure functions, no engine)."""

from __future__ import annotations

import itertools

import numpy as np

from slipstream.decoding.calibration import PickOrderStats, TreeSizer
from slipstream.decoding.dynamic_tree import DynamicTrees, best_first_draft
from slipstream.decoding.pair_rows import PairRows

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


def test_rows_never_written_are_not_expanded() -> None:
    matrix, probs = _tables({})
    assert best_first_draft(matrix, probs, root=1, size=4) == ([], [])  # a cold table
    # 1's row is known, 2's is not: the walk stops below 2 and drafts fewer than `size`.
    matrix, probs = _tables({1: [(2, 0.6), (3, 0.4)], 3: [(6, 0.9), (7, 0.1)]})
    paths, tokens = best_first_draft(matrix, probs, root=1, size=6)
    assert paths == [(0,), (1,), (1, 0), (1, 1)] and tokens == [2, 3, 6, 7]


def test_pair_rows_answer_before_one_token_rows() -> None:
    # One-token rows: 5 -> 7, 7 -> 3. After (4, 5) the model continued 5 with 9, and after
    # (5, 9) with 10: where those pairs are stored, they draft instead.
    matrix, probs = _tables({5: [(7, 0.9), (8, 0.1)], 7: [(3, 1.0), (0, 0.0)]})
    pairs = PairRows(capacity=4, k=K)
    pairs.write([4, 5], [5, 9], np.array([[9, 7], [10, 11]]), np.array([[0.8, 0.2], [0.7, 0.3]]))
    _, tokens = best_first_draft(matrix, probs, root=5, size=2, pairs=pairs, prev=4)
    assert tokens == [9, 10]  # (4, 5) -> 9, then (5, 9) -> 10
    _, tokens = best_first_draft(matrix, probs, root=5, size=2, pairs=pairs, prev=6)
    assert tokens == [7, 3]  # (6, 5) unseen: the one-token rows
    _, tokens = best_first_draft(matrix, probs, root=5, size=2, pairs=None, prev=4)
    assert tokens == [7, 3]


def test_pair_rows_are_a_ring_that_overwrites_the_oldest() -> None:
    pairs = PairRows(capacity=2, k=K)
    row = np.array([[1, 2]])
    p = np.array([[0.5, 0.5]])
    pairs.write([1], [2], row, p)
    pairs.write([3], [4], row + 1, p)
    pairs.write([1], [2], row + 5, p)  # an existing pair is rewritten in place
    assert len(pairs) == 2 and pairs.ids[pairs.find(1, 2)].tolist() == [6, 7]
    pairs.write([5], [6], row, p)  # the ring's next slot held (1, 2): it goes
    assert pairs.find(1, 2) == -1 and pairs.find(3, 4) >= 0 and pairs.find(5, 6) >= 0
    pairs.write([-1], [9], row, p)  # no previous token: nothing stored
    assert pairs.find(-1, 9) == -1 and len(pairs) == 2
    pairs.clear()
    assert len(pairs) == 0 and pairs.find(5, 6) == -1


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


def test_a_chain_shares_the_nodes_the_tree_drafted_and_hangs_the_rest_below() -> None:
    trees = DynamicTrees(K)
    paths, toks = [(0,), (0, 0), (1,)], [7, 3, 8]  # root 5 -> 7 -> 3, root -> 8
    tmpl, tokens = trees.with_chain(5, paths, toks, [7, 4, 6])
    # 7 is the tree's (0,); 4 and 6 hang below it on rank K, fed once each
    assert tmpl.paths == ((), (0,), (1,), (0, 0), (0, K), (0, K, K))
    assert tokens == [5, 7, 8, 3, 4, 6]
    assert tmpl.source_index == [0, 1, 3, 2, -1, -1]  # shared node keeps its pick order
    assert trees.with_chain(5, paths, toks, [7, 4, 9])[0] is tmpl  # cached by shape
    tmpl, tokens = trees.with_chain(5, paths, toks, [7, 3])  # wholly inside the tree
    assert tmpl.num_tokens == 4 and tokens == [5, 7, 8, 3]
    tmpl, tokens = trees.with_chain(5, [], [], [2, 2])  # no tree: the chain alone
    assert tmpl.paths == ((), (K,), (K, K)) and tokens == [5, 2, 2]


def test_pick_order_stats_size_the_tree() -> None:
    stats = PickOrderStats(8)
    trees = DynamicTrees(K)
    tmpl = trees.tree([(0,), (0, 0), (1,)])
    for _ in range(50):  # the first two picks always accepted, the third never
        stats.record(tmpl, [1, 3])  # nodes (0,) and (0, 0); node 2 is (1,)
    a = stats.expected_accepted()
    assert a[2] > 1.8 and a[3] - a[2] < 0.1
    assert np.all(np.diff(a) >= 0)
    merged, _ = trees.with_chain(1, [(0,)], [4], [9])  # (0,) and a chain node (K,)
    before = stats.trials.copy()
    stats.record(merged, [1, 2])  # both matched: the pick counts, the chain node not
    assert stats.trials[1] == before[1] + 1 and stats.trials.sum() == before.sum() + 1
    sizer = TreeSizer(stats, 8, calibration_rounds=0, explore_every=0)
    for n in range(1, 12):
        sizer.cost.add(n, 0.02 + 0.001 * n)  # a step costs 20 ms plus 1 ms per token
    assert sizer.best_size(1) == 2  # the third pick is never accepted: it does not pay
