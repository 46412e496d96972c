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
from collections.abc import Callable

import torch
from kernel_revisions import (  # benchmarks/: a kernel at a git revision
    build_base_and_working_tree,
    interleaved_rounds,
    print_ab_table,
)
from skinny_f32_layouts import HEAD, LAYERS, SHAPES  # benchmarks/: the model's products

import slipstream.kernels.cpu.skinny_linear_f32 as sl

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
    inputs = {m: {k: torch.randn(m, k) for k in (576, 1536)} for m in rows}
    threads = torch.get_num_threads()

    def step(fn: Callable[..., int], m: int) -> list[torch.Tensor]:
        outs = []
        for data, n, k in weights:
            y = torch.empty(m, n)
            fn(inputs[m][k].data_ptr(), m, k, data.data_ptr(), n, None, y.data_ptr(), threads)
            outs.append(y)
        return outs

    times, same = interleaved_rounds(builds, rows, args.rounds, step)
    title = (
        f"{len(weights)} products ({args.layout}), ms (median of {args.rounds} interleaved "
        f"rounds), {threads} threads"
    )
    print_ab_table(title, "rows", list(builds), times, same)


if __name__ == "__main__":
    main()
