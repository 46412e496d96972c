"""Every decoder end to end on the engine's CUDA path, on the tiny random-weight model.

The unit tests run the Triton kernels one by one; this drives whole engines through them
(paged and tree attention, the K/V store, the sparse kernels, the matrix updates of token
recycling), greedy, and counts the answers that equal standard decoding's. It is the first
step of benchmarks/gpu_check.sh, so that an engine bug on CUDA shows in seconds.

    python benchmarks/gpu_engine_smoke.py --out smoke.json            # on a GPU
    SLIPSTREAM_KERNELS=triton TRITON_INTERPRET=1 SLIPSTREAM_CPU_KERNELS=0 \\
        python benchmarks/gpu_engine_smoke.py --device cpu            # the same Triton paths here

float32 for CONFIGS: GEMMs of different row counts may round differently on a GPU, so a
count below the total is reported, not raised; an exception fails the config. Then bf16
with and without --batch-invariant (BF16_CONFIGS), each against bf16 standard decoding
with the same setting: with it, every answer must equal standard's.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from slipstream.config import Device
from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampling_params import SamplingParams
from slipstream.testing.engines import run_to_completion, tiny_engine_config
from slipstream.testing.tiny_model import make_tiny_model_dir

# A pruning budget far under the prompts' ~200 tokens, so the sparse kernels do run.
SPARSE_SMALL = {"top_k": 16, "window": 8, "sink": 4, "dense_layers": 0}

CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("ngram", "ngram", {}),
    ("token_recycling official", "token_recycling", {"adaptive": False, "dynamic_tree": False}),
    ("token_recycling defaults", "token_recycling", {}),
    ("sparse hip", "sparse_attention", {"method": "hip", **SPARSE_SMALL}),
    ("sparse block_topk", "sparse_attention", {"method": "block_topk", **SPARSE_SMALL}),
    (
        "token_recycling+sparse block_topk",
        "token_recycling+sparse_attention",
        {"sparse_attention": {"method": "block_topk", **SPARSE_SMALL}},
    ),
]


# bf16 speculation, each against bf16 standard decoding with the same batch_invariant flag.
BF16_CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("ngram", "ngram", {}),
    ("token_recycling official", "token_recycling", {"adaptive": False, "dynamic_tree": False}),
]


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    """Random prompts with repeated spans, so that drafts get accepted."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        span = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 24))]
        prompts.append(span * rng.randint(4, 10) + [rng.randrange(3, vocab)])
    return prompts


def _run(
    model_dir: str,
    device: Device,
    decoder: str,
    options: dict[str, Any],
    prompts: list[list[int]],
    max_tokens: int,
    bf16_invariant: bool | None = None,  # None: float32; else bf16 with batch_invariant=it
) -> tuple[list[list[int]], float]:
    cfg = tiny_engine_config(
        model_dir, decoder, options, num_blocks=512, max_num_batched_tokens=2048
    )
    # tiny_engine_config is a float32 CPU config: the device changes, and the dtype for bf16.
    model = replace(cfg.model, device=device)
    if bf16_invariant is not None:
        model = replace(model, dtype="bfloat16", batch_invariant=bf16_invariant)
    cfg = replace(cfg, model=model)
    engine = LLMEngine(cfg)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = run_to_completion(engine, prompts, params)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", default=None, help="write the results here (JSON)")
    args = parser.parse_args()
    prompts = _prompts(args.prompts, 500, seed=0)
    results: dict[str, Any] = {"device": args.device}
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny_model_dir(Path(tmp) / "tiny"))
        reference, seconds = _run(model_dir, args.device, "standard", {}, prompts, args.max_tokens)
        results["standard"] = {"seconds": round(seconds, 2)}
        for label, decoder, options in CONFIGS:
            try:
                tokens, seconds = _run(
                    model_dir, args.device, decoder, options, prompts, args.max_tokens
                )
                same = sum(a == b for a, b in zip(tokens, reference, strict=True))
                results[label] = {
                    "same_as_standard": f"{same}/{len(prompts)}",
                    "seconds": round(seconds, 2),
                }
            except Exception:  # a failing config is the finding; go on to the next
                failed += 1
                results[label] = {"error": traceback.format_exc(limit=8)}
            print(label, json.dumps(results[label])[:2000], flush=True)
        for invariant in (False, True):
            name = "bf16 batch-invariant" if invariant else "bf16"
            try:
                bf16_ref, seconds = _run(
                    model_dir, args.device, "standard", {}, prompts, args.max_tokens, invariant
                )
                results[f"{name} standard"] = {"seconds": round(seconds, 2)}
                for label, decoder, options in BF16_CONFIGS:
                    tokens, seconds = _run(
                        model_dir, args.device, decoder, options, prompts, args.max_tokens,
                        invariant,
                    )  # fmt: skip
                    same = sum(a == b for a, b in zip(tokens, bf16_ref, strict=True))
                    results[f"{name} {label}"] = {
                        "same_as_standard": f"{same}/{len(prompts)}",
                        "seconds": round(seconds, 2),
                    }
                    # With the flag a difference is a bug, not rounding.
                    failed += int(invariant and same != len(prompts))
            except Exception:
                failed += 1
                results[f"{name} error"] = {"error": traceback.format_exc(limit=8)}
            print(name, json.dumps({k: v for k, v in results.items() if k.startswith(name)}),
                  flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
