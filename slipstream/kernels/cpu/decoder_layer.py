"""A decoder layer's work outside attention as two C++ calls (decoder_layer.cpp).

The Llama layer on the CPU kernels runs eight small ops around attention (two norms, four
projections, RoPE, SiLU * up); through their separate wrappers each pays ~5-8 us of Python,
ctypes and allocation, ~1.5-2 ms a step for the default model's 30 layers. These two calls
run the same C kernels in the same order, so their bits equal the op-by-op path's
(tests/kernels/test_decoder_layer_cpp.py), into buffers allocated once a step and shared by
every layer (LayerBuffers).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch

from slipstream.kernels.cpu.build import CppFunction

_P, _I64, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# The single ops' sources, linked into the library with decoder_layer.cpp.
_OPS = ("skinny_linear.cpp", "rms_norm.cpp", "layer_ops.cpp")
# h, delta, norm weight, eps, rows, hidden, x, qkv weight, qkv bias, qkv width, qkv,
# rotating heads, head dim, cos, sin, their row stride, rot, threads
_BEFORE = CppFunction(
    "decoder_layer.cpp",
    "slipstream_layer_before_attention",
    [_P, _P, _P, _F, _I64, _I64, _P, _P, _P, _I64, _P, _I64, _I64, _P, _P, _I64, _P, _INT],
    also=_OPS,
)
# h, attn, q size, rows, hidden, o weight, o bias, attn_proj, norm weight, eps, x,
# gate|up weight, its bias, inter, gate_up, act, down weight, its bias, delta, threads
_AFTER = CppFunction(
    "decoder_layer.cpp",
    "slipstream_layer_after_attention",
    [_P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _F, _P, _P, _P, _I64, _P, _P, _P, _P, _P, _INT],
    also=_OPS,
)


def decoder_layer_unavailable_reason() -> str | None:
    """None when the two fused calls can run here, else why not."""
    return _BEFORE.unavailable_reason()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass(frozen=True)
class LayerBuffers:
    """One step's scratch and outputs for every layer (each layer overwrites the last's:
    a layer's q, k, v and MLP output are read before the next layer writes them)."""

    # In the model's dtype (bf16, or float32 for decoder_layer_f32.py).
    x: torch.Tensor  # [T, hidden]: normed rows
    qkv: torch.Tensor  # [T, qkv_n]: q | k | v; v is read from here
    rot: torch.Tensor  # [T, H + KV, D]: rotated q | k
    attn_proj: torch.Tensor  # [T, hidden]
    gate_up: torch.Tensor  # [T, 2 * inter]
    act: torch.Tensor  # [T, inter]
    delta: torch.Tensor  # [T, hidden]: the MLP output
    # Views for the attention backend, made once a step rather than once a layer.
    q: torch.Tensor  # [T, H, D] of rot
    k: torch.Tensor  # [T, KV, D] of rot
    v: torch.Tensor  # [T, KV, D] of qkv

    @staticmethod
    def allocate(
        rows: int,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        inter: int,
        dtype: torch.dtype = torch.bfloat16,
    ) -> LayerBuffers:
        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype)

        qkv = empty(rows, (num_heads + 2 * num_kv_heads) * head_dim)
        rot = empty(rows, num_heads + num_kv_heads, head_dim)
        q, k = rot.split([num_heads, num_kv_heads], dim=1)
        v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(rows, num_kv_heads, head_dim)
        return LayerBuffers(
            x=empty(rows, hidden),
            qkv=qkv,
            rot=rot,
            attn_proj=empty(rows, hidden),
            gate_up=empty(rows, 2 * inter),
            act=empty(rows, inter),
            delta=empty(rows, hidden),
            q=q,
            k=k,
            v=v,
        )


def before_attention_args(
    h: torch.Tensor,  # [T, hidden] float32, contiguous
    delta: torch.Tensor | None,  # [T, hidden], contiguous
    norm_weight: torch.Tensor,  # [hidden] float32
    eps: float,
    qkv_weight_ptr: int,  # the q|k|v weight as the C call takes it
    qkv_bias: torch.Tensor | None,
    cos: torch.Tensor,  # [T, 1, D], unit stride in a row
    sin: torch.Tensor,  # [T, 1, D], cos's row stride
    buffers: LayerBuffers,
) -> tuple[Any, ...]:
    """The arguments the before-attention calls (bf16 and float32) share, in their order."""
    rows, hidden = h.shape
    return (
        h.data_ptr(),
        _ptr(delta),
        norm_weight.data_ptr(),
        eps,
        rows,
        hidden,
        buffers.x.data_ptr(),
        qkv_weight_ptr,
        _ptr(qkv_bias),
        buffers.qkv.shape[1],
        buffers.qkv.data_ptr(),
        buffers.rot.shape[1],
        buffers.rot.shape[2],
        cos.data_ptr(),
        sin.data_ptr(),
        cos.stride(0),
        buffers.rot.data_ptr(),
    )


def after_attention_args(
    h: torch.Tensor,  # [T, hidden] float32, contiguous
    attn: torch.Tensor,  # [T, q_size], contiguous (check_attention_output)
    o_weight_ptr: int,
    o_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,  # [hidden] float32
    eps: float,
    gate_up_weight_ptr: int,
    gate_up_bias: torch.Tensor | None,
    down_weight_ptr: int,
    down_bias: torch.Tensor | None,
    buffers: LayerBuffers,
) -> tuple[Any, ...]:
    """The arguments the after-attention calls (bf16 and float32) share, in their order."""
    rows, hidden = h.shape
    return (
        h.data_ptr(),
        attn.data_ptr(),
        attn.shape[1],
        rows,
        hidden,
        o_weight_ptr,
        _ptr(o_bias),
        buffers.attn_proj.data_ptr(),
        norm_weight.data_ptr(),
        eps,
        buffers.x.data_ptr(),
        gate_up_weight_ptr,
        _ptr(gate_up_bias),
        buffers.act.shape[1],
        buffers.gate_up.data_ptr(),
        buffers.act.data_ptr(),
        down_weight_ptr,
        _ptr(down_bias),
        buffers.delta.data_ptr(),
    )


def check_attention_output(attn: torch.Tensor, rows: int, q_size: int, dtype: torch.dtype) -> None:
    """The one input an attention backend makes: the kernels would misread another dtype's
    or layout's bytes as rows of `dtype`."""
    if attn.dtype != dtype or attn.shape != (rows, q_size) or not attn.is_contiguous():
        raise ValueError(
            f"attention output must be contiguous [{rows}, {q_size}] {dtype}, "
            f"got {tuple(attn.shape)} {attn.dtype}"
        )


def layer_before_attention(
    h: torch.Tensor,  # [T, hidden] float32, contiguous; h += delta in place
    delta: torch.Tensor | None,  # [T, hidden] bf16, contiguous
    norm_weight: torch.Tensor,  # [hidden] float32
    eps: float,
    qkv_weight: torch.Tensor,  # packed by pack_skinny_weight: [qkv_n / 16, hidden / 2, 16, 2]
    qkv_bias: torch.Tensor | None,  # [qkv_n] bf16
    cos: torch.Tensor,  # [T, 1, D] bf16, unit stride in a row
    sin: torch.Tensor,  # [T, 1, D] bf16, cos's row stride
    buffers: LayerBuffers,
) -> None:
    """add_rms_norm, the q|k|v projection and RoPE: results in buffers.qkv and .rot."""
    args = before_attention_args(
        h, delta, norm_weight, eps, qkv_weight.data_ptr(), qkv_bias, cos, sin, buffers
    )
    status = _BEFORE.get()(*args, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"slipstream_layer_before_attention refused op {status} (shapes)")


def layer_after_attention(
    h: torch.Tensor,  # [T, hidden] float32, contiguous; h += attn W_o^T in place
    attn: torch.Tensor,  # [T, q_size] bf16, contiguous
    o_weight: torch.Tensor,  # packed [hidden / 16, q_size / 2, 16, 2]
    o_bias: torch.Tensor | None,
    norm_weight: torch.Tensor,  # [hidden] float32
    eps: float,
    gate_up_weight: torch.Tensor,  # packed [2 inter / 16, hidden / 2, 16, 2]
    gate_up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,  # packed [hidden / 16, inter / 2, 16, 2]
    down_bias: torch.Tensor | None,
    buffers: LayerBuffers,
) -> torch.Tensor:  # buffers.delta: [T, hidden] bf16, the MLP output
    """o_proj, add_rms_norm, gate|up, SiLU * up and down: the layer's MLP output."""
    check_attention_output(attn, h.shape[0], o_weight.shape[1] * 2, torch.bfloat16)
    args = after_attention_args(
        h, attn, o_weight.data_ptr(), o_bias, norm_weight, eps, gate_up_weight.data_ptr(),
        gate_up_bias, down_weight.data_ptr(), down_bias, buffers,
    )  # fmt: skip
    status = _AFTER.get()(*args, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"slipstream_layer_after_attention refused op {status} (shapes)")
    return buffers.delta
