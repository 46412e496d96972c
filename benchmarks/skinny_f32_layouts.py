"""skinny_linear_f32.cpp over float32 weights in place against their grouped bf16 copies.

Part 1 (layouts): the 120 projections and the LM head of one decode step of the default
model (30 layers of q|k|v 960x576, o 576x576, gate|up 3072x576, down 576x1536, and the
[49152, 576] head; random weights on the bf16 grid, 540 MB as float32, more than the 32 MB
L3, so they stream from DRAM as in the engine) at each row count, the two layouts
alternating round by round; min and median ms per step, and whether the bits agree.

Part 2 (streams): float32 weights in place, [N, K] row-major (each output row its own
stream), the model's 540 MB cut into rows of K from 576 up, one row at a time: how much the
length of a row's stream alone changes the read speed (why the bf16 copy is grouped).

    .venv/bin/python benchmarks/skinny_f32_layouts.py
    .venv/bin/python benchmarks/skinny_f32_layouts.py --rows 1,9 --rounds 20 --parts layouts

Not a test: run it alone on the machine (another process on the cores moves the numbers).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from slipstream.kernels.cpu.skinny_linear_f32 import (
    GroupedBf16Weight,
    pack_grouped_bf16,
    skinny_linear_f32,
)

LAYERS = 30
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (N, K) of one layer
HEAD = (49152, 576)


def step_seconds(weights: list[torch.Tensor | GroupedBf16Weight], rows: int) -> float:
    xs = {k: torch.randn(rows, k) for k in (576, 1536)}
    start = time.perf_counter()
    for w in weights:
        skinny_linear_f32(xs[w.shape[1]], w)
    return time.perf_counter() - start


def layouts(rows_list: list[int], rounds: int) -> None:
    torch.manual_seed(0)
    dense = [torch.randn(n, k).bfloat16().float() for _ in range(LAYERS) for n, k in SHAPES]
    dense.append(torch.randn(*HEAD).bfloat16().float())
    grouped: list[torch.Tensor | GroupedBf16Weight] = []
    for w in dense:
        g = pack_grouped_bf16(w)
        assert g is not None
        grouped.append(g)
    print("| rows | float32 in place, min / median ms | grouped bf16, min / median ms | "
          "median ratio | same bits |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for rows in rows_list:
        x = torch.randn(rows, 576)
        same = torch.equal(skinny_linear_f32(x, dense[0]), skinny_linear_f32(x, grouped[0]))
        times: dict[str, list[float]] = {"f32": [], "bf16": []}
        for _ in range(rounds):
            times["f32"].append(step_seconds(list(dense), rows))
            times["bf16"].append(step_seconds(grouped, rows))
        a, b = (sorted(times[k]) for k in ("f32", "bf16"))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| {rows} | {a[0] * 1e3:.1f} / {ma * 1e3:.1f} | {b[0] * 1e3:.1f} / {mb * 1e3:.1f} "
              f"| {ma / mb:.2f}x | {same} |")  # fmt: skip


def streams(rounds: int) -> None:
    """One-row products over row-major float32 weights, by row length."""
    torch.manual_seed(0)
    total = 135_000_000  # the default model's parameters
    print("| K | row bytes | min ms | GB/s at min |")
    print("| --- | --- | --- | --- |")
    for k in (576, 1152, 2304, 4608, 9216):
        n = 6 * (total // k // 6 // LAYERS)
        ws = [torch.randn(n, k) for _ in range(LAYERS)]
        x = torch.randn(1, k)
        best = min(_time_calls(ws, x) for _ in range(rounds))
        gb = LAYERS * n * k * 4 / 1e9
        print(f"| {k} | {k * 4} | {best * 1e3:.1f} | {gb / best:.1f} |")


def _time_calls(ws: list[torch.Tensor], x: torch.Tensor) -> float:
    start = time.perf_counter()
    for w in ws:
        skinny_linear_f32(x, w)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,5,9,13,17")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--parts", default="layouts,streams")
    args = ap.parse_args()
    parts = args.parts.split(",")
    print(f"{torch.get_num_threads()} threads")
    if "layouts" in parts:
        layouts([int(r) for r in args.rows.split(",")], args.rounds)
    if "streams" in parts:
        streams(args.rounds)


if __name__ == "__main__":
    main()
