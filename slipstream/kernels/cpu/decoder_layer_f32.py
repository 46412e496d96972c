"""decoder_layer.py's two calls for float32 models on AVX2 + FMA CPUs
(decoder_layer_f32.cpp).

A layer's norms, four projections, RoPE and SiLU * up as two C++ calls around attention,
running skinny_linear_f32 and layer_ops_f32 in the op-by-op path's order, so the bits are
the same (tests/engine/test_skinny_f32_path.py). Up to skinny_linear_f32.MAX_ROWS rows: above
that the op-by-op path runs the products in several kernel calls, or hands them to MKL
(above CHUNKED_MAX_ROWS), which these calls cannot do.
"""

from __future__ import annotations

import ctypes

import torch

from slipstream.kernels.cpu.build import CppFunction
from slipstream.kernels.cpu.decoder_layer import (
    LayerBuffers,
    after_attention_args,
    before_attention_args,
    check_attention_output,
)
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
    args = before_attention_args(
        h, delta, norm_weight, eps, _weight_ptr(qkv_weight), qkv_bias, cos, sin, buffers
    )
    grouped = isinstance(qkv_weight, GroupedBf16Weight)
    status = _BEFORE.get()(*args, grouped, torch.get_num_threads())
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
    check_attention_output(attn, h.shape[0], o_weight.shape[1], torch.float32)
    args = after_attention_args(
        h, attn, _weight_ptr(o_weight), o_bias, norm_weight, eps, _weight_ptr(gate_up_weight),
        gate_up_bias, _weight_ptr(down_weight), down_bias, buffers,
    )  # fmt: skip
    grouped = isinstance(o_weight, GroupedBf16Weight)
    status = _AFTER.get()(*args, grouped, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"slipstream_layer_after_attention_f32 refused op {status} (shapes)")
    return buffers.delta
