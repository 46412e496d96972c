"""Batch-invariant linear: y[M, N] = x[M, K] @ w[N, K]^T + bias, a row's bits independent of M.

Why: speculative decoding is lossless only if verifying a token computes the logits that
one-row decoding would. cuBLAS picks its algorithm (split-K, tile shape, reduction order)
from the problem size, so on the H200 a 1-row and an 81-row bf16 GEMM rounded the same row
differently and token recycling matched standard greedy output on only 4-6 of 12 prompts
(BENCHMARKS.md, "GPU: NVIDIA H200 (session 15)"). The CPU engine avoids this through
skinny_linear.cpp; this kernel is the GPU's counterpart.

How: every launch uses the same tiles (BLOCK_M x BLOCK_N outputs per program, BLOCK_K per
step) and one program owns an output tile for the whole K loop, in order: no split-K, no
shape-dependent choice. An output element is then the same sequence of MMA instructions
over the same operands whatever rows share the call. M is not specialised by Triton
(`do_not_specialize`), so M = 1 compiles to the same code as any other M.

Cost: for one row the tile wastes BLOCK_M - 1 rows of tensor-core work, which is free in
a memory-bound GEMV (the weight still streams once); at large M it runs below cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._dispatch import dot_settings

# The same for every call: changing any of these changes the bits, not the invariance.
BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 64


def invariant_linear_ref(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype | None = None,  # default: x's dtype
) -> torch.Tensor:  # [M, N]
    """float32 product of the operands, bias added in float32, then cast."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


@triton.jit(do_not_specialize=["M"])
def _invariant_linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N] (unused when not HAS_BIAS)
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 operands (the interpreter's bf16 tl.dot is unreliable)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands, "tf32" otherwise (unused)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (row tile, column tile): the full K loop of a BLOCK_M x BLOCK_N output tile."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w = tl.load(
            w_ptr + cols[:, None] * stride_wn + ks[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_K]
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_off = rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def invariant_linear_triton(
    x: torch.Tensor,  # [M, K], unit stride along K
    weight: torch.Tensor,  # [N, K], unit stride along K
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype | None = None,  # default: x's dtype; float32 keeps accumulators
) -> torch.Tensor:  # [M, N]
    """The Triton launcher; ValueError for shapes, dtypes or layouts it does not take."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"invariant_linear needs x [M, K] and weight [N, K], got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"invariant_linear needs x and weight of one float dtype, got {x.dtype} "
            f"and {weight.dtype}"
        )
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("invariant_linear needs unit stride along K in x and weight")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    y = x.new_empty((m, n), dtype=out_dtype or x.dtype)
    if m == 0 or n == 0:
        return y
    upcast, precision = dot_settings(x.dtype)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _invariant_linear_kernel[grid](
        x,
        weight,
        bias if bias is not None else x,
        y,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        UPCAST=upcast,
        DOT_PRECISION=precision,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return y
