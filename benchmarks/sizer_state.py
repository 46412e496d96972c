"""What token recycling's tree sizer has learnt after a run: its step-cost curve, the
expected accepted draft tokens A(s) of the best s nodes, the size it picks at several batch
sizes and the predicted speed of each size relative to not drafting.

    .venv/bin/python benchmarks/sizer_state.py                     # 12 prompts, batch 1
    .venv/bin/python benchmarks/sizer_state.py --prompts 64 --concurrency 16

Builtin prompts, chat template, greedy, 128 tokens, --dtype (default auto: bf16 on CPUs
with native bf16, else float32), the decoder's defaults (or --decoder-config JSON). Run it
alone: the cost curve is measured wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from slipstream import LLM
from slipstream.engine.sampling_params import SamplingParams
from slipstream.loadtest.builtin import load_builtin


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=1, help="sequences running at once")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--decoder-config", default="{}")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    llm = LLM(
        dtype=args.dtype,
        decoder="token_recycling",
        decoder_config=json.loads(args.decoder_config),
        kv_cache_memory_gib=2.0,
        max_num_seqs=args.concurrency,
    )
    prompts = load_builtin(None)[: args.prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outs = llm.chat([[dict(m) for m in p.messages] for p in prompts], params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = llm.get_stats()
    print(f"{tokens / seconds:.1f} tok/s, {tokens} tokens in {stats['num_steps']} steps")
    decoder: Any = llm.engine.decoder  # TokenRecyclingDecoder
    sizer = decoder.sizer
    points = [(round(n, 1), round(t * 1e3, 2)) for n, t in sizer.cost.points()]
    print("step cost (tokens fed, ms):", points)
    expected = sizer.stats.expected_accepted()
    print("A(s), s = 0..40:", [round(float(a), 2) for a in expected[:41]])
    for batch in sorted({1, 4, 8, 16, args.concurrency}):
        rates = [
            batch * (1 + expected[s]) / sizer.cost.predict(batch * (1 + s))
            for s in range(min(25, len(expected)))
        ]
        ratios = [round(float(r / rates[0]), 2) for r in rates]
        print(f"batch {batch}: picks {sizer.best_size(batch)}; rate vs s = 0, s = 0..24: {ratios}")
    print({k: v for k, v in stats.items() if k.startswith("spec_")})


if __name__ == "__main__":
    main()
