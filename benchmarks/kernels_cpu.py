"""CPU timings of the kernels' PyTorch references (what the engine runs without a GPU).

Compares the plain per-sequence loop (`_paged_attention_loop`, the pre-optimisation
reference) with `paged_attention_ref`, and the masked store_kv with `store_kv_ref`, at the
default model's attention shape (9 heads over 3 KV heads, head_dim 64, pages of 16).

    .venv/bin/python benchmarks/kernels_cpu.py [--threads 2] [--out cpu.json]

Not a test: timings depend on the machine. They are process CPU time per call, the best of
three runs, with one torch thread by default, so that other processes' load does not count.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

import torch

from slipstream.kernels.paged_attention import _paged_attention_loop, paged_attention_ref
from slipstream.kernels.store_kv import store_kv_ref

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
SCALE = HEAD_DIM**-0.5


def time_us(fn: Callable[[], object], budget_s: float = 0.25, repeats: int = 3) -> float:
    """Best mean CPU time of `repeats` runs, each of as many calls as fit in budget_s / repeats.

    Process CPU time, not wall time: on a shared machine wall time also counts the time other
    processes hold the cores (2-5x swings seen with 2 busy neighbours on 2 cores). With more
    than one thread it sums the threads' time, so compare like with like.
    """
    fn()
    start = time.process_time()
    fn()
    per_call = time.process_time() - start
    calls = max(1, int(budget_s / repeats / max(per_call, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def make_batch(
    num_q: list[int], seq_lens: list[int], dtype: torch.dtype, tree: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Random q and a paged cache with shuffled pages; returns (op args, tree_mask)."""
    pages = [(n + BLOCK_SIZE - 1) // BLOCK_SIZE for n in seq_lens]
    total = sum(pages) + 1
    shape = (total, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=dtype)
    v_cache = torch.randn(shape, dtype=dtype)
    order = torch.randperm(total)
    block_tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        block_tables[b, :n] = order[used : used + n]
        used += n
    starts = torch.tensor([0, *num_q]).cumsum(0).to(torch.int32)
    q = torch.randn(int(starts[-1]), NUM_HEADS, HEAD_DIM, dtype=dtype)
    tree_mask = None
    if tree:  # a chain-of-pairs tree: node i's parent is (i - 1) // 2
        n = max(num_q)
        tree_mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            tree_mask[i] |= tree_mask[(i - 1) // 2]
        tree_mask = tree_mask.repeat(len(num_q), 1)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [q, k_cache, v_cache, block_tables, starts, lens], tree_mask


def _store_kv_masked(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """The pre-optimisation store_kv reference (boolean mask every call)."""
    keep = slots >= 0
    k_cache.view(-1, *k_cache.shape[2:])[slots[keep]] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots[keep]] = v[keep].to(v_cache.dtype)


def attention_rows(dtype: torch.dtype) -> list[dict[str, object]]:
    """Decode at 3 contexts x 3 batch sizes, plus a prefill and a tree verification."""
    cases: list[tuple[str, list[int], list[int], bool]] = []
    for ctx in (128, 1024, 4096):
        for batch in (1, 8, 32):
            cases.append((f"decode b={batch} ctx={ctx}", [1] * batch, [ctx] * batch, False))
    cases.append(("prefill 512", [512], [512], False))
    cases.append(("tree 16 nodes ctx=1024", [16], [1040], True))
    cases.append(("tree b=8 x 16 nodes ctx=1024", [16] * 8, [1040] * 8, True))
    rows = []
    for name, num_q, seq_lens, tree in cases:
        args, tree_mask = make_batch(num_q, seq_lens, dtype, tree)
        q, k_cache, v_cache, block_tables, starts, lens = args
        call = (q, k_cache, v_cache, block_tables, starts, lens, SCALE, tree_mask)
        before = time_us(partial(_paged_attention_loop, *call))
        after = time_us(partial(paged_attention_ref, *call))
        rows.append({"op": "paged_attention", "case": name, "before_us": before, "after_us": after})
    return rows


def store_rows(dtype: torch.dtype) -> list[dict[str, object]]:
    """store_kv for one decode token, a decode batch of 32 and a 512-token prefill."""
    rows = []
    cache_shape = (2048, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.zeros(cache_shape, dtype=dtype), torch.zeros(cache_shape, dtype=dtype)
    for num_tokens in (1, 32, 512):
        k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
        v = torch.randn_like(k)
        slots = torch.randperm(2048 * BLOCK_SIZE)[:num_tokens]
        before = time_us(partial(_store_kv_masked, k, v, k_cache, v_cache, slots))
        after = time_us(partial(store_kv_ref, k, v, k_cache, v_cache, slots))
        rows.append(
            {
                "op": "store_kv",
                "case": f"tokens={num_tokens}",
                "before_us": before,
                "after_us": after,
            }
        )
    return rows


def main() -> None:
    """Time both ops in bf16 and fp32; print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time adds up)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"{'dtype':9} {'op':16} {'case':30} {'before us':>10} {'after us':>10} {'x':>6}")
    for dtype in (torch.bfloat16, torch.float32):
        for row in attention_rows(dtype) + store_rows(dtype):
            row["dtype"] = str(dtype).removeprefix("torch.")
            b, a = float(row["before_us"]), float(row["after_us"])  # type: ignore[arg-type]
            print(
                f"{row['dtype']:9} {row['op']:16} {row['case']:30} {b:10.1f} {a:10.1f} {b / a:6.1f}"
            )
            results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"threads": args.threads, "torch": torch.__version__, "rows": results}, f, indent=1
            )


if __name__ == "__main__":
    main()
