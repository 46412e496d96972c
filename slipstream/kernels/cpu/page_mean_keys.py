"""Block top-k's page mean keys on CPU through page_mean_keys.cpp (float32 or bf16 caches);
kernels/page_summaries.py's page_mean_keys_ref is the reference it matches bit for bit."""

from __future__ import annotations

import ctypes

import torch

from slipstream.kernels.cpu.build import CppFunction

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# k cache, blocks, block size, KV heads, head dim, means, their block and head strides, pages,
# counts, pages listed, threads
_ARGTYPES = [_P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, _P, _I64, ctypes.c_int]
_KERNELS = {
    dtype: CppFunction(
        "page_mean_keys.cpp", f"slipstream_page_mean_keys_{name}", _ARGTYPES, isa="avx2_fma"
    )
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16"))
}


def page_mean_keys_cpu_unavailable_reason(k_cache: torch.Tensor, means: torch.Tensor) -> str | None:
    """None when page_mean_keys_cpu takes these tensors, else why not."""
    kernel = _KERNELS.get(k_cache.dtype)
    if kernel is None:
        return f"no kernel for a {k_cache.dtype} cache"
    if k_cache.device.type != "cpu" or not k_cache.is_contiguous():
        return "the cache must be a contiguous CPU tensor"
    if means.dtype != torch.float32 or means.stride(-1) != 1:
        return "the means must be float32 with a unit last stride"
    if k_cache.shape[3] > 512:
        return f"head size {k_cache.shape[3]} > 512"
    # The reference's sum over the slots ran in slot order, as here, whenever a slot's row of
    # KV heads x head size was a multiple of 32 floats (every case tried: 1-8 heads, sizes
    # 16-128, float32 and bf16 caches); past it, torch sums the row's tail in another order
    # and the last bit can differ, so such caches keep the reference.
    if (k_cache.shape[2] * k_cache.shape[3]) % 32:
        return "KV heads x head size is not a multiple of 32"
    return kernel.unavailable_reason()


def page_mean_keys_cpu(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim] fp32 | bf16
    means: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim] fp32, updated in place
    pages: torch.Tensor,  # [num_pages] int32/int64 physical block ids
    counts: torch.Tensor,  # [num_pages] int32/int64 filled slots per page, 1..block_size
) -> None:
    """page_mean_keys_ref in one C++ call (check page_mean_keys_cpu_unavailable_reason; the
    shapes as kernels/page_summaries.py's page_mean_keys checks them: the C++ checks only the
    pages and counts)."""
    if pages.numel() == 0:
        return
    pages64 = pages.to(torch.int64).contiguous()
    counts64 = counts.to(torch.int64).contiguous()
    num_blocks, block_size, heads, head_dim = k_cache.shape
    status = _KERNELS[k_cache.dtype].get()(
        k_cache.data_ptr(),
        num_blocks,
        block_size,
        heads,
        head_dim,
        means.data_ptr(),
        means.stride(0),
        means.stride(1),
        pages64.data_ptr(),
        counts64.data_ptr(),
        pages64.numel(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError("a page lies outside the cache or a count outside 1..block_size")
