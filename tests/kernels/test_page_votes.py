"""Page votes (block top-k's pinned pages): the PyTorch reference against a float64
one-query-at-a-time count, and page_votes.cpp against the reference."""

from __future__ import annotations

import pytest
import torch

import slipstream.kernels.page_votes as pv
from slipstream.kernels.cpu.page_votes import page_votes_cpu, page_votes_cpu_unavailable_reason
from slipstream.kernels.page_votes import page_votes_ref

_PROBE = (torch.zeros(1, 2, 64), torch.zeros(1, 16, 1, 64))
needs_kernel = pytest.mark.skipif(
    page_votes_cpu_unavailable_reason(*_PROBE) is not None,
    reason=f"{page_votes_cpu_unavailable_reason(*_PROBE)}",
)


def _case(
    seed: int, voters: int, heads: int, group: int, dim: int, seq_len: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k_cache, table, positions): pages shuffled, the voters the last positions but
    one (so the mask matters), peaked queries (x3) so that votes concentrate."""
    g = torch.Generator().manual_seed(seed)
    block_size = 16
    pages = -(-seq_len // block_size)
    k_cache = torch.randn(pages + 7, block_size, heads, dim, generator=g).to(dtype)
    table = torch.randperm(pages + 7, generator=g)[: pages + 2].int()
    q = 3 * torch.randn(voters, heads * group, dim, generator=g) / dim**0.25
    positions = torch.arange(seq_len - voters - 1, seq_len - 1)
    return q, k_cache, table, positions


def _float64_votes(q, k_cache, table, seq_len, positions, scale, spread):  # type: ignore[no-untyped-def]
    block_size, heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // heads
    keys = k_cache[table.long()].reshape(-1, heads, k_cache.shape[3])[:seq_len].double()
    pages = -(-seq_len // block_size)
    out = torch.zeros(heads, pages, dtype=torch.float64)
    for h in range(heads):
        mass = torch.zeros(seq_len, dtype=torch.float64)
        for i, pos in enumerate(positions.tolist()):
            for j in range(group):
                logits = keys[: pos + 1, h] @ q[i, h * group + j].double() * scale
                mass[: pos + 1] += logits.softmax(0)
        best = torch.stack([mass[max(0, t - spread + 1) : t + 1].max() for t in range(seq_len)])
        for p in range(pages):
            out[h, p] = best[p * block_size : (p + 1) * block_size].sum()
    return out


@pytest.mark.parametrize("spread", [1, 8])
def test_reference_counts_each_query_over_the_keys_it_sees(spread: int) -> None:
    q, k_cache, table, positions = _case(0, 3, 2, 3, 16, 75, torch.float32)
    got = page_votes_ref(q, k_cache, table, 75, positions, 0.25, spread)
    want = _float64_votes(q, k_cache, table, 75, positions, 0.25, spread)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("voters", "heads", "group", "dim", "seq_len"),
    [
        (1, 3, 3, 64, 1000),
        (4, 2, 1, 32, 77),
        (32, 3, 3, 64, 300),
        (2, 1, 4, 8, 16),
        (3, 4, 2, 128, 129),
    ],
)
def test_kernel_matches_the_reference(
    dtype: torch.dtype, voters: int, heads: int, group: int, dim: int, seq_len: int
) -> None:
    q, k_cache, table, positions = _case(seq_len, voters, heads, group, dim, seq_len, dtype)
    for spread in (1, 8):
        got = page_votes_cpu(q, k_cache, table, seq_len, positions, dim**-0.5, spread)
        want = page_votes_ref(q, k_cache, table, seq_len, positions, dim**-0.5, spread)
        assert got.shape == (heads, -(-seq_len // 16))
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
        # The pins it feeds: the same top pages per head.
        k = min(5, got.shape[1])
        assert torch.equal(got.topk(k).indices.sort().values, want.topk(k).indices.sort().values)


@needs_kernel
def test_bad_tables_or_positions_raise() -> None:
    q, k_cache, table, positions = _case(1, 2, 2, 2, 16, 40, torch.float32)
    with pytest.raises(ValueError, match="outside"):
        page_votes_cpu(q, k_cache, torch.tensor([0, 1, 99]), 40, positions, 0.25, 8)
    with pytest.raises(ValueError, match="outside"):
        page_votes_cpu(q, k_cache, table, 40, torch.tensor([3, 40]), 0.25, 8)
    with pytest.raises(ValueError, match="pages"):
        page_votes_cpu(q, k_cache, table[:2], 40, positions, 0.25, 8)
    with pytest.raises(ValueError, match="voters"):
        page_votes_cpu(q[:, :3], k_cache, table, 40, positions, 0.25, 8)


def test_dispatch_takes_the_kernel_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k_cache, table, positions = _case(2, 2, 2, 2, 16, 40, torch.float32)
    calls: list[str] = []
    monkeypatch.setattr(pv, "page_votes_cpu", lambda *a: calls.append("cpp") or page_votes_ref(*a))
    monkeypatch.setattr(pv, "page_votes_ref", lambda *a: calls.append("ref") or page_votes_ref(*a))
    pv.page_votes(q, k_cache, table, 40, positions, 0.25, 8)
    expected = "cpp" if page_votes_cpu_unavailable_reason(q, k_cache) is None else "ref"
    assert calls == [expected]
    odd = torch.cat([k_cache, k_cache], -1)[..., :16]  # not contiguous: the reference
    assert page_votes_cpu_unavailable_reason(q, odd) is not None
    calls.clear()
    pv.page_votes(q, odd, table, 40, positions, 0.25, 8)
    assert calls == ["ref"]
