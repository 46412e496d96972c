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
        model_dir, decoder, options, num_blocks=512, max_num_batched_tokens=2048,
        dtype="float32" if bf16_invariant is None else "bfloat16", device=device,
        batch_invariant=bool(bf16_invariant),
    )  # fmt: skip
    engine = LLMEngine(cfg)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = run_to_completion(engine, prompts, params)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - start


def _compare(
    args: argparse.Namespace,
    model_dir: str,
    prompts: list[list[int]],
    configs: list[tuple[str, str, dict[str, Any]]],
    reference: list[list[int]],
    results: dict[str, Any],
    prefix: str = "",
    bf16_invariant: bool | None = None,
) -> int:
    """Each config's answers against the reference into results[prefix + label]; returns
    the failures: exceptions, and with the batch-invariant flag any answer that differs
    (a bug there, not rounding)."""
    failed = 0
    for label, decoder, options in configs:
        name = prefix + label
        try:
            tokens, seconds = _run(
                model_dir, args.device, decoder, options, prompts, args.max_tokens,
                bf16_invariant,
            )  # fmt: skip
            same = sum(a == b for a, b in zip(tokens, reference, strict=True))
            results[name] = {
                "same_as_standard": f"{same}/{len(prompts)}",
                "seconds": round(seconds, 2),
            }
            failed += int(bool(bf16_invariant) and same != len(prompts))
        except Exception:  # a failing config is the finding; go on to the next
            failed += 1
            results[name] = {"error": traceback.format_exc(limit=8)}
        print(name, json.dumps(results[name])[:2000], flush=True)
    return failed


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
        failed += _compare(args, model_dir, prompts, CONFIGS, reference, results)
        for invariant in (False, True):
            prefix = "bf16 batch-invariant " if invariant else "bf16 "
            try:
                bf16_ref, seconds = _run(
                    model_dir, args.device, "standard", {}, prompts, args.max_tokens, invariant
                )
            except Exception:
                failed += 1
                results[prefix + "standard"] = {"error": traceback.format_exc(limit=8)}
                continue
            results[prefix + "standard"] = {"seconds": round(seconds, 2)}
            failed += _compare(
                args, model_dir, prompts, BF16_CONFIGS, bf16_ref, results, prefix, invariant
            )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
