"""vocab_topk / vocab_argmax: the two-pass chunked forms must answer exactly as torch does.

vocab_topk takes the C++ pass where it builds (tests/kernels/test_vocab_topk_cpp.py); the
`path` fixture runs each top-k test through both that dispatch and the chunked torch form."""

from __future__ import annotations

import pytest
import torch

from slipstream.engine import vocab_topk as vocab_topk_module
from slipstream.engine.vocab_topk import _CHUNK, vocab_argmax, vocab_topk, vocab_topk_and_argmax

# Whole chunks only (the default model's 49152), a partial tail chunk, a tail of one logit.
VOCABS = [384 * _CHUNK, 250 * _CHUNK + 77, 300 * _CHUNK + 1]


@pytest.fixture(params=["dispatch", "chunked"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """'dispatch': vocab_topk as the engine calls it; 'chunked': the C++ pass turned off."""
    if request.param == "chunked":
        monkeypatch.setattr(vocab_topk_module, "vocab_topk_cpu_applies", lambda *_: False)
    return str(request.param)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("k", [1, 8])
def test_topk_equals_torch_on_random_rows(vocab: int, rows: int, k: int, path: str) -> None:
    gen = torch.Generator().manual_seed(vocab + rows + k)
    values = torch.randn(rows, vocab, generator=gen) * 4
    got_vals, got_idx = vocab_topk(values, k)
    want_vals, want_idx = values.topk(k, dim=-1)
    assert torch.equal(got_vals, want_vals)
    assert torch.equal(got_idx, want_idx)  # distinct values: the order is defined


@pytest.mark.parametrize("vocab", VOCABS)
def test_topk_finds_winners_in_one_chunk_and_in_the_tail(vocab: int, path: str) -> None:
    values = torch.full((2, vocab), -5.0)
    # Row 0: all eight winners packed into one chunk (the others hold none).
    values[0, 7 * _CHUNK : 7 * _CHUNK + 8] = torch.arange(8.0)
    # Row 1: the winners at the very end of the row (in the tail where there is one).
    values[1, vocab - 8 :] = torch.arange(8.0) + 10
    got_vals, got_idx = vocab_topk(values, 8)
    want_vals, want_idx = values.topk(8, dim=-1)
    assert torch.equal(got_vals, want_vals)
    assert torch.equal(got_idx, want_idx)
    assert len(set(got_idx[1].tolist())) == 8  # no index counted twice


@pytest.mark.parametrize("vocab", VOCABS)
def test_topk_with_ties_returns_the_same_values_and_distinct_indices(vocab: int, path: str) -> None:
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(0, 4, (3, vocab), generator=gen).float()  # many ties
    got_vals, got_idx = vocab_topk(values, 8)
    assert torch.equal(got_vals, values.topk(8, dim=-1).values)
    for r in range(3):
        assert len(set(got_idx[r].tolist())) == 8
        assert torch.equal(values[r, got_idx[r]], got_vals[r])


@pytest.mark.parametrize("vocab", VOCABS)
def test_argmax_equals_torch_including_ties_and_nan(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    values = torch.randn(6, vocab, generator=gen)
    values[1, [5 * _CHUNK + 3, 2 * _CHUNK + 9, vocab - 1]] = 50.0  # tie: lowest index wins
    values[2, vocab - 1] = 60.0  # the maximum at the last logit
    values[3, [vocab - 1, 40]] = 70.0  # tie between the tail and an early chunk
    values[4, 3 * _CHUNK + 1] = float("nan")  # torch counts NaN as the maximum
    values[5] = 1.0  # all equal: index 0
    assert torch.equal(vocab_argmax(values), values.argmax(dim=-1))
    # bf16 takes the chunked torch form (NumPy has no bf16), with the same answers.
    half = values.to(torch.bfloat16)
    assert torch.equal(vocab_argmax(half), half.argmax(dim=-1))


def test_small_or_strided_inputs_fall_back_to_torch(path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(3, 1000, generator=gen)  # under 16 chunks per candidate
    assert torch.equal(vocab_topk(small, 8)[1], small.topk(8, dim=-1).indices)
    assert torch.equal(vocab_argmax(small), small.argmax(dim=-1))
    wide = torch.randn(40000, 3, generator=gen).t()  # [3, 40000], last-dim stride 3
    assert torch.equal(vocab_topk(wide, 2)[1], wide.topk(2, dim=-1).indices)
    assert torch.equal(vocab_argmax(wide), wide.argmax(dim=-1))


@pytest.mark.parametrize("vocab", VOCABS)
def test_topk_and_argmax_agree_with_torch_on_ties_and_nan(vocab: int, path: str) -> None:
    gen = torch.Generator().manual_seed(vocab + 1)
    values = torch.randn(5, vocab, generator=gen)
    values[1, [5 * _CHUNK + 3, 2 * _CHUNK + 9, vocab - 1]] = 50.0  # tie: lowest index wins
    values[2] = 1.0  # all equal: index 0
    values[3, [vocab - 1, 40]] = 70.0  # tie between the tail and an early chunk
    values[4, 3 * _CHUNK + 1] = float("nan")  # torch counts NaN as the maximum
    (top_vals, top_idx), targets = vocab_topk_and_argmax(values, 8)
    assert torch.equal(targets, values.argmax(dim=-1))
    want = values.topk(8, dim=-1).values
    assert torch.equal(top_vals[:4], want[:4])
    assert torch.isnan(top_vals[4, 0]) and torch.equal(top_vals[4, 1:], want[4, 1:])
    assert torch.equal(values.gather(1, top_idx[:4]), top_vals[:4])
