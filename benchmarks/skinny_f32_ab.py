"""skinny_linear_f32.cpp at a git revision against the working tree, in one process.

Both builds run the products of one decode step of the default model (30 layers of q|k|v
960x576, o 576x576, gate|up 3072x576, down 576x1536, and the [49152, 576] LM head: random
weights on the bf16 grid, 270 MB as grouped bf16 copies or 540 MB as float32, more than the
32 MB L3, so they stream from DRAM as in the engine) at each row count, alternating build by
build each round; median ms per step's products, and whether both builds give the same bits.

    .venv/bin/python benchmarks/skinny_f32_ab.py --base HEAD~1
    .venv/bin/python benchmarks/skinny_f32_ab.py --base HEAD~1 --layout float32 --rows 1,5,9

Needs AVX2 + FMA. Not a test: run it alone on the machine (another process on the cores
moves the numbers).
"""

from __future__ import annotations

import argparse
import time

import torch
from kernel_revisions import (  # benchmarks/: a kernel at a git revision
    build_base_and_working_tree,
    print_ab_table,
)

import slipstream.kernels.cpu.skinny_linear_f32 as sl

LAYERS = 30
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (N, K) of one layer
HEAD = (49152, 576)
FUNCTIONS = {  # layout -> the C entry point that reads it
    "grouped": "slipstream_skinny_linear_f32_bf16g",
    "float32": "slipstream_skinny_linear_f32",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
    ap.add_argument(
        "--layout",
        choices=sorted(FUNCTIONS),
        default="grouped",
        help="grouped: bf16 copies (the default model's path); float32: the weights in place",
    )
    ap.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10,11,12,13,17,25,32")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    dense = [torch.randn(n, k).bfloat16().float() for _ in range(LAYERS) for n, k in SHAPES]
    dense.append(torch.randn(*HEAD).bfloat16().float())
    weights: list[tuple[torch.Tensor, int, int]] = []  # (what the kernel reads, N, K)
    for w in dense:
        if args.layout == "grouped":
            grouped = sl.pack_grouped_bf16(w)
            assert grouped is not None
            weights.append((grouped.packed, *w.shape))
        else:
            weights.append((w, *w.shape))
    if args.layout == "grouped":
        del dense  # only the copies are read: 270 MB instead of 810
    fn_name = FUNCTIONS[args.layout]
    builds = build_base_and_working_tree(
        args.base, "skinny_linear_f32.cpp", fn_name, sl._SKINNY_F32.argtypes, isa="avx2_fma"
    )
    names = list(builds)
    inputs = {m: {k: torch.randn(m, k) for k in (576, 1536)} for m in rows}
    times: dict[tuple[str, int], list[float]] = {(b, m): [] for b in names for m in rows}
    outs: dict[tuple[str, int], list[torch.Tensor]] = {}
    threads = torch.get_num_threads()
    for r in range(args.rounds + 1):  # round 0 warms up and keeps the outputs
        for name in names if r % 2 else names[::-1]:
            fn = builds[name]
            for m in rows:
                kept = []
                start = time.perf_counter()
                for data, n, k in weights:
                    y = torch.empty(m, n)
                    fn(
                        inputs[m][k].data_ptr(),
                        m,
                        k,
                        data.data_ptr(),
                        n,
                        None,
                        y.data_ptr(),
                        threads,
                    )
                    if not r:
                        kept.append(y)
                if r:
                    times[(name, m)].append(time.perf_counter() - start)
                else:
                    outs[(name, m)] = kept
    same = {
        m: all(
            torch.equal(x, y) for x, y in zip(outs[(names[0], m)], outs[(names[1], m)], strict=True)
        )
        for m in rows
    }
    title = (
        f"{len(weights)} products ({args.layout}), ms (median of {args.rounds} interleaved "
        f"rounds), {threads} threads"
    )
    print_ab_table(title, "rows", names, times, same)


if __name__ == "__main__":
    main()
