"""HiP's mask search on CPU (hip_mask.cpp): the whole branch-and-prune search of every
(sequence, KV head) in one C++ call. slipstream/kernels/hip_mask.py dispatches here on CPU
and keeps the reference; semantics are in its docstring."""

from __future__ import annotations

import ctypes

import torch

from slipstream.kernels.cpu.build import CppFunction

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# q, seqs, kv heads, rows, head dim, k cache, key is bf16, block size, tables + stride,
# region start, region end, num select, block k, out, threads
_SEARCH = CppFunction(
    "hip_mask.cpp",
    "slipstream_hip_mask",
    [_P, _I64, _I64, _I64, _I64, _P, ctypes.c_int, _I64, _P, _I64, _P, _P, _I64, _I64, _P]
    + [ctypes.c_int],
)


def hip_search_unavailable_reason() -> str | None:
    """None when hip_mask_search can run here, else why not."""
    return _SEARCH.unavailable_reason()


def hip_mask_search(
    qg: torch.Tensor,  # [num_seqs, num_kv_heads, rows, head_dim] fp32 grouped queries
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim] bf16 or fp32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    region_start: torch.Tensor,  # [num_seqs] int, in key blocks of block_k tokens
    region_end: torch.Tensor,  # [num_seqs] int, exclusive
    num_select: int,
    block_k: int,
) -> torch.Tensor:  # [num_seqs, num_kv_heads, num_select] int64 ascending, -1 = none
    """The search through the C++ kernel; the caller has checked the arguments
    (hip_mask.py's _check_args) and grouped the queries."""
    fn = _SEARCH.get()
    if k_cache.dtype not in (torch.bfloat16, torch.float32) or not k_cache.is_contiguous():
        raise ValueError(f"k_cache must be contiguous bf16 or fp32, got {k_cache.dtype}")
    num_seqs, num_kv_heads, rows, head_dim = qg.shape
    qg = qg.float().contiguous()
    tables = block_tables.to(torch.int32)
    if tables.numel() and tables.stride(-1) != 1:
        tables = tables.contiguous()
    starts = region_start.to(torch.int64).contiguous()
    ends = region_end.to(torch.int64).contiguous()
    out = torch.empty(num_seqs, num_kv_heads, num_select, dtype=torch.int64)
    fn(
        qg.data_ptr(),
        num_seqs,
        num_kv_heads,
        rows,
        head_dim,
        k_cache.data_ptr(),
        int(k_cache.dtype == torch.bfloat16),
        k_cache.shape[1],
        tables.data_ptr(),
        tables.stride(0),
        starts.data_ptr(),
        ends.data_ptr(),
        num_select,
        block_k,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out
