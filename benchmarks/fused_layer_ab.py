"""Decoding with each layer's non-attention work as two C++ calls (decoder_layer.cpp, the
default) against the same engine running those ops one call each: two engines in one
process, builtin prompts, the order alternating per prompt (the machine's speed drifts
over minutes), batch 1, greedy. Both paths run the same kernels, so answers must match.

    .venv/bin/python benchmarks/fused_layer_ab.py            # 24 builtin prompts, 128 tokens
    .venv/bin/python benchmarks/fused_layer_ab.py --prompts 48 --max-tokens 256
    .venv/bin/python benchmarks/fused_layer_ab.py --decoder token_recycling

Needs the C++ kernels (an AVX512-BF16 CPU and g++). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from slipstream import LLM
from slipstream.engine.sampling_params import SamplingParams
from slipstream.kernels.cpu.decoder_layer import decoder_layer_unavailable_reason
from slipstream.loadtest.builtin import load_builtin


def build(fused: bool, decoder: str, decoder_config: dict[str, Any]) -> Any:
    llm = LLM(
        dtype="bfloat16",
        kv_cache_memory_gib=1.0,
        decoder=decoder,
        decoder_config=decoder_config,
    )
    layers = llm.engine.runner.model.layers
    if not all(layer.fused_cpu for layer in layers):
        raise SystemExit("the engine did not take the fused layer calls")
    for layer in layers:
        layer.fused_cpu = fused
    return llm


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--decoder", default="standard")
    ap.add_argument("--decoder-config", default="{}", help="JSON options for --decoder")
    args = ap.parse_args()
    reason = decoder_layer_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"decoder_layer.cpp is unavailable here: {reason}")
    options = json.loads(args.decoder_config)
    llms = {"fused": build(True, args.decoder, options), "ops": build(False, args.decoder, options)}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    tokens = dict.fromkeys(llms, 0)
    seconds = dict.fromkeys(llms, 0.0)
    outputs: dict[str, list[list[int]]] = {name: [] for name in llms}
    for i, prompt in enumerate(load_builtin(None)[: args.prompts]):
        for name in list(llms) if i % 2 == 0 else list(llms)[::-1]:
            start = time.perf_counter()
            out = llms[name].chat([dict(m) for m in prompt.messages], params)[0]
            seconds[name] += time.perf_counter() - start
            tokens[name] += len(out.outputs[0].token_ids)
            outputs[name].append(list(out.outputs[0].token_ids))
    for name in llms:
        print(f"{name}: {tokens[name] / seconds[name]:.1f} tok/s ({tokens[name]} tokens)")
    print(
        f"fused / ops: {tokens['fused'] / seconds['fused'] / (tokens['ops'] / seconds['ops']):.3f}"
    )
    same = sum(a == b for a, b in zip(outputs["fused"], outputs["ops"], strict=True))
    print(f"identical answers: {same}/{len(outputs['fused'])}")


if __name__ == "__main__":
    main()
