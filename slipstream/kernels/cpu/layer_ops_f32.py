"""Residual add + RMSNorm, RoPE and SiLU(gate) * up for float32 models on AVX2 + FMA CPUs,
one C++ call each (layer_ops_f32.cpp).

The float32 counterparts of rms_norm.py's add_rms_norm_bf16 and layer_ops.py's bf16 ops,
with the same arguments, so the Llama layer swaps them in for the PyTorch references
(add_rms_norm_ref, rope_ref, silu_mul_ref) where the kernels build. The caller guarantees
the layouts (the layer checks them once, in use_skinny_f32): float32, contiguous rows, a
head size that is a multiple of 16 and an intermediate size that is a multiple of 8.
"""

from __future__ import annotations

import ctypes

import torch

from slipstream.kernels.cpu.build import CppFunction
from slipstream.kernels.cpu.layer_ops import call_rope
from slipstream.kernels.cpu.rms_norm import call_add_rms_norm

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# h, delta or NULL, weight, out, rows, hidden, eps, threads
_NORM = CppFunction(
    "layer_ops_f32.cpp",
    "slipstream_add_rms_norm_f32",
    [_P, _P, _P, _P, _I64, _I64, ctypes.c_float, ctypes.c_int],
    isa="avx2_fma",
)
# qkv, its row stride, tokens, heads, head dim, cos, sin, their row stride, out
_ROPE = CppFunction(
    "layer_ops_f32.cpp",
    "slipstream_rope_f32",
    [_P, _I64, _I64, _I64, _I64, _P, _P, _I64, _P],
    isa="avx2_fma",
)
# gate_up, tokens, intermediate size, out, threads
_SILU_MUL = CppFunction(
    "layer_ops_f32.cpp",
    "slipstream_silu_mul_f32",
    [_P, _I64, _I64, _P, ctypes.c_int],
    isa="avx2_fma",
)


def layer_ops_f32_unavailable_reason() -> str | None:
    """None when the three float32 ops can run here, else why not."""
    return _NORM.unavailable_reason()


def layer_ops_f32_fit(head_dim: int, intermediate_size: int) -> bool:
    """Whether rope_f32 and silu_mul_f32 take a model of these sizes."""
    return head_dim % 16 == 0 and intermediate_size % 8 == 0


def add_rms_norm_f32(
    h: torch.Tensor,  # [T, hidden] float32, contiguous; updated in place
    delta: torch.Tensor | None,  # [T, hidden] float32, contiguous
    weight: torch.Tensor,  # [hidden] float32, contiguous
    eps: float,
    out_dtype: torch.dtype = torch.float32,  # float32 only; keeps NormFn's shape
) -> torch.Tensor:  # [T, hidden] float32
    """h += delta; return rms_norm(h) * weight (add_rms_norm_ref's result)."""
    out = torch.empty_like(h)
    call_add_rms_norm(_NORM.get(), h, delta, weight, eps, out)
    return out


def rope_f32(
    qkv: torch.Tensor,  # [T, (H + 2 KV) * D] float32, unit stride in a row
    heads: int,  # H + KV: the heads that rotate (q, then k)
    head_dim: int,
    cos: torch.Tensor,  # [T, 1, D] float32, unit stride in a row
    sin: torch.Tensor,  # [T, 1, D] float32, first half negated, same row stride as cos
) -> torch.Tensor:  # [T, heads, D] float32
    """x * cos + rotate_half(x) * sin for q and k (rope_ref's result)."""
    out = torch.empty(qkv.shape[0], heads, head_dim, dtype=torch.float32)
    if call_rope(_ROPE.get(), qkv, heads, head_dim, cos, sin, out) != 0:
        raise ValueError(f"rope_f32 needs a head size that is a multiple of 16, got {head_dim}")
    return out


def silu_mul_f32(gate_up: torch.Tensor, inter: int) -> torch.Tensor:  # [T, inter] float32
    """SiLU(gate) * up over gate_up's halves (contiguous float32; silu_mul_ref's result)."""
    out = torch.empty(gate_up.shape[0], inter, dtype=torch.float32)
    status = _SILU_MUL.get()(
        gate_up.data_ptr(), gate_up.shape[0], inter, out.data_ptr(), torch.get_num_threads()
    )
    if status != 0:
        raise ValueError(f"silu_mul_f32 needs an intermediate size % 8 == 0, got {inter}")
    return out
