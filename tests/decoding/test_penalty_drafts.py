"""Recycled candidates re-ranked by a request's penalties (penalty_drafts.py): the same
arithmetic as the sampler's, on a row's k candidates, and what it does to a draft."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slipstream.decoding.dynamic_tree import best_first_draft
from slipstream.decoding.pair_rows import PairRows
from slipstream.decoding.penalty_drafts import PenalisedRows
from slipstream.engine.sampler import SamplingContext, _apply_penalties
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.sequence import Sequence


def _seq(prompt: list[int], output: list[int], **penalties: float) -> Sequence:
    seq = Sequence(
        seq_id=0,
        request_id="r",
        prompt_token_ids=prompt,
        params=SamplingParams(temperature=0.0, max_tokens=8, **penalties),
        arrival_time=0.0,
    )
    seq.token_ids.extend(output)
    return seq


def test_no_penalty_means_no_rerank() -> None:
    assert PenalisedRows.of(_seq([1, 2], [3])) is None


@pytest.mark.parametrize(
    "penalties",
    [
        {"repetition_penalty": 1.2},
        {"repetition_penalty": 0.8},
        {"frequency_penalty": 0.5, "presence_penalty": 0.3},
        {"repetition_penalty": 1.3, "frequency_penalty": -0.4, "presence_penalty": 1.0},
    ],
)
def test_penalised_logits_equal_the_samplers_on_those_candidates(
    penalties: dict[str, float],
) -> None:
    vocab = 40
    seq = _seq([3, 5, 7, 5], [9, 3, 3, 11], **penalties)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, vocab, generator=gen) * 4  # positive and negative logits
    full = logits.clone()
    _apply_penalties(full, [SamplingContext.of(seq)])
    ids = np.array([3, 9, 11, 20, 5, 7, 0, 39], dtype=np.int32)
    rows = PenalisedRows.of(seq)
    assert rows is not None
    got = rows.penalised(ids, logits[0].numpy()[ids])
    np.testing.assert_allclose(got, full[0].numpy()[ids], rtol=1e-6, atol=1e-6)


def test_rerank_orders_by_penalised_logit_and_renormalises() -> None:
    rows = PenalisedRows.of(_seq([4, 8], [6], repetition_penalty=2.0))
    assert rows is not None
    ids = np.array([4, 5, 6, 7], dtype=np.int32)
    raw = np.array([10.0, 8.0, 6.0, -1.0], dtype=np.float32)  # 4 and 6 were seen
    new_ids, probs = rows(ids, raw)
    assert new_ids.tolist() == [5, 4, 6, 7]  # 8, 5, 3, -1
    want = np.exp(np.array([8.0, 5.0, 3.0, -1.0]) - 8.0)
    np.testing.assert_allclose(probs, want / want.sum(), rtol=1e-6)


def test_a_penalised_favourite_moves_the_draft_to_the_next_candidate() -> None:
    """Row 5's raw favourite is 7, already in the context: under a repetition penalty the
    draft takes 9, and follows 9's row."""
    vocab, k = 16, 2
    matrix = np.zeros((vocab, k), dtype=np.int32)
    probs = np.zeros((vocab, k), dtype=np.float32)
    logits = np.zeros((vocab, k), dtype=np.float32)
    for tok, cands in {5: [(7, 6.0), (9, 5.5)], 9: [(2, 4.0), (3, 1.0)]}.items():
        vals = np.array([v for _, v in cands], dtype=np.float32)
        matrix[tok] = [t for t, _ in cands]
        logits[tok] = vals
        probs[tok] = np.exp(vals - vals.max()) / np.exp(vals - vals.max()).sum()
    plain = best_first_draft(matrix, probs, root=5, size=2)
    assert plain[1] == [7, 9]  # siblings: 7 first
    rows = PenalisedRows.of(_seq([1, 7], [5], repetition_penalty=1.2))
    paths, tokens = best_first_draft(
        matrix, probs, root=5, size=2, logits=logits, rerank=rows
    )  # 7: 6 / 1.2 = 5 < 5.5
    assert tokens == [9, 2] and paths == [(0,), (0, 0)]
    # Rows whose raw logits were never stored (a matrix loaded without them) keep their
    # stored order.
    paths, tokens = best_first_draft(
        matrix, probs, root=5, size=2, logits=np.zeros_like(logits), rerank=rows
    )
    assert tokens == plain[1]


def test_pair_rows_are_reranked_too() -> None:
    vocab, k = 16, 2
    matrix = np.zeros((vocab, k), dtype=np.int32)
    probs = np.zeros((vocab, k), dtype=np.float32)
    pairs = PairRows(8, k)
    ids = np.array([[7, 9]], dtype=np.int32)
    vals = np.array([[6.0, 5.5]], dtype=np.float32)
    pairs.write([4], [5], ids, np.array([[0.6, 0.4]], dtype=np.float32), vals)
    rows = PenalisedRows.of(_seq([1, 7, 4], [5], repetition_penalty=1.2))
    _, tokens = best_first_draft(
        matrix, probs, root=5, size=1, pairs=pairs, prev=4, logits=matrix * 0.0, rerank=rows
    )
    assert tokens == [9]
