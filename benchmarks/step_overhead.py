"""Where an engine step's time goes outside the forward: the engine's phases and a
speculative decoder's parts, in ms per step, measured in the running engine.

The same small call takes several times longer in the engine than in a loop: right after a
forward that streamed the model's weights, the caches hold none of the code or data the
bookkeeping touches (a one-element clone: ~40 us as the first op after a forward, ~3 us
after it). So the parts are timed where they run: one engine, greedy, batch 1 unless
--concurrency says more.

    .venv/bin/python benchmarks/step_overhead.py                       # token recycling
    .venv/bin/python benchmarks/step_overhead.py --decoder standard
    .venv/bin/python benchmarks/step_overhead.py --json out.json
    .venv/bin/python benchmarks/step_overhead.py --concurrency 16 --prompts 64 --max-tokens 128

Every part is wrapped with perf_counter (~1 us a call); parts nest (select holds
greedy_targets, verification and observe; schedule holds plan_draft; build_inputs holds
propose). Parts a checkout lacks are left out, so the script runs on older commits too.
Steps with a prefill count in the totals, as they do in tokens per second. Run it alone:
other processes on the cores move the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from slipstream import LLM, SamplingParams
from slipstream.loadtest.builtin import load_builtin

TOTALS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)

ENGINE_PARTS = ("schedule", "_apply", "_collect")
RUNNER_PARTS = ("forward", "copy_slots")
DECODER_PARTS = (
    "build_inputs",
    "propose",
    "select",
    "greedy_targets",
    "_verify_fast",
    "accepted",
    "observe",
    "plan_draft",
)


def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, adding its wall time to TOTALS[part]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[part] += time.perf_counter() - t0
            CALLS[part] += 1

    return wrapper


def wrap(obj: Any, names: tuple[str, ...], prefix: str = "") -> None:
    for name in names:
        fn = getattr(obj, name, None)
        if fn is not None:
            setattr(obj, name, timed(prefix + name, fn))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decoder", default="token_recycling")
    ap.add_argument("--decoder-config", default="{}")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=12, help="builtin prompts (after 2 warm-up)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument(
        "--concurrency", type=int, default=1, help="sequences running at once (max_num_seqs)"
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    llm = LLM(
        dtype=args.dtype,
        decoder=args.decoder,
        decoder_config=json.loads(args.decoder_config),
        kv_cache_memory_gib=2.0,
        max_num_seqs=args.concurrency,
    )
    engine: Any = llm.engine
    wrap(engine, ENGINE_PARTS)
    wrap(engine.runner, RUNNER_PARTS)
    wrap(engine.decoder, DECODER_PARTS)
    sizer = getattr(engine.decoder, "sizer", None)
    if sizer is not None:
        wrap(sizer, ("end_step",), "sizer.")
    pairs = getattr(engine.decoder, "pairs", None)
    if pairs is not None:
        wrap(pairs, ("write",), "pairs.")
    prompts = load_builtin(None)
    messages = [[dict(m) for m in p.messages] for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.chat(messages[:2], params)  # warm-up: kernels built, calibration done
    TOTALS.clear()
    CALLS.clear()
    steps_before = llm.get_stats()["num_steps"]
    start = time.perf_counter()
    outs = llm.chat(messages[2 : 2 + args.prompts], params)
    seconds = time.perf_counter() - start
    steps = llm.get_stats()["num_steps"] - steps_before
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    per_step = {part: 1e3 * total / steps for part, total in TOTALS.items()}
    outside = 1e3 * seconds / steps - per_step.get("forward", 0.0)
    print(
        f"{args.decoder}: {tokens / seconds:.1f} tok/s, {tokens} tokens in {steps} steps, "
        f"{1e3 * seconds / steps:.2f} ms a step, {outside:.2f} ms of it outside the forward"
    )
    print("| part | ms per step | calls |")
    print("| --- | --- | --- |")
    for part in sorted(per_step, key=lambda p: -per_step[p]):
        print(f"| {part} | {per_step[part]:.3f} | {CALLS[part]} |")
    if args.json:
        result = {
            "decoder": args.decoder,
            "decoder_config": json.loads(args.decoder_config),
            "concurrency": args.concurrency,
            "tok_s": tokens / seconds,
            "steps": steps,
            "ms_per_step": 1e3 * seconds / steps,
            "ms_outside_forward": outside,
            "parts_ms_per_step": per_step,
            "calls": dict(CALLS),
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
