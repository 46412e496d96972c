"""Greedy outputs of the speculative decoders vs standard on the real model, token for token.

    .venv/bin/python benchmarks/lossless_check.py --dtype float32   # exact arithmetic path
    .venv/bin/python benchmarks/lossless_check.py --dtype bfloat16  # rounding can flip ties
    .venv/bin/python benchmarks/lossless_check.py --repetition-penalty 1.2  # penalised path
    python benchmarks/lossless_check.py --dtype bfloat16 --batch-invariant  # GPU: must be 6/6

Six builtin prompts (one every 8th), chat template, 64 greedy tokens, batch 1.
"""

from __future__ import annotations

import argparse

from slipstream import LLM, SamplingParams
from slipstream.loadtest.builtin import load_builtin

# (label, decoder, options): the official 80-node tree, token recycling's defaults (a
# calibrated tree, prompt seeding, a grafted prompt-lookup branch), and ngram.
DECODERS = [
    ("standard", "standard", {}),
    (
        "token_recycling (official)",
        "token_recycling",
        {
            "adaptive": False,
            "prompt_seed_rows": 0,
            "prompt_lookup_tokens": 0,
            "dynamic_tree": False,
        },
    ),
    ("token_recycling (defaults)", "token_recycling", {}),
    ("ngram", "ngram", {}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--batch-invariant", action="store_true", help="every engine with --batch-invariant"
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    args = ap.parse_args()
    prompts = load_builtin(None)[::8][:6]
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty
    )
    convs = [[dict(m) for m in p.messages] for p in prompts]
    outputs: dict[str, list[list[int]]] = {}
    for name, decoder, options in DECODERS:
        llm = LLM(
            model=args.model,
            dtype=args.dtype,
            decoder=decoder,
            decoder_config=options,
            max_num_seqs=1,
            batch_invariant=args.batch_invariant,
        )
        outputs[name] = [llm.chat(c, params)[0].outputs[0].token_ids for c in convs]
        mat = llm.get_stats().get("mean_accepted_tokens_per_step")
        print(f"{name}: mean accepted tokens per step {mat}")
    for name, _, _ in DECODERS[1:]:
        same = sum(a == b for a, b in zip(outputs[name], outputs["standard"], strict=True))
        print(
            f"{name}: {same}/{len(convs)} outputs identical to standard ({args.dtype}, "
            f"repetition_penalty {args.repetition_penalty}, "
            f"batch_invariant {args.batch_invariant})"
        )


if __name__ == "__main__":
    main()
