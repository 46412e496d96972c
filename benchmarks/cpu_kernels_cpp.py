"""The C++ CPU kernels (slipstream/kernels/cpu/) against what the engine runs without them.

Four parts, each timed interleaved (every candidate once per round, median over rounds,
wall time: the kernels use both cores):
- projections: the 120 projections of one decode step of the default model (30 layers of
  q|k|v, o, gate|up, down; random bf16 weights, 212 MB, so they stream from DRAM as in the
  model) at several row counts: skinny_linear vs packed oneDNN vs plain F.linear, and
  ATen's GEMV (one_row_linear) at one row;
- attention: paged_decode_attention vs the SDPA reference (paged_attention_ref with a step
  plan), one sequence, 9 heads over 3 KV heads, head_dim 64, pages of 16 (kernels_cpu.py's
  batch: shuffled pages, a binary draft tree for several rows);
- norms: add_rms_norm_bf16 vs add_rms_norm_ref on [rows, 576];
- layer_ops: RoPE of q|k, the K/V store and SiLU(gate) * up (layer_ops.cpp) vs the PyTorch
  ops the layer runs without them, at the default model's shapes.

    .venv/bin/python benchmarks/cpu_kernels_cpp.py                # all parts
    .venv/bin/python benchmarks/cpu_kernels_cpp.py --parts projections --rows 1,9,2048

Not a test: run it alone on the machine (another process on the cores moves the numbers).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from kernels_cpu import make_batch  # benchmarks/: a paged batch at the default model's shape

from slipstream.engine.models.llama import _packed_linear, one_row_linear
from slipstream.kernels.cpu.layer_ops import (
    rope_bf16,
    rope_ref,
    silu_mul_bf16,
    silu_mul_ref,
    store_kv_cpu,
)
from slipstream.kernels.cpu.paged_decode_attention import (
    decode_attention_unavailable_reason,
    paged_decode_attention,
)
from slipstream.kernels.cpu.rms_norm import add_rms_norm_bf16, add_rms_norm_ref
from slipstream.kernels.cpu.skinny_linear import (
    pack_skinny_weight,
    skinny_linear,
    skinny_unavailable_reason,
)
from slipstream.kernels.paged_attention import paged_attention_ref
from slipstream.kernels.store_kv import store_kv_ref

HIDDEN, INTER, LAYERS = 576, 1536, 30
# (out, in) of q|k|v (9 + 2 x 3 heads of 64), o, gate|up, down: SmolLM2-135M.
SHAPES = [(960, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall time (ms) of each function, all called once per round in turn."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def projections(rows_list: list[int], rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    plain = [
        (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
        for _ in range(LAYERS)
        for n, k in SHAPES
    ]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in plain]
    skinny = [pack_skinny_weight(w) for w in plain]
    print("\n120 projections of a decode step, ms (median; weights streamed from DRAM)")
    print("| rows | skinny_linear | packed oneDNN | plain F.linear | ATen GEMV |")
    print("| --- | --- | --- | --- | --- |")
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for _, k in SHAPES}

        def run(
            fn: Callable[..., torch.Tensor],
            weights: list[torch.Tensor],
            xs: dict[int, torch.Tensor] = xs,
        ) -> None:
            for w, (_, k) in zip(weights, SHAPES * LAYERS, strict=True):
                fn(xs[k], w, None)

        fns: dict[str, Callable[[], object]] = {
            "skinny": lambda: run(skinny_linear, skinny),
            "packed": lambda: run(_packed_linear, packed),
            "plain": lambda: run(F.linear, plain),
        }
        if rows == 1:
            fns["gemv"] = lambda: run(one_row_linear, plain)
        n = max(3, rounds if rows <= 64 else rounds // 4)
        ms = interleaved_ms(fns, n)
        gemv = f"{ms['gemv']:.2f}" if "gemv" in ms else "-"
        print(
            f"| {rows} | {ms['skinny']:.2f} | {ms['packed']:.2f} | {ms['plain']:.2f} | {gemv} |",
            flush=True,
        )


def attention(cases: list[tuple[int, int]], rounds: int) -> None:
    print("\nattention of one sequence (rows over cached keys), us (median)")
    print("| rows | cached keys | paged_decode_attention | SDPA reference |")
    print("| --- | --- | --- | --- |")
    for rows, ctx in cases:
        tensors, tree_mask = make_batch([rows], [ctx + rows], torch.bfloat16, tree=rows > 1)
        args = (*tensors, 0.125, tree_mask)
        plan_c: dict[str, object] = {}
        plan_r: dict[str, object] = {}

        def cpp(args: tuple = args, plan: dict[str, object] = plan_c) -> object:
            return paged_decode_attention(*args, plan=plan)

        def ref(args: tuple = args, plan: dict[str, object] = plan_r) -> object:
            return paged_attention_ref(*args, plan=plan)

        ms = interleaved_ms({"cpp": cpp, "ref": ref}, rounds * 10)
        print(f"| {rows} | {ctx} | {ms['cpp'] * 1e3:.1f} | {ms['ref'] * 1e3:.1f} |", flush=True)


def norms(rows_list: list[int], rounds: int) -> None:
    print("\nresidual add + RMSNorm + bf16 cast, us per call (median)")
    print("| rows | add_rms_norm_bf16 | PyTorch |")
    print("| --- | --- | --- |")
    weight = torch.rand(HIDDEN) + 0.5
    for rows in rows_list:
        h = torch.randn(rows, HIDDEN)
        delta = torch.randn(rows, HIDDEN).to(torch.bfloat16)

        def many(
            fn: Callable[..., torch.Tensor], h: torch.Tensor = h, delta: torch.Tensor = delta
        ) -> None:
            for _ in range(100):
                fn(h, delta, weight, 1e-5, torch.bfloat16)

        ms = interleaved_ms(
            {"cpp": lambda: many(add_rms_norm_bf16), "ref": lambda: many(add_rms_norm_ref)}, rounds
        )
        print(f"| {rows} | {ms['cpp'] * 10:.1f} | {ms['ref'] * 10:.1f} |", flush=True)


def layer_ops(rows_list: list[int], rounds: int) -> None:
    print("\nper-layer small ops, us per call (median): C++ / PyTorch")
    print("| rows | RoPE (q and k) | K/V store | SiLU(gate) * up |")
    print("| --- | --- | --- | --- |")
    for rows in rows_list:
        us = _layer_ops_us(rows, rounds)
        print(
            f"| {rows} | {us['rope_c']:.1f} / {us['rope_t']:.1f} | {us['store_c']:.1f} /"
            f" {us['store_t']:.1f} | {us['silu_c']:.1f} / {us['silu_t']:.1f} |",
            flush=True,
        )


def _layer_ops_us(rows: int, rounds: int) -> dict[str, float]:
    """us per call of each layer op, C++ (_c) and PyTorch (_t), at the default model's shapes."""
    heads, kv_heads, dim = 9, 3, 64
    k_cache = torch.zeros(4096, 16, kv_heads, dim, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim).to(torch.bfloat16)
    cos, sin = torch.randn(rows, 2, 1, dim).to(torch.bfloat16).unbind(1)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
    slots = torch.randperm(4096 * 16)[:rows]
    gate_up = torch.randn(rows, 2 * INTER).to(torch.bfloat16)
    plan: dict[str, object] = {}
    candidates: dict[str, Callable[[], object]] = {
        "rope_c": lambda: rope_bf16(qkv, heads + kv_heads, dim, cos, sin),
        "rope_t": lambda: rope_ref(qkv, heads + kv_heads, dim, cos, sin),
        "store_c": lambda: store_kv_cpu(k, v, k_cache, v_cache, slots),
        "store_t": lambda: store_kv_ref(k, v, k_cache, v_cache, slots, plan),
        "silu_c": lambda: silu_mul_bf16(gate_up, INTER),
        "silu_t": lambda: silu_mul_ref(gate_up, INTER),
    }

    def hundred(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(100):
                fn()

        return run

    ms = interleaved_ms({name: hundred(fn) for name, fn in candidates.items()}, rounds)
    return {name: t * 10 for name, t in ms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--parts", default="projections,attention,norms,layer_ops")
    ap.add_argument("--rows", default="1,2,5,9,12,16,32,256")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    for reason in (skinny_unavailable_reason(), decode_attention_unavailable_reason()):
        if reason is not None:
            raise SystemExit(f"the C++ kernels are unavailable here: {reason}")
    print(f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    parts = args.parts.split(",")
    if "projections" in parts:
        projections([int(r) for r in args.rows.split(",")], args.rounds)
    if "attention" in parts:
        attention(
            [(1, 300), (9, 300), (17, 300), (81, 300), (1, 2000), (9, 2000), (1, 8192)], args.rounds
        )
    if "norms" in parts:
        norms([1, 9], args.rounds)
    if "layer_ops" in parts:
        layer_ops([1, 9], args.rounds)


if __name__ == "__main__":
    main()
