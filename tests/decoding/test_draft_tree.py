"""Pure-function tests: the official template's shape, BFS filling, greedy path acceptance,
and the calibration that picks the tree size (no engine)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from slipstream.decoding.calibration import (
    AcceptanceStats,
    ChainStats,
    CostModel,
    TreeSizer,
    choose_chain_length,
    choose_size,
)
from slipstream.decoding.draft_tree import (
    TEMPLATE_2_2_2,
    TreeTemplate,
    build_template,
    chain_template,
    fill_tree,
    graft_chain,
    subtree,
    template,
)
from slipstream.decoding.tree_verify import accept_greedy, matching_nodes
from slipstream.engine.model_runner import ancestor_mask


def test_official_template_shape() -> None:
    t = template("2.2.2")
    assert t.num_draft == 80 and t.num_tokens == 81
    assert t.level_sizes() == [8, 21, 25, 15, 8, 3]
    assert t.max_depth == 6
    assert [list(p) for p in t.paths[1:]] == [list(p) for p in TEMPLATE_2_2_2]
    assert all(t.parents[i] < i for i in range(1, 81))
    assert torch.equal(t.mask, ancestor_mask(t.parents))
    # children are the inverse of parent links, in rank order
    assert all(t.parents[c] == i for i, kids in enumerate(t.children) for c in kids)
    assert sum(len(kids) for kids in t.children) == 80
    assert all(
        [t.ranks[c] for c in kids] == sorted(t.ranks[c] for c in kids) for kids in t.children
    )


def test_template_from_paths_in_pick_order() -> None:
    """Paths listed depth-mixed (a dynamic tree's pick order) come out in BFS order, each
    level a contiguous run, with the ancestor mask, ranks and source indices of their paths."""
    picks = [(0,), (0, 0), (1,), (0, 0, 0), (0, 1), (2,), (1, 0)]
    t = build_template(picks, k=3, source_index=[10, 11, 12, 13, 14, 15, 16])
    assert [list(p) for p in t.paths] == [[], [0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    assert t.parents == [-1, 0, 0, 0, 1, 1, 2, 4]
    assert t.depths == [0, 1, 1, 1, 2, 2, 2, 3]
    assert t.ranks == [0, 0, 1, 2, 0, 1, 0, 0]
    assert t.children == [[1, 2, 3], [4, 5], [6], [], [7], [], [], []]
    assert t.source_index == [0, 10, 12, 15, 11, 14, 16, 13]
    assert torch.equal(t.mask, ancestor_mask(t.parents))
    runs = [(start, end, idx.tolist(), rank.tolist()) for start, end, idx, rank in t.levels]
    assert runs == [(1, 4, [0, 0, 0], [0, 1, 2]), (4, 7, [1, 1, 2], [0, 1, 0]), (7, 8, [4], [0])]
    with pytest.raises(ValueError, match="duplicate"):
        build_template([(0,), (1,), (0,)], k=2)
    with pytest.raises(ValueError, match="no parent"):
        build_template([(0,), (1, 0)], k=2)
    with pytest.raises(ValueError, match="ranks"):
        build_template([(0,), (2,)], k=2)


def test_fill_from_hand_written_matrix() -> None:
    tmpl = build_template([[0], [1], [0, 0]], k=2)
    m = torch.zeros(10, 2, dtype=torch.int32)
    m[5] = torch.tensor([7, 9])
    m[7] = torch.tensor([3, 4])
    m[6] = torch.tensor([1, 2])
    m[1] = torch.tensor([8, 8])
    out = fill_tree(tmpl, m, torch.tensor([5, 6]))
    assert out.tolist() == [[5, 7, 9, 3], [6, 1, 2, 8]]


def test_fill_full_template_follows_ranks() -> None:
    t = template("2.2.2")
    vocab = 200
    # row t holds t * 8 + r mod vocab: every node's token encodes its parent and rank.
    m = (torch.arange(vocab).unsqueeze(1) * 8 + torch.arange(8)) % vocab
    tokens = fill_tree(t, m.int(), torch.tensor([3])).tolist()[0]
    for i in range(1, 81):
        assert tokens[i] == (tokens[t.parents[i]] * 8 + t.ranks[i]) % vocab


def test_subtree_and_chain() -> None:
    t = template("2.2.2")
    sub = subtree(t, [1, 2, 9, 30])  # [0], [1], [0,0], [0,0,0]
    assert [list(p) for p in sub.paths] == [[], [0], [1], [0, 0], [0, 0, 0]]
    assert sub.parents == [-1, 0, 0, 1, 3]
    assert sub.source_index == [0, 1, 2, 9, 30]
    c = chain_template(3)
    assert c.parents == [-1, 0, 1, 2] and c.depths == [0, 1, 2, 3]


def test_graft_chain_hangs_given_tokens_under_the_root() -> None:
    base = build_template([[0], [1], [0, 0]], k=2)
    g = graft_chain(base, 3)
    t = g.tmpl
    # BFS order: the chain's node at each depth follows the base's nodes of that depth
    assert [list(p) for p in t.paths] == [[], [0], [1], [2], [0, 0], [2, 0], [2, 0, 0]]
    assert t.parents == [-1, 0, 0, 0, 1, 3, 5]
    assert t.source_index == [0, 1, 2, -1, 3, -1, -1]
    assert torch.equal(t.mask, ancestor_mask(t.parents))
    tokens = g.tokens([10, 11, 12, 13], [40, 41, 42])
    assert tokens == [10, 11, 12, 40, 13, 41, 42]
    # the chain is a path of its own: accepting it takes the chain's nodes only
    assert accept_greedy(t, tokens, [40, 0, 0, 41, 0, 42, 7]) == [0, 3, 5, 6]
    # a root-only base (tree size 0) still takes a chain
    solo = graft_chain(subtree(template("2.2.2"), []), 2)
    assert solo.tmpl.parents == [-1, 0, 1] and solo.tokens([5], [6, 7]) == [5, 6, 7]
    with pytest.raises(ValueError, match="1 token"):
        graft_chain(base, 0)


def test_acceptance_counts_every_matching_node_and_leaves_chains_to_chain_stats() -> None:
    t = template("2.2.2")
    stats = AcceptanceStats(t)
    g = graft_chain(subtree(t, [1, 9]), 2)  # template nodes (0,), (0, 0) plus a 2-token chain
    assert g.tmpl.paths == ((), (0,), (1,), (0, 0), (1, 0))  # (1,) (1, 0): the chain
    # The chain and node (0,) drafted the same first token; the emitted tokens match both.
    tokens = g.tokens([10, 11, 12], [11, 13])  # [10, 11, 11, 12, 13]
    matched = matching_nodes(g.tmpl, tokens, [11, 13, 40])
    assert matched == [1, 2, 4]  # (0,), the chain's 2 tokens; (0, 0) drafted 12, not 13
    stats.record(g.tmpl, matched)
    assert stats.trials[1] == 1 and stats.hits[1] == 1  # counted though the chain won
    assert stats.trials[9] == 1 and stats.hits[9] == 0
    assert stats.trials.sum() == 2  # chain nodes are not template nodes


def test_accept_greedy_full_partial_and_ties() -> None:
    # root 0 -> a(1), b(2); a -> c(3)
    t = build_template([[0], [1], [0, 0]], k=2)
    tokens = [10, 11, 12, 13]
    assert accept_greedy(t, tokens, [11, 13, 0, 5]) == [0, 1, 3]  # 11 -> a, 13 -> c
    assert accept_greedy(t, tokens, [12, 99, 7, 0]) == [0, 2]  # 12 -> b only
    assert accept_greedy(t, tokens, [42, 0, 0, 0]) == [0]  # nothing matches
    # duplicate siblings both match with equal length: the first in rank order wins
    dup = [10, 11, 11, 13]
    assert accept_greedy(t, dup, [11, 0, 0, 0]) == [0, 1]
    # ... and a longer match below the second sibling wins over the first
    t2 = build_template([[0], [1], [1, 0]], k=2)  # root -> a(1), b(2); b -> c(3)
    assert accept_greedy(t2, dup, [11, 0, 13, 0]) == [0, 2, 3]


def test_accept_greedy_is_the_longest_matching_path_on_random_trees() -> None:
    rng = torch.Generator().manual_seed(0)
    full = template("2.2.2")
    for _ in range(200):
        keep = sorted(torch.randperm(81, generator=rng)[:30].tolist())
        closed = {n for n in keep if n}
        for n in list(closed):  # close under parents
            while full.parents[n] > 0:
                n = full.parents[n]
                closed.add(n)
        t = subtree(full, sorted(closed))
        tokens = torch.randint(0, 3, (t.num_tokens,), generator=rng).tolist()
        targets = torch.randint(0, 3, (t.num_tokens,), generator=rng).tolist()
        got = accept_greedy(t, tokens, targets)
        ok = [
            all(tokens[c] == targets[t.parents[c]] for c in _path(t, n)) for n in range(len(tokens))
        ]
        longest = max(len(_path(t, n)) for n in range(len(tokens)) if ok[n])
        assert len(got) == longest + 1 and got[0] == 0
        pairs = itertools.pairwise(got)
        assert all(t.parents[b] == a and tokens[b] == targets[a] for a, b in pairs)


def _path(t: TreeTemplate, node: int) -> list[int]:
    """Node indices from the root's child down to `node` (empty for the root)."""
    out = []
    while node > 0:
        out.append(node)
        node = t.parents[node]
    return out[::-1]


def test_acceptance_order_is_a_subtree() -> None:
    t = template("2.2.2")
    stats = AcceptanceStats(t)
    rng = np.random.default_rng(0)
    for _ in range(50):
        leaf = int(rng.integers(1, 81))
        path = [leaf]
        while t.parents[path[-1]] > 0:
            path.append(t.parents[path[-1]])
        stats.record(t, path[::-1])
    order = stats.order()
    for s in (1, 5, 17, 40, 80):
        kept = set(order[:s])
        assert all(t.parents[i] == 0 or t.parents[i] in kept for i in kept)
    a = stats.expected_accepted()
    assert a[0] == 0 and np.all(np.diff(a) >= 0)


def _linear_cost(fixed: float, per_token: float) -> CostModel:
    cost = CostModel()
    for n in (1, 2, 4, 8, 16, 32, 64, 81, 128, 256, 512, 1296):
        cost.add(n, fixed + per_token * n)
    return cost


def test_calibration_picks_smaller_tree_when_cost_is_steeper() -> None:
    stats = AcceptanceStats(template("2.2.2"))
    expected = stats.expected_accepted()
    flat, _ = choose_size(1, expected, _linear_cost(0.020, 0.00002), 80)  # GPU-like
    mid, _ = choose_size(1, expected, _linear_cost(0.020, 0.0003), 80)  # CPU-like
    steep, _ = choose_size(1, expected, _linear_cost(0.020, 0.005), 80)
    assert flat > mid > steep
    assert flat == 80
    # a full batch on a compute-bound machine stops drafting
    busy, _ = choose_size(16, expected, _linear_cost(0.002, 0.001), 80)
    assert busy == 0


def test_drafting_needs_the_minimum_predicted_gain() -> None:
    # One node accepted 20% of the time: (1 + 0.2) / t(2) against 1 / t(1), with t(n) =
    # 10 ms + 1 ms x n, predicts 1.2 / 12 vs 1 / 11 tokens per ms: a 10% gain.
    expected = np.array([0.0, 0.2])
    cost = _linear_cost(0.010, 0.001)
    assert choose_size(1, expected, cost, 1)[0] == 1
    assert choose_size(1, expected, cost, 1, min_gain=0.05)[0] == 1
    size, rate = choose_size(1, expected, cost, 1, min_gain=0.15)
    assert size == 0 and abs(rate - 1 / 0.011) < 1e-6
    # The sizer passes its margin on.
    sizer = TreeSizer(AcceptanceStats(template("2.2.2")), 80, calibration_rounds=0)
    sizer.cost = _linear_cost(0.020, 0.0003)
    loose = sizer.best_size(1)
    sizer = TreeSizer(AcceptanceStats(template("2.2.2")), 80, calibration_rounds=0, min_gain=10.0)
    sizer.cost = _linear_cost(0.020, 0.0003)
    assert loose > 0 and sizer.best_size(1) == 0


def test_chain_statistics_and_cost_aware_chain_length() -> None:
    chains = ChainStats(8)
    for _ in range(200):
        chains.record_chain(8, 2)  # always the first two tokens, never the third
    a = chains.expected_accepted()
    assert a[0] == 0 and abs(a[2] - 2.0) < 0.05 and a[8] - a[2] < 0.05
    for found in [True] + [False] * 99:
        chains.record_lookup(found)
    assert abs(chains.graft_fraction() - 3 / 108) < 1e-9
    # Flat cost (a GPU at batch 1): every useful token is worth offering; tokens 3..8 add
    # almost nothing (each < 0.01 accepted), so the chain stops at 2 once cost grows.
    flat = _linear_cost(0.020, 0.0)
    assert choose_chain_length(1, 0, 0.0, chains, flat, 8) >= 2
    steep = _linear_cost(0.002, 0.001)
    assert choose_chain_length(16, 0, 0.0, chains, steep, 8) == 2
    # Chains never accepted: not worth a token where tokens cost time.
    useless = ChainStats(8)
    for _ in range(200):
        useless.record_chain(8, 0)
    assert choose_chain_length(16, 0, 0.0, useless, steep, 8) == 0
    # While the sizer calibrates it offers whole chains.
    sizer = TreeSizer(AcceptanceStats(template("2.2.2")), 80)
    assert sizer.chain_length_for(16, 0, useless) == 8


def test_cost_model_interpolates_and_extrapolates() -> None:
    cost = _linear_cost(0.01, 0.001)
    assert abs((cost.predict(50) or 0) - 0.06) < 0.003
    assert abs((cost.predict(3000) or 0) - 3.01) < 0.05
    assert CostModel().predict(5) is None


def test_cost_model_predictions_follow_new_measurements() -> None:
    """Bucket medians are cached between measurements; a new one must still count."""
    cost = CostModel(window=1)
    cost.add(10, 0.010)
    assert abs((cost.predict(10) or 0) - 0.010) < 1e-9
    cost.add(10, 0.030)  # the window of one replaces the old sample
    assert abs((cost.predict(10) or 0) - 0.030) < 1e-9
    cost.add(100, 0.100)
    assert abs((cost.predict(55) or 0) - 0.065) < 1e-9


@pytest.mark.parametrize("num_running", [1, 4, 16])
def test_start_up_calibration_feeds_the_same_token_counts_at_any_batch(num_running: int) -> None:
    stats = AcceptanceStats(template("2.2.2"))
    sizer = TreeSizer(stats, 80, calibration_rounds=1, explore_every=0)
    fed = []
    for _ in range(sizer.calibration_steps):
        fed.append(num_running * (1 + sizer.size_for(num_running)))
        sizer.end_step(fed[-1], 0.01)
    targets = [1 + s for s in TreeSizer.CYCLE]  # 81, 41, 21, 11, 6, 3, 1 at batch 1
    assert max(fed) <= max(targets[0], num_running)
    for got, want in zip(fed, targets, strict=True):
        # the largest token count <= the target that whole trees allow, never below B
        assert got <= max(want, num_running) and got > want - num_running


def test_each_logits_row_knows_the_token_before_it() -> None:
    from slipstream.decoding.base import SeqInputs, StepInputs
    from slipstream.decoding.tree_verify import _fed_and_previous
    from slipstream.engine.batch import Batch, ScheduledSeq
    from slipstream.engine.sampling_params import SamplingParams
    from slipstream.engine.sequence import Sequence

    params = SamplingParams(max_tokens=4)
    tree_seq = Sequence(0, "a", [5, 6, 7], params, 0.0)  # 5, 6 computed; 7 is the root
    tree_seq.num_computed_tokens = 2
    prefill = Sequence(1, "b", [20, 21, 22], params, 0.0)  # nothing computed yet
    batch = Batch([ScheduledSeq(tree_seq, 1, 2), ScheduledSeq(prefill, 3)])
    inputs = StepInputs(
        [
            # root 7, node 8 under the root, node 9 under 8
            SeqInputs([7, 8, 9], [2, 3, 4], parents=[-1, 0, 1], logits_indices=[0, 1, 2]),
            SeqInputs([20, 21, 22], [0, 1, 2], logits_indices=[0, 2]),  # two rows asked
        ]
    )
    fed, prev = _fed_and_previous(batch, inputs)
    assert fed == [7, 8, 9, 20, 22]
    assert prev == [6, 7, 8, -1, 21]  # position 0 has no previous token
