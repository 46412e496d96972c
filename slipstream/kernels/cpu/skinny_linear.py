"""bf16 linear for AVX512-BF16 CPUs (skinny_linear.cpp) and its PyTorch reference.

y[M, N] = x[M, K] @ w[N, K]^T + bias. Built for the few rows of decode and speculative
steps, it also beats packed oneDNN on prefill-sized inputs on the dev CPU, so the engine
runs every bf16 product through it. Two properties the engine relies on:
- speed: the weight streams from memory once for all rows; see the .cpp for the tiling and
  BENCHMARKS.md for numbers.
- batch invariance: a row's output is the same bits whatever other rows share the call,
  so a speculative step's verification rows match what one-row decoding computes.

skinny_linear_ref reproduces the kernel bit for bit: VDPBF16PS adds each pair's odd product,
then its even product, into the float32 accumulator (products of two bf16 are exact in
float32, so each add rounds once, like the reference's adds).
"""

from __future__ import annotations

import ctypes

import torch

from slipstream.kernels.cpu.build import CppFunction

_BLOCK = 16  # outputs per kernel block: N must be a multiple


_SKINNY = CppFunction(
    "skinny_linear.cpp",
    "slipstream_skinny_linear",
    [
        ctypes.c_void_p,  # x
        ctypes.c_int64,  # M
        ctypes.c_int64,  # K
        ctypes.c_void_p,  # packed weight
        ctypes.c_int64,  # N
        ctypes.c_void_p,  # bias or NULL
        ctypes.c_void_p,  # y
        ctypes.c_int,  # float32 output
        ctypes.c_int,  # threads
    ],
)


def skinny_unavailable_reason() -> str | None:
    """None when the engine should use the kernel, else why not (no compiler, no
    AVX512-BF16, turned off by SLIPSTREAM_CPU_KERNELS=0)."""
    return _SKINNY.unavailable_reason()


def can_pack(weight: torch.Tensor) -> bool:
    """Whether pack_skinny_weight takes this weight: 2-D bf16 on CPU, N % 16 == 0, K even."""
    return (
        weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.shape[0] % _BLOCK == 0
        and weight.shape[1] % 2 == 0
    )


def pack_skinny_weight(
    weight: torch.Tensor,  # [N, K] bf16
) -> torch.Tensor:  # [N/16, K/2, 16, 2] bf16
    """The kernel's layout: block b, pair p holds weight[16b + i, 2p + j] at [b, p, i, j]."""
    if not can_pack(weight):
        raise ValueError(
            f"skinny_linear needs a 2-D bf16 CPU weight with N % 16 == 0 and even K, "
            f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}"
        )
    n, k = weight.shape
    return weight.reshape(n // _BLOCK, _BLOCK, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def skinny_linear(
    x: torch.Tensor,  # [M, K] bf16
    packed: torch.Tensor,  # [N/16, K/2, 16, 2] from pack_skinny_weight
    bias: torch.Tensor | None = None,  # [N] bf16
    out_dtype: torch.dtype = torch.bfloat16,  # or torch.float32 (unrounded accumulators)
) -> torch.Tensor:  # [M, N]
    """x @ weight.T + bias through the C++ kernel; RuntimeError if it is unavailable.

    Checks only what would make the kernel read out of bounds (121 calls a decode step;
    each microsecond here is ~0.8% of a step): `packed` must come from pack_skinny_weight.
    """
    fn = _SKINNY.get()
    n, k = packed.shape[0] * _BLOCK, packed.shape[1] * 2
    if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.bfloat16:
        raise ValueError(f"x must be [M, {k}] bf16, got {tuple(x.shape)} {x.dtype}")
    if out_dtype is not torch.bfloat16 and out_dtype is not torch.float32:
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.bfloat16):
        raise ValueError(f"bias must be [{n}] bf16, got {tuple(bias.shape)} {bias.dtype}")
    if not x.is_contiguous():
        x = x.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = torch.empty(x.shape[0], n, dtype=out_dtype)
    status = fn(
        x.data_ptr(),
        x.shape[0],
        k,
        packed.data_ptr(),
        n,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        int(out_dtype == torch.float32),
        torch.get_num_threads(),
    )
    if status != 0:  # unreachable after the checks above; kept so a mismatch cannot pass
        raise RuntimeError(f"slipstream_skinny_linear returned {status}")
    return y


def skinny_linear_ref(
    x: torch.Tensor,  # [M, K] bf16
    weight: torch.Tensor,  # [N, K] bf16, plain layout
    bias: torch.Tensor | None = None,  # [N] bf16
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # [M, N]
    """The kernel's arithmetic in PyTorch: float32 accumulators starting at the bias, then
    per input pair the odd product, then the even one; rounded once at the end. K / 2
    sequential steps, so for tests on small shapes."""
    xf, wf = x.float(), weight.float()
    acc = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32)
    if bias is not None:
        acc += bias.float()
    for p in range(0, x.shape[1], 2):
        acc += xf[:, p + 1, None] * wf[None, :, p + 1]
        acc += xf[:, p, None] * wf[None, :, p]
    return acc.to(out_dtype)
