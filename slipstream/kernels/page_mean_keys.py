"""Per-page mean keys of the paged KV cache (Kinetics' "compressed key" cache).

Kinetics (Sadhukhan et al., arXiv 2506.05333) scores each 16-token page by the mean GQA query
dotted with the page's mean key, which by linearity equals the mean attention logit over the
page. This op recomputes the mean key of the pages a step wrote:

    means[pages[i], h, :] = mean(k_cache[pages[i], :counts[i], h, :])   (fp32 accumulation)

Recomputing whole pages (at most 16 rows each) instead of a running sum keeps the summary
exact when KV slots are rewritten (tree verification compaction, rejected drafts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._dispatch import use_triton


def page_mean_keys_ref(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    means: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64 physical block ids
    counts: torch.Tensor,  # [num_pages] int32/int64 filled slots per page, 1..block_size
) -> None:
    """Reference: gather the pages, masked sum over slots, divide by the count."""
    if pages.numel() == 0:
        return
    block_size = k_cache.shape[1]
    pages = pages.long()
    k = k_cache.index_select(0, pages).float()  # [P, block_size, H, D]
    filled = torch.arange(block_size, device=k.device) < counts.view(-1, 1)  # [P, block_size]
    k = k * filled[:, :, None, None]
    mean = k.sum(1) / counts.view(-1, 1, 1).to(torch.float32)
    means.index_copy_(0, pages, mean.to(means.dtype))


@triton.jit
def _page_mean_keys_kernel(
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    means_ptr,  # [num_blocks, num_kv_heads, head_dim]
    pages_ptr,  # [num_pages]
    counts_ptr,  # [num_pages]
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_m_block,
    stride_m_head,
    PAGE_SIZE: tl.constexpr,  # cache block_size
    PAGE_SIZE_P: tl.constexpr,  # power of two >= PAGE_SIZE
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # power of two >= HEAD_DIM
):
    """Program (page i, kv head h): mean over the page's first counts[i] keys of head h."""
    i = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    page = tl.load(pages_ptr + i).to(tl.int64)
    count = tl.load(counts_ptr + i)
    s = tl.arange(0, PAGE_SIZE_P)
    d = tl.arange(0, HEAD_DIM_P)
    mask = (s < count)[:, None] & (s < PAGE_SIZE)[:, None] & (d < HEAD_DIM)[None, :]
    off = page * stride_k_block + s[:, None] * stride_k_slot + h * stride_k_head + d[None, :]
    k = tl.load(k_cache_ptr + off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(k, 0) / count.to(tl.float32)
    m_off = page * stride_m_block + h * stride_m_head + d
    tl.store(means_ptr + m_off, mean.to(means_ptr.dtype.element_ty), mask=d < HEAD_DIM)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def page_mean_keys_triton(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    means: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64
    counts: torch.Tensor,  # [num_pages] int32/int64, 1..block_size
) -> None:
    """Triton launcher: checks the arguments, then one program per (page, kv head)."""
    check_page_summary_args(k_cache, {"means": means}, pages, counts)
    num_pages = pages.shape[0]
    if num_pages == 0:
        return
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    _page_mean_keys_kernel[(num_pages, num_kv_heads)](
        k_cache,
        means,
        pages,
        counts,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        means.stride(0),
        means.stride(1),
        PAGE_SIZE=block_size,
        PAGE_SIZE_P=triton.next_power_of_2(block_size),
        HEAD_DIM=head_dim,
        HEAD_DIM_P=triton.next_power_of_2(head_dim),
    )


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


def page_mean_keys(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    means: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim], updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64
    counts: torch.Tensor,  # [num_pages] int32/int64, 1..block_size
) -> None:
    """Public op: Triton on CUDA, the reference elsewhere (see kernels/_dispatch.py)."""
    op = page_mean_keys_triton if use_triton(k_cache) else page_mean_keys_ref
    op(k_cache, means, pages, counts)
