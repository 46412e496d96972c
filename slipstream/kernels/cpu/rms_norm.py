"""Residual add + RMSNorm + bf16 cast in one C++ call (rms_norm.cpp), and its reference.

Both add `delta` into the float32 residual stream `h` in place and return h's
RMS-normalised rows cast to the model's dtype: what the Llama layer runs before attention
and before the MLP. The C++ kernel needs bf16 output and a hidden size that is a multiple
of 16 (fused_norm_applies); otherwise the model runs add_rms_norm_ref.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

from slipstream.kernels.cpu.build import CppFunction

# h, delta or NULL, weight, out, rows, hidden, eps, threads
_NORM = CppFunction(
    "rms_norm.cpp",
    "slipstream_add_rms_norm",
    [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int],
)


def rms_norm_unavailable_reason() -> str | None:
    """None when add_rms_norm_bf16 can run here, else why not."""
    return _NORM.unavailable_reason()


def add_rms_norm_ref(
    h: torch.Tensor,  # [T, hidden] float32 residual stream, updated in place
    delta: torch.Tensor | None,  # [T, hidden], added into h first
    weight: torch.Tensor,  # [hidden] float32
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [T, hidden] out_dtype
    """PyTorch: h += delta; return rms_norm(h) * weight cast to out_dtype."""
    if delta is not None:
        h += delta
    return F.rms_norm(h, (h.shape[-1],), weight, eps).to(out_dtype)


def fused_norm_applies(hidden_size: int) -> bool:
    """Whether add_rms_norm_bf16 can run a model with this hidden size here."""
    return hidden_size % 16 == 0 and rms_norm_unavailable_reason() is None


def add_rms_norm_bf16(
    h: torch.Tensor,  # [T, hidden] float32, contiguous, CPU; updated in place
    delta: torch.Tensor | None,  # [T, hidden] bf16, contiguous
    weight: torch.Tensor,  # [hidden] float32, contiguous
    eps: float,
    out_dtype: torch.dtype = torch.bfloat16,  # bf16 only; the argument keeps NormFn's shape
) -> torch.Tensor:  # [T, hidden] bf16
    """add_rms_norm_ref's result through the C++ kernel.

    The caller guarantees the layouts above (the Llama model checks them once, at
    pack_for_cpu: its residual stream is a fresh contiguous float32 tensor and skinny_linear
    returns contiguous bf16): checking them here cost ~5 us a call, 61 calls a step.
    """
    out = torch.empty_like(h, dtype=torch.bfloat16)  # 1.2 us; empty(h.shape) takes 2.7
    call_add_rms_norm(_NORM.get(), h, delta, weight, eps, out)
    return out


def call_add_rms_norm(
    fn: Callable[..., int],
    h: torch.Tensor,  # [T, hidden] float32, contiguous; updated in place
    delta: torch.Tensor | None,  # [T, hidden], contiguous
    weight: torch.Tensor,  # [hidden] float32, contiguous
    eps: float,
    out: torch.Tensor,  # [T, hidden], contiguous
) -> None:
    """An add + RMSNorm kernel's C call (bf16's or float32's: the same arguments)."""
    fn(
        h.data_ptr(),
        None if delta is None else delta.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        h.shape[0],
        h.shape[1],
        eps,
        torch.get_num_threads(),
    )
