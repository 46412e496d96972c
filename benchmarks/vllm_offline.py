"""vLLM baseline numbers for BENCHMARKS.md: vLLM's offline LLM on the default model.

Run with the vLLM environment (`make vllm`), on an otherwise idle machine:

    .venv-vllm/bin/python benchmarks/vllm_offline.py --out bench-results/vllm_offline.json

Measures (each in a fresh vLLM engine):
- batch-1 decode tokens/s: one request, a short prompt, 128 output tokens (ignore_eos),
  median of --repeats runs after a warm-up, with enforce_eager True and False;
- aggregate output tokens/s: 64 requests of 256 random prompt tokens and 128 output tokens
  (ignore_eos), submitted at once, at max_num_seqs 1, 8 and 32.

vLLM spawns processes, hence the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path.home() / ".cache" / "slipstream" / "models" / "smollm2-135m-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF model folder")
    p.add_argument("--dtype", default="bfloat16", help="(default: %(default)s)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--repeats", type=int, default=3, help="batch-1 runs (median)")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--eager", choices=["both", "true", "false"], default="both", help="batch-1 modes"
    )
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM-CPU KV cache size")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    return p.parse_args(argv)


def make_llm(args: argparse.Namespace, enforce_eager: bool, max_num_seqs: int) -> Any:
    """A fresh vLLM engine."""
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "enforce_eager": enforce_eager,
        "max_num_seqs": max_num_seqs,
        "max_model_len": 1024,
        "seed": 0,
        "disable_log_stats": True,
    }
    import torch

    if not torch.cuda.is_available():
        kwargs["kv_cache_memory_bytes"] = int(args.kv_cache_gib * 2**30)
    return LLM(**kwargs)


def shutdown(llm: Any) -> None:
    """Stop the engine's processes before the next configuration starts."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown()
    del llm
    import gc

    gc.collect()


def batch1_decode(args: argparse.Namespace, enforce_eager: bool) -> dict[str, Any]:
    """Median decode tokens/s of one request (prefill of a short prompt included)."""
    from vllm import SamplingParams

    llm = make_llm(args, enforce_eager, max_num_seqs=1)
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    ids = llm.get_tokenizer().encode("Write a short story about a river and an old mill.")
    prompt = {"prompt_token_ids": ids}
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        rates.append(len(out[0].outputs[0].token_ids) / elapsed)
    shutdown(llm)
    return {
        "enforce_eager": enforce_eager,
        "output_tokens": args.decode_tokens,
        "tokens_per_s_median": statistics.median(rates),
        "tokens_per_s_runs": rates,
    }


def throughput(args: argparse.Namespace, max_num_seqs: int) -> dict[str, Any]:
    """Aggregate output tokens/s of num_requests random prompts submitted at once."""
    from vllm import SamplingParams

    llm = make_llm(args, enforce_eager=False, max_num_seqs=max_num_seqs)
    vocab = llm.get_tokenizer().vocab_size
    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(args.prompt_tokens)]}
        for _ in range(args.num_requests)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    shutdown(llm)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "max_num_seqs": max_num_seqs,
        "num_requests": args.num_requests,
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "elapsed_s": elapsed,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (generated + args.num_requests * args.prompt_tokens) / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and print (and optionally save) the JSON."""
    args = parse_args(argv)
    if not Path(args.model).is_dir():
        print(
            f"model folder {args.model} not found (run `slipstream generate` once)", file=sys.stderr
        )
        return 2
    import torch
    import vllm

    result: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "batch1_decode": [],
        "throughput": [],
    }
    if not args.skip_decode:
        modes = {"both": [True, False], "true": [True], "false": [False]}[args.eager]
        for eager in modes:
            result["batch1_decode"].append(batch1_decode(args, eager))
            print(json.dumps(result["batch1_decode"][-1]), flush=True)
    if not args.skip_throughput:
        for seqs in args.max_num_seqs:
            result["throughput"].append(throughput(args, seqs))
            print(json.dumps(result["throughput"][-1]), flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
