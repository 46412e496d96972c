"""Degenerate equivalence: every registered decoder, at its degenerate settings, produces
exactly the standard decoder's greedy tokens on the tiny model (design.md, Decoders 1)."""

from __future__ import annotations

from typing import Any

import pytest

from slipstream.decoding.registry import DECODERS
from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampling_params import SamplingParams
from slipstream.testing.engines import run_to_completion, tiny_engine_config

# Decoder name -> options under which it must equal standard greedy decoding. Decoders not
# listed run with their defaults. Add yours here.
DEGENERATE: dict[str, dict[str, Any]] = {
    "standard": {},
    "ngram": {"prompt_lookup_min": 1, "prompt_lookup_max": 3},
    "token_recycling": {"adaptive": False},
    "cautious": {"gate_entropy": float("inf")},
    # A budget covering the context (and no dense layers, so the sparse backend runs).
    "sparse_attention": {"top_k": 1 << 20, "dense_layers": 0},
}

PROMPTS = [[11, 42, 7, 99, 123, 5] * 3, [5, 6, 7, 8] * 4, [100, 200, 300], [9]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(tiny_model_dir: str) -> list[list[int]]:
    std = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    return [o.outputs[0].token_ids for o in run_to_completion(std, PROMPTS, GREEDY)]


# Test-only decoders (test_interface.py registers "test_*") are not part of the product.
@pytest.mark.parametrize("name", [n for n in DECODERS.names() if not n.startswith("test_")])
def test_degenerate_equals_standard(
    tiny_model_dir: str, expected: list[list[int]], name: str
) -> None:
    eng = LLMEngine(
        tiny_engine_config(
            tiny_model_dir, decoder=name, decoder_options=DEGENERATE.get(name, {}), block_size=4
        )
    )
    got = [o.outputs[0].token_ids for o in run_to_completion(eng, PROMPTS, GREEDY)]
    assert got == expected
    eng.block_manager.check_invariants()
