"""skinny_linear.cpp at a git revision against the working tree, in one process.

Both builds run the 120 projections of one decode step of the default model (30 layers of
q|k|v 960x576, o 576x576, gate|up 3072x576, down 576x1536: 212 MB of random bf16 weights,
more than the 32 MB L3, so they stream from DRAM as in the engine) at each row count,
alternating build by build each round; median ms per step's projections, and whether both
builds give the same bits.

    .venv/bin/python benchmarks/skinny_linear_ab.py --base HEAD~1
    .venv/bin/python benchmarks/skinny_linear_ab.py --base 568e556 --rows 1,8,9,16,256

Not a test: run it alone on the machine (another process on the cores moves the numbers).
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
from skinny_f32_layouts import LAYERS, SHAPES  # benchmarks/: the default model's products

import slipstream.kernels.cpu.skinny_linear as sl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--rows", default="1,2,4,6,7,8,9,12,16,24,64,256")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    weights = [
        sl.pack_skinny_weight(torch.randn(n, k, dtype=torch.bfloat16) * 0.02)
        for _ in range(LAYERS)
        for n, k in SHAPES
    ]
    inputs = {m: {k: torch.randn(m, k, dtype=torch.bfloat16) for _, k in SHAPES} for m in rows}
    builds = build_base_and_working_tree(
        args.base, "skinny_linear.cpp", "slipstream_skinny_linear", sl._SKINNY.argtypes
    )
    threads = torch.get_num_threads()

    def step(fn: Callable[..., int], m: int) -> list[torch.Tensor]:
        outs = []
        for w in weights:
            n, k = w.shape[0] * 16, w.shape[1] * 2
            y = torch.empty(m, n, dtype=torch.bfloat16)
            fn(inputs[m][k].data_ptr(), m, k, w.data_ptr(), n, None, y.data_ptr(), 0, threads)
            outs.append(y)
        return outs

    times, same = interleaved_rounds(builds, rows, args.rounds, step)
    title = f"120 projections, ms (median of {args.rounds} interleaved rounds), {threads} threads"
    print_ab_table(title, "rows", list(builds), times, same)


if __name__ == "__main__":
    main()
