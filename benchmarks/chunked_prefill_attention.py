"""Chunked prefill's attention on CPU: one SDPA call with an explicit mask against two
unmasked parts merged by their log-sum-exp (kernels/paged_attention_torch.py, _attend_chunk).

A chunk of --chunk new tokens after each of --contexts cached keys, at the default model's
attention shape (9 heads over 3 KV heads, head_dim 64, pages of 16), one layer's call timed
as the engine makes it: the mask (masked path) is built once and reused, as a step's layers
share it. Both paths alternate round by round in one process, so the machine's drift hits
both alike; the outputs are compared too.

    .venv/bin/python benchmarks/chunked_prefill_attention.py
    .venv/bin/python benchmarks/chunked_prefill_attention.py --contexts 2048,6144 --dtype bfloat16

Not a test: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from slipstream.kernels import paged_attention_torch as pa

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def one_layer(split: bool, args: tuple, cache: dict) -> torch.Tensor:  # type: ignore[type-arg]
    """The chunk's attention through the split path or the masked one."""
    pa._SPLIT_CHUNK_ROWS = 256 if split else 1 << 30
    return pa._attend_one(*args, cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk", type=int, default=2048, help="new tokens in the chunk")
    parser.add_argument("--contexts", default="2048,4096,6144", help="cached keys before it")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if pa._FLASH_WITH_LSE is None:
        raise SystemExit("this torch has no _scaled_dot_product_flash_attention_for_cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"one layer, {args.chunk}-token chunk, {args.dtype}, {torch.get_num_threads()} threads")
    print("| cached keys | masked s | split s | speedup | max abs diff |")
    print("| --- | --- | --- | --- | --- |")
    for ctx in map(int, args.contexts.split(",")):
        seq_len = ctx + args.chunk
        blocks = -(-seq_len // BLOCK)
        k_cache = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM).to(dtype)
        v_cache = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM).to(dtype)
        table = torch.randperm(blocks).int()
        q = torch.randn(args.chunk, HEADS, HEAD_DIM).to(dtype)
        call = (q, k_cache, v_cache, table, seq_len, HEAD_DIM**-0.5, None)
        caches: dict[bool, dict] = {False: {}, True: {}}  # type: ignore[type-arg]
        outs = {split: one_layer(split, call, caches[split]) for split in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            for split in (r % 2 == 0, r % 2 == 1):
                start = time.perf_counter()
                one_layer(split, call, caches[split])
                times[split].append(time.perf_counter() - start)
        masked, split = min(times[False]), min(times[True])
        diff = (outs[True].float() - outs[False].float()).abs().max().item()
        print(f"| {ctx} | {masked:.3f} | {split:.3f} | {masked / split:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
