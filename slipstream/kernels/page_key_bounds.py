"""Per-page, per-channel minimum and maximum keys of the paged KV cache (Quest's page summary).

Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
ICML 2024, arXiv 2406.10774) keeps, for every KV page and channel, the smallest and largest
key value. For a query q the page's upper bound on any of its logits is

    sum_d max(q_d * low[d], q_d * high[d])  >=  q . k   for every key k in the page,

so a page holding one key that matches q strongly (a copied fact) scores high even when its
mean key is unremarkable: the mean dilutes that key 16-fold. This op recomputes the bounds
of the pages a step wrote:

    lows[pages[i], h, :]  = min(k_cache[pages[i], :counts[i], h, :])
    highs[pages[i], h, :] = max(k_cache[pages[i], :counts[i], h, :])

Whole pages (at most 16 rows) are recomputed rather than folded in incrementally, so the
bounds stay exact when slots are rewritten (tree verification compaction, rejected drafts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._dispatch import use_triton
from slipstream.kernels.page_mean_keys import check_page_summary_args


def page_key_bounds_ref(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    lows: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    highs: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64 physical block ids
    counts: torch.Tensor,  # [num_pages] int32/int64 filled slots per page, 1..block_size
) -> None:
    """Reference: gather the pages, min/max over the filled slots (empty ones masked out)."""
    if pages.numel() == 0:
        return
    block_size = k_cache.shape[1]
    pages = pages.long()
    k = k_cache.index_select(0, pages).float()  # [P, block_size, H, D]
    filled = torch.arange(block_size, device=k.device) < counts.view(-1, 1)  # [P, block_size]
    empty = ~filled[:, :, None, None]
    low = k.masked_fill(empty, float("inf")).amin(1)  # [P, H, D]
    high = k.masked_fill(empty, float("-inf")).amax(1)
    lows.index_copy_(0, pages, low.to(lows.dtype))
    highs.index_copy_(0, pages, high.to(highs.dtype))


@triton.jit
def _page_key_bounds_kernel(
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    lows_ptr,  # [num_blocks, num_kv_heads, head_dim]
    highs_ptr,  # [num_blocks, num_kv_heads, head_dim], same strides as lows
    pages_ptr,  # [num_pages]
    counts_ptr,  # [num_pages]
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_b_block,
    stride_b_head,
    PAGE_SIZE: tl.constexpr,  # cache block_size
    PAGE_SIZE_P: tl.constexpr,  # power of two >= PAGE_SIZE
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # power of two >= HEAD_DIM
):
    """Program (page i, kv head h): channel-wise min and max of the page's filled keys."""
    i = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    page = tl.load(pages_ptr + i).to(tl.int64)
    count = tl.load(counts_ptr + i)
    s = tl.arange(0, PAGE_SIZE_P)
    d = tl.arange(0, HEAD_DIM_P)
    mask = (s < count)[:, None] & (s < PAGE_SIZE)[:, None] & (d < HEAD_DIM)[None, :]
    off = page * stride_k_block + s[:, None] * stride_k_slot + h * stride_k_head + d[None, :]
    k = tl.load(k_cache_ptr + off, mask=mask, other=0.0).to(tl.float32)
    low = tl.min(tl.where(mask, k, float("inf")), 0)
    high = tl.max(tl.where(mask, k, float("-inf")), 0)
    b_off = page * stride_b_block + h * stride_b_head + d
    tl.store(lows_ptr + b_off, low.to(lows_ptr.dtype.element_ty), mask=d < HEAD_DIM)
    tl.store(highs_ptr + b_off, high.to(highs_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def page_key_bounds_triton(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    lows: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    highs: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64
    counts: torch.Tensor,  # [num_pages] int32/int64, 1..block_size
) -> None:
    """Triton launcher: checks the arguments, then one program per (page, kv head)."""
    check_page_summary_args(k_cache, {"lows": lows, "highs": highs}, pages, counts)
    if lows.stride() != highs.stride():
        raise ValueError(f"lows/highs strides differ: {lows.stride()} vs {highs.stride()}")
    num_pages = pages.shape[0]
    if num_pages == 0:
        return
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    _page_key_bounds_kernel[(num_pages, num_kv_heads)](
        k_cache,
        lows,
        highs,
        pages,
        counts,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        lows.stride(0),
        lows.stride(1),
        PAGE_SIZE=block_size,
        PAGE_SIZE_P=triton.next_power_of_2(block_size),
        HEAD_DIM=head_dim,
        HEAD_DIM_P=triton.next_power_of_2(head_dim),
    )


def page_key_bounds(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    lows: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    highs: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64
    counts: torch.Tensor,  # [num_pages] int32/int64, 1..block_size
) -> None:
    """Public op: Triton on CUDA, the reference elsewhere (see kernels/_dispatch.py)."""
    op = page_key_bounds_triton if use_triton(k_cache) else page_key_bounds_ref
    op(k_cache, lows, highs, pages, counts)
