"""decoder_layer.py's two calls for float32 models on AVX2 + FMA CPUs
(decoder_layer_f32.cpp).

A layer's norms, four projections, RoPE and SiLU * up as two C++ calls around attention,
running skinny_linear_f32 and layer_ops_f32 in the op-by-op path's order, so the bits are
the same (tests/engine/test_skinny_f32_path.py). Up to skinny_linear_f32.MAX_ROWS rows: above
that the op-by-op path hands the products to MKL, which these calls cannot do.
"""

from __future__ import annotations

import ctypes

import torch

from slipstream.kernels.cpu.build import CppFunction
from slipstream.kernels.cpu.decoder_layer import LayerBuffers
from slipstream.kernels.cpu.skinny_linear_f32 import GroupedBf16Weight

_P, _I64, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_OPS = ("skinny_linear_f32.cpp", "layer_ops_f32.cpp")  # linked in with decoder_layer_f32.cpp
# h, delta, norm weight, eps, rows, hidden, x, qkv weight, qkv bias, qkv width, qkv,
# rotating heads, head dim, cos, sin, their row stride, rot, grouped, threads
_BEFORE = CppFunction(
    "decoder_layer_f32.cpp",
    "slipstream_layer_before_attention_f32",
    [_P, _P, _P, _F, _I64, _I64, _P, _P, _P, _I64, _P, _I64, _I64, _P, _P, _I64, _P, _INT, _INT],
    also=_OPS,
    isa="avx2_fma",
)
# h, attn, q size, rows, hidden, o weight, o bias, attn_proj, norm weight, eps, x,
# gate|up weight, its bias, inter, gate_up, act, down weight, its bias, delta, grouped,
# threads
_AFTER = CppFunction(
    "decoder_layer_f32.cpp",
    "slipstream_layer_after_attention_f32",
    [_P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _F, _P, _P, _P, _I64, _P, _P, _P, _P, _P]
    + [_INT, _INT],
    also=_OPS,
    isa="avx2_fma",
)

Weight = torch.Tensor | GroupedBf16Weight  # every weight of a layer of one kind


def decoder_layer_f32_unavailable_reason() -> str | None:
    """None when the two float32 calls can run here, else why not."""
    return _BEFORE.unavailable_reason()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _weight_ptr(w: Weight) -> int:
    return w.packed.data_ptr() if isinstance(w, GroupedBf16Weight) else w.data_ptr()


def layer_before_attention_f32(
    h: torch.Tensor,  # [T, hidden] float32, contiguous; h += delta in place
    delta: torch.Tensor | None,  # [T, hidden] float32, contiguous
    norm_weight: torch.Tensor,  # [hidden] float32
    eps: float,
    qkv_weight: Weight,  # [qkv_n, hidden]
    qkv_bias: torch.Tensor | None,  # [qkv_n] float32
    cos: torch.Tensor,  # [T, 1, D] float32, unit stride in a row
    sin: torch.Tensor,  # [T, 1, D] float32, cos's row stride
    buffers: LayerBuffers,  # float32
) -> None:
    """add_rms_norm_f32, the q|k|v projection and rope_f32: results in buffers.qkv, .rot."""
    rows, hidden = h.shape
    status = _BEFORE.get()(
        h.data_ptr(),
        _ptr(delta),
        norm_weight.data_ptr(),
        eps,
        rows,
        hidden,
        buffers.x.data_ptr(),
        _weight_ptr(qkv_weight),
        _ptr(qkv_bias),
        buffers.qkv.shape[1],
        buffers.qkv.data_ptr(),
        buffers.rot.shape[1],
        buffers.rot.shape[2],
        cos.data_ptr(),
        sin.data_ptr(),
        cos.stride(0),
        buffers.rot.data_ptr(),
        isinstance(qkv_weight, GroupedBf16Weight),
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"slipstream_layer_before_attention_f32 refused op {status} (shapes)")


def layer_after_attention_f32(
    h: torch.Tensor,  # [T, hidden] float32, contiguous; h += attn W_o^T in place
    attn: torch.Tensor,  # [T, q_size] float32, contiguous
    o_weight: Weight,  # [hidden, q_size]
    o_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,  # [hidden] float32
    eps: float,
    gate_up_weight: Weight,  # [2 inter, hidden]
    gate_up_bias: torch.Tensor | None,
    down_weight: Weight,  # [hidden, inter]
    down_bias: torch.Tensor | None,
    buffers: LayerBuffers,  # float32
) -> torch.Tensor:  # buffers.delta: [T, hidden] float32, the MLP output
    """o_proj, add_rms_norm_f32, gate|up, silu_mul_f32 and down: the layer's MLP output."""
    rows, hidden = h.shape
    # The one input an attention backend makes: the kernel would misread another dtype's or
    # layout's bytes.
    q_size = o_weight.shape[1]
    if attn.dtype != torch.float32 or attn.shape != (rows, q_size) or not attn.is_contiguous():
        raise ValueError(
            f"attention output must be contiguous [{rows}, {q_size}] float32, "
            f"got {tuple(attn.shape)} {attn.dtype}"
        )
    status = _AFTER.get()(
        h.data_ptr(),
        attn.data_ptr(),
        q_size,
        rows,
        hidden,
        _weight_ptr(o_weight),
        _ptr(o_bias),
        buffers.attn_proj.data_ptr(),
        norm_weight.data_ptr(),
        eps,
        buffers.x.data_ptr(),
        _weight_ptr(gate_up_weight),
        _ptr(gate_up_bias),
        buffers.act.shape[1],
        buffers.gate_up.data_ptr(),
        buffers.act.data_ptr(),
        _weight_ptr(down_weight),
        _ptr(down_bias),
        buffers.delta.data_ptr(),
        isinstance(o_weight, GroupedBf16Weight),
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"slipstream_layer_after_attention_f32 refused op {status} (shapes)")
    return buffers.delta
