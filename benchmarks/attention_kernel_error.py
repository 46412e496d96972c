"""Error of paged_decode_attention.cpp against float64 attention, at a git revision and in
the working tree (for a change to the kernel's arithmetic).

Random bf16 queries and paged caches at the default model's attention shape (9 heads over
3 KV heads, head_dim 64), a decode row or a tree of rows over cached keys; for each build,
the largest absolute error and the error's norm relative to the float64 output's norm,
worst of --trials batches. For scale, the last column rounds the float64 output itself to
bf16 (which keeps 8 bits of mantissa): no bf16 kernel can do better than that.

    .venv/bin/python benchmarks/attention_kernel_error.py --base 7574260
"""

from __future__ import annotations

import argparse
import sys

import torch
from attention_kernel_ab import attention_builds  # benchmarks/: both builds of the kernel
from kernel_revisions import REPO

import slipstream.kernels.cpu.paged_decode_attention as pda

sys.path.insert(0, str(REPO))  # the tests' batch builder and float64 attention
from tests.kernels.test_paged_attention import naive_attention, random_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--cases", default="1x300,9x1000,1x4000", help="rows x cached keys")
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    builds = attention_builds(args.base, torch.bfloat16)
    torch.manual_seed(0)
    columns = [*builds, "float64 rounded to bf16"]
    print("| rows x keys | " + " | ".join(f"{n}: max abs, rel. norm" for n in columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for case in args.cases.split(","):
        rows, keys = (int(x) for x in case.split("x"))
        worst = {name: [0.0, 0.0] for name in columns}
        for _ in range(args.trials):
            batch = random_batch([rows], [keys], 9, 3, 64, dtype=torch.bfloat16, tree=rows > 1)
            ref = naive_attention(batch).double()
            for name in columns:
                if name in builds:
                    pda._KERNELS[torch.bfloat16]._fn = builds[name]
                    out = batch.run(pda.paged_decode_attention).double()
                else:
                    out = ref.to(torch.bfloat16).double()
                err = out - ref
                worst[name][0] = max(worst[name][0], err.abs().max().item())
                worst[name][1] = max(worst[name][1], (err.norm() / ref.norm()).item())
        cells = [f"{w[0]:.4f}, {100 * w[1]:.3f}%" for w in worst.values()]
        print(f"| {rows} x {keys} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
