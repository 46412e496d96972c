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
from typing import Any

from layer_ops_ab import alternate_and_report  # benchmarks/: the per-prompt A/B loop

from slipstream import LLM
from slipstream.kernels.cpu.decoder_layer import decoder_layer_unavailable_reason


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
    alternate_and_report(llms, args.prompts, args.max_tokens)


if __name__ == "__main__":
    main()
