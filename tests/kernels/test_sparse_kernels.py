"""Sparse-attention kernels: block-sparse paged attention, HiP mask search, page mean keys.

Each reference is checked against plain math (a masked SDPA loop, a recursive search, a
mean), then each Triton kernel (interpreter on CPU) against its reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slipstream.kernels.hip_mask import hip_mask_ref, hip_mask_triton
from slipstream.kernels.page_summaries import (
    page_key_bounds_ref,
    page_key_bounds_triton,
    page_mean_keys_ref,
    page_mean_keys_triton,
)
from slipstream.kernels.paged_attention import paged_attention_ref
from slipstream.kernels.sparse_paged_attention import (
    sparse_paged_attention_ref,
    sparse_paged_attention_triton,
)
from tests.kernels.tolerances import TOL, assert_close_verbose

SCALE = 0.25


def _batch(
    lens: list[int],
    num_q: list[int],
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    block_size: int = 4,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random paged K/V with shuffled block tables, and one query per new token."""
    max_blocks = max((n + block_size - 1) // block_size for n in lens)
    num_blocks = max_blocks * len(lens) + 3
    perm = torch.randperm(num_blocks)[: max_blocks * len(lens)]
    qsl = [0]
    for n in num_q:
        qsl.append(qsl[-1] + n)
    return {
        "q": torch.randn(qsl[-1], heads, head_dim, dtype=dtype),
        "k_cache": torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype),
        "v_cache": torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype),
        "block_tables": perm.view(len(lens), max_blocks).int(),
        "query_start_loc": torch.tensor(qsl, dtype=torch.int32),
        "seq_lens": torch.tensor(lens, dtype=torch.int32),
    }


def _random_chunks(lens: list[int], num_q: list[int], kv_heads: int, chunk: int) -> torch.Tensor:
    """Each (seq, kv head) keeps a random half of its cached chunks, shuffled, -1 padded."""
    rows: list[list[list[int]]] = []
    for seq_len, n in zip(lens, num_q, strict=True):
        total = -(-(seq_len - n) // chunk)
        per_head: list[list[int]] = []
        for _ in range(kv_heads):
            perm = torch.randperm(total)[: max(1, total // 2)] if total else torch.empty(0)
            per_head.append(perm.long().tolist())
        rows.append(per_head)
    width = max(len(h) for r in rows for h in r) + 2
    out = torch.full((len(lens), kv_heads, width), -1, dtype=torch.long)
    for b, per_head in enumerate(rows):
        for h, keep in enumerate(per_head):
            out[b, h, : len(keep)] = torch.tensor(keep, dtype=torch.long)
    return out


def _naive(
    batch: dict[str, torch.Tensor],
    chunks: torch.Tensor,
    chunk: int,
    tree: torch.Tensor | None,
) -> torch.Tensor:
    """Per sequence and head: gather all keys, mask to the selected chunks + new tokens."""
    q, kc, vc = batch["q"], batch["k_cache"], batch["v_cache"]
    bs, kv_heads = kc.shape[1], kc.shape[2]
    group = q.shape[1] // kv_heads
    out = torch.zeros_like(q)
    qsl = batch["query_start_loc"].tolist()
    for b, seq_len in enumerate(batch["seq_lens"].tolist()):
        s, e = qsl[b], qsl[b + 1]
        n = e - s
        ctx = seq_len - n
        blocks = batch["block_tables"][b, : -(-seq_len // bs)].long()
        keys = kc[blocks].reshape(-1, kv_heads, kc.shape[3])[:seq_len]
        vals = vc[blocks].reshape(-1, kv_heads, kc.shape[3])[:seq_len]
        pos = torch.arange(seq_len)
        for h in range(q.shape[1]):
            g = h // group
            sel = set(chunks[b, g].tolist()) - {-1}
            mask = torch.zeros(n, seq_len, dtype=torch.bool)
            mask[:, :ctx] = torch.tensor([p // chunk in sel for p in range(ctx)], dtype=torch.bool)
            new = torch.ones(n, n).tril().bool() if tree is None else tree[s:e, :n]
            mask[:, ctx:] = new
            o = F.scaled_dot_product_attention(
                q[s:e, h].float().unsqueeze(0),
                keys[:, g].float().unsqueeze(0),
                vals[:, g].float().unsqueeze(0),
                attn_mask=mask.unsqueeze(0),
                scale=SCALE,
            )
            out[s:e, h] = o[0].to(q.dtype)
        del pos
    return out


def _call(op, batch: dict[str, torch.Tensor], chunks: torch.Tensor, chunk: int, tree=None, **kw):  # type: ignore[no-untyped-def]
    return op(
        batch["q"],
        batch["k_cache"],
        batch["v_cache"],
        batch["block_tables"],
        batch["query_start_loc"],
        batch["seq_lens"],
        chunks,
        chunk,
        SCALE,
        tree,
        **kw,
    )


def _tree(num_q: list[int]) -> torch.Tensor:
    """A two-branch tree per sequence: token i's parent is i - 2 (or the context)."""
    rows = sum(num_q)
    mask = torch.zeros(rows, max(num_q), dtype=torch.bool)
    start = 0
    for n in num_q:
        for i in range(n):
            j = i
            while j >= 0:
                mask[start + i, j] = True
                j -= 2
        start += n
    return mask


CASES = [
    ([13, 33, 9], [1, 1, 1], False),  # decode batch
    ([21], [1], False),  # batch-1 decode
    ([18, 27], [3, 5], True),  # tree verification
    ([16, 11], [4, 1], False),  # a causal chain next to a decode
]


@pytest.mark.parametrize("lens, num_q, is_tree", CASES)
@pytest.mark.parametrize("chunk", [2, 3, 4])  # 3 does not tile the 4-slot pages
def test_reference_matches_masked_dense_math(
    lens: list[int], num_q: list[int], is_tree: bool, chunk: int
) -> None:
    batch = _batch(lens, num_q)
    chunks = _random_chunks(lens, num_q, 2, chunk)
    tree = _tree(num_q) if is_tree else None
    expected = _naive(batch, chunks, chunk, tree)
    assert_close_verbose(
        _call(sparse_paged_attention_ref, batch, chunks, chunk, tree),
        expected,
        **TOL[torch.float32],
    )


def test_step_cache_is_reused_across_layers_with_different_chunks() -> None:
    # One step, two "layers": the same tables and lengths, different chunks and K/V. The
    # decode maps built by the first call serve the second, whose output must still match
    # the plain math for its own chunks.
    lens, num_q = [13, 33, 9, 20], [1, 1, 0, 1]  # one sequence without a new token
    tables = _batch(lens, num_q)["block_tables"]
    cache: dict[str, object] = {}
    built = None
    for _ in range(2):
        batch = {**_batch(lens, num_q), "block_tables": tables}
        chunks = _random_chunks(lens, num_q, 2, 2)
        got = sparse_paged_attention_ref(
            *(batch[k] for k in ("q", "k_cache", "v_cache", "block_tables")),
            batch["query_start_loc"],
            batch["seq_lens"],
            chunks,
            2,
            SCALE,
            None,
            cache,
        )
        assert list(cache) == ["sparse_decode:2"]
        built = built or cache["sparse_decode:2"]
        assert cache["sparse_decode:2"] is built
        assert_close_verbose(got, _naive(batch, chunks, 2, None), **TOL[torch.float32])


@pytest.mark.parametrize("lens, num_q, is_tree", CASES)
def test_all_chunks_selected_equals_paged_attention(
    lens: list[int], num_q: list[int], is_tree: bool
) -> None:
    batch = _batch(lens, num_q)
    width = max(lens)
    chunks = torch.arange(width).expand(len(lens), 2, width).contiguous()
    tree = _tree(num_q) if is_tree else None
    dense = paged_attention_ref(
        batch["q"],
        batch["k_cache"],
        batch["v_cache"],
        batch["block_tables"],
        batch["query_start_loc"],
        batch["seq_lens"],
        SCALE,
        tree,
    )
    assert_close_verbose(
        _call(sparse_paged_attention_ref, batch, chunks, 1, tree), dense, **TOL[torch.float32]
    )


@pytest.mark.parametrize("lens, num_q, is_tree", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_triton_matches_reference(
    lens: list[int], num_q: list[int], is_tree: bool, dtype: torch.dtype, num_splits: int | None
) -> None:
    """num_splits=3: the chunk list is shared out over three programs per (seq, KV head)
    (some with no keys at all at these sizes) and merged by the combine kernel."""
    batch = _batch(lens, num_q, heads=6, kv_heads=2, dtype=dtype)
    chunks = _random_chunks(lens, num_q, 2, 2).int()
    tree = _tree(num_q) if is_tree else None
    ref = _call(sparse_paged_attention_ref, batch, chunks, 2, tree)
    got = _call(sparse_paged_attention_triton, batch, chunks, 2, tree, num_splits=num_splits)
    assert_close_verbose(got, ref, **TOL[dtype])


def test_triton_splits_cover_long_chunk_lists() -> None:
    """Splits of several key tiles each (16 keys a tile here), an uneven last share, and a
    sequence whose list is mostly padding: 1, 2, 5 and 7 splits all give the reference."""
    lens, num_q = [300, 41], [1, 1]
    batch = _batch(lens, num_q, heads=4, kv_heads=2, block_size=8)
    chunks = _random_chunks(lens, num_q, 2, 3).int()
    ref = _call(sparse_paged_attention_ref, batch, chunks, 3)
    for splits in (1, 2, 5, 7):
        got = _call(sparse_paged_attention_triton, batch, chunks, 3, num_splits=splits)
        assert_close_verbose(got, ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="num_splits"):
        _call(sparse_paged_attention_triton, batch, chunks, 3, num_splits=0)


def test_triton_rejects_bad_chunks() -> None:
    batch = _batch([9], [1])
    with pytest.raises(ValueError, match="chunks"):
        _call(sparse_paged_attention_triton, batch, torch.zeros(1, 3, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="chunks"):
        _call(sparse_paged_attention_triton, batch, torch.zeros(1, 2, 2), 2)


# ----------------------------------------------------------------------------- HiP mask


def _block_scores(batch: dict[str, torch.Tensor], b: int, block_k: int) -> torch.Tensor:
    """[kv_heads, num_key_blocks] max over the block's keys and the query block's rows."""
    q, kc = batch["q"], batch["k_cache"]
    bs, kv_heads, d = kc.shape[1], kc.shape[2], kc.shape[3]
    qsl = batch["query_start_loc"].tolist()
    seq_len = int(batch["seq_lens"][b])
    blocks = batch["block_tables"][b, : -(-seq_len // bs)].long()
    keys = kc[blocks].reshape(-1, kv_heads, d)[:seq_len].float()
    qs = q[qsl[b] : qsl[b + 1]].float().view(-1, kv_heads, q.shape[1] // kv_heads, d)
    logits = torch.einsum("nhgd,khd->hngk", qs, keys).flatten(1, 2).amax(1)  # [H, seq_len]
    usable = seq_len // block_k * block_k
    return logits[:, :usable].view(kv_heads, -1, block_k).amax(-1)


def _hip_args(
    batch: dict[str, torch.Tensor],
    start: torch.Tensor,
    end: torch.Tensor,
    num_select: int,
    block_k: int,
) -> tuple[torch.Tensor | int, ...]:
    """The HiP search ops' arguments over a _batch: queries, cache, tables, the region."""
    names = ("q", "k_cache", "block_tables", "query_start_loc")
    return (*(batch[n] for n in names), start, end, num_select, block_k)


def _search_plain(scores: list[float], start: int, end: int, k: int) -> list[int]:
    """HiP's branch-and-prune in plain Python over precomputed key-block scores."""
    size = end - start
    nodes = [(i * size // k, (i + 1) * size // k) for i in range(k)]
    while any(e - s > 1 for s, e in nodes):
        children = []
        for s, e in nodes:
            m = s + (e - s + 1) // 2
            children += [(s, m), (m, e)]
        scored = [
            (scores[start + s + (e - s) // 2] if e > s else float("-inf"), i)
            for i, (s, e) in enumerate(children)
        ]
        keep = sorted(scored, key=lambda t: -t[0])[:k]
        nodes = [children[i] for _, i in keep]
    return sorted(start + s for s, e in nodes if e > s)


@pytest.mark.parametrize("num_q", [[1, 1], [3, 1]])
def test_hip_mask_matches_plain_search(num_q: list[int]) -> None:
    lens = [70, 53]
    batch = _batch(lens, num_q, heads=4, kv_heads=2, block_size=8)
    start = torch.tensor([2, 1])
    end = torch.tensor([30, 25])
    got = hip_mask_ref(*_hip_args(batch, start, end, 5, 2))
    for b in range(2):
        scores = _block_scores(batch, b, 2)
        for h in range(2):
            want = _search_plain(scores[h].tolist(), int(start[b]), int(end[b]), 5)
            assert got[b, h].tolist() == want


def test_hip_mask_small_region_is_returned_whole() -> None:
    batch = _batch([40], [1], block_size=8)
    got = hip_mask_ref(*_hip_args(batch, torch.tensor([3]), torch.tensor([7]), 6, 2))
    assert got[0, 0].tolist() == [3, 4, 5, 6, -1, -1]


def test_hip_mask_finds_dense_top_k_on_local_peaks() -> None:
    """Crafted locality: each initial chunk holds one peak with scores falling off around it,
    the setting HiP assumes; the search must return exactly the dense top-k blocks."""
    kv_heads, heads, d, block_k, k = 1, 1, 4, 1, 4
    n_blocks = 64
    peaks = [5, 22, 37, 58]  # one per initial chunk of 16 blocks, off-centre
    pos = torch.arange(n_blocks).float()
    dist = torch.stack([(pos - p).abs() for p in peaks]).amin(0)
    score = 10.0 - dist  # unimodal within each chunk
    # q = e0; key j = score_j * e0 (+ noise in other dims that q ignores)
    keys = torch.zeros(n_blocks, d)
    keys[:, 0] = score
    keys[:, 1:] = torch.randn(n_blocks, d - 1)
    bs = 8
    k_cache = keys.view(n_blocks // bs, bs, kv_heads, d)
    q = torch.zeros(1, heads, d)
    q[0, 0, 0] = 1.0
    tables = torch.arange(n_blocks // bs, dtype=torch.int32).view(1, -1)
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    got = hip_mask_ref(
        q, k_cache, tables, qsl, torch.tensor([0]), torch.tensor([n_blocks]), k, block_k
    )
    dense = torch.topk(score, k).indices.sort().values
    assert got[0, 0].tolist() == dense.tolist() == peaks


@pytest.mark.parametrize("num_q, dtype", [([1, 1], torch.float32), ([4, 1], torch.bfloat16)])
def test_hip_mask_triton_matches_reference(num_q: list[int], dtype: torch.dtype) -> None:
    lens = [90, 61]
    batch = _batch(lens, num_q, heads=6, kv_heads=2, block_size=8, dtype=dtype)
    args = _hip_args(batch, torch.tensor([2, 0]), torch.tensor([40, 28]), 6, 2)
    assert torch.equal(hip_mask_triton(*args), hip_mask_ref(*args))


@pytest.mark.parametrize(
    "num_select, block_k, starts, ends",
    [
        (1, 2, [0, 3], [40, 20]),  # one node: log2(40) rounds down to a single block
        (5, 3, [2, 0], [33, 30]),  # block_k not a power of two
        (16, 1, [0, 5], [37, 9]),  # K above one region's size: returned whole, -1 padded
        (8, 2, [30, 0], [10, 0]),  # empty regions (start >= end): all -1
    ],
)
def test_hip_search_kernel_matches_reference(
    num_select: int, block_k: int, starts: list[int], ends: list[int]
) -> None:
    """The one-launch search against the host loop, over node counts that are not powers
    of two, odd block sizes, small and empty regions, and a 3-token query block."""
    batch = _batch([100, 95], [3, 1], heads=6, kv_heads=2, block_size=8)
    args = _hip_args(batch, torch.tensor(starts), torch.tensor(ends), num_select, block_k)
    want = hip_mask_ref(*args)
    assert torch.equal(hip_mask_triton(*args), want)
    assert want.shape == (2, 2, num_select)


# ----------------------------------------------------------------------------- page means


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_mean_keys_ref_and_triton(dtype: torch.dtype) -> None:
    k_cache = torch.randn(9, 4, 3, 20, dtype=dtype)
    pages = torch.tensor([7, 0, 4], dtype=torch.int32)
    counts = torch.tensor([4, 1, 3], dtype=torch.int32)
    means = torch.full((9, 3, 20), 5.0, dtype=dtype)
    page_mean_keys_ref(k_cache, means, pages, counts)
    for p, c in zip(pages.tolist(), counts.tolist(), strict=True):
        assert_close_verbose(means[p], k_cache[p, :c].float().mean(0).to(dtype), **TOL[dtype])
    assert torch.equal(means[1], torch.full((3, 20), 5.0, dtype=dtype))  # untouched
    got = torch.full((9, 3, 20), 5.0, dtype=dtype)
    page_mean_keys_triton(k_cache, got, pages, counts)
    assert_close_verbose(got, means, **TOL[dtype])


def test_page_mean_keys_triton_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="means"):
        page_mean_keys_triton(
            torch.randn(4, 4, 2, 8), torch.zeros(4, 8), torch.tensor([0]), torch.tensor([1])
        )


# ----------------------------------------------------------------------------- page key bounds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_key_bounds_ref_and_triton(dtype: torch.dtype) -> None:
    k_cache = torch.randn(9, 4, 3, 20, dtype=dtype)
    k_cache[7, 3] = 100.0  # beyond page 7's count of 3: must not leak into its bounds
    pages = torch.tensor([7, 0, 4], dtype=torch.int64)
    counts = torch.tensor([3, 1, 4], dtype=torch.int64)
    lows = torch.full((9, 3, 20), 5.0, dtype=dtype)
    highs = torch.full((9, 3, 20), 5.0, dtype=dtype)
    page_key_bounds_ref(k_cache, lows, highs, pages, counts)
    for p, c in zip(pages.tolist(), counts.tolist(), strict=True):
        assert torch.equal(lows[p], k_cache[p, :c].amin(0))
        assert torch.equal(highs[p], k_cache[p, :c].amax(0))
    assert torch.equal(lows[1], torch.full((3, 20), 5.0, dtype=dtype))  # untouched
    got_lows = torch.full((9, 3, 20), 5.0, dtype=dtype)
    got_highs = torch.full((9, 3, 20), 5.0, dtype=dtype)
    page_key_bounds_triton(k_cache, got_lows, got_highs, pages.int(), counts.int())
    assert torch.equal(got_lows, lows)  # min/max are exact: no tolerance
    assert torch.equal(got_highs, highs)


def test_page_key_bounds_bound_every_logit() -> None:
    """sum_d max(q_d low_d, q_d high_d) >= q . k for each key of the page (Quest's bound)."""
    k_cache = torch.randn(6, 16, 2, 32)
    pages = torch.arange(6)
    lows, highs = torch.zeros(6, 2, 32), torch.zeros(6, 2, 32)
    page_key_bounds_ref(k_cache, lows, highs, pages, torch.full((6,), 16))
    q = torch.randn(2, 32)
    bound = torch.maximum(q * lows, q * highs).sum(-1)  # [6, 2]
    logits = torch.einsum("hd,pshd->psh", q, k_cache)  # [6, 16, 2]
    assert (bound >= logits.amax(1) - 1e-5).all()


def test_page_key_bounds_triton_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="highs"):
        page_key_bounds_triton(
            torch.randn(4, 4, 2, 8),
            torch.zeros(4, 2, 8),
            torch.zeros(4, 8),
            torch.tensor([0]),
            torch.tensor([1]),
        )


def test_page_key_bounds_triton_rejects_mismatched_strides() -> None:
    # One kernel addresses lows and highs with one set of strides.
    with pytest.raises(ValueError, match="strides differ"):
        page_key_bounds_triton(
            torch.randn(4, 4, 2, 8),
            torch.zeros(4, 2, 8),
            torch.zeros(4, 2, 16)[..., :8],
            torch.tensor([0]),
            torch.tensor([1]),
        )


@pytest.mark.parametrize("bounds", [False, True])
def test_page_summaries_write_head_major_fp32_views(bounds: bool) -> None:
    # The block top-k selector keeps summaries as [H, num_blocks, W] fp32 (W = D, or 2 D for
    # high | low) and hands the kernels [num_blocks, H, D] views of it: block stride W, head
    # stride num_blocks * W. Both implementations must write through those strides.
    k_cache = torch.randn(9, 4, 3, 20, dtype=torch.bfloat16)
    pages = torch.tensor([7, 0, 4], dtype=torch.int32)
    counts = torch.tensor([4, 1, 3], dtype=torch.int32)
    width = 40 if bounds else 20
    results = []
    for op in ("ref", "triton"):
        store = torch.full((3, 9, width), 5.0)
        view = store.transpose(0, 1)  # [9, 3, width]
        if bounds:
            fn = page_key_bounds_ref if op == "ref" else page_key_bounds_triton
            fn(k_cache, view[..., 20:], view[..., :20], pages, counts)
        else:
            fn = page_mean_keys_ref if op == "ref" else page_mean_keys_triton
            fn(k_cache, view, pages, counts)
        results.append(store)
    ref, got = results
    for p, c in zip(pages.tolist(), counts.tolist(), strict=True):
        keys = k_cache[p, :c].float()  # [c, H, D]
        if bounds:
            assert torch.equal(ref[:, p, :20], keys.amax(0))
            assert torch.equal(ref[:, p, 20:], keys.amin(0))
        else:
            assert_close_verbose(ref[:, p], keys.mean(0), **TOL[torch.float32])
    assert torch.equal(ref[:, 1], torch.full((3, width), 5.0))  # untouched page
    assert_close_verbose(got, ref, **TOL[torch.float32])


# ----------------------------------------------------------------------------- on a GPU
# Compiled for the card rather than interpreted: the interpreter accepted a masked load in
# the HiP score kernel that Triton 3.6 refused to compile for an H200.


def _to_cuda(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.cuda() for name, t in batch.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lens, num_q, is_tree", [([4096, 700, 33], [1, 1, 1], False), ([2000, 900], [9, 9], True)]
)
def test_sparse_attention_triton_matches_reference_on_gpu(
    lens: list[int], num_q: list[int], is_tree: bool, dtype: torch.dtype
) -> None:
    """Realistic sizes (8 heads over 2 KV heads, dim 128, 16-slot pages, 2-token chunks)."""
    batch = _to_cuda(_batch(lens, num_q, 8, 2, 128, 16, dtype))
    chunks = _random_chunks(lens, num_q, 2, 2).int().cuda()
    tree = _tree(num_q).cuda() if is_tree else None
    ref = _call(sparse_paged_attention_ref, batch, chunks, 2, tree)
    for splits in (None, 1, 4):  # None: the launcher's own choice for the card
        got = _call(sparse_paged_attention_triton, batch, chunks, 2, tree, num_splits=splits)
        assert_close_verbose(got, ref, **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("num_q", [[1, 1], [4, 1]])
def test_hip_mask_triton_matches_reference_on_gpu(num_q: list[int]) -> None:
    """64 of ~1000 key blocks per KV head, as the decoder asks at 2k context (float32 keys, so
    that the two sides' logits differ by rounding alone and random scores do not tie)."""
    batch = _to_cuda(_batch([2100, 1500], num_q, 8, 2, 128, 16))
    args = _hip_args(
        batch, torch.tensor([4, 0], device="cuda"), torch.tensor([1000, 700], device="cuda"), 64, 2
    )
    assert torch.equal(hip_mask_triton(*args), hip_mask_ref(*args))


@pytest.mark.gpu
def test_page_summaries_triton_match_references_on_gpu() -> None:
    k_cache = torch.randn(64, 16, 2, 128, dtype=torch.bfloat16, device="cuda")
    pages = torch.tensor([7, 0, 40, 63], dtype=torch.int32, device="cuda")
    counts = torch.tensor([16, 1, 9, 3], dtype=torch.int32, device="cuda")
    want, got = (torch.zeros(64, 2, 128, dtype=torch.bfloat16, device="cuda") for _ in "ab")
    page_mean_keys_ref(k_cache, want, pages, counts)
    page_mean_keys_triton(k_cache, got, pages, counts)
    assert_close_verbose(got, want, **TOL[torch.bfloat16])
    lows, highs, got_lows, got_highs = (
        torch.zeros(64, 2, 128, dtype=torch.bfloat16, device="cuda") for _ in range(4)
    )
    page_key_bounds_ref(k_cache, lows, highs, pages.long(), counts.long())
    page_key_bounds_triton(k_cache, got_lows, got_highs, pages, counts)
    assert torch.equal(got_lows, lows) and torch.equal(got_highs, highs)
