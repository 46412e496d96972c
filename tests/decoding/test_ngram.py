"""ngram (prompt lookup): vLLM's matching rule, and lossless greedy on the tiny model."""

from __future__ import annotations

import numpy as np

from slipstream.decoding.ngram import NgramDecoder
from slipstream.decoding.suffix_index import SuffixIndex
from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampling_params import SamplingParams
from slipstream.testing.engines import run_to_completion, tiny_engine_config
from tests.decoding.test_suffix_index import find_draft as _draft_by_every_n  # the rule


def find_draft(tokens: list[int] | np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """The decoders' lookup (a fresh index each call)."""
    return list(SuffixIndex(min_n, max_n).draft(tokens, k))  # type: ignore[arg-type]


def find_longest_draft(
    tokens: list[int], min_n: int, max_n: int, k: int, factor: float
) -> list[int]:
    """The same, at most factor x the match length long (token recycling's chain)."""
    return SuffixIndex(min_n, max_n).draft(tokens, k, factor)


def test_find_longest_draft_is_find_draft_cut_to_its_match_length() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):  # short random texts over 2-5 tokens repeat often
        tokens = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(1, 60))).tolist()
        lo = int(rng.integers(1, 5))
        hi, k = int(rng.integers(lo, 12)), int(rng.integers(1, 10))
        want = _draft_by_every_n(tokens, lo, hi, k)
        assert find_draft(tokens, lo, hi, k) == want
        assert find_draft(np.array(tokens, dtype=np.int64), lo, hi, k) == want
        assert find_longest_draft(tokens, lo, hi, k, 1e9) == want
    # [1, 2, 3] matched (3 tokens): at most 3 tokens of what followed with factor 1
    assert find_longest_draft([1, 2, 3, 9, 1, 2, 3], 2, 8, 8, 1.0) == [9, 1, 2]
    assert find_longest_draft([1, 2, 3, 9, 1, 2, 3], 2, 8, 8, 0.5) == [9]
    assert find_longest_draft([1, 2, 3, 9, 1, 2, 3], 2, 2, 8, 1.0) == [9, 1]  # max_n caps
    assert find_longest_draft([1, 2], 3, 8, 8, 1.0) == []


def test_find_draft_matches_vllm_rules() -> None:
    # vLLM's docstring example: [4, 2, 3] never occurred, [2, 3] did -> what followed it.
    assert find_draft([1, 2, 3, 4, 2, 3], 2, 3, 4) == [4, 2, 3]
    # the longest n wins; among equal n, the earliest occurrence
    assert find_draft([7, 1, 2, 9, 5, 1, 2, 8, 1, 2], 2, 2, 1) == [9]
    assert find_draft([5, 1, 2, 9, 7, 5, 1, 2], 2, 3, 2) == [9, 7]
    assert find_draft([1, 2, 3, 4], 2, 3, 4) == []  # no repeat
    assert find_draft([1, 2], 5, 5, 4) == []  # shorter than min_n
    assert find_draft([3, 3, 3, 3, 3], 2, 2, 8) == [3, 3, 3]  # capped by what follows


def test_greedy_identical_and_drafts_accepted(tiny_model_dir: str) -> None:
    prompts = [[11, 42, 7, 99, 5] * 4, [5, 6, 7, 8] * 5, [100, 200, 300]]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    std = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    want = [o.outputs[0].token_ids for o in run_to_completion(std, prompts, params)]
    opts = {"prompt_lookup_min": 2, "prompt_lookup_max": 3, "num_speculative_tokens": 4}
    eng = LLMEngine(
        tiny_engine_config(tiny_model_dir, decoder="ngram", decoder_options=opts, block_size=4)
    )
    got = [o.outputs[0].token_ids for o in run_to_completion(eng, prompts, params)]
    assert got == want
    stats = eng.get_stats()
    assert stats["spec_num_drafts"] > 0 and stats["spec_num_accepted_tokens"] > 0
    assert isinstance(eng.decoder, NgramDecoder)
    assert eng.decoder.stats()["draft_tokens"] == stats["spec_num_draft_tokens"]
    eng.block_manager.check_invariants()
