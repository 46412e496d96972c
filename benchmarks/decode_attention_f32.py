"""paged_decode_attention_f32.cpp alone: one decode step's attention over a long context.

30 layers (the default model's) of float32 caches, each with `--context` cached keys, 9
query heads over 3 KV heads of 64 dims, pages of 16 in order or shuffled across the pool;
`--rows` query rows of one sequence (1 = a decode step, more = a verification tree, each
row reading every cached key). Prints the best of 5 passes over the 30 layers.

    .venv/bin/python benchmarks/decode_attention_f32.py --context 8192 --rows 1,4
"""

from __future__ import annotations

import argparse
import time

import torch

from slipstream.kernels.cpu.paged_decode_attention import (
    decode_attention_unavailable_reason,
    paged_decode_attention,
)

LAYERS, BLOCK, HEADS, KV_HEADS, DIM = 30, 16, 9, 3, 64


def step_ms(
    caches: list[tuple[torch.Tensor, torch.Tensor]], context: int, rows: int, shuffle: bool
) -> float:
    """Best of 5: milliseconds for one step's attention over every layer."""
    num_blocks = caches[0][0].shape[0]
    order = torch.randperm(num_blocks) if shuffle else torch.arange(num_blocks)
    tables = order[: (context + rows + BLOCK - 1) // BLOCK].to(torch.int32).unsqueeze(0)
    q = torch.randn(rows, HEADS, DIM)
    starts = torch.tensor([0, rows], dtype=torch.int32)
    lens = torch.tensor([context + rows], dtype=torch.int32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for k_cache, v_cache in caches:
            paged_decode_attention(q, k_cache, v_cache, tables, starts, lens, DIM**-0.5)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--context", type=int, default=8192, help="cached keys per layer")
    ap.add_argument("--rows", default="1,4", help="comma-separated query rows per step")
    args = ap.parse_args()
    reason = decode_attention_unavailable_reason(torch.float32)
    if reason is not None:
        raise SystemExit(f"the float32 kernel cannot run here: {reason}")
    torch.manual_seed(0)
    num_blocks = args.context // BLOCK + 16
    shape = (num_blocks, BLOCK, KV_HEADS, DIM)
    caches = [(torch.randn(shape), torch.randn(shape)) for _ in range(LAYERS)]
    megabytes = 2 * LAYERS * args.context * KV_HEADS * DIM * 4 / 1e6
    for rows in (int(r) for r in args.rows.split(",")):
        for shuffle in (False, True):
            ms = step_ms(caches, args.context, rows, shuffle)
            pages = "shuffled" if shuffle else "in order"
            print(f"rows {rows}, pages {pages}: {ms:.1f} ms / {LAYERS} layers "
                  f"({megabytes * rows / ms:.1f} GB/s of K/V read)")  # fmt: skip


if __name__ == "__main__":
    main()
