"""float32 linear for AVX2 CPUs (skinny_linear_f32.cpp) and its PyTorch reference.

y[M, N] = x[M, K] @ w[N, K]^T + bias for the few rows of decode and speculative steps,
straight from the weight's own layout. The engine runs float32 models' products through it
on CPUs with AVX2 and FMA (float32 is the default where the CPU lacks native bf16) up to
MAX_ROWS rows; prefill-sized inputs stay with PyTorch (MKL), whose blocked GEMM reuses x
across outputs where this kernel re-reads it for every few outputs.

Like skinny_linear (bf16), a row's output has the same bits whatever other rows share the
call, so a speculative step's verification rows match what one-row decoding computes.

The weight may also come as a bf16 tensor holding exactly the float32 weight's values
(`exact_bf16_copy`): the kernel widens it as it reads, for the same bits from half the
bytes. A float32 model loaded from a bf16 checkpoint (the default model) is such a model.
"""

from __future__ import annotations

import ctypes

import torch

from slipstream.kernels.cpu.build import CppFunction

# Above this many rows the engine calls F.linear: at 64 rows MKL's GEMM already wins (this
# kernel re-reads x for every group of outputs). Steps up to here (decode batches, a
# speculative tree of up to 32 rows) get the streaming kernel.
MAX_ROWS = 32

_SKINNY_F32 = CppFunction(
    "skinny_linear_f32.cpp",
    "slipstream_skinny_linear_f32",
    [
        ctypes.c_void_p,  # x
        ctypes.c_int64,  # M
        ctypes.c_int64,  # K
        ctypes.c_void_p,  # weight [N, K]
        ctypes.c_int64,  # N
        ctypes.c_void_p,  # bias or NULL
        ctypes.c_void_p,  # y
        ctypes.c_int,  # threads
    ],
    isa="avx2_fma",
)
_SKINNY_F32_BF16_WEIGHTS = CppFunction(
    "skinny_linear_f32.cpp",
    "slipstream_skinny_linear_f32_bf16w",
    _SKINNY_F32.argtypes,  # the same, the weight as bf16 bits
    isa="avx2_fma",
)


def skinny_f32_unavailable_reason() -> str | None:
    """None when the engine should use the kernel, else why not (no compiler, no AVX2 +
    FMA, turned off by SLIPSTREAM_CPU_KERNELS=0)."""
    return _SKINNY_F32.unavailable_reason()


def can_run_f32(weight: torch.Tensor) -> bool:
    """Whether skinny_linear_f32 takes this weight: 2-D contiguous float32 (or bf16) on
    CPU."""
    return (
        weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.is_contiguous()
    )


def exact_bf16_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """A bf16 copy of a float32 weight when bf16 holds every value exactly (a bf16
    checkpoint upcast), else None: skinny_linear_f32 over the copy gives the same bits."""
    copy = weight.detach().to(torch.bfloat16)
    return copy if torch.equal(copy.float(), weight) else None


def skinny_linear_f32(
    x: torch.Tensor,  # [M, K] float32
    weight: torch.Tensor,  # [N, K] float32, or bf16 (see exact_bf16_copy); contiguous
    bias: torch.Tensor | None = None,  # [N] float32
) -> torch.Tensor:  # [M, N] float32
    """x @ weight.T + bias: the C++ kernel up to MAX_ROWS rows, F.linear above (a bf16
    weight is widened for it).

    RuntimeError if the kernel is unavailable. Checks only what would make it read out of
    bounds (121 calls a decode step).
    """
    if x.shape[0] > MAX_ROWS:
        return torch.nn.functional.linear(x, weight.float(), bias)
    fn = (_SKINNY_F32_BF16_WEIGHTS if weight.dtype == torch.bfloat16 else _SKINNY_F32).get()
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.float32:
        raise ValueError(f"x must be [M, {k}] float32, got {tuple(x.shape)} {x.dtype}")
    if not can_run_f32(weight):
        raise ValueError(
            "weight must be a contiguous 2-D float32 or bf16 CPU tensor, got "
            f"{tuple(weight.shape)} {weight.dtype} on {weight.device}"
        )
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32):
        raise ValueError(f"bias must be [{n}] float32, got {tuple(bias.shape)} {bias.dtype}")
    if not x.is_contiguous():
        x = x.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    status = fn(
        x.data_ptr(),
        x.shape[0],
        k,
        weight.data_ptr(),
        n,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:  # unreachable after the checks above; kept so a mismatch cannot pass
        raise RuntimeError(f"skinny_linear_f32 returned {status}")
    return y


def skinny_linear_f32_ref(
    x: torch.Tensor,  # [M, K] float32
    weight: torch.Tensor,  # [N, K] float32 or bf16
    bias: torch.Tensor | None = None,  # [N] float32
) -> torch.Tensor:  # [M, N] float32
    """The kernel's summation order in PyTorch: 8 lanes, lane l summing k = l mod 8 in
    increasing k (each step rounded once: float64 holds the exact product and the sum,
    then rounds to float32, as an FMA does but for rare double-rounding ties), then the
    lanes added as ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)), then the bias."""
    m, k = x.shape
    n = weight.shape[0]
    pad = (-k) % 8
    xp = torch.nn.functional.pad(x.double(), (0, pad)).view(m, -1, 8)
    wp = torch.nn.functional.pad(weight.double(), (0, pad)).view(n, -1, 8)
    lanes = torch.zeros(m, n, 8, dtype=torch.float32)
    for c in range(xp.shape[1]):
        lanes = (lanes.double() + xp[:, None, c, :] * wp[None, :, c, :]).float()
    half = lanes[..., :4] + lanes[..., 4:]  # (0 + 4), (1 + 5), (2 + 6), (3 + 7)
    pairs = half[..., :2] + half[..., 2:]  # (0 + 4) + (2 + 6), (1 + 5) + (3 + 7)
    y = pairs[..., 0] + pairs[..., 1]
    if bias is not None:
        y = y + bias
    return y
