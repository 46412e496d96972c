"""Paged attention for few query rows per sequence on CPUs: bf16 on AVX512-BF16
(paged_decode_attention.cpp), float32 on AVX2 + FMA (paged_decode_attention_f32.cpp).

Same semantics as slipstream/kernels/paged_attention.py (causal or tree mask among a
step's new tokens, every cached key visible), for queries and caches of one of those
dtypes with head size 64 or 128; with `chunks`, those of
slipstream/kernels/sparse_paged_attention.py (each KV head reads only its selected chunks
of the cached keys). Both kernels take the same arguments. Decode, tree-verification
and prefill chunks of up to max_query_rows(dtype) rows take it; longer chunks keep the SDPA
reference, whose blocked kernel wins on long query runs (this one computes each query row
on its own, O(rows x keys)).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch

from slipstream.kernels._dispatch import once_a_step
from slipstream.kernels.cpu.build import CppFunction

# Rows per sequence up to which the engine takes this kernel: every draft tree, and every
# prefill chunk at the default token budget (512 a step), so a row's bits never depend on
# where the load cut its prompt into chunks. With 128 here, chunks of 129-512 rows took the
# SDPA reference, whose bits follow the chunk's bounds: on ~830-token prompts, 7 of 12
# greedy answers at 12 concurrent sequences differed from those decoded one at a time
# (session 31). Measured (2 cores, 9 heads / 3 kv heads, 64 dims), this kernel vs the
# reference: 81-row tree at 300 cached keys 698 vs 898 us, 128 rows at 1000 keys 2.7 vs 3.3
# ms, one layer's 496-row chunk from scratch 6.8 vs 4.3 ms, after 1000 keys 11.6 vs 12.5;
# whole prefills at the default budget 1004-1009 -> 1063-1167 tok/s (~830-token prompts)
# and 652-699 -> 689-760 (~3100). Bigger chunks (a larger --max-num-batched-tokens) keep
# the reference, which wins there (2048 rows from scratch: 130 vs 42 ms a layer).
MAX_QUERY_ROWS = 512
# float32 (the AVX2 kernel): 128. Its products hand chunks of more than 128 rows to MKL
# anyway, so those chunks' bits follow the cut whatever attention does, and its attention
# loses on long chunks (measured here: 496 rows after 1000 keys 18.7 vs 14.9 ms a layer,
# after 4000 keys 72 vs 35).
MAX_QUERY_ROWS_F32 = 128


def max_query_rows(dtype: torch.dtype) -> int:
    """Rows per sequence up to which a step of this dtype takes the kernel."""
    return MAX_QUERY_ROWS if dtype == torch.bfloat16 else MAX_QUERY_ROWS_F32


HEAD_DIMS = (64, 128)
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
# q, q strides, k/v caches, block tables + stride, query starts, seq lens, num seqs, tree
# mask + stride, out, heads, kv heads, head dim, block size, scale, threads, then the
# block-sparse chunks (null when dense) + seq stride + head stride + count + chunk size.
_ARGTYPES = (
    [_P, _I64, _I64, _P, _P, _P, _I64, _P, _P, _I64, _P, _I64, _P]
    + [_I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int]
    + [_P, _I64, _I64, _I64, _I64]
)
# The kernel for each dtype it takes (queries and caches alike).
_KERNELS = {
    torch.bfloat16: CppFunction(
        "paged_decode_attention.cpp", "slipstream_paged_decode_attention", _ARGTYPES
    ),
    torch.float32: CppFunction(
        "paged_decode_attention_f32.cpp",
        "slipstream_paged_decode_attention_f32",
        _ARGTYPES,
        isa="avx2_fma",
    ),
}
# The dtypes a kernel exists for (whether it builds on this CPU is unavailable_reason's call).
KERNEL_DTYPES = tuple(_KERNELS)


def decode_attention_unavailable_reason(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when the engine should use the kernel for `dtype`, else why not."""
    kernel = _KERNELS.get(dtype)
    if kernel is None:
        return f"no CPU decode attention kernel for {dtype}"
    return kernel.unavailable_reason()


def decode_attention_applies(q: torch.Tensor, k_cache: torch.Tensor, max_query_len: int) -> bool:
    """Whether a step's attention can run here: bf16 or float32 on CPU (queries and caches
    alike), a supported head size, few query rows per sequence, and that dtype's kernel
    built."""
    return (
        q.device.type == "cpu"
        and q.dtype in _KERNELS
        and k_cache.dtype == q.dtype
        and q.shape[-1] in HEAD_DIMS
        and max_query_len <= max_query_rows(q.dtype)
        and decode_attention_unavailable_reason(q.dtype) is None
    )


def paged_decode_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim] bf16/f32, unit stride in a head
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim] q's dtype
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim] q's dtype
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
    plan: dict[str, Any] | None = None,
    chunks: torch.Tensor | None = None,  # [num_seqs, num_kv_heads, max_chunks] int, -1 = pad
    chunk_size: int = 0,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim] q's dtype
    """Attention of each new token over its sequence's paged keys (see the module doc).

    `plan` (a step's AttentionMetadata.scratch) keeps the step's converted metadata for
    every layer: converting and checking it took ~8 us a call, 30 calls a step.
    `chunks` (block-sparse): the chunks of `chunk_size` cached positions each KV head reads;
    distinct per row, in any order.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    kernel = _KERNELS.get(q.dtype)
    same = k_cache.dtype == v_cache.dtype == q.dtype
    if kernel is None or not same or q.stride(-1) != 1:
        raise ValueError(
            "q and the caches must be all bf16 or all float32, q with unit stride within a head"
        )
    fn = kernel.get()
    if head_dim not in HEAD_DIMS or num_heads % num_kv_heads:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS} and heads a multiple of kv heads")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the caches must be contiguous")
    meta = once_a_step(
        plan,
        "pda_meta",
        lambda: _step_metadata(block_tables, query_start_loc, seq_lens, tree_mask),
    )
    sparse: tuple[int | None, ...] = (None, 0, 0, 0, 0)
    if chunks is not None:
        if chunks.shape[:2] != (seq_lens.shape[0], num_kv_heads) or chunks.dim() != 3:
            raise ValueError(
                f"chunks {tuple(chunks.shape)} must be [{seq_lens.shape[0]}, {num_kv_heads}, *]"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunks = chunks.to(torch.int64)
        if chunks.shape[2] and chunks.stride(2) != 1:
            chunks = chunks.contiguous()
        strides = (chunks.stride(0), chunks.stride(1))
        sparse = (chunks.data_ptr(), *strides, chunks.shape[2], chunk_size)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype)
    status = fn(
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        *meta.args,
        out.data_ptr(),
        num_heads,
        num_kv_heads,
        head_dim,
        k_cache.shape[1],
        scale,
        torch.get_num_threads(),
        *sparse,
    )
    if status != 0:
        raise RuntimeError(f"{kernel.symbol} returned {status}")
    return out


@dataclass(frozen=True)
class _StepMetadata:
    tensors: tuple[torch.Tensor, ...]  # kept alive while `args` points into them
    args: tuple[int | None, ...]  # block tables + stride, starts, lens, count, mask + stride


def _step_metadata(
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tree_mask: torch.Tensor | None,
) -> _StepMetadata:
    tables = block_tables.to(torch.int32).contiguous()
    starts = query_start_loc.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    tensors = [tables, starts, lens]
    mask_ptr, mask_stride = None, 0
    if tree_mask is not None:
        mask = tree_mask.to(torch.bool).contiguous().view(torch.uint8)
        tensors.append(mask)
        mask_ptr, mask_stride = mask.data_ptr(), mask.stride(0)
    args = (tables.data_ptr(), tables.stride(0), starts.data_ptr(), lens.data_ptr())
    return _StepMetadata(tuple(tensors), (*args, lens.shape[0], mask_ptr, mask_stride))
