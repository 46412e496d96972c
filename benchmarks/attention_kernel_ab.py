"""paged_decode_attention.cpp at a git revision against the working tree, in one process.

Both builds are called through the same Python wrapper, alternating round by round, on the
same random data at the default model's attention shape (9 heads over 3 KV heads, head_dim
64, pages of 16). Each case runs 30 layers, each with its own cache, so the K/V of a step
come from DRAM as in the engine (30 x 6.3 MB at 8k context: more than the 32 MB L3):
- dense at --context (shuffled pages: a pool that has served many requests);
- block-sparse chunk lists at that context: block top-k's default read (sink page, 4 window
  pages + the current one, 16 selected pages: 352 keys a head), a 2k-key read (128 pages),
  and HiP's 2-token chunks (~400 keys a head);
- dense tree-verification steps of --tree-rows rows (a tree mask among the new tokens), as
  token recycling feeds them.
It also checks that both builds give the same bits.

    .venv/bin/python benchmarks/attention_kernel_ab.py --base HEAD~1
    .venv/bin/python benchmarks/attention_kernel_ab.py --base 0cacd2a --context 4096
    .venv/bin/python benchmarks/attention_kernel_ab.py --base HEAD --dtype float32 --context 300

Not a test: run it alone on the machine (another process on the cores moves the numbers).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from kernel_revisions import (  # benchmarks/: a kernel at a git revision
    build_base_and_working_tree,
    print_ab_table,
)
from kernels_cpu import BLOCK_SIZE, make_batch  # benchmarks/: a paged batch, default shape

import slipstream.kernels.cpu.paged_decode_attention as pda

LAYERS = 30


def attention_builds(base: str, dtype: torch.dtype) -> dict[str, Callable[..., int]]:
    """{base: the attention kernel for `dtype` at revision `base`, "working tree": as it is
    now}."""
    kernel = pda._KERNELS[dtype]
    return build_base_and_working_tree(
        base, kernel.source_name, kernel.symbol, kernel.argtypes, isa=kernel.isa
    )


def chunk_lists(ctx: int, chunk: int, fixed: list[int], selected: int) -> torch.Tensor:
    """[1, 3, S] chunk ids: `fixed` plus `selected` random others, per KV head."""
    total, taken = ctx // chunk, set(fixed)
    pool = torch.tensor([c for c in range(total) if c not in taken])
    rows = [
        torch.cat([torch.tensor(fixed), pool[torch.randperm(len(pool))[:selected]]]).sort().values
        for _ in range(3)
    ]
    return torch.stack(rows).unsqueeze(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--context", type=int, default=8192, help="cached keys")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="bfloat16: paged_decode_attention.cpp (AVX512-BF16); float32: "
        "paged_decode_attention_f32.cpp (AVX2 + FMA)",
    )
    ap.add_argument(
        "--tree-rows", default="5,9,13", help="rows of the tree steps timed (empty: none)"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    ctx = args.context
    pages = ctx // BLOCK_SIZE
    dtype = getattr(torch, args.dtype)
    layers = [make_batch([1], [ctx + 1], dtype)[0] for _ in range(LAYERS)]
    window = list(range(pages - 5, pages + 1))  # 4 window pages + the current one
    hip_window = list(range((ctx - 128) // 2, ctx // 2 + 1))
    # case -> (per-layer tensors, tree mask, chunk lists, chunk size)
    Case = tuple[list[list[torch.Tensor]], torch.Tensor | None, torch.Tensor | None, int]
    cases: dict[str, Case] = {
        f"dense {ctx}": (layers, None, None, 0),
        "block top-k, 352 keys": (
            layers,
            None,
            chunk_lists(ctx, BLOCK_SIZE, [0, *window], 16),
            BLOCK_SIZE,
        ),
        "block top-k, 2k keys": (
            layers,
            None,
            chunk_lists(ctx, BLOCK_SIZE, [0, *window], 122),
            BLOCK_SIZE,
        ),
        "HiP 2-token chunks, ~400 keys": (
            layers,
            None,
            chunk_lists(ctx, 2, [*range(8), *hip_window], 128),
            2,
        ),
    }
    for rows in (int(r) for r in args.tree_rows.split(",") if r):
        batches = [make_batch([rows], [ctx + rows], dtype, tree=True) for _ in range(LAYERS)]
        cases[f"tree of {rows} rows, dense"] = ([b[0] for b in batches], batches[0][1], None, 0)
    builds = attention_builds(args.base, dtype)
    times: dict[tuple[str, str], list[float]] = {(b, c): [] for b in builds for c in cases}
    outs: dict[tuple[str, str], torch.Tensor] = {}
    names = list(builds)
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in names if r % 2 else names[::-1]:
            pda._KERNELS[dtype]._fn = builds[name]
            for case, (case_layers, mask, chunks, chunk_size) in cases.items():
                plan: dict[str, object] = {}
                start = time.perf_counter()
                for tensors in case_layers:
                    out = pda.paged_decode_attention(
                        *tensors, 0.125, mask, plan=plan, chunks=chunks, chunk_size=chunk_size
                    )
                if r:
                    times[(name, case)].append(time.perf_counter() - start)
                else:
                    outs[(name, case)] = out
    same = {case: torch.equal(outs[(names[0], case)], outs[(names[1], case)]) for case in cases}
    title = (
        f"30 layers of {args.dtype} decode attention, ms (median of {args.rounds} interleaved "
        "rounds)"
    )
    print_ab_table(title, "case", names, times, same)


if __name__ == "__main__":
    main()
