"""Decoding with each layer's non-attention work as two C++ calls (decoder_layer.cpp, or
decoder_layer_f32.cpp with --dtype float32; the default) against the same engine running
those ops one call each: two engines in one process, builtin prompts, the order
alternating per prompt (the machine's speed drifts over minutes), batch 1, greedy. Both
paths run the same kernels, so answers must match.

    .venv/bin/python benchmarks/fused_layer_ab.py            # 24 builtin prompts, 128 tokens
    .venv/bin/python benchmarks/fused_layer_ab.py --prompts 48 --max-tokens 256
    .venv/bin/python benchmarks/fused_layer_ab.py --decoder token_recycling
    .venv/bin/python benchmarks/fused_layer_ab.py --dtype float32   # AVX2-only CPUs

Needs the C++ kernels (g++, and an AVX512-BF16 CPU for bf16 or AVX2 + FMA for float32).
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from layer_ops_ab import alternate_and_report  # benchmarks/: the per-prompt A/B loop

from slipstream import LLM
from slipstream.kernels.cpu.decoder_layer import decoder_layer_unavailable_reason
from slipstream.kernels.cpu.decoder_layer_f32 import decoder_layer_f32_unavailable_reason


def build(fused: bool, dtype: str, decoder: str, decoder_config: dict[str, Any]) -> Any:
    llm = LLM(
        dtype=dtype,
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
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    f32 = args.dtype == "float32"
    reason = (decoder_layer_f32_unavailable_reason if f32 else decoder_layer_unavailable_reason)()
    if reason is not None:
        raise SystemExit(f"the fused layer calls are unavailable here: {reason}")
    options = json.loads(args.decoder_config)
    llms = {
        label: build(fused, args.dtype, args.decoder, options)
        for label, fused in (("fused", True), ("ops", False))
    }
    alternate_and_report(llms, args.prompts, args.max_tokens)


if __name__ == "__main__":
    main()
