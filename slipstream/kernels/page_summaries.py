"""Per-page key summaries of the paged KV cache, used to score pages for block top-k.

Two summaries, recomputed for the pages a step wrote (fp32 accumulation):

- mean keys (Kinetics, Sadhukhan et al., arXiv 2506.05333, the "compressed key" cache): the
  mean GQA query dotted with a page's mean key equals, by linearity, the page's mean logit.

      means[pages[i], h, :] = mean(k_cache[pages[i], :counts[i], h, :])

- channel bounds (Quest, Tang et al., ICML 2024, arXiv 2406.10774): for a query q,
  sum_d max(q_d * low[d], q_d * high[d]) >= q . k for every key k of the page, so a page
  holding one key that matches q strongly (a copied fact) scores high even when its mean key
  is unremarkable: the mean dilutes that key 16-fold.

      lows[pages[i], h, :]  = min(k_cache[pages[i], :counts[i], h, :])
      highs[pages[i], h, :] = max(k_cache[pages[i], :counts[i], h, :])

Whole pages (at most 16 rows) are recomputed rather than folded in incrementally, so the
summaries stay exact when slots are rewritten (tree verification compaction, rejected
drafts). One Triton kernel serves both (constexpr BOUNDS): one program per (page, KV head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._dispatch import use_triton
from slipstream.kernels.cpu.page_mean_keys import (
    page_mean_keys_cpu,
    page_mean_keys_cpu_unavailable_reason,
)


def _filled_pages(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    pages: torch.Tensor,  # [P]
    counts: torch.Tensor,  # [P]
) -> tuple[torch.Tensor, torch.Tensor]:  # ([P, block_size, H, D] fp32, [P, block_size, 1, 1])
    """The pages' keys in fp32 and which slots are filled."""
    block_size = k_cache.shape[1]
    k = k_cache.index_select(0, pages.long()).float()
    filled = torch.arange(block_size, device=k.device) < counts.view(-1, 1)
    return k, filled[:, :, None, None]


def page_mean_keys_ref(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    means: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64 physical block ids
    counts: torch.Tensor,  # [num_pages] int32/int64 filled slots per page, 1..block_size
) -> None:
    """Reference: gather the pages, masked sum over slots, divide by the count."""
    if pages.numel() == 0:
        return
    k, filled = _filled_pages(k_cache, pages, counts)
    mean = (k * filled).sum(1) / counts.view(-1, 1, 1).to(torch.float32)
    means.index_copy_(0, pages.long(), mean.to(means.dtype))


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
    k, filled = _filled_pages(k_cache, pages, counts)
    low = k.masked_fill(~filled, float("inf")).amin(1)  # [P, H, D]
    high = k.masked_fill(~filled, float("-inf")).amax(1)
    lows.index_copy_(0, pages.long(), low.to(lows.dtype))
    highs.index_copy_(0, pages.long(), high.to(highs.dtype))


@triton.jit
def _page_summary_kernel(
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    first_ptr,  # [num_blocks, num_kv_heads, head_dim]: means, or lows with BOUNDS
    second_ptr,  # highs with BOUNDS (same strides as first); unused otherwise
    pages_ptr,  # [num_pages]
    counts_ptr,  # [num_pages]
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_s_block,
    stride_s_head,
    BOUNDS: tl.constexpr,  # False: mean key; True: channel-wise min and max
    PAGE_SIZE: tl.constexpr,  # cache block_size
    PAGE_SIZE_P: tl.constexpr,  # power of two >= PAGE_SIZE
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # power of two >= HEAD_DIM
):
    """Program (page i, kv head h): summary of the page's first counts[i] keys of head h."""
    i = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    page = tl.load(pages_ptr + i).to(tl.int64)
    count = tl.load(counts_ptr + i)
    s = tl.arange(0, PAGE_SIZE_P)
    d = tl.arange(0, HEAD_DIM_P)
    mask = (s < count)[:, None] & (s < PAGE_SIZE)[:, None] & (d < HEAD_DIM)[None, :]
    off = page * stride_k_block + s[:, None] * stride_k_slot + h * stride_k_head + d[None, :]
    k = tl.load(k_cache_ptr + off, mask=mask, other=0.0).to(tl.float32)
    s_off = page * stride_s_block + h * stride_s_head + d
    if BOUNDS:
        low = tl.min(tl.where(mask, k, float("inf")), 0)
        high = tl.max(tl.where(mask, k, float("-inf")), 0)
        tl.store(first_ptr + s_off, low.to(first_ptr.dtype.element_ty), mask=d < HEAD_DIM)
        tl.store(second_ptr + s_off, high.to(second_ptr.dtype.element_ty), mask=d < HEAD_DIM)
    else:
        mean = tl.sum(k, 0) / count.to(tl.float32)
        tl.store(first_ptr + s_off, mean.to(first_ptr.dtype.element_ty), mask=d < HEAD_DIM)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def check_page_summary_args(
    k_cache: torch.Tensor,
    summaries: dict[str, torch.Tensor],  # name -> [num_blocks, num_kv_heads, head_dim]
    pages: torch.Tensor,
    counts: torch.Tensor,
) -> None:
    """Raise ValueError naming the first argument whose shape, stride or dtype is wrong."""
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-d, got {tuple(k_cache.shape)}")
    expected = (k_cache.shape[0], k_cache.shape[2], k_cache.shape[3])
    for name, t in summaries.items():
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} {tuple(t.shape)} must be {expected}")
    floats = {"k_cache": k_cache, **summaries}
    for name, t in floats.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp16/bf16/fp32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit last-dim stride; strides {t.stride()}")
    strides = {t.stride() for t in summaries.values()}
    if len(strides) > 1:
        raise ValueError(f"{' and '.join(summaries)} strides differ: {sorted(strides)}")
    if pages.dim() != 1 or counts.shape != pages.shape:
        raise ValueError(f"pages {tuple(pages.shape)} and counts {tuple(counts.shape)} must be [P]")
    for name, t in (("pages", pages), ("counts", counts)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.numel() > 1 and t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous; stride {t.stride()}")
    devices = {t.device for t in floats.values()} | {pages.device, counts.device}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _launch(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    first: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim]
    second: torch.Tensor | None,  # same as first, BOUNDS only
    pages: torch.Tensor,  # [num_pages]
    counts: torch.Tensor,  # [num_pages]
) -> None:
    """One program per (page, kv head); BOUNDS when `second` is given."""
    num_pages = pages.shape[0]
    if num_pages == 0:
        return
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    _page_summary_kernel[(num_pages, num_kv_heads)](
        k_cache,
        first,
        first if second is None else second,
        pages,
        counts,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        first.stride(0),
        first.stride(1),
        BOUNDS=second is not None,
        PAGE_SIZE=block_size,
        PAGE_SIZE_P=triton.next_power_of_2(block_size),
        HEAD_DIM=head_dim,
        HEAD_DIM_P=triton.next_power_of_2(head_dim),
    )


def page_mean_keys_triton(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    means: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64
    counts: torch.Tensor,  # [num_pages] int32/int64, 1..block_size
) -> None:
    """Triton launcher for the mean keys."""
    check_page_summary_args(k_cache, {"means": means}, pages, counts)
    _launch(k_cache, means, None, pages, counts)


def page_key_bounds_triton(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    lows: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    highs: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64
    counts: torch.Tensor,  # [num_pages] int32/int64, 1..block_size
) -> None:
    """Triton launcher for the channel bounds."""
    check_page_summary_args(k_cache, {"lows": lows, "highs": highs}, pages, counts)
    _launch(k_cache, lows, highs, pages, counts)


def page_mean_keys(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    means: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64
    counts: torch.Tensor,  # [num_pages] int32/int64, 1..block_size
) -> None:
    """Public op: Triton on CUDA, on CPU the C++ kernel where it runs (cpu/page_mean_keys.cpp,
    the reference's bits), else the reference (see kernels/_dispatch.py)."""
    if use_triton(k_cache):
        page_mean_keys_triton(k_cache, means, pages, counts)
    elif page_mean_keys_cpu_unavailable_reason(k_cache, means) is None:
        # The C++ writes means[page] unchecked: its shape is checked here, as for Triton.
        check_page_summary_args(k_cache, {"means": means}, pages, counts)
        page_mean_keys_cpu(k_cache, means, pages, counts)
    else:
        page_mean_keys_ref(k_cache, means, pages, counts)


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
