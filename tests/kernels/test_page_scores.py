"""Block top-k's page scores: reference against plain loops, Triton (interpreter on CPU,
compiled on a GPU) against the reference, and the selection through either."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels.cpu.page_topk import page_topk_ref
from slipstream.kernels.page_scores import page_scores_ref, page_scores_triton
from tests.kernels.tolerances import TOL, assert_close_verbose


def _inputs(
    seqs: int, heads: int, group: int, width: int, blocks: int, pages: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(seqs, heads, group, width, device=device)
    summary = torch.randn(heads, blocks, width, device=device)
    tables = torch.stack([torch.randperm(blocks)[:pages] for _ in range(seqs)]).int().to(device)
    return q, summary, tables


@pytest.mark.parametrize("group, width", [(1, 64), (3, 40)])  # 40: not a power of two
def test_reference_matches_plain_loops(group: int, width: int) -> None:
    q, summary, tables = _inputs(2, 2, group, width, 50, 37)
    ends, sink = [37, 20], 2
    got = page_scores_ref(q, summary, tables, ends, sink)
    assert got.shape == (2, 2, 37)
    for r in range(2):
        for h in range(2):
            for p in range(37):
                if p < sink or p >= ends[r]:
                    assert got[r, h, p] == float("-inf")
                    continue
                row = summary[h, tables[r, p]]
                want = max(float(q[r, h, g] @ row) for g in range(group))
                assert abs(float(got[r, h, p]) - want) < 1e-4


@pytest.mark.parametrize("group, width, ends", [(1, 64, [37, 20, 5]), (3, 40, [70, 1, 64])])
def test_triton_matches_reference(group: int, width: int, ends: list[int]) -> None:
    """Several page tiles (16 pages each in the interpreter), a ragged last tile, a sequence
    whose only page is the sink."""
    q, summary, tables = _inputs(3, 2, group, width, 90, 70)
    want = page_scores_ref(q, summary, tables, ends, 1)
    got = page_scores_triton(q, summary, tables, ends, 1)
    assert_close_verbose(got, want, **TOL[torch.float32])
    assert torch.equal(got == float("-inf"), want == float("-inf"))


def test_selection_is_the_same_through_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """page_topk_ref with the scores from Triton picks the reference's pages."""
    q, summary, tables = _inputs(2, 2, 1, 64, 80, 60)
    args = (q, summary, tables, [60, 45], 1, [8, 5])
    monkeypatch.setenv("SLIPSTREAM_KERNELS", "torch")
    want = page_topk_ref(*args)
    monkeypatch.setenv("SLIPSTREAM_KERNELS", "triton")
    got = page_topk_ref(*args)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    assert (want[1, :, 5:] == -1).all()  # the second sequence keeps 5


def test_triton_rejects_bad_arguments() -> None:
    q, summary, tables = _inputs(2, 2, 1, 64, 50, 30)
    with pytest.raises(ValueError, match="float32"):
        page_scores_triton(q.double(), summary, tables, [30, 30], 1)
    with pytest.raises(ValueError, match="summary"):
        page_scores_triton(q, summary[:1], tables, [30, 30], 1)
    with pytest.raises(ValueError, match="region_end"):
        page_scores_triton(q, summary, tables, [30], 1)
    with pytest.raises(ValueError, match="past the tables"):
        page_scores_triton(q, summary, tables, [31, 30], 1)


@pytest.mark.gpu
def test_triton_matches_reference_on_gpu() -> None:
    """Llama-3-8B's 8 KV heads, 128-wide mean keys, 2048 pages (32k tokens), batch 4."""
    q, summary, tables = _inputs(4, 8, 1, 128, 9000, 2048, device="cuda")
    ends = [2044, 1500, 2048, 700]
    want = page_scores_ref(q, summary, tables, ends, 1)
    assert_close_verbose(
        page_scores_triton(q, summary, tables, ends, 1), want, **TOL[torch.float32]
    )
