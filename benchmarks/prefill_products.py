"""float32 products above 32 rows: the C++ kernel in calls of 32 rows against MKL (F.linear).

Two parts, each in one process with the two paths timed in turn:
- `products`: the default model's product shapes (a layer's four projections, and the
  [49152, 576] LM head) at M rows, F.linear over the float32 weight against
  skinny_linear_f32 in calls of MAX_ROWS over the grouped bf16 copy; median ms.
- `prefill`: a one-token chat (the prefill, its first token, and token recycling's prompt
  seeding) on the builtin prompts, per decoder, with today's products against the old
  hand-off (every product above MAX_ROWS rows to MKL, restored by wrapping the model's
  product functions); median ms over the prompts, each prompt on every engine in turn.

    .venv/bin/python benchmarks/prefill_products.py
    .venv/bin/python benchmarks/prefill_products.py --parts prefill --prompts 24

Needs AVX2 + FMA and a float32 engine (an AVX2-only CPU, or --dtype float32). Not a test:
run it alone on the machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from typing import Any

import torch

from slipstream import LLM, SamplingParams
from slipstream.kernels.cpu.skinny_linear_f32 import (
    MAX_ROWS,
    GroupedBf16Weight,
    skinny_linear_f32,
)
from slipstream.loadtest.builtin import load_builtin

DECODERS = {
    "standard": ("standard", {}),
    "token_recycling": ("token_recycling", {}),
    "token_recycling, no prompt seeding": ("token_recycling", {"prompt_seed_rows": 0}),
}


def _median_ms(fn: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def products(llm: LLM, rows: list[int], rounds: int) -> dict[str, Any]:
    """ms per product at each row count: MKL, then the kernel in calls of MAX_ROWS rows."""
    model: Any = llm.engine.runner.model
    shapes: dict[str, GroupedBf16Weight] = {}
    for name, w in zip(("qkv", "o", "gate_up", "down"), model.layers[0].skinny, strict=True):
        shapes[name] = w
    shapes["lm_head"] = model.lm_head_f32
    if not all(isinstance(w, GroupedBf16Weight) for w in shapes.values()):
        raise SystemExit("needs the float32 engine with grouped bf16 copies (the default model)")
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    for m in rows:
        for name, w in shapes.items():
            x = torch.randn(m, w.dense.shape[1])
            mkl = _median_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w.dense), rounds)
            calls = _median_ms(
                lambda x=x, w=w: skinny_linear_f32(x, w, chunked_max_rows=None), rounds
            )
            out[f"{m}/{name}"] = {"mkl_ms": mkl, "kernel_ms": calls}
            print(f"{m:4d} rows {name:8s} MKL {mkl:8.2f} ms  kernel calls {calls:8.2f} ms  "
                  f"({mkl / calls:.2f}x)", flush=True)  # fmt: skip
    return out


def _old_hand_off(llm: LLM) -> None:
    """Every product above MAX_ROWS rows to F.linear, as before session 29."""
    model: Any = llm.engine.runner.model
    old = functools.partial(skinny_linear_f32, chunked_max_rows=MAX_ROWS)
    for layer in model.layers:
        layer.linear_skinny = old
    model.compute_logits = lambda hidden: old(hidden, model.lm_head_f32)


def prefill(num_prompts: int, dtype: str) -> dict[str, Any]:
    """Median ms of a one-token chat per decoder and product path."""
    llms: dict[str, LLM] = {}
    for label, (decoder, options) in DECODERS.items():
        for path in ("calls", "old"):
            llm = LLM(dtype=dtype, decoder=decoder, decoder_config=options, kv_cache_memory_gib=0.5)
            if path == "old":
                _old_hand_off(llm)
            llms[f"{label} [{path}]"] = llm
    prompts = load_builtin()[:num_prompts]
    warm = SamplingParams(temperature=0.0, max_tokens=32)
    for llm in llms.values():
        for p in prompts[:2]:
            llm.chat([dict(m) for m in p.messages], warm)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    times: dict[str, list[float]] = {k: [] for k in llms}
    lengths = []
    order = list(llms)
    for i, p in enumerate(prompts):
        for key in order[i % len(order) :] + order[: i % len(order)]:  # rotate per prompt
            t0 = time.perf_counter()
            out = llms[key].chat([dict(m) for m in p.messages], one)[0]
            times[key].append(time.perf_counter() - t0)
        lengths.append(len(out.prompt_token_ids))
    print(f"\n{len(prompts)} builtin prompts of {min(lengths)}-{max(lengths)} tokens "
          f"(median {statistics.median(lengths)}), one-token chats, prefix caching on")  # fmt: skip
    print("| decoder | products above 32 rows in kernel calls | all to MKL (before) | ratio |")
    print("| --- | --- | --- | --- |")
    result: dict[str, Any] = {"prompt_tokens": lengths}
    for label in DECODERS:
        new = statistics.median(times[f"{label} [calls]"]) * 1e3
        old = statistics.median(times[f"{label} [old]"]) * 1e3
        print(f"| {label} | {new:.1f} ms | {old:.1f} ms | {old / new:.2f}x |")
        result[label] = {"calls_ms": new, "old_ms": old}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="products,prefill")
    ap.add_argument("--rows", default="33,64,128,256,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=24, help="builtin prompts for `prefill`")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    parts = args.parts.split(",")
    results: dict[str, Any] = {}
    if "products" in parts:
        llm = LLM(dtype=args.dtype, kv_cache_memory_gib=0.5)
        results["products"] = products(llm, [int(r) for r in args.rows.split(",")], args.rounds)
        del llm
    if "prefill" in parts:
        results["prefill"] = prefill(args.prompts, args.dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
