"""paged_decode_attention.cpp (bf16, AVX512-BF16) and paged_decode_attention_f32.cpp
(float32, AVX2 + FMA) against float64 attention and the SDPA reference; batch invariance;
when paged_attention dispatches to them. Each test runs for every dtype whose kernel builds
on this CPU."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels import paged_attention as pa
from slipstream.kernels.cpu.paged_decode_attention import (
    MAX_QUERY_ROWS,
    decode_attention_unavailable_reason,
    paged_decode_attention,
)
from slipstream.kernels.paged_attention import paged_attention, paged_attention_ref
from tests.kernels.test_paged_attention import (
    ALL_CASES,
    SCALE,
    PagedBatch,
    _case,
    build_batch,
    naive_attention,
    other_layer,
    path_to,
    random_batch,
)
from tests.kernels.tolerances import TOL, assert_close_verbose

BF16 = torch.bfloat16


def _kernel_dtypes() -> list[object]:
    params = []
    for dtype in (BF16, torch.float32):
        reason = decode_attention_unavailable_reason(dtype)
        mark = pytest.mark.skipif(reason is not None, reason=f"{dtype}: {reason}")
        params.append(pytest.param(dtype, marks=mark, id=str(dtype).removeprefix("torch.")))
    return params


@pytest.fixture(params=_kernel_dtypes())
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """The dtype of queries and caches (each kernel's own)."""
    return request.param  # type: ignore[no-any-return]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(6, 2), (3, 3), (8, 1)])
@pytest.mark.parametrize("name", ALL_CASES)
def test_matches_float64_attention(
    name: str, heads: tuple[int, int], head_dim: int, dtype: torch.dtype
) -> None:
    num_q, seq_lens, tree = _case(name)
    batch = random_batch(num_q, seq_lens, *heads, head_dim=head_dim, dtype=dtype, tree=tree)
    out = batch.run(paged_decode_attention)
    assert out.dtype == dtype and out.shape == batch.q.shape
    assert_close_verbose(out, naive_attention(batch), **TOL[dtype])


@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 48, 300, 1100])
def test_long_and_boundary_contexts(seq_len: int, dtype: torch.dtype) -> None:
    # 16-key tiles, their tail, several pages; block_size 16 and 5 (tiles span pages).
    for block_size in (16, 5):
        batch = random_batch([1], [seq_len], 9, 3, 64, block_size, dtype=dtype)
        assert_close_verbose(
            batch.run(paged_decode_attention), naive_attention(batch), **TOL[dtype]
        )


def test_large_scores_do_not_overflow(dtype: torch.dtype) -> None:
    batch = random_batch([3], [40], 2, 1, 64, dtype=dtype, tree=True)
    batch.q.mul_(30)  # scores in the hundreds: exp must be taken after subtracting the max
    out = batch.run(paged_decode_attention)
    assert torch.isfinite(out).all()
    assert_close_verbose(out, naive_attention(batch), **TOL[dtype])


def test_strided_queries_as_the_model_passes_them(dtype: torch.dtype) -> None:
    # The model's q is a view into q|k rows: token stride (H + KV) * D, head stride D.
    batch = random_batch([2, 1], [20, 9], 6, 2, 64, dtype=dtype)
    wide = torch.randn(batch.q.shape[0], 8, 64).to(dtype)
    wide[:, :6] = batch.q
    q = wide[:, :6]
    assert not q.is_contiguous()
    args = (q, *batch.args()[1:])
    assert torch.equal(paged_decode_attention(*args, SCALE), batch.run(paged_decode_attention))


def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    qs = [torch.randn(n, 6, 64, generator=gen).to(dtype) for n in (1, 5, 3)]
    keys = [torch.randn(n, 2, 64, generator=gen).to(dtype) for n in (40, 77, 9)]
    values = [torch.randn(n, 2, 64, generator=gen).to(dtype) for n in (40, 77, 9)]
    trees = [[-1], [-1, 0, 0, 1, 2], [-1, 0, 1]]
    together = build_batch(qs, keys, values, 16, trees).run(paged_decode_attention)
    alone = build_batch(qs[1:2], keys[1:2], values[1:2], 16, trees[1:2])
    assert torch.equal(together[1:6], alone.run(paged_decode_attention))


@pytest.mark.parametrize("tree", [False, True])
def test_a_long_prefill_in_the_step_leaves_the_other_rows_their_bits(
    dtype: torch.dtype, tree: bool
) -> None:
    # A prefill chunk over MAX_QUERY_ROWS rows takes the reference; the decode row and the
    # draft tree beside it keep the kernel's bits, as in a step of their own.
    gen = torch.Generator().manual_seed(1)
    num_q = (1, MAX_QUERY_ROWS + 3, 5)
    lens = (40, MAX_QUERY_ROWS + 20, 77)
    qs = [torch.randn(n, 6, 64, generator=gen).to(dtype) for n in num_q]
    keys = [torch.randn(n, 2, 64, generator=gen).to(dtype) for n in lens]
    values = [torch.randn(n, 2, 64, generator=gen).to(dtype) for n in lens]
    causal = [-1, *range(num_q[1] - 1)]  # the prefill chunk as a one-branch tree
    trees = [[-1], causal, [-1, 0, 0, 1, 2]] if tree else None

    def part(which: list[int]) -> PagedBatch:
        return build_batch(
            [qs[b] for b in which],
            [keys[b] for b in which],
            [values[b] for b in which],
            16,
            None if trees is None else [trees[b] for b in which],
        )

    together = part([0, 1, 2]).run(paged_attention)
    few = part([0, 2]).run(paged_decode_attention)
    assert torch.equal(together[:1], few[:1])
    assert torch.equal(together[1 + num_q[1] :], few[1:])
    assert torch.equal(together[1 : 1 + num_q[1]], part([1]).run(paged_attention_ref))
    # A step plan keeps the split for the step's other layers.
    plan: dict[str, object] = {}
    whole = part([0, 1, 2])
    assert torch.equal(whole.run(lambda *a: paged_attention(*a, plan)), together)
    assert plan["pa_cpu_kernel"] is False and plan["pa_split"] is not None


def test_dispatch_takes_the_kernel_for_few_rows_only(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    calls: list[int] = []

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return paged_decode_attention(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pa, "paged_decode_attention", counted)
    few = random_batch([1, 4], [30, 12], 6, 2, 64, dtype=dtype, tree=True)
    many = random_batch([MAX_QUERY_ROWS + 1], [MAX_QUERY_ROWS + 1], 6, 2, 64, dtype=dtype)
    odd_head = random_batch([1], [30], 6, 2, 32, dtype=dtype)
    half = random_batch([1], [30], 6, 2, 64, dtype=torch.float16)  # no kernel takes it
    assert_close_verbose(few.run(paged_attention), few.run(paged_attention_ref), **TOL[dtype])
    assert len(calls) == 1
    for batch in (many, odd_head, half):
        batch.run(paged_attention)
    assert len(calls) == 1  # the reference ran those
    monkeypatch.setenv("SLIPSTREAM_KERNELS", "torch")
    few.run(paged_attention)
    monkeypatch.setenv("SLIPSTREAM_KERNELS", "auto")
    monkeypatch.setenv("SLIPSTREAM_CPU_KERNELS", "0")
    few.run(paged_attention)
    assert len(calls) == 1
    # With a step plan the choice is made once and reused by every layer.
    monkeypatch.delenv("SLIPSTREAM_CPU_KERNELS")
    plan: dict[str, object] = {}
    few.run(lambda *a: paged_attention(*a, plan))
    few.run(lambda *a: paged_attention(*a, plan))
    assert len(calls) == 3 and plan["pa_cpu_kernel"] is True


def test_bad_arguments_raise(dtype: torch.dtype) -> None:
    batch = random_batch([1], [20], 6, 2, 64, dtype=dtype)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(batch.q[..., :32], *batch.args()[1:], SCALE)
    other = torch.float32 if dtype == BF16 else BF16
    with pytest.raises(ValueError, match="all bf16 or all float32"):
        paged_decode_attention(batch.q.to(other), *batch.args()[1:], SCALE)
    with pytest.raises(ValueError, match="all bf16 or all float32"):
        paged_decode_attention(batch.q.half(), *batch.args()[1:], SCALE)


def test_a_step_plan_is_reused_by_later_layers(dtype: torch.dtype) -> None:
    first = random_batch([2, 1], [20, 9], 6, 2, 64, dtype=dtype, tree=True)
    second = other_layer(first, [2, 1], [20, 9], 6, 2, 64, dtype=dtype, tree=True)
    plan: dict[str, object] = {}
    paged_decode_attention(*first.args(), SCALE, first.tree_mask, plan)
    reused = paged_decode_attention(*second.args(), SCALE, second.tree_mask, plan)
    assert torch.equal(reused, paged_decode_attention(*second.args(), SCALE, second.tree_mask))
    assert "pda_meta" in plan


TEN_NODES = [-1, 0, 0, 1, 1, 2, 5, 3, 7, 0]
# 20 nodes: more than the float32 kernel's 16 rows a shared item (two groups of rows).
TWENTY_NODES = [-1, 0, 0, 1, 1, 2, 5, 3, 7, 0, 9, 9, 4, 12, 6, 14, 8, 16, 10, 18]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    ("parents", "ctx"),
    [(TEN_NODES, 140), (TEN_NODES, 300), (TWENTY_NODES, 270), ([-1, 0, 1], 40)],
)
def test_a_tree_node_gets_the_bits_of_decoding_it_alone(
    dtype: torch.dtype, parents: list[int], ctx: int, head_dim: int
) -> None:
    # Verification computes what decoding would: node i's output equals a one-row decode of
    # that token with the context and its ancestors cached at consecutive positions. 140
    # cached keys: the rows' keys cross a 128-key chunk at different points; 270-300: two
    # chunks of cached keys only, which the float32 kernel reads once for all rows; a
    # 3-node chain over 40 keys: one chunk, ending in the rows' own keys. Both head sizes.
    gen = torch.Generator().manual_seed(5)
    n = len(parents)
    q = torch.randn(n, 6, head_dim, generator=gen).to(dtype)
    k = torch.randn(ctx + n, 2, head_dim, generator=gen).to(dtype)
    v = torch.randn(ctx + n, 2, head_dim, generator=gen).to(dtype)
    tree = build_batch([q], [k], [v], 16, [parents]).run(paged_decode_attention)
    for node in range(n):
        path = path_to(parents, node)
        idx = torch.tensor([*range(ctx), *(ctx + i for i in path)])
        alone = build_batch([q[node : node + 1]], [k[idx]], [v[idx]], 16)
        assert torch.equal(tree[node], alone.run(paged_decode_attention)[0]), node
