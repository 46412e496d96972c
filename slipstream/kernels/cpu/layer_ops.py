"""RoPE, the K/V store and SiLU(gate) * up as one C++ call each (layer_ops.cpp; the store
is store_kv.cpp, for any dtype), with the PyTorch references the Llama layer runs without
them.

All three are small (a decode row moves a few kilobytes) and PyTorch spends its time on
dispatch: ~18, ~12 and ~9 us a layer for one row on 2 cores, against ~3 us a call here.
The caller guarantees the layouts (the Llama layer checks them once, when it packs its
weights for the CPU kernels): bf16, contiguous rows, a head size that is a multiple of 32.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

from slipstream.kernels.cpu.build import CppFunction

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# qkv, its row stride, tokens, heads, head dim, cos, sin, their row stride, out
_ROPE = CppFunction(
    "layer_ops.cpp", "slipstream_rope", [_P, _I64, _I64, _I64, _I64, _P, _P, _I64, _P]
)
# k, strides, v, strides, caches, slots, tokens, kv heads, head dim, element bytes, slots
# in the cache. Any dtype: built for AVX2, so float32 models on AVX2-only CPUs take it too.
_STORE = CppFunction(
    "store_kv.cpp",
    "slipstream_store_kv",
    [_P, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64],
    isa="avx2_fma",
)
# gate_up, tokens, intermediate size, out, threads
_SILU_MUL = CppFunction("layer_ops.cpp", "slipstream_silu_mul", [_P, _I64, _I64, _P, ctypes.c_int])


def layer_ops_unavailable_reason() -> str | None:
    """None when the bf16 RoPE and SiLU * up can run here, else why not."""
    return _ROPE.unavailable_reason()


def store_kv_unavailable_reason() -> str | None:
    """None when store_kv_cpu can run here, else why not."""
    return _STORE.unavailable_reason()


def rope_ref(
    qkv: torch.Tensor,  # [T, (H + 2 KV) * D]
    heads: int,  # H + KV: the heads that rotate (q, then k)
    head_dim: int,
    cos: torch.Tensor,  # [T, 1, D]
    sin: torch.Tensor,  # [T, 1, D], first half negated
) -> torch.Tensor:  # [T, heads, D]
    """x * cos + rotate_half(x) * sin for q and k, in the model's dtype (two roundings)."""
    qk = qkv[:, : heads * head_dim].view(qkv.shape[0], heads, head_dim)
    rot = qk.roll(head_dim // 2, dims=-1)
    return rot.mul_(sin).addcmul_(qk, cos)


def call_rope(
    fn: Callable[..., int],
    qkv: torch.Tensor,  # [T, (H + 2 KV) * D], unit stride in a row
    heads: int,
    head_dim: int,
    cos: torch.Tensor,  # [T, 1, D], unit stride in a row
    sin: torch.Tensor,  # [T, 1, D], same row stride as cos
    out: torch.Tensor,  # [T, heads, D], contiguous
) -> int:
    """A RoPE kernel's C call (bf16's or float32's: the same arguments); its status."""
    return fn(
        qkv.data_ptr(),
        qkv.stride(0),
        qkv.shape[0],
        heads,
        head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        cos.stride(0),
        out.data_ptr(),
    )


def rope_bf16(
    qkv: torch.Tensor,  # [T, (H + 2 KV) * D] bf16, contiguous
    heads: int,
    head_dim: int,
    cos: torch.Tensor,  # [T, 1, D] bf16, unit stride in a row
    sin: torch.Tensor,  # [T, 1, D] bf16, same row stride as cos
) -> torch.Tensor:  # [T, heads, D] bf16
    """rope_ref through the C++ kernel."""
    out = torch.empty(qkv.shape[0], heads, head_dim, dtype=torch.bfloat16)
    if call_rope(_ROPE.get(), qkv, heads, head_dim, cos, sin, out) != 0:
        raise ValueError(f"rope_bf16 needs a head size that is a multiple of 32, got {head_dim}")
    return out


def store_kv_cpu(
    k: torch.Tensor,  # [T, KV, D], unit stride within a head
    v: torch.Tensor,  # [T, KV, D], unit stride within a head
    k_cache: torch.Tensor,  # [num_blocks, block_size, KV, D], contiguous, k's dtype
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, contiguous; -1 = skip
) -> None:
    """store_kv_ref's scatter, one row copy per (token, head)."""
    status = _STORE.get()(
        k.data_ptr(),
        k.stride(0),
        k.stride(1),
        v.data_ptr(),
        v.stride(0),
        v.stride(1),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slot_mapping.data_ptr(),
        k.shape[0],
        k.shape[1],
        k.shape[2],
        k.element_size(),
        k_cache.shape[0] * k_cache.shape[1],
    )
    if status != 0:
        raise IndexError(f"a slot of {slot_mapping.tolist()} is past the cache's slots")


def store_kv_cpu_applies(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> bool:
    """Whether store_kv_cpu can take these tensors (CPU, one dtype, unit inner strides)."""
    return (
        k.device.type == "cpu"
        and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
        and k.stride(-1) == 1
        and v.stride(-1) == 1
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and slot_mapping.dtype == torch.int64
        and slot_mapping.is_contiguous()
        and store_kv_unavailable_reason() is None
    )


def silu_mul_ref(gate_up: torch.Tensor, inter: int) -> torch.Tensor:  # [T, inter]
    """SiLU(gate) * up, gate | up = gate_up's halves."""
    gate, up = gate_up.split(inter, dim=-1)
    return F.silu(gate).mul_(up)


def silu_mul_bf16(gate_up: torch.Tensor, inter: int) -> torch.Tensor:  # [T, inter] bf16
    """silu_mul_ref through the C++ kernel (gate_up contiguous bf16, inter % 16 == 0)."""
    out = torch.empty(gate_up.shape[0], inter, dtype=torch.bfloat16)
    status = _SILU_MUL.get()(
        gate_up.data_ptr(), gate_up.shape[0], inter, out.data_ptr(), torch.get_num_threads()
    )
    if status != 0:
        raise ValueError(f"silu_mul_bf16 needs an intermediate size % 16 == 0, got {inter}")
    return out
