"""Do greedy answers depend on the load? Each decoder answers the same prompts with many
sequences running at once, and the answers are compared, prompt by prompt, with standard
decoding's one sequence at a time.

A lossless speculative decoder must give standard's greedy tokens; so must standard itself
at any concurrency. Both fail where a row's bits follow the step it shares: a decode beside
a prefill chunk, or a prompt cut into chunks where the other requests left room.

    .venv/bin/python benchmarks/answers_under_load.py                      # builtin, 16 at once
    .venv/bin/python benchmarks/answers_under_load.py --prompts long --concurrency 12
    .venv/bin/python benchmarks/answers_under_load.py --dtype float32
    .venv/bin/python benchmarks/answers_under_load.py --prompts long --concurrency 12 \
        --decoders sparse_attention --against self

--against self compares each decoder with itself one sequence at a time instead: for a
decoder that changes the answers by design (sparse attention), whether its answers still
do not depend on the load; --against sparse_attention compares a composite such as
token_recycling+sparse_attention with sparse attention alone.

--prompts builtin: the builtin suite's prompts after the first 2 (chat template), as
`slipstream bench --dataset builtin` sends them. --prompts long: "summarize" requests over
~650 words of the licence texts in /usr/share/common-licenses (~830 tokens: longer than
the default token budget of 512 a step, so every prompt is prefilled in chunks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from slipstream import LLM, SamplingParams


def builtin_prompts(count: int) -> list[list[dict[str, str]]]:
    from slipstream.loadtest.builtin import load_builtin

    prompts = load_builtin(None)[2 : 2 + count]
    return [[dict(m) for m in p.messages] for p in prompts]


def long_prompts(count: int) -> list[list[dict[str, str]]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sparse_attention import real_text  # benchmarks/: the licence texts

    words = real_text().split()
    out = []
    for i in range(count):
        passage = " ".join(words[600 * i : 600 * i + 650])
        text = "Summarize the following text in a few sentences.\n\n" + passage
        out.append([{"role": "user", "content": text}])
    return out


def answers(
    decoder: str, concurrency: int, prompts: list[Any], args: argparse.Namespace
) -> list[list[int]]:
    llm = LLM(
        dtype=args.dtype,
        decoder=decoder,
        kv_cache_memory_gib=2.0,
        max_num_seqs=concurrency,
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    return [list(o.outputs[0].token_ids) for o in llm.chat(prompts, params)]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", choices=("builtin", "long"), default="builtin")
    ap.add_argument("--count", type=int, default=None, help="prompts (builtin 32, long 12)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--decoders", default="standard,token_recycling,ngram")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--against",
        default="standard",
        help="whose one-at-a-time answers to compare with: a decoder's (standard), or 'self'",
    )
    args = ap.parse_args()
    if args.prompts == "builtin":
        prompts = builtin_prompts(args.count or 32)
    else:
        prompts = long_prompts(args.count or 12)
    reference = None if args.against == "self" else answers(args.against, 1, prompts, args)
    print(f"{len(prompts)} {args.prompts} prompts, {args.max_tokens} tokens, greedy, {args.dtype}")
    whose = f"{args.against}'s" if reference is not None else "its own"
    print(f"| decoder | concurrency | answers equal to {whose} one at a time | differing |")
    print("| --- | --- | --- | --- |")
    for decoder in args.decoders.split(","):
        alone = reference if reference is not None else answers(decoder, 1, prompts, args)
        got = answers(decoder, args.concurrency, prompts, args)
        differ = [i for i, (a, b) in enumerate(zip(got, alone, strict=True)) if a != b]
        same = len(prompts) - len(differ)
        print(f"| {decoder} | {args.concurrency} | {same}/{len(prompts)} | {differ} |", flush=True)


if __name__ == "__main__":
    main()
