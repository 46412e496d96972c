"""page_topk.cpp (block top-k page selection) against its PyTorch reference and a plain
per-page loop."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slipstream.kernels.cpu.page_topk import (
    Rerank,
    page_topk,
    page_topk_ref,
    page_topk_unavailable_reason,
    select_top_pages,
)

needs_kernel = pytest.mark.skipif(
    page_topk_unavailable_reason() is not None, reason=f"{page_topk_unavailable_reason()}"
)
needs_rerank = pytest.mark.skipif(
    page_topk_unavailable_reason(rerank=True) is not None,
    reason=f"{page_topk_unavailable_reason(rerank=True)}",
)
# Each build of page_topk.cpp, run where this CPU has its instruction set.
BUILDS = [
    pytest.param(
        isa,
        marks=pytest.mark.skipif(
            page_topk_unavailable_reason(isa) is not None,
            reason=f"{page_topk_unavailable_reason(isa)}",
        ),
    )
    for isa in ("avx512_bf16", "avx2_fma")
]


def _inputs(
    num_seqs: int, heads: int, group: int, width: int, num_blocks: int = 64, pages: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(num_seqs, heads, group, width)
    summary = torch.randn(heads, num_blocks, width)
    tables = torch.stack([torch.randperm(num_blocks)[:pages] for _ in range(num_seqs)]).int()
    return q, summary, tables


def _plain(
    q: torch.Tensor,
    summary: torch.Tensor,
    tables: torch.Tensor,
    region_end: list[int],
    sink: int,
    top_k: list[int],
) -> list[list[list[int]]]:
    """Score page by page in float64, sort, keep the best top_k[r]."""
    out = []
    for r in range(q.shape[0]):
        per_head = []
        for h in range(q.shape[1]):
            scores = []
            for p in range(sink, region_end[r]):
                row = summary[h, int(tables[r, p])].double()
                scores.append((max(float(q[r, h, g].double() @ row) for g in range(q.shape[2])), p))
            scores.sort(key=lambda x: (-x[0], x[1]))
            per_head.append([p for _, p in scores[: top_k[r]]])
        out.append(per_head)
    return out


def _as_lists(chosen: torch.Tensor) -> list[list[list[int]]]:
    return [[[p for p in row if p >= 0] for row in per_head] for per_head in chosen.tolist()]


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("group, width", [(1, 64), (3, 64), (1, 128), (2, 40), (1, 13)])
def test_kernel_matches_plain_selection_and_reference(group: int, width: int, isa: str) -> None:
    q, summary, tables = _inputs(3, 2, group, width)
    ends, ks = [40, 25, 3], [8, 8, 8]  # the last sequence has fewer candidates than k
    got = page_topk(q, summary, tables, ends, 2, ks, isa=isa)
    assert got.shape == (3, 2, 8) and got.dtype == torch.long
    assert _as_lists(got) == _plain(q, summary, tables, ends, 2, ks)
    assert (got[2, :, 1:] == -1).all()  # one candidate (page 2), then padding
    assert torch.equal(got, page_topk_ref(q, summary, tables, ends, 2, ks))


@pytest.mark.parametrize("isa", BUILDS)
def test_per_sequence_budgets_pad_the_shorter_rows(isa: str) -> None:
    q, summary, tables = _inputs(2, 3, 1, 64)
    ends, ks = [40, 40], [10, 4]  # budget_fraction gives shorter contexts fewer pages
    got = page_topk(q, summary, tables, ends, 1, ks, isa=isa)
    assert got.shape == (2, 3, 10)
    assert (got[1, :, 4:] == -1).all() and (got[1, :, :4] >= 1).all()
    assert _as_lists(got) == _plain(q, summary, tables, ends, 1, ks)
    assert torch.equal(got, page_topk_ref(q, summary, tables, ends, 1, ks))


def test_reference_finds_the_planted_pages() -> None:
    # Crafted: the query matches pages 7 and 19 of sequence 0 far better than any other.
    q, summary, tables = _inputs(1, 1, 1, 64)
    summary.mul_(0.01)
    for p in (7, 19):
        summary[0, int(tables[0, p])] = q[0, 0, 0] * (p / 10)
    chosen = select_top_pages(q, summary, tables, [30], 4, [2])
    assert chosen.tolist() == [[[19, 7]]]
    assert page_topk_ref(q, summary, tables, [30], 4, [2]).tolist() == [[[19, 7]]]


@pytest.mark.parametrize("isa", BUILDS)
def test_pinned_pages_lead_the_rows_and_are_read_once(isa: str) -> None:
    """Pins come first, as given (-1 pads kept); then the plain top-k, where a page that is
    also pinned turns -1. A pin outside the scored region is only copied."""
    torch.manual_seed(5)
    q, summary, tables = _inputs(3, 2, 2, 64)
    ends, ks = [40, 30, 12], [5, 5, 5]
    plain = _plain(q, summary, tables, ends, 2, ks)
    # Pin two of each row's chosen pages and two others, so that the dedupe has work.
    pinned = torch.full((3, 2, 4), -1, dtype=torch.long)
    for r in range(3):
        for h in range(2):
            others = [p for p in range(2, 40) if p not in plain[r][h]]
            pinned[r, h] = torch.tensor(plain[r][h][1:3] + others[:2])
    pinned[1, 0, 3] = 39  # past sequence 1's region: read, but never chosen anyway
    pinned[2, :, 2:] = -1  # sequence 2 has fewer pins
    got = page_topk(q, summary, tables, ends, 2, ks, isa=isa, pinned=pinned)
    assert got.shape == (3, 2, 4 + 5)
    assert torch.equal(got[..., :4], pinned)
    for r in range(3):
        for h in range(2):
            pins = set(pinned[r, h].tolist())
            want = [p if p not in pins else -1 for p in plain[r][h]]
            assert got[r, h, 4 : 4 + len(want)].tolist() == want
            assert (got[r, h, 4 + len(want) :] == -1).all()
            read = [p for p in got[r, h].tolist() if p >= 0]
            assert len(read) == len(set(read))
    assert torch.equal(got, page_topk_ref(q, summary, tables, ends, 2, ks, pinned=pinned))


def test_reference_checks_the_pins() -> None:
    q, summary, tables = _inputs(1, 2, 1, 64)
    with pytest.raises(ValueError, match="pinned"):
        page_topk_ref(q, summary, tables, [10], 0, [4], pinned=torch.zeros(1, 3, 2).long())
    with pytest.raises(ValueError, match="pinned"):
        select_top_pages(q, summary, tables, [10], 0, [4], pinned=torch.zeros(1, 2, 2).int())


@pytest.mark.parametrize("isa", BUILDS)
def test_bad_arguments_raise(isa: str) -> None:
    q, summary, tables = _inputs(1, 2, 1, 64)
    with pytest.raises(ValueError, match="summary"):
        page_topk(q, summary[:1], tables, [10], 0, [4], isa=isa)
    with pytest.raises(ValueError, match="region_end"):
        page_topk(q, summary, tables, [41], 0, [4], isa=isa)
    with pytest.raises(ValueError, match="one entry per sequence"):
        page_topk(q, summary, tables, [10, 10], 0, [4], isa=isa)
    bad = tables.clone()
    bad[0, 3] = 1000
    with pytest.raises(ValueError, match="outside the page summaries"):
        page_topk(q, summary, bad, [10], 0, [4], isa=isa)
    if isa == "avx2_fma":  # no rerank in this build: the caller must take the reference
        rerank = Rerank(torch.randn(1, 2, 1, 64), torch.randn(64, 16, 2, 64).bfloat16(), 8)
        with pytest.raises(RuntimeError, match="unavailable"):
            page_topk(q, summary, tables, [10], 0, [4], rerank, isa=isa)


@needs_kernel
def test_selection_takes_the_kernel_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """select_top_pages runs a build of the kernel without a rerank, the reference with a
    rerank where no AVX512 build runs."""
    import slipstream.kernels.cpu.page_topk as pt

    calls: list[str] = []

    def recorded(name: str) -> Any:
        return lambda *args, **kwargs: calls.append(name) or torch.zeros(0)

    monkeypatch.setattr(pt, "page_topk", recorded("kernel"))
    monkeypatch.setattr(pt, "page_topk_ref", recorded("ref"))
    q, summary, tables = _inputs(1, 2, 1, 64)
    pt.select_top_pages(q, summary, tables, [10], 0, [4])
    rerank = Rerank(torch.randn(1, 2, 1, 64), torch.randn(64, 16, 2, 64).bfloat16(), 8)
    pt.select_top_pages(q, summary, tables, [10], 0, [4], rerank)
    with_rerank = "kernel" if page_topk_unavailable_reason(rerank=True) is None else "ref"
    assert calls == ["kernel", with_rerank]


def _plain_rerank(
    qh: torch.Tensor,  # [R, H, G, D]
    k_cache: torch.Tensor,  # [blocks, block_size, H, D]
    tables: torch.Tensor,
    shortlists: list[list[list[int]]],  # [R][H] pages shortlisted by the page score
    top_k: list[int],
) -> list[list[list[int]]]:
    """Each shortlisted page's best exact logit in float64 (q rounded to bf16, as the cache)."""
    out = []
    for r, per_head in enumerate(shortlists):
        rows = []
        for h, pages in enumerate(per_head):
            q = qh[r, h].to(k_cache.dtype).double()  # [G, D]
            best = []
            for p in pages:
                keys = k_cache[int(tables[r, p]), :, h].double()  # [block_size, D]
                best.append((float((keys @ q.T).max()), p))
            best.sort(key=lambda x: (-x[0], x[1]))
            rows.append([p for _, p in best[: top_k[r]]])
        out.append(rows)
    return out


@needs_rerank
@pytest.mark.parametrize("block_size", [16, 12])
def test_rerank_keeps_the_shortlisted_pages_with_the_best_key(block_size: int) -> None:
    torch.manual_seed(3)
    heads, group, dim = 2, 3, 64
    q, summary, tables = _inputs(2, heads, 1, dim)
    qh = torch.randn(2, heads, group, dim)
    k_cache = torch.randn(64, block_size, heads, dim).bfloat16()
    ends, ks, shortlist = [40, 30], [4, 4], 12
    rerank = Rerank(qh, k_cache, shortlist)
    got = page_topk(q, summary, tables, ends, 1, ks, rerank)
    short = _plain(q, summary, tables, ends, 1, [shortlist, shortlist])
    assert _as_lists(got) == _plain_rerank(qh, k_cache, tables, short, ks)
    ref = page_topk_ref(q, summary, tables, ends, 1, ks, rerank)
    assert [sorted(h) for r in _as_lists(ref) for h in r] == [
        sorted(h) for r in _as_lists(got) for h in r
    ]
    # Dispatch: a float32 cache or an odd head size takes the reference.
    assert torch.equal(
        select_top_pages(q, summary, tables, ends, 1, ks, Rerank(qh, k_cache.float(), shortlist)),
        page_topk_ref(q, summary, tables, ends, 1, ks, Rerank(qh, k_cache.float(), shortlist)),
    )
