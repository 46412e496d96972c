"""Paged attention: the loop reference vs naive dense math, the fast reference vs the loop,
and the Triton kernel (interpreter on CPU) vs the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from slipstream.kernels import paged_attention_torch as pa_torch
from slipstream.kernels.paged_attention import (
    _paged_attention_loop,
    paged_attention,
    paged_attention_ref,
    paged_attention_triton,
)
from tests.kernels.tolerances import TOL, assert_close_verbose

SCALE = 0.3


@dataclass
class PagedBatch:
    """A batch in the op's paged layout, plus each sequence's contiguous K/V for checking."""

    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    tree_mask: torch.Tensor | None  # [num_tokens, max_query_len] bool
    keys: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim]
    values: list[torch.Tensor]
    masks: list[torch.Tensor]  # per sequence [num_q, num_q] bool among the new tokens

    def args(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positional arguments of the op, scale and tree mask included."""
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.query_start_loc,
            self.seq_lens,
        )

    def run(self, op) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """Call one of the paged attention ops on this batch."""
        return op(*self.args(), SCALE, self.tree_mask)


def tree_mask_of(parents: list[int]) -> torch.Tensor:  # [n, n] bool
    """Ancestor-or-self mask of a tree given each node's parent (-1 = child of the context)."""
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def build_batch(
    qs: list[torch.Tensor],  # per sequence [num_q, num_heads, head_dim]
    keys: list[torch.Tensor],  # per sequence [seq_len, num_kv_heads, head_dim]
    values: list[torch.Tensor],
    block_size: int,
    trees: list[list[int]] | None = None,
) -> PagedBatch:
    """Scatter each sequence's K/V into shuffled pages; unwritten slots hold NaN."""
    num_kv_heads, head_dim = keys[0].shape[1:]
    dtype, device = keys[0].dtype, keys[0].device
    pages = [(k.shape[0] + block_size - 1) // block_size for k in keys]
    total = sum(pages) + 2  # spare pages, never referenced
    shape = (total, block_size, num_kv_heads, head_dim)
    # NOTE: NaN everywhere else makes any read of an unwritten slot show up in the output.
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    order = torch.randperm(total).tolist()
    block_tables = torch.zeros(len(keys), max(max(pages), 1) + 1, dtype=torch.int32)
    for b, (k, v) in enumerate(zip(keys, values, strict=True)):
        ids = [order.pop() for _ in range(pages[b])]
        block_tables[b, : pages[b]] = torch.tensor(ids, dtype=torch.int32)
        for j in range(k.shape[0]):
            k_cache[ids[j // block_size], j % block_size] = k[j]
            v_cache[ids[j // block_size], j % block_size] = v[j]
    num_q = [q.shape[0] for q in qs]
    starts = torch.tensor([0, *num_q]).cumsum(0).to(torch.int32)
    masks = [torch.ones(n, n, dtype=torch.bool).tril() for n in num_q]
    tree_mask = None
    if trees is not None:
        masks = [tree_mask_of(parents) for parents in trees]
        tree_mask = torch.zeros(sum(num_q), max(num_q), dtype=torch.bool)
        for b, m in enumerate(masks):
            tree_mask[int(starts[b]) : int(starts[b + 1]), : m.shape[0]] = m
        tree_mask = tree_mask.to(device)
    return PagedBatch(
        q=torch.cat(qs).to(device),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables.to(device),
        query_start_loc=starts.to(device),
        seq_lens=torch.tensor([k.shape[0] for k in keys], dtype=torch.int32, device=device),
        tree_mask=tree_mask,
        keys=keys,
        values=values,
        masks=masks,
    )


def random_batch(
    num_q: list[int],
    seq_lens: list[int],
    num_heads: int = 6,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    tree: bool = False,
) -> PagedBatch:
    """Random q/K/V; with tree=True each sequence's new tokens form a random tree."""
    qs = [torch.randn(n, num_heads, head_dim, dtype=dtype, device=device) for n in num_q]
    keys = [torch.randn(L, num_kv_heads, head_dim, dtype=dtype, device=device) for L in seq_lens]
    values = [torch.randn_like(k) for k in keys]
    trees = None
    if tree:
        trees = [[-1] + [int(torch.randint(-1, i, ()).item()) for i in range(1, n)] for n in num_q]
    return build_batch(qs, keys, values, block_size, trees)


def other_layer(first: PagedBatch, *args: Any, **kwargs: Any) -> PagedBatch:
    """A batch for another layer of `first`'s step: random_batch(*args, **kwargs) for new q,
    with first's block tables and tree mask and fresh random caches."""
    second = random_batch(*args, **kwargs)
    second.block_tables, second.tree_mask = first.block_tables, first.tree_mask
    second.k_cache, second.v_cache = (
        torch.randn_like(first.k_cache),
        torch.randn_like(first.v_cache),
    )
    return second


def path_to(parents: list[int], node: int) -> list[int]:
    """The tree nodes from the root down to `node` (parents[i] = -1 for a root)."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def naive_attention(batch: PagedBatch) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Float64 attention from contiguous K/V, head by head, spelled out from the docstring."""
    out = torch.zeros(batch.q.shape, dtype=torch.float64)
    starts = batch.query_start_loc.tolist()
    num_heads = batch.q.shape[1]
    for b, (k, v) in enumerate(zip(batch.keys, batch.values, strict=True)):
        s, e = starts[b], starts[b + 1]
        num_q, seq_len = e - s, k.shape[0]
        if num_q == 0:
            continue
        visible = torch.ones(num_q, seq_len, dtype=torch.bool)
        visible[:, seq_len - num_q :] = batch.masks[b]
        group = num_heads // k.shape[1]
        for h in range(num_heads):
            q_h = batch.q[s:e, h].double().cpu()
            k_h, v_h = k[:, h // group].double().cpu(), v[:, h // group].double().cpu()
            scores = (q_h @ k_h.T * SCALE).masked_fill(~visible, float("-inf"))
            out[s:e, h] = scores.softmax(-1) @ v_h
    return out


# (num_q per sequence, seq_len per sequence); block_size 16 throughout
CASES = {
    "decode_one_block": ([1], [16]),
    "decode_block_plus_one": ([1], [17]),
    "decode_batch": ([1, 1, 1], [5, 16, 33]),
    "prefill_one_block": ([16], [16]),
    "prefill_odd": ([7], [7]),
    "chunked_prefill": ([5], [21]),
    "mixed": ([3, 1, 6], [3, 40, 17]),
    "empty_seq": ([0, 2], [5, 9]),
}
TREE_CASES = {
    "tree_one": ([6], [22]),
    "tree_batch": ([4, 5], [16, 9]),
    "tree_decode": ([1, 1], [17, 3]),
}
GQA = {"gqa1": (2, 2), "gqa3": (6, 2)}
DTYPES = [torch.float32, torch.bfloat16]


def _case(name: str) -> tuple[list[int], list[int], bool]:
    if name in CASES:
        return (*CASES[name], False)
    return (*TREE_CASES[name], True)


ALL_CASES = [*CASES, *TREE_CASES]


@pytest.mark.parametrize("name", ALL_CASES)
def test_loop_reference_matches_naive_dense(name: str) -> None:
    """The ground truth itself: paged gather + SDPA equals float64 math on contiguous K/V."""
    num_q, seq_lens, tree = _case(name)
    batch = random_batch(num_q, seq_lens, tree=tree)
    expected = naive_attention(batch)
    assert_close_verbose(batch.run(_paged_attention_loop), expected, **TOL[torch.float32])


@pytest.mark.parametrize("path", ["auto", "padded", "per_seq"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", list(GQA))
@pytest.mark.parametrize("name", ALL_CASES)
def test_fast_reference_matches_loop(
    monkeypatch: pytest.MonkeyPatch, name: str, gqa: str, dtype: torch.dtype, path: str
) -> None:
    """Every CPU fast path (single sequence, padded batch, per-sequence loop) = the loop."""
    ratio = {"auto": pa_torch._MAX_PAD_RATIO, "padded": float("inf"), "per_seq": 0.0}[path]
    monkeypatch.setattr(pa_torch, "_MAX_PAD_RATIO", ratio)
    num_q, seq_lens, tree = _case(name)
    heads, kv_heads = GQA[gqa]
    batch = random_batch(num_q, seq_lens, heads, kv_heads, dtype=dtype, tree=tree)
    out = batch.run(paged_attention_ref)
    assert out.dtype == dtype and out.shape == batch.q.shape
    num_tokens = int(batch.query_start_loc[-1])
    assert torch.isfinite(out[:num_tokens]).all()
    assert_close_verbose(out, batch.run(_paged_attention_loop), **TOL[dtype])


@pytest.mark.parametrize("name", ALL_CASES)
def test_plan_shared_across_layers_gives_the_same_output(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A plan built in "layer 1" is reused in "layer 2" with other q/K/V, same metadata."""
    monkeypatch.setattr(pa_torch, "_MAX_PAD_RATIO", float("inf"))  # force the cached padded path
    num_q, seq_lens, tree = _case(name)
    first = random_batch(num_q, seq_lens, tree=tree)
    second = other_layer(first, num_q, seq_lens, tree=tree)
    plan: dict[str, object] = {}
    paged_attention_ref(*first.args(), SCALE, first.tree_mask, plan)
    reused = paged_attention_ref(*second.args(), SCALE, second.tree_mask, plan)
    fresh = paged_attention_ref(*second.args(), SCALE, second.tree_mask)
    num_tokens = int(first.query_start_loc[-1])
    assert torch.equal(reused[:num_tokens], fresh[:num_tokens])
    assert "pa_starts" in plan


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", list(GQA))
def test_long_chunk_after_cached_keys_matches_loop(
    monkeypatch: pytest.MonkeyPatch, gqa: str, dtype: torch.dtype, flash: bool
) -> None:
    """A chunk of >= _SPLIT_CHUNK_ROWS new tokens after cached ones (chunked prefill) attends
    in two unmasked parts merged by log-sum-exp where torch has the CPU flash kernel, with
    one masked call where it has not; both equal the loop. Shorter chunks keep the mask."""
    if flash and pa_torch._FLASH_WITH_LSE is None:
        pytest.skip("this torch has no _scaled_dot_product_flash_attention_for_cpu")
    if not flash:
        monkeypatch.setattr(pa_torch, "_FLASH_WITH_LSE", None)
    calls: list[int] = []
    split = pa_torch._attend_chunk

    def counted(q: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(q.shape[0])
        return split(q, *args)

    monkeypatch.setattr(pa_torch, "_attend_chunk", counted)
    # each sequence on its own, as long ones go
    monkeypatch.setattr(pa_torch, "_MAX_PAD_RATIO", 0.0)
    heads, kv_heads = GQA[gqa]
    n = pa_torch._SPLIT_CHUNK_ROWS
    # A long chunk after 173 cached keys, then one just under the threshold after 40.
    batch = random_batch([n + 44, n - 1], [n + 44 + 173, n - 1 + 40], heads, kv_heads, dtype=dtype)
    out = batch.run(paged_attention_ref)
    assert calls == ([n + 44] if flash else [])
    assert_close_verbose(out, batch.run(_paged_attention_loop), **TOL[dtype])


def test_fast_reference_ignores_trailing_padding_tokens() -> None:
    """Rows past query_start_loc[-1] (a padded batch) are left alone and do not break it."""
    batch = random_batch([1, 1], [20, 7])
    q = torch.cat([batch.q, torch.randn(3, *batch.q.shape[1:])])
    args = (q, *batch.args()[1:])
    out = paged_attention_ref(*args, SCALE)
    assert_close_verbose(out[:2], _paged_attention_loop(*args, SCALE)[:2], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", list(GQA))
@pytest.mark.parametrize("name", ALL_CASES)
def test_triton_matches_reference(name: str, gqa: str, dtype: torch.dtype, device: str) -> None:
    """The kernel (interpreter on CPU) matches the reference over boundaries, masks, GQA."""
    num_q, seq_lens, tree = _case(name)
    heads, kv_heads = GQA[gqa]
    batch = random_batch(num_q, seq_lens, heads, kv_heads, dtype=dtype, device=device, tree=tree)
    out = batch.run(paged_attention_triton)
    assert out.dtype == dtype
    assert_close_verbose(out, batch.run(paged_attention_ref), **TOL[dtype])


@pytest.mark.parametrize("name", ALL_CASES)
def test_triton_split_keys_match_reference(name: str, device: str) -> None:
    """The keys shared out over 2 and 3 programs per (seq, KV head, q block), merged by the
    combine kernel: every case (some splits get no keys) gives the reference."""
    num_q, seq_lens, tree = _case(name)
    batch = random_batch(num_q, seq_lens, 6, 2, device=device, tree=tree)
    ref = batch.run(paged_attention_ref)
    for splits in (2, 3):
        out = paged_attention_triton(*batch.args(), SCALE, batch.tree_mask, splits)
        assert_close_verbose(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("head_dim", [40, 16])
def test_triton_odd_head_dim_and_block_size(head_dim: int, device: str) -> None:
    """Head dims that are not a power of two, pages that are not (block_size 6)."""
    batch = random_batch([3, 1], [14, 6], 3, 1, head_dim, block_size=6, device=device)
    assert_close_verbose(
        batch.run(paged_attention_triton), batch.run(paged_attention_ref), **TOL[torch.float32]
    )


@pytest.mark.parametrize("op", ["ref", "triton"])
def test_tree_paths_equal_causal_chains(op: str, device: str) -> None:
    """Each root-to-leaf path of a verified tree gives the outputs of that path run alone."""
    fn = {"ref": paged_attention_ref, "triton": paged_attention_triton}[op]
    heads, kv_heads, head_dim, ctx = 6, 2, 32, 13
    parents = [-1, 0, 0, 1, 1, 2, 5, -1]  # two roots; leaves 3, 4, 6, 7
    n = len(parents)
    q = torch.randn(n, heads, head_dim, device=device)
    k = torch.randn(ctx + n, kv_heads, head_dim, device=device)
    v = torch.randn_like(k)
    tree = build_batch([q], [k], [v], block_size=4, trees=[parents])
    tree_out = tree.run(fn)
    leaves = [i for i in range(n) if i not in parents]
    for leaf in leaves:
        path = path_to(parents, leaf)
        idx = torch.tensor([*range(ctx), *(ctx + i for i in path)], device=device)
        chain = build_batch([q[path]], [k[idx]], [v[idx]], block_size=4)
        assert_close_verbose(tree_out[path], chain.run(fn), **TOL[torch.float32])


def test_dispatch_follows_backend_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLIPSTREAM_KERNELS=triton runs the kernel on CPU tensors, =torch the reference."""
    batch = random_batch([2, 1], [9, 17])
    expected = batch.run(paged_attention_ref)
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SLIPSTREAM_KERNELS", backend)
        assert_close_verbose(batch.run(paged_attention), expected, **TOL[torch.float32])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "q": a["q"][..., :8]}, "head_dim"),
        (lambda a: {**a, "q": a["q"][:, :5]}, "multiple"),
        (lambda a: {**a, "v_cache": a["v_cache"][:-1]}, "v_cache"),
        (lambda a: {**a, "q": a["q"].transpose(1, 2).contiguous().transpose(1, 2)}, "stride"),
        (lambda a: {**a, "q": a["q"].to(torch.int32)}, "dtypes"),
        (lambda a: {**a, "seq_lens": a["seq_lens"].float()}, "seq_lens"),
        (lambda a: {**a, "query_start_loc": a["query_start_loc"][:-1]}, "query_start_loc"),
        (lambda a: {**a, "block_tables": a["block_tables"][:1]}, "block_tables"),
        (lambda a: {**a, "tree_mask": torch.ones(3, 2, dtype=torch.bool)}, "tree_mask"),
        (lambda a: {**a, "tree_mask": torch.ones(4, 2, dtype=torch.int8)}, "tree_mask"),
    ],
)
def test_triton_launcher_rejects_bad_arguments(change, message: str) -> None:  # type: ignore[no-untyped-def]
    """Wrong shapes, strides or dtypes raise ValueError naming the problem, before launch."""
    batch = random_batch([3, 1], [5, 9])
    names = ["q", "k_cache", "v_cache", "block_tables", "query_start_loc", "seq_lens"]
    kwargs = {**dict(zip(names, batch.args(), strict=True)), "tree_mask": None}
    with pytest.raises(ValueError, match=message):
        paged_attention_triton(**change(kwargs), scale=SCALE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "num_q, seq_lens, tree",
    [
        ([1] * 8, [4096, 1, 300, 17, 2048, 64, 65, 1000], False),
        ([512], [700], False),
        ([9, 9], [1500, 40], True),
    ],
)
def test_triton_matches_reference_on_gpu(
    num_q: list[int], seq_lens: list[int], tree: bool, dtype: torch.dtype
) -> None:
    """Realistic sizes on the GPU (real tl.dot, real bf16), 9 heads over 3 KV heads, dim 64."""
    batch = random_batch(num_q, seq_lens, 9, 3, 64, dtype=dtype, device="cuda", tree=tree)
    ref = batch.run(paged_attention_ref)
    for splits in (None, 1, 5):  # None: the launcher's own choice for the card
        out = paged_attention_triton(*batch.args(), SCALE, batch.tree_mask, splits)
        assert_close_verbose(out, ref, **TOL[dtype])
