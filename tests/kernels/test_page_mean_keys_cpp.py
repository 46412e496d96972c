"""page_mean_keys.cpp (block top-k's page mean keys on CPU) against its PyTorch reference,
bit for bit."""

from __future__ import annotations

import pytest
import torch

import slipstream.kernels.page_summaries as ps
from slipstream.kernels.cpu.page_mean_keys import (
    page_mean_keys_cpu,
    page_mean_keys_cpu_unavailable_reason,
)
from slipstream.kernels.page_summaries import page_mean_keys_ref

_PROBE = (torch.zeros(1, 16, 1, 64), torch.zeros(1, 1, 64))
needs_kernel = pytest.mark.skipif(
    page_mean_keys_cpu_unavailable_reason(*_PROBE) is not None,
    reason=f"{page_mean_keys_cpu_unavailable_reason(*_PROBE)}",
)


def _head_major_means(blocks: int, heads: int, dim: int) -> torch.Tensor:
    """[blocks, heads, dim] viewed from a [heads, blocks, dim] tensor, as the selector keeps
    its summaries (head-major, passed transposed)."""
    return torch.full((heads, blocks, dim), 7.0).transpose(0, 1)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 32])
def test_kernel_gives_the_reference_bits(dtype: torch.dtype, dim: int) -> None:
    torch.manual_seed(0)
    blocks, block_size, heads = 50, 16, 3
    k_cache = (torch.randn(blocks, block_size, heads, dim) * 3).to(dtype)
    pages = torch.randperm(blocks)[:37]  # a prompt's pages, in table order
    counts = torch.randint(1, block_size + 1, (37,))
    counts[:5] = block_size
    got, want = _head_major_means(blocks, heads, dim), _head_major_means(blocks, heads, dim)
    page_mean_keys_cpu(k_cache, got, pages, counts.int())
    page_mean_keys_ref(k_cache, want, pages, counts)
    assert torch.equal(got, want)
    untouched = torch.ones(blocks, dtype=torch.bool)
    untouched[pages] = False
    assert (got[untouched] == 7.0).all()  # pages not listed keep their summaries
    # One page (a decode step's write), a partly filled one.
    page_mean_keys_cpu(k_cache, got, torch.tensor([3]), torch.tensor([5]))
    assert torch.equal(got[3], k_cache[3, :5].float().sum(0) / 5)


@needs_kernel
def test_bad_pages_or_counts_raise_and_write_nothing() -> None:
    k_cache = torch.randn(8, 16, 2, 64)
    means = torch.zeros(8, 2, 64)
    for pages, counts in (([2, 8], [4, 4]), ([2, -1], [4, 4]), ([2, 3], [4, 0]), ([2], [17])):
        with pytest.raises(ValueError, match="outside"):
            page_mean_keys_cpu(k_cache, means, torch.tensor(pages), torch.tensor(counts))
        assert (means == 0).all()


@needs_kernel
def test_the_public_op_takes_the_kernel_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(ps, "page_mean_keys_cpu", lambda *a: calls.append("kernel"))
    monkeypatch.setattr(ps, "page_mean_keys_ref", lambda *a: calls.append("ref"))
    k_cache, means = torch.randn(4, 16, 2, 64), torch.zeros(4, 2, 64)
    ps.page_mean_keys(k_cache, means, torch.tensor([1]), torch.tensor([3]))
    ps.page_mean_keys(k_cache.half(), means, torch.tensor([1]), torch.tensor([3]))  # no fp16
    # 3 heads x 40: torch sums such rows' tails in another order, so the reference runs.
    odd_cache, odd_means = torch.randn(4, 16, 3, 40), torch.zeros(4, 3, 40)
    ps.page_mean_keys(odd_cache, odd_means, torch.tensor([1]), torch.tensor([3]))
    assert calls == ["kernel", "ref", "ref"]
    # The kernel writes means[page] unchecked: a summary too small for the cache is refused.
    with pytest.raises(ValueError, match="means"):
        ps.page_mean_keys(k_cache, means[:2], torch.tensor([1]), torch.tensor([3]))
    assert calls == ["kernel", "ref", "ref"]
