"""Block top-k's page votes on CPU through page_votes.cpp (float32 or bf16 caches);
kernels/page_votes.py's page_votes_ref is the reference it matches to float32 rounding."""

from __future__ import annotations

import ctypes

import torch

from slipstream.kernels.cpu.build import CppFunction

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# q, positions, voters, k cache, blocks, block size, KV heads, group, head dim, table,
# seq_len, scale, spread, out, threads
_ARGTYPES = [_P, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64, _P, _I64, ctypes.c_float, _I64]
_ARGTYPES += [_P, ctypes.c_int]
_KERNELS = {
    dtype: CppFunction("page_votes.cpp", f"slipstream_page_votes_{name}", _ARGTYPES, isa="avx2_fma")
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16"))
}


def page_votes_cpu_unavailable_reason(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """None when page_votes_cpu takes these tensors, else why not."""
    kernel = _KERNELS.get(k_cache.dtype)
    if kernel is None:
        return f"no kernel for a {k_cache.dtype} cache"
    if k_cache.device.type != "cpu" or not k_cache.is_contiguous():
        return "the cache must be a contiguous CPU tensor"
    if q.device.type != "cpu":
        return "the queries must be on the CPU"
    head_dim = k_cache.shape[3]
    if head_dim % 8 or head_dim > 512:
        return f"head size {head_dim} is not a multiple of 8 up to 512"
    return kernel.unavailable_reason()


def page_votes_cpu(
    q: torch.Tensor,  # [w, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim] fp32 | bf16
    table: torch.Tensor,  # [>= pages of seq_len] int32/int64
    seq_len: int,
    positions: torch.Tensor,  # [w] int64, each in [0, seq_len)
    scale: float,
    spread: int,
) -> torch.Tensor:  # [num_kv_heads, ceil(seq_len / block_size)] fp32
    """page_votes_ref in one C++ call (check page_votes_cpu_unavailable_reason)."""
    num_blocks, block_size, heads, head_dim = k_cache.shape
    w, num_heads, q_dim = q.shape
    num_pages = -(-seq_len // block_size)
    if q_dim != head_dim or num_heads % heads or positions.numel() != w:
        raise ValueError("q must be [voters, a multiple of the KV heads, head size]")
    if table.numel() < num_pages:
        raise ValueError(f"the table holds {table.numel()} pages, {num_pages} needed")
    q32 = q.float().contiguous()
    pos = positions.to(torch.int64).contiguous()
    tab = table[:num_pages].to(torch.int32).contiguous()
    out = torch.empty(heads, num_pages, dtype=torch.float32)
    status = _KERNELS[k_cache.dtype].get()(
        q32.data_ptr(),
        pos.data_ptr(),
        w,
        k_cache.data_ptr(),
        num_blocks,
        block_size,
        heads,
        num_heads // heads,
        head_dim,
        tab.data_ptr(),
        seq_len,
        scale,
        spread,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError("a table entry lies outside the cache or a position past seq_len")
    return out
