"""page_votes: the C++ kernel against the PyTorch reference at one sequence's 2k-8k keys.

The votes run once per request and sparse layer: at the end of the prefill (the prompt's
last 32 queries choose block top-k's pins) and, with answer_votes N, at the N-th decode step
(N queries). Shapes are the default model's (3 KV heads x 3 query heads, head size 64,
16-token pages), the pages shuffled in a pool, float32.

    python benchmarks/page_votes_timing.py [--reps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from slipstream.kernels.cpu.page_votes import page_votes_cpu, page_votes_cpu_unavailable_reason
from slipstream.kernels.page_votes import page_votes_ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    pool = torch.randn(1100, 16, 3, 64)
    reason = page_votes_cpu_unavailable_reason(torch.zeros(1, 9, 64), pool)
    if reason:
        raise SystemExit(f"the C++ kernel does not run here: {reason}")
    print("| keys | voters | PyTorch ms | C++ ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for seq_len in (2048, 4096, 8192):
        table = torch.randperm(1100)[: seq_len // 16].int()
        for voters in (1, 32):
            q = torch.randn(voters, 9, 64)
            pos = torch.arange(seq_len - voters, seq_len)
            times = []
            for fn in (page_votes_ref, page_votes_cpu):
                fn(q, pool, table, seq_len, pos, 0.125, 8)
                start = time.perf_counter()
                for _ in range(args.reps):
                    fn(q, pool, table, seq_len, pos, 0.125, 8)
                times.append((time.perf_counter() - start) / args.reps * 1e3)
            ratio = times[0] / times[1]
            print(f"| {seq_len} | {voters} | {times[0]:.2f} | {times[1]:.2f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
