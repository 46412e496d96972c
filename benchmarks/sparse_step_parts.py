"""Where a block top-k decode step's time goes: steps that choose pages anew (a refresh)
against steps that reuse the choice, part by part.

One request of random tokens at --context, prefilled, then --steps decode steps of the
sparse configuration (the decoder's default unless --config names one); every part is
timed with a wrapper (perf_counter around each call, ~1 us a call), and steps are split by
whether the selector chose pages in them. The first --warmup decode steps are left out.

    .venv/bin/python benchmarks/sparse_step_parts.py --dtype float32
    .venv/bin/python benchmarks/sparse_step_parts.py --context 4096 --out parts.json

Parts that a version of the code lacks are left out of its table, so that the script also
runs on older checkouts (compare a change with the commit before it). Run it alone: other
processes on the cores move the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# (label, module, attribute): the calls timed, where the checkout has them. Methods of a
# class are given as "Class.method".
PARTS = [
    (
        "sparse layers (all)",
        "slipstream.decoding.sparse_attention",
        "SparseAttentionBackend.forward",
    ),
    ("attention kernel (C, every layer)", None, "attention_c"),
    ("page choice: select", "slipstream.decoding.sparse.selectors", "BlockTopkSelector.select"),
    ("page choice: scores + top-k", "slipstream.decoding.sparse.selectors", "select_top_pages"),
    (
        "page choice: pins merged (PyTorch)",
        "slipstream.decoding.sparse.selectors",
        "BlockTopkSelector._with_pinned",
    ),
    ("page choice: + sink and window", "slipstream.decoding.sparse.selectors", "reused_plus_fixed"),
    ("page summaries", "slipstream.decoding.sparse.selectors", "BlockTopkSelector.after_store"),
    ("step plan", "slipstream.decoding.sparse.selectors", "BlockTopkSelector.prepare"),
    ("KV read count", "slipstream.decoding.sparse_attention", "_Shared._count_read"),
]
TOTALS: Counter[str] = Counter()


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[label] += time.perf_counter() - start

    return wrapper


def _install() -> list[str]:
    """Wrap every part this checkout has; the labels wrapped."""
    import importlib

    from slipstream.kernels.cpu import paged_decode_attention as pda

    wrapped = []
    for label, module_name, attr in PARTS:
        if module_name is None:  # the C attention kernel, whichever dtype it serves
            for kernel in pda._KERNELS.values():
                if kernel.unavailable_reason() is None:
                    kernel._fn = _timed(label, kernel.get())
            wrapped.append(label)
            continue
        owner: Any = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        if hasattr(owner, name):
            setattr(owner, name, _timed(label, getattr(owner, name)))
            wrapped.append(label)
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8192, help="prompt + decode tokens")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--warmup", type=int, default=9, help="decode steps left out first")
    parser.add_argument("--dtype", default="auto", help="the engine's dtype (auto, float32, ...)")
    parser.add_argument("--config", default="{}", help="sparse_attention options (JSON)")
    parser.add_argument("--out", type=Path, help="write the table as JSON here too")
    args = parser.parse_args()
    wrapped = _install()

    from slipstream import LLM
    from slipstream.engine.sampling_params import SamplingParams

    llm = LLM(
        dtype=args.dtype,
        decoder="sparse_attention",
        decoder_config=json.loads(args.config),
        max_model_len=args.context,
        max_num_batched_tokens=2048,
        enable_prefix_caching=False,
    )
    engine = llm.engine
    rng = random.Random(0)
    room = args.warmup + args.steps + 8
    prompt = [rng.randrange(1000, 30000) for _ in range(args.context - room)]
    params = SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True)
    engine.add_request("parts", prompt, params)
    while all(s.num_output_tokens == 0 for s in engine.seqs.values()):
        engine.step()
    for _ in range(args.warmup):
        engine.step()
    sums: dict[str, Counter[str]] = {"refresh": Counter(), "reuse": Counter()}
    counts = Counter[str]()
    for _ in range(args.steps):
        TOTALS.clear()
        start = time.perf_counter()
        engine.step()
        TOTALS["step"] = time.perf_counter() - start
        kind = "refresh" if TOTALS["page choice: scores + top-k"] > 0 else "reuse"
        sums[kind].update(TOTALS)
        counts[kind] += 1
    table = {
        kind: {
            "steps": counts[kind],
            **{k: round(v / counts[kind] * 1e3, 3) for k, v in sums[kind].items()},
        }
        for kind in sums
        if counts[kind]
    }
    print(f"ms per step, context {args.context}, {torch.get_num_threads()} threads")
    print(f"| part | refresh ({counts['refresh']}) | reuse ({counts['reuse']}) |")
    print("| --- | --- | --- |")
    for label in ["step", *wrapped]:
        cells = [f"{table.get(k, {}).get(label, 0.0):.2f}" for k in ("refresh", "reuse")]
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    if args.out:
        args.out.write_text(json.dumps({"context": args.context, "ms": table}, indent=2))


if __name__ == "__main__":
    main()
