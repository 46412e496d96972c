"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one.

The interpreter runs kernels as NumPy and accepts programs that the real compiler refuses:
an H200 (Triton 3.6) refused a masked load in the HiP score kernel, and a scalar that
changed type inside an `if` passed the interpreter too. Here each launcher is called on
CPU tensors with Triton's driver replaced by one that names an sm_90 target, and every
launch stops after compilation (JITFunction.run with warmup=True), so the full pipeline
down to a cubin runs (Triton's bundled ptxas) and nothing executes.

Run by tests/kernels/test_gpu_compile.py in a subprocess: TRITON_INTERPRET must be unset
before any kernel module is imported, which the test session has already done.

    python -m tests.kernels.gpu_compile      # prints the compiled kernels, exits 1 on failure
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

COMPILED: Counter[str] = Counter()


class _Sm90Driver:
    """The parts of Triton's active driver that compilation asks for."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self) -> Any:
        return torch.cuda

    def is_active(self) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return str(ty_to_cpp(ty))


def _compile_only() -> None:
    driver.set_active(_Sm90Driver())
    run = JITFunction.run

    def compile_without_launch(
        self: JITFunction, *args: Any, grid: Any, warmup: bool, **kw: Any
    ) -> Any:
        kernel = run(self, *args, grid=grid, warmup=True, **kw)
        COMPILED[self.fn.__name__] += 1
        return kernel

    JITFunction.run = compile_without_launch


def _launch_all() -> None:
    """Every launcher at the shapes the engine and the benchmarks use (bf16 and fp32)."""
    from slipstream.kernels.hip_mask import hip_mask_triton
    from slipstream.kernels.invariant_attention import invariant_paged_attention_triton
    from slipstream.kernels.invariant_linear import invariant_linear_triton
    from slipstream.kernels.invariant_rms_norm import add_rms_norm_triton
    from slipstream.kernels.page_scores import page_scores_triton
    from slipstream.kernels.page_summaries import page_key_bounds_triton, page_mean_keys_triton
    from slipstream.kernels.paged_attention import paged_attention_triton
    from slipstream.kernels.sparse_paged_attention import sparse_paged_attention_triton
    from slipstream.kernels.store_kv import store_kv_triton
    from slipstream.kernels.tree_attention import tree_attention_triton

    heads, kv_heads, dim, page = 8, 2, 128, 16
    for dtype in (torch.bfloat16, torch.float32):
        k_cache = torch.zeros(64, page, kv_heads, dim, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        tables = torch.arange(64, dtype=torch.int32).view(2, 32)
        for num_q, tree in (([1, 1], False), ([40, 1], False), ([9, 9], True)):
            q = torch.zeros(sum(num_q), heads, dim, dtype=dtype)
            qsl = torch.tensor([0, num_q[0], sum(num_q)], dtype=torch.int32)
            lens = torch.tensor([300, 200], dtype=torch.int32)
            mask = torch.ones(sum(num_q), max(num_q), dtype=torch.bool) if tree else None
            for splits in (1, 4):
                paged_attention_triton(q, k_cache, v_cache, tables, qsl, lens, 0.1, mask, splits)
            if mask is not None:
                tree_attention_triton(q, k_cache, v_cache, tables, qsl, lens, 0.1, mask)
            invariant_paged_attention_triton(q, k_cache, v_cache, tables, qsl, lens, 0.1, mask)
            chunks = torch.arange(40, dtype=torch.int32).expand(2, kv_heads, 40).contiguous()
            for splits in (1, 4):
                sparse_paged_attention_triton(
                    q, k_cache, v_cache, tables, qsl, lens, chunks, 2, 0.1, mask, splits
                )
            for num_select in (16, 256):  # 256: the benchmark's k = 512 tokens in 2-token blocks
                hip_mask_triton(
                    q, k_cache, tables, qsl, torch.tensor([0, 0]), torch.tensor([250, 60]),
                    num_select, 2,
                )  # fmt: skip
        store_kv_triton(
            torch.zeros(5, kv_heads, dim, dtype=dtype),
            torch.zeros(5, kv_heads, dim, dtype=dtype),
            k_cache,
            v_cache,
            torch.arange(5),
        )
        pages, counts = (
            torch.tensor([3, 9], dtype=torch.int32),
            torch.tensor([16, 4], dtype=torch.int32),
        )
        summary = torch.zeros(64, kv_heads, dim, dtype=dtype)
        page_mean_keys_triton(k_cache, summary, pages, counts)
        if dtype == torch.float32:  # page scores take fp32 summaries only
            pooled = torch.zeros(2, kv_heads, 1, dim)
            head_major = summary.transpose(0, 1).contiguous()
            page_scores_triton(pooled, head_major, tables, [30, 12], 1)
        page_key_bounds_triton(k_cache, summary, summary.clone(), pages, counts)
        # --batch-invariant at the default model's shapes: fused q|k|v, LM head, the norms.
        for rows in (1, 81):
            x = torch.zeros(rows, 576, dtype=dtype)
            invariant_linear_triton(x, torch.zeros(960, 576, dtype=dtype), None)
            invariant_linear_triton(x, torch.zeros(49152, 576, dtype=dtype), None, torch.float32)
            h = torch.zeros(rows, 576)
            add_rms_norm_triton(h, x, torch.ones(576), 1e-5, dtype)


def main() -> int:
    _compile_only()
    try:
        _launch_all()
    finally:
        print(json.dumps(dict(COMPILED)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
