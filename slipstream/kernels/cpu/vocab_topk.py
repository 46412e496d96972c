"""Exact top-k of float32 vocabulary rows in one C++ pass (vocab_topk.cpp); torch.topk is
the reference (same values; among equal values the lower index first)."""

from __future__ import annotations

import ctypes

import torch

from slipstream.kernels.cpu.build import CppFunction

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# values, rows, vocab, row stride, k, out values, out indices, threads
_ARGTYPES = [_P, _I64, _I64, _I64, _I64, _P, _P, ctypes.c_int]
# AVX2 (8 logits a compare) runs on every CPU the engine's kernels do, AVX512 ones included.
_KERNEL = CppFunction("vocab_topk.cpp", "slipstream_vocab_topk", _ARGTYPES, isa="avx2_fma")


def vocab_topk_cpu_applies(values: torch.Tensor, k: int) -> bool:
    """Whether vocab_topk_cpu takes these rows: [R, V] float32 on the CPU, unit stride
    within a row, 1 <= k <= V, and the kernel built."""
    return (
        values.device.type == "cpu"
        and values.dtype == torch.float32
        and values.dim() == 2
        and values.stride(-1) == 1
        and 1 <= k <= values.shape[1]
        and not values.requires_grad
        and _KERNEL.unavailable_reason() is None
    )


def vocab_topk_cpu(
    values: torch.Tensor,  # [R, V] float32 (check vocab_topk_cpu_applies)
    k: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:  # ([R, k] float32, [R, k] int64) or None
    """Each row's k largest values, largest first, and their indices (the lower index first
    among equal values, so [:, 0] is argmax's answer); None when a row holds a NaN (torch
    ranks NaN largest: take torch.topk then)."""
    rows, vocab = values.shape
    out_vals = torch.empty(rows, k, dtype=torch.float32)
    out_idx = torch.empty(rows, k, dtype=torch.int64)
    if rows == 0:
        return out_vals, out_idx
    status = _KERNEL.get()(
        values.data_ptr(),
        rows,
        vocab,
        values.stride(0),
        k,
        out_vals.data_ptr(),
        out_idx.data_ptr(),
        torch.get_num_threads(),
    )
    if status == 1:
        return None
    if status != 0:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    return out_vals, out_idx
