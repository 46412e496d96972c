"""Batch-invariant residual add + RMSNorm: one program per row, the row's bits independent of
how many rows share the call.

PyTorch's CUDA reductions pick their thread layout from the whole tensor's shape, so a
row's sum of squares may be added in a different order at 1 row than at 81 (one reason
bf16 speculative decoding on the H200 did not match standard decoding; see
invariant_linear.py). Here a row is one program that reduces its `hidden` values with one
fixed block width. The reference is add_rms_norm_ref (slipstream/kernels/cpu/rms_norm.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    h_ptr,  # [T, hidden] float32 residual stream, updated in place
    delta_ptr,  # [T, hidden] (unused when not HAS_DELTA)
    weight_ptr,  # [hidden] float32
    out_ptr,  # [T, hidden] out dtype
    hidden,
    eps,
    stride_h,
    stride_delta,
    stride_out,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,  # power of two >= hidden
):
    """Program (row): h += delta; out = h * rsqrt(mean(h^2) + eps) * weight."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    h = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        h += tl.load(delta_ptr + row * stride_delta + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * stride_h + cols, h, mask=ok)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, 0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, (h * inv * w).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm_triton(
    h: torch.Tensor,  # [T, hidden] float32, unit stride along hidden; updated in place
    delta: torch.Tensor | None,  # [T, hidden], unit stride along hidden
    weight: torch.Tensor,  # [hidden] float32
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [T, hidden] out_dtype
    """add_rms_norm_ref's contract in one launch; ValueError for layouts it does not take."""
    if h.dim() != 2 or h.dtype != torch.float32 or h.stride(1) != 1:
        raise ValueError(f"h must be a [T, hidden] float32 row-major tensor, got {h.shape}")
    if delta is not None and (delta.shape != h.shape or delta.stride(1) != 1):
        raise ValueError(f"delta must match h {tuple(h.shape)}, got {tuple(delta.shape)}")
    if weight.shape != (h.shape[1],) or weight.dtype != torch.float32:
        raise ValueError(
            f"weight must be float32 [{h.shape[1]}], got {weight.dtype} {weight.shape}"
        )
    rows, hidden = h.shape
    out = torch.empty((rows, hidden), dtype=out_dtype, device=h.device)
    if rows == 0:
        return out
    _add_rms_norm_kernel[(rows,)](
        h,
        delta if delta is not None else h,
        weight,
        out,
        hidden,
        eps,
        h.stride(0),
        delta.stride(0) if delta is not None else 0,
        out.stride(0),
        HAS_DELTA=delta is not None,
        BLOCK=triton.next_power_of_2(hidden),
    )
    return out
