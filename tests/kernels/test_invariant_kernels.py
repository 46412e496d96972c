"""The batch-invariant kernels (--batch-invariant): each against its PyTorch reference, and
the property they exist for: a row's bits do not depend on the rows beside it, and a tree
node's attention equals decoding the node alone after its ancestors. On CPU the kernels run
in Triton's interpreter; the `gpu` tests repeat the property on a card, where it matters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slipstream.engine.model_runner import ancestor_mask
from slipstream.kernels.cpu.rms_norm import add_rms_norm_ref
from slipstream.kernels.invariant_attention import (
    SPLIT_KEYS,
    invariant_paged_attention_triton,
    token_layout,
)
from slipstream.kernels.invariant_linear import (
    BLOCK_K,
    BLOCK_M,
    BLOCK_N,
    invariant_linear_ref,
    invariant_linear_triton,
)
from slipstream.kernels.invariant_rms_norm import add_rms_norm_triton
from slipstream.kernels.paged_attention import _paged_attention_loop
from tests.kernels.tolerances import TOL, assert_close_verbose

I32 = torch.int32


def _rows(m: int, k: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return (torch.randn(m, k, device=device) / k**0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n, k", [(1, 64, 64), (81, 100, 200), (17, 48, 72)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(
    dtype: torch.dtype, m: int, n: int, k: int, with_bias: bool
) -> None:
    x, w = _rows(m, k, dtype), _rows(n, k, dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    for out_dtype in (dtype, torch.float32):
        got = invariant_linear_triton(x, w, bias, out_dtype)
        assert got.dtype == out_dtype and got.shape == (m, n)
        want = invariant_linear_ref(x, w, bias, out_dtype)
        assert_close_verbose(got.float(), want.float(), **TOL[out_dtype])


def _check_linear_rows_invariant(device: str) -> None:
    x, w = _rows(81, 576, torch.bfloat16, device), _rows(200, 576, torch.bfloat16, device)
    whole = invariant_linear_triton(x, w, None, torch.float32)
    for i in (0, 1, 40, 80):  # alone, as one-row decoding computes it
        assert torch.equal(
            invariant_linear_triton(x[i : i + 1], w, None, torch.float32)[0], whole[i]
        )
    order = torch.randperm(81, device=device)[:37]  # other neighbours, other row count
    assert torch.equal(invariant_linear_triton(x[order], w, None, torch.float32), whole[order])


def _interpreter_dot_is_row_invariant() -> bool:
    """Whether numpy's float32 matmul, which the interpreter runs for tl.dot, gives a row the
    same bits wherever it sits in a BLOCK_M-row tile. OpenBLAS's Haswell sgemm (AVX2-only
    CPUs, e.g. AMD Zen 3) does not: rows 6-15 of a 16-row tile round differently when moved
    to row 0. The kernel's own invariance is then untestable on this host's interpreter."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((BLOCK_M, BLOCK_K), dtype=np.float32)
    b = rng.standard_normal((BLOCK_K, BLOCK_N), dtype=np.float32)
    full = a @ b
    for r in range(BLOCK_M):
        alone = np.zeros_like(a)
        alone[0] = a[r]
        if not np.array_equal((alone @ b)[0], full[r]):
            return False
    return True


def test_linear_rows_do_not_depend_on_the_batch() -> None:
    if not _interpreter_dot_is_row_invariant():
        pytest.skip(
            "numpy's matmul (the interpreter's tl.dot) rounds a row by its place in the tile "
            "on this CPU; test_linear_tile_aligned_rows_do_not_depend_on_the_batch still runs"
        )
    _check_linear_rows_invariant("cpu")


def test_linear_tile_aligned_rows_do_not_depend_on_the_batch() -> None:
    # Rows kept at their place within a BLOCK_M tile, with other neighbours and another M
    # (so another grid): the same bits. Holds on any host, whatever its BLAS does with a
    # row's place in the tile.
    x, w = _rows(81, 576, torch.bfloat16), _rows(200, 576, torch.bfloat16)
    whole = invariant_linear_triton(x, w, None, torch.float32)
    for start, stop in ((0, 1), (16, 48), (64, 81), (32, 37)):
        part = invariant_linear_triton(x[start:stop], w, None, torch.float32)
        assert torch.equal(part, whole[start:stop])
    shuffled = x.clone()
    shuffled[16:32] = torch.flip(x[16:32], [1])  # other values beside rows 0-15 and 32-80
    again = invariant_linear_triton(shuffled, w, None, torch.float32)
    assert torch.equal(again[:16], whole[:16]) and torch.equal(again[32:], whole[32:])


def test_linear_rejects_what_it_cannot_run() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        invariant_linear_triton(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="dtype"):
        invariant_linear_triton(x, torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="unit stride"):
        invariant_linear_triton(torch.randn(8, 2).t(), torch.randn(4, 8))
    with pytest.raises(ValueError, match="bias"):
        invariant_linear_triton(x, torch.randn(4, 8), torch.randn(5))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_reference(out_dtype: torch.dtype, with_delta: bool) -> None:
    h = torch.randn(7, 576)
    delta = torch.randn(7, 576).to(torch.bfloat16) if with_delta else None
    weight = torch.rand(576) + 0.5
    h_ref = h.clone()
    got = add_rms_norm_triton(h, delta, weight, 1e-5, out_dtype)
    want = add_rms_norm_ref(h_ref, delta, weight, 1e-5, out_dtype)
    assert torch.equal(h, h_ref)  # the residual stream took the same update
    assert_close_verbose(got.float(), want.float(), **TOL[out_dtype])
    alone = add_rms_norm_triton(h[3:4].clone(), None, weight, 1e-5, out_dtype)
    assert torch.equal(alone[0], add_rms_norm_triton(h.clone(), None, weight, 1e-5, out_dtype)[3])


def test_add_rms_norm_rejects_bad_layouts() -> None:
    with pytest.raises(ValueError, match="float32"):
        add_rms_norm_triton(
            torch.randn(2, 8, dtype=torch.float64), None, torch.ones(8), 1e-5, torch.float32
        )
    with pytest.raises(ValueError, match="delta"):
        add_rms_norm_triton(
            torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-5, torch.float32
        )
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm_triton(torch.randn(2, 8), None, torch.ones(9), 1e-5, torch.float32)


def _cache(
    blocks: int, block_size: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (blocks, block_size, kv_heads, dim)
    return (
        torch.randn(shape, device=device).to(dtype),
        torch.randn(shape, device=device).to(dtype),
    )


def test_token_layout_lists_each_tokens_visible_new_tokens() -> None:
    # Sequence 0: a tree of 4 (root; 1, 2 under it; 3 under 1); sequence 1: one decode row.
    tree = torch.zeros(5, 4, dtype=torch.bool)
    tree[:4] = ancestor_mask([-1, 0, 0, 1])
    tree[4, 0] = True
    qsl = torch.tensor([0, 4, 5], dtype=I32)
    seq, ctx, seen, tail = token_layout(qsl, torch.tensor([14, 31], dtype=I32), tree, 5)
    assert seq.tolist() == [0, 0, 0, 0, 1]
    assert ctx.tolist() == [10, 10, 10, 10, 30]
    assert seen.tolist() == [1, 2, 2, 3, 1]  # depth + 1: the position is ctx + depth
    assert [row[:n] for row, n in zip(tail.tolist(), seen.tolist(), strict=True)] == [
        [0], [0, 1], [0, 2], [0, 1, 3], [0],
    ]  # fmt: skip
    _, ctx, seen, tail = token_layout(qsl, torch.tensor([14, 31], dtype=I32), None, 5)
    assert seen.tolist() == [1, 2, 3, 4, 1] and ctx.tolist() == [10, 10, 10, 10, 30]
    assert [row[:n] for row, n in zip(tail.tolist(), seen.tolist(), strict=True)] == [
        [0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0],
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim", [(6, 2, 64), (4, 4, 48)])
def test_attention_matches_reference_causal(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int
) -> None:
    """Prefill from zero, a chunk after context, and decode past a split boundary."""
    k_cache, v_cache = _cache(120, 16, kv_heads, dim, dtype)
    tables = torch.randperm(120)[:117].view(3, 39).to(I32)
    num_q, lens = [9, 5, 1], [9, 40, SPLIT_KEYS + 90]
    qsl = torch.tensor([0, 9, 14, 15], dtype=I32)
    q = torch.randn(15, heads, dim).to(dtype)
    seq_lens = torch.tensor(lens, dtype=I32)
    got = invariant_paged_attention_triton(q, k_cache, v_cache, tables, qsl, seq_lens, 0.2)
    want = _paged_attention_loop(q, k_cache, v_cache, tables, qsl, seq_lens, 0.2)
    assert sum(num_q) == got.shape[0]
    assert_close_verbose(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_reference_tree(dtype: torch.dtype) -> None:
    parents = [-1, 0, 0, 1, 1, 2, 3, 6]
    k_cache, v_cache = _cache(80, 16, 2, 64, dtype)
    tables = torch.randperm(80)[:76].view(2, 38).to(I32)
    n = len(parents)
    mask = torch.zeros(n + 1, n, dtype=torch.bool)
    mask[:n] = ancestor_mask(parents)
    mask[n, 0] = True  # sequence 1 decodes one token in the same step
    qsl = torch.tensor([0, n, n + 1], dtype=I32)
    seq_lens = torch.tensor([SPLIT_KEYS - 3 + n, 77], dtype=I32)  # tree crosses a split
    q = torch.randn(n + 1, 8, 64).to(dtype)
    got = invariant_paged_attention_triton(q, k_cache, v_cache, tables, qsl, seq_lens, 0.2, mask)
    want = _paged_attention_loop(q, k_cache, v_cache, tables, qsl, seq_lens, 0.2, mask)
    assert_close_verbose(got.float(), want.float(), **TOL[dtype])


def _copy_positions(
    src: tuple[torch.Tensor, torch.Tensor],
    src_table: torch.Tensor,
    src_pos: list[int],
    dst: tuple[torch.Tensor, torch.Tensor],
    dst_table: torch.Tensor,
    dst_pos: list[int],
) -> None:
    """dst's positions dst_pos[i] (through dst_table) := src's src_pos[i], K and V, one copy."""
    bs = src[0].shape[1]

    def slots(table: torch.Tensor, pos: list[int]) -> torch.Tensor:
        p = torch.tensor(pos, device=table.device)
        return table.long()[p // bs] * bs + p % bs

    for s, d in zip(src, dst, strict=True):
        d.view(-1, *d.shape[2:])[slots(dst_table, dst_pos)] = s.view(-1, *s.shape[2:])[
            slots(src_table, src_pos)
        ]


def _check_tree_equals_sequential_decoding(device: str, ctx: int) -> None:
    """Verify a tree in one call; then, per node, decode it alone after its ancestors laid out
    at consecutive positions in other blocks (what acceptance leaves): the same bits."""
    parents = [-1, 0, 0, 1, 1, 2, 3, 6, 7]
    n, bs, dtype = len(parents), 16, torch.bfloat16
    pages = (ctx + n) // bs + 1
    cache = _cache(2 * pages + 2, bs, 2, 64, dtype, device)
    perm = torch.randperm(2 * pages + 2, device=device).to(I32)
    table, other = perm[:pages], perm[pages : 2 * pages]
    q = torch.randn(n, 8, 64, device=device).to(dtype)
    one = torch.tensor([0, 1], dtype=I32, device=device)
    verified = invariant_paged_attention_triton(
        q, *cache, table[None], torch.tensor([0, n], dtype=I32, device=device),
        torch.tensor([ctx + n], dtype=I32, device=device), 0.125,
        ancestor_mask(parents).to(device),
    )  # fmt: skip
    for node in range(n):
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path.reverse()
        laid_out = (cache[0].clone(), cache[1].clone())
        src = [*range(ctx), *(ctx + member for member in path)]
        _copy_positions(cache, table, src, laid_out, other, list(range(ctx + len(path))))
        alone = invariant_paged_attention_triton(
            q[node : node + 1], *laid_out, other[None], one,
            torch.tensor([ctx + len(path)], dtype=I32, device=device), 0.125,
        )  # fmt: skip
        assert torch.equal(alone[0], verified[node]), f"node {node} (depth {len(path) - 1})"


@pytest.mark.parametrize("ctx", [37, SPLIT_KEYS - 4])  # the second crosses a split boundary
def test_tree_rows_equal_sequential_decoding(ctx: int) -> None:
    _check_tree_equals_sequential_decoding("cpu", ctx)


def test_a_sequences_rows_do_not_depend_on_its_batch() -> None:
    k_cache, v_cache = _cache(60, 16, 2, 64, torch.bfloat16)
    tables = torch.randperm(60)[:60].view(3, 20).to(I32)
    q = torch.randn(12, 8, 64).to(torch.bfloat16)
    lens = torch.tensor([100, 300, 57], dtype=I32)
    together = invariant_paged_attention_triton(
        q, k_cache, v_cache, tables, torch.tensor([0, 4, 11, 12], dtype=I32), lens, 0.125
    )
    alone = invariant_paged_attention_triton(
        q[4:11], k_cache, v_cache, tables[1:2], torch.tensor([0, 7], dtype=I32), lens[1:2], 0.125
    )
    assert torch.equal(alone, together[4:11])


@pytest.mark.gpu
def test_invariance_on_gpu() -> None:
    _check_linear_rows_invariant("cuda")
    for ctx in (37, SPLIT_KEYS - 4, 3000):
        _check_tree_equals_sequential_decoding("cuda", ctx)
    h = torch.randn(81, 576, device="cuda")
    weight = torch.rand(576, device="cuda")
    whole = add_rms_norm_triton(h.clone(), None, weight, 1e-5, torch.bfloat16)
    assert torch.equal(
        add_rms_norm_triton(h[5:6].clone(), None, weight, 1e-5, torch.bfloat16)[0], whole[5]
    )
