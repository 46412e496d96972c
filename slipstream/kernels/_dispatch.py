"""Choose Triton or the PyTorch reference for an op.

SLIPSTREAM_KERNELS=auto (default): Triton on CUDA tensors, the reference elsewhere.
SLIPSTREAM_KERNELS=torch forces the reference; =triton forces Triton (on CPU that needs
TRITON_INTERPRET=1, which tests/conftest.py sets).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")

_VALID = ("auto", "torch", "triton")


def kernel_backend() -> str:
    """The backend named by SLIPSTREAM_KERNELS."""
    backend = os.environ.get("SLIPSTREAM_KERNELS", "auto")
    if backend not in _VALID:
        raise ValueError(f"SLIPSTREAM_KERNELS={backend!r}; valid: {', '.join(_VALID)}")
    return backend


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast, input_precision) for a kernel's tl.dot on operands of this dtype.

    Triton 3.9's interpreter returns garbage (~1e10) from tl.dot on bf16 operands, so there
    16-bit operands are upcast: fp32 products of bf16/fp16 values are exact, only the
    summation order differs. fp32 dots run "ieee" (tf32 would miss 1e-5 tolerances); the
    precision of 16-bit dots on a GPU is their own ("tf32" is ignored for them).
    """
    upcast = dtype != torch.float32 and triton_interpreting()
    return upcast, "ieee" if dtype == torch.float32 or upcast else "tf32"


def once_a_step(plan: dict[str, Any] | None, key: str, decide: Callable[[], _T]) -> _T:
    """decide(), kept under `key` in `plan` (a step's AttentionMetadata.scratch) so that the
    other layers of the step reuse it; without a plan, decided on every call."""
    if plan is None:
        return decide()
    if key not in plan:
        plan[key] = decide()
    value: _T = plan[key]
    return value


def use_triton(x: torch.Tensor, plan: dict[str, Any] | None = None) -> bool:
    """Whether the op on tensor x should run its Triton kernel.

    With `plan` (a step's AttentionMetadata.scratch) the answer is looked up once a step
    and reused by every layer: reading os.environ twice per layer cost ~0.1 ms a step (30
    layers, 2 cores), 0.4% of a batch-1 decode step.
    """
    if plan is not None:
        return once_a_step(plan, f"use_triton_{x.device.type}", lambda: use_triton(x))
    backend = kernel_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return x.is_cuda
