"""Where one forward step's time goes, by the number of tokens it feeds.

A speculative step feeds the root plus its draft (a chain here, attended through a tree
mask as token recycling's steps are) at a given context length. Per step: the four
projections of every layer, attention (KV store + paged attention), the RMS norms with
their residual adds and bf16 casts, SiLU(gate) * up, RoPE, the rest of the layers (splits,
views), and the LM head (with its bf16 refinement where the logits come out in bf16). Then the
vocabulary top-k and argmax that every step runs, torch against vocab_topk.py.

    .venv/bin/python benchmarks/step_breakdown.py                  # default model, bf16
    .venv/bin/python benchmarks/step_breakdown.py --context 1000 --fed 1,5,9,17

Parts are timed with wrappers (perf_counter around each call), which add ~1 us a call.
Run it alone: other processes on the cores move the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from slipstream import LLM
from slipstream.engine.attention import AttentionMetadata
from slipstream.engine.model_runner import ancestor_mask
from slipstream.engine.vocab_topk import vocab_argmax, vocab_topk

TOTALS: dict[str, float] = defaultdict(float)


def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, adding its wall time to TOTALS[part]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        TOTALS[part] += time.perf_counter() - t0
        return out

    return wrapper


def instrument(model: Any) -> None:
    """Wrap each layer's projections (both paths), attention backend, norms, SiLU * up, RoPE.

    The layers run their ops one by one here: the fused C++ calls (decoder_layer.cpp, the
    engine's default on AVX512-BF16) would hide them from the wrappers."""
    for layer in model.layers:
        layer.fused_cpu = False
        layer.linear = timed("projections", layer.linear)
        layer.linear_one_row = timed("projections", layer.linear_one_row)
        layer.linear_skinny = timed("projections", layer.linear_skinny)
    for backend in model.attn_backends:
        backend.forward = timed("attention", backend.forward)
    # The norms with their residual adds and bf16 casts (C++ or PyTorch).
    for module in (*model.layers, model):
        module.add_norm = timed("rms_norm", module.add_norm)
    # C++ (layer_ops.cpp) or PyTorch, whichever the layer took.
    for layer in model.layers:
        layer.silu_mul = timed("silu", layer.silu_mul)
        layer.rope = timed("rope", layer.rope)


def step_metadata(context: int, fed: int, block_size: int) -> AttentionMetadata:
    """One sequence with `context` cached tokens feeding a chain of `fed` through a tree mask."""
    total = context + fed
    table = list(range(1, (total + block_size - 1) // block_size + 1))
    slots = [table[p // block_size] * block_size + p % block_size for p in range(context, total)]
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, fed], dtype=torch.int32),
        seq_lens=torch.tensor([total], dtype=torch.int32),
        block_tables=torch.tensor([table], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        tree_mask=ancestor_mask([-1, *range(fed - 1)]) if fed > 1 else None,
        max_query_len=fed,
        max_seq_len=total,
        seq_ids=[0],
        query_start_loc_list=[0, fed],
        seq_lens_list=[total],
    )


def time_step(llm: Any, context: int, fed: int, reps: int) -> dict[str, float]:
    """Mean ms per step of each part over `reps` steps (after 3 warm-up steps)."""
    runner = llm.engine.runner
    model = runner.model
    ids = torch.randint(0, model.config.vocab_size - 1, (fed,))
    positions = torch.arange(context, context + fed)
    walls: list[float] = []
    with torch.inference_mode():
        for rep in range(reps + 3):
            if rep == 3:
                TOTALS.clear()
            meta = step_metadata(context, fed, runner.block_size)
            t0 = time.perf_counter()
            hidden = model(ids, positions, runner.layer_caches(), meta)
            t1 = time.perf_counter()
            model.compute_logits(hidden)
            if rep >= 3:
                TOTALS["lm_head+refine"] += time.perf_counter() - t1
                walls.append(t1 - t0)
    out = {part: 1000 * total / reps for part, total in TOTALS.items()}
    parts = ("projections", "attention", "rms_norm", "silu", "rope")
    out["rest_of_layers"] = 1000 * statistics.mean(walls) - sum(out.get(p, 0.0) for p in parts)
    return out


def time_call(fn: Callable[[], Any], reps: int = 200) -> float:
    """Mean microseconds per call, after 10 warm-up calls."""
    for _ in range(10):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1e6 * (time.perf_counter() - t0) / reps


def time_vocab_ops(x: torch.Tensor) -> list[float]:
    """us per call: torch.topk, vocab_topk (k = 8), torch.argmax, vocab_argmax over x."""
    return [
        time_call(lambda: x.topk(8, dim=-1)),
        time_call(lambda: vocab_topk(x, 8)),
        time_call(lambda: x.argmax(dim=-1)),
        time_call(lambda: vocab_argmax(x)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=300, help="cached tokens before the step")
    ap.add_argument("--fed", default="1,5,9,17", help="tokens fed per step (root + draft)")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    llm = LLM(dtype=args.dtype, kv_cache_memory_gib=0.3)
    fed_counts = [int(x) for x in args.fed.split(",")]
    limit = llm.engine.max_model_len
    if args.context + max(fed_counts) > limit:
        ap.error(f"--context + the largest --fed must be <= the model's {limit} positions")
    instrument(llm.engine.runner.model)
    print(f"ms per step, context {args.context}, {args.dtype}, {torch.get_num_threads()} threads")
    cols = (
        "projections",
        "attention",
        "rms_norm",
        "silu",
        "rope",
        "rest_of_layers",
        "lm_head+refine",
    )
    print("| fed | " + " | ".join(cols) + " | total |")
    print("| --- " * (len(cols) + 2) + "|")
    for fed in fed_counts:
        parts = time_step(llm, args.context, fed, args.reps)
        cells = [parts.get(c, 0.0) for c in cols]
        print(f"| {fed} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {sum(cells):.2f} |")
    vocab = llm.engine.runner.arch.vocab_size
    print(f"\nus per call over [rows, {vocab}] float32 logits (top-8; argmax)")
    print("| rows | torch.topk | vocab_topk | torch.argmax | vocab_argmax |")
    print("| --- | --- | --- | --- | --- |")
    for rows in (1, 9, 17, 128):
        cells = time_vocab_ops(torch.randn(rows, vocab))
        print(f"| {rows} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
