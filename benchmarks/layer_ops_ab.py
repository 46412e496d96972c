"""Standard decoding with layer_ops.cpp (RoPE, K/V store, SiLU * up) against the same engine
with those three ops back on PyTorch: both engines in one process, builtin prompts, the
order alternating per prompt (the machine's speed drifts over minutes), batch 1, greedy.

    .venv/bin/python benchmarks/layer_ops_ab.py            # 24 builtin prompts, 128 tokens
    .venv/bin/python benchmarks/layer_ops_ab.py --prompts 48 --max-tokens 256

Needs the C++ kernels (an AVX512-BF16 CPU and g++). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import slipstream.kernels.store_kv as store_kv_module
from slipstream import LLM
from slipstream.engine.sampling_params import SamplingParams
from slipstream.kernels.cpu.layer_ops import (
    layer_ops_unavailable_reason,
    rope_ref,
    silu_mul_ref,
    store_kv_cpu_applies,
)
from slipstream.loadtest.builtin import load_builtin


def build(torch_ops: bool) -> Any:
    llm = LLM(dtype="bfloat16", kv_cache_memory_gib=1.0)
    for layer in llm.engine.runner.model.layers:
        # Op by op in both arms: the fused calls (decoder_layer.cpp) always run layer_ops.
        layer.fused_cpu = False
        if torch_ops:
            layer.rope, layer.silu_mul = rope_ref, silu_mul_ref
    return llm


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    reason = layer_ops_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"layer_ops.cpp is unavailable here: {reason}")
    llms = {"layer_ops": build(False), "torch_ops": build(True)}
    # The K/V store is chosen per call by store_kv's dispatch: switched per engine's turn.
    applies = {"layer_ops": store_kv_cpu_applies, "torch_ops": lambda *a: False}

    def before_turn(name: str) -> None:
        store_kv_module.store_kv_cpu_applies = applies[name]

    alternate_and_report(llms, args.prompts, args.max_tokens, before_turn)


def alternate_and_report(
    llms: dict[str, Any],
    num_prompts: int,
    max_tokens: int,
    before_turn: Callable[[str], None] | None = None,
) -> None:
    """Each builtin prompt on every LLM in turn (the order alternating per prompt), greedy;
    prints each LLM's tok/s, the first's ratio to the second, and how many answers agree."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    tokens = dict.fromkeys(llms, 0)
    seconds = dict.fromkeys(llms, 0.0)
    outputs: dict[str, list[list[int]]] = {name: [] for name in llms}
    for i, prompt in enumerate(load_builtin(None)[:num_prompts]):
        for name in list(llms) if i % 2 == 0 else list(llms)[::-1]:
            if before_turn is not None:
                before_turn(name)
            start = time.perf_counter()
            out = llms[name].chat([dict(m) for m in prompt.messages], params)[0]
            seconds[name] += time.perf_counter() - start
            tokens[name] += len(out.outputs[0].token_ids)
            outputs[name].append(list(out.outputs[0].token_ids))
    for name in llms:
        print(f"{name}: {tokens[name] / seconds[name]:.1f} tok/s ({tokens[name]} tokens)")
    first, second = list(llms)[:2]
    rate = {name: tokens[name] / seconds[name] for name in (first, second)}
    print(f"{first} / {second}: {rate[first] / rate[second]:.3f}")
    same = sum(a == b for a, b in zip(outputs[first], outputs[second], strict=True))
    print(f"identical answers: {same}/{len(outputs[first])}")


if __name__ == "__main__":
    main()
