"""The C++ vocabulary top-k (kernels/cpu/vocab_topk.cpp) against torch.topk."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels.cpu.vocab_topk import _KERNEL, vocab_topk_cpu, vocab_topk_cpu_applies

needs_kernel = pytest.mark.skipif(
    _KERNEL.unavailable_reason() is not None,
    reason=f"vocab_topk.cpp unavailable: {_KERNEL.unavailable_reason()}",
)


def lowest_index_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk's values with indices ordered lowest first among equal values: a stable
    descending sort."""
    vals, idx = values.sort(dim=-1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


@needs_kernel
@pytest.mark.parametrize("vocab", [49152, 1000, 37, 8])  # whole 32-blocks, tails, k = V
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("k", [1, 8])
def test_equals_torch_topk_on_random_rows(vocab: int, rows: int, k: int) -> None:
    gen = torch.Generator().manual_seed(vocab * 31 + rows + k)
    values = torch.randn(rows, vocab, generator=gen) * 4
    found = vocab_topk_cpu(values, k)
    assert found is not None
    want = values.topk(k, dim=-1)
    assert torch.equal(found[0], want.values)
    assert torch.equal(found[1], want.indices)  # distinct values: the order is defined


@needs_kernel
@pytest.mark.parametrize("vocab", [49152, 1003])
def test_ties_put_the_lower_index_first_and_the_first_is_argmax(vocab: int) -> None:
    gen = torch.Generator().manual_seed(5)
    values = torch.randint(0, 4, (4, vocab), generator=gen).float()  # thousands of ties
    values[1, [700, 20, vocab - 1]] = 9.0  # a tie at the top, the last logit among it
    values[2] = 1.0  # all equal
    found = vocab_topk_cpu(values, 8)
    assert found is not None
    want_vals, want_idx = lowest_index_topk(values, 8)
    assert torch.equal(found[0], want_vals)
    assert torch.equal(found[1], want_idx)
    assert torch.equal(found[1][:, 0], values.argmax(dim=-1))
    assert found[1][1, :3].tolist() == [20, 700, vocab - 1]
    assert found[1][2].tolist() == list(range(8))


@needs_kernel
def test_infinities_and_winners_at_either_end() -> None:
    values = torch.full((3, 5000), float("-inf"))
    values[0, 3] = 1.0  # one finite value: the other seven are -inf, lowest indices first
    values[1, -8:] = torch.arange(8.0)  # the winners in the row's last logits
    values[1, :4990] = torch.linspace(-3, -1, 4990)
    values[2, 100] = float("inf")
    found = vocab_topk_cpu(values, 8)
    assert found is not None
    want_vals, want_idx = lowest_index_topk(values, 8)
    assert torch.equal(found[0], want_vals)
    assert torch.equal(found[1], want_idx)
    assert found[1][0].tolist() == [3, 0, 1, 2, 4, 5, 6, 7]


@needs_kernel
def test_a_nan_makes_the_call_return_none() -> None:
    values = torch.randn(3, 4096)
    values[2, 1234] = float("nan")
    assert vocab_topk_cpu(values, 8) is None
    values[2, 1234] = 0.0
    values[0, 2] = float("nan")  # among the first k (entered unconditionally)
    assert vocab_topk_cpu(values, 8) is None


@needs_kernel
def test_strided_rows_and_thread_counts_give_the_same_answer() -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 9000, generator=gen)
    rows = wide[:, 500:8500]  # row stride 9000, unit stride within a row
    assert vocab_topk_cpu_applies(rows, 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vocab_topk_cpu(rows, 8)
        torch.set_num_threads(max(2, before))
        many = vocab_topk_cpu(rows, 8)
    finally:
        torch.set_num_threads(before)
    assert one is not None and many is not None
    want = rows.contiguous().topk(8, dim=-1)
    for got in (one, many):
        assert torch.equal(got[0], want.values)
        assert torch.equal(got[1], want.indices)


def test_applies_only_to_float32_rows_with_a_k_in_range() -> None:
    values = torch.randn(2, 100)
    assert not vocab_topk_cpu_applies(values.to(torch.bfloat16), 8)
    assert not vocab_topk_cpu_applies(values.t(), 8)  # stride within a row 100
    assert not vocab_topk_cpu_applies(values, 0)
    assert not vocab_topk_cpu_applies(values, 101)
    assert not vocab_topk_cpu_applies(values[0], 8)  # one dimension
