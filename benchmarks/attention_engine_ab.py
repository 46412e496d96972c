"""paged_decode_attention.cpp at a git revision against the working tree, in the engine.

One process holds an engine per decoder (default model, bf16, batch 1, greedy, chat
template) and both builds of the attention kernel; every prompt of the builtin suite (or
of --categories) runs once with each build, the order alternating prompt by prompt, so
the machine's drift hits both alike. Token recycling's matrix is reset before each run:
both builds then draft from the same state. Prints tok/s per decoder and build, their
ratio, and whether the answers' token counts agree (bits can differ between builds when
the kernel's arithmetic changed; the counts show whether the work compared is the same).

    .venv/bin/python benchmarks/attention_engine_ab.py --base 7574260
    .venv/bin/python benchmarks/attention_engine_ab.py --base 7574260 --categories rag

Not a test: run it alone on the machine (another process on the cores moves the numbers).
"""

from __future__ import annotations

import argparse
import time

import torch
from attention_kernel_ab import attention_builds  # benchmarks/: both builds of the kernel

import slipstream.kernels.cpu.paged_decode_attention as pda
from slipstream import LLM
from slipstream.engine.sampling_params import SamplingParams
from slipstream.loadtest.builtin import load_builtin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--decoders", default="standard,token_recycling")
    ap.add_argument("--categories", default=None, help="comma-separated builtin categories")
    ap.add_argument("--num-prompts", type=int, default=16, help="spread over the suite")
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    builds = attention_builds(args.base, torch.bfloat16)
    prompts = load_builtin(args.categories.split(",") if args.categories else None)
    prompts = prompts[:: max(1, len(prompts) // args.num_prompts)][: args.num_prompts]
    llms = {d: LLM(decoder=d, kv_cache_memory_gib=1.0) for d in args.decoders.split(",")}
    for llm in llms.values():
        llm.chat([{"role": "user", "content": "Hi"}])  # warm-up
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    names = list(builds)
    tokens = {(d, b): 0 for d in llms for b in names}
    seconds = {(d, b): 0.0 for d in llms for b in names}
    for i, prompt in enumerate(prompts):
        for decoder, llm in llms.items():
            for name in names if i % 2 == 0 else names[::-1]:
                pda._KERNELS[torch.bfloat16]._fn = builds[name]
                if hasattr(llm.engine.decoder, "reset_matrix"):
                    llm.engine.decoder.reset_matrix()
                start = time.perf_counter()
                out = llm.chat([dict(m) for m in prompt.messages], params)[0]
                seconds[(decoder, name)] += time.perf_counter() - start
                tokens[(decoder, name)] += len(out.outputs[0].token_ids)
    print(f"{len(prompts)} prompts, batch 1, greedy, {args.max_tokens} max tokens; tok/s")
    print(f"| decoder | {names[0]} | {names[1]} | ratio | tokens ({names[0]} / {names[1]}) |")
    print("| --- | --- | --- | --- | --- |")
    for d in llms:
        a, b = (tokens[(d, n)] / seconds[(d, n)] for n in names)
        counts = f"{tokens[(d, names[0])]} / {tokens[(d, names[1])]}"
        print(f"| {d} | {a:.1f} | {b:.1f} | {b / a:.3f}x | {counts} |")


if __name__ == "__main__":
    main()
