"""Prompt logprobs on the native engine: every prompt token scored, whatever the chunking,
the prefix cache or the decoder (tiny random-weight model, float32, CPU)."""

from __future__ import annotations

import itertools
import math

import pytest

from slipstream.engine.engine import LLMEngine
from slipstream.engine.outputs import RequestOutput
from slipstream.engine.sampling_params import SamplingParams
from slipstream.testing.engines import run_to_completion, tiny_engine_config

PROMPTS = [
    [7, 19, 33, 7, 19, 33, 7, 19, 41, 56, 70, 12, 5, 88, 91, 23, 7, 19, 33, 101, 4, 9],
    [300, 301, 302, 45, 46, 47, 300, 301, 302, 45, 46, 47, 300, 301, 302, 45, 46],
]


def _entries(out: RequestOutput) -> list[tuple[int, float, list[int], list[float]] | None]:
    assert out.prompt_logprobs is not None
    rows: list[tuple[int, float, list[int], list[float]] | None] = []
    for lp in out.prompt_logprobs:
        if lp is None:
            rows.append(None)
            continue
        rows.append(
            (
                lp.chosen.token_id,
                lp.chosen.logprob,
                [t.token_id for t in lp.top],
                [t.logprob for t in lp.top],
            )
        )
    return rows


def _close(a: list, b: list, tol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
            continue
        assert x[0] == y[0] and x[2] == y[2]
        assert abs(x[1] - y[1]) < tol
        assert all(abs(u - v) < tol for u, v in zip(x[3], y[3], strict=True))


def test_entries_match_the_next_token_distribution_of_each_prefix(tiny_model_dir: str) -> None:
    """Entry j equals what decoding after prompt[:j] reports for its first token."""
    engine = LLMEngine(tiny_engine_config(tiny_model_dir, enable_prefix_caching=False))
    prompt = PROMPTS[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=5)
    out = run_to_completion(engine, [prompt], params)[0]
    got = _entries(out)
    assert len(got) == len(prompt) and got[0] is None
    for j in range(1, len(prompt)):
        entry = got[j]
        assert entry is not None and entry[0] == prompt[j]
        ref = run_to_completion(
            engine, [prompt[:j]], SamplingParams(temperature=0.0, max_tokens=1, logprobs=20)
        )[0]
        lps = ref.outputs[0].logprobs
        assert lps is not None
        top = lps[0].top
        assert [t.token_id for t in top[:5]] == entry[2]
        assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(top[:5], entry[3], strict=True))
        # The prompt token's own logprob, where it is among the top 20.
        own = [t.logprob for t in top if t.token_id == prompt[j]]
        if own:
            assert abs(own[0] - entry[1]) < 1e-4
        assert entry[1] <= 0.0 and entry[3] == sorted(entry[3], reverse=True)
    # The generated tokens are unaffected by asking for prompt logprobs.
    plain = run_to_completion(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert plain.prompt_logprobs is None
    assert plain.outputs[0].token_ids == out.outputs[0].token_ids


def test_chunked_prefill_prefix_cache_and_batching_give_the_same_entries(
    tiny_model_dir: str,
) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=3, ignore_eos=True)
    whole = LLMEngine(tiny_engine_config(tiny_model_dir, max_num_batched_tokens=512))
    expected = [_entries(o) for o in run_to_completion(whole, PROMPTS, params)]
    # Prefill in chunks of 5 tokens: the entries come from several steps.
    chunked = LLMEngine(tiny_engine_config(tiny_model_dir, max_num_batched_tokens=5))
    for got, want in zip(run_to_completion(chunked, PROMPTS, params), expected, strict=True):
        _close(_entries(got), want)
    # The same prompt again: its blocks are in the prefix cache, which would skip positions
    # whose logits are needed; the request computes them anyway.
    again = run_to_completion(whole, PROMPTS[:1], params)[0]
    _close(_entries(again), expected[0])
    plain = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    cached = run_to_completion(whole, PROMPTS[:1], plain)[0]
    assert cached.num_cached_tokens > 0  # requests without prompt logprobs still hit it
    # n = 2: both completions share one set of prompt entries.
    two = SamplingParams(
        temperature=0.8, seed=3, n=2, max_tokens=3, prompt_logprobs=3, ignore_eos=True
    )
    _close(_entries(run_to_completion(whole, PROMPTS[1:], two)[0]), expected[1])


@pytest.mark.parametrize(
    ("decoder", "options"),
    # A fixed tree: the calibrated one follows measured step times, and drafts nothing on a
    # busy machine.
    [
        ("token_recycling", {"tree_size": 6}),
        ("ngram", {"prompt_lookup_min": 2, "prompt_lookup_max": 3}),
    ],
)
def test_speculative_decoders_report_the_same_entries_and_tokens(
    tiny_model_dir: str, decoder: str, options: dict
) -> None:
    """Token recycling also asks for prompt rows (to seed its matrix): rows are merged, and
    its verification still sees only its own rows, so greedy tokens stay as standard's."""
    params = SamplingParams(temperature=0.0, max_tokens=16, prompt_logprobs=2, ignore_eos=True)
    standard = LLMEngine(tiny_engine_config(tiny_model_dir, max_num_batched_tokens=9))
    spec = LLMEngine(
        tiny_engine_config(
            tiny_model_dir, decoder=decoder, decoder_options=options, max_num_batched_tokens=9
        )
    )
    # The decoder's select gets back exactly the logits rows its build_inputs asked for.
    dec = spec.decoder
    asked: list[list[int]] = []
    build, select = dec.build_inputs, dec.select

    def build_inputs(batch):  # type: ignore[no-untyped-def]
        inputs = build(batch)
        asked[:] = [list(si.logits_indices) for si in inputs.seqs]
        return inputs

    def checked_select(batch, inputs, logits):  # type: ignore[no-untyped-def]
        assert [list(si.logits_indices) for si in inputs.seqs] == asked
        assert logits.offsets == [0, *itertools.accumulate(len(a) for a in asked)]
        assert logits.values.shape[0] == logits.offsets[-1]
        return select(batch, inputs, logits)

    dec.build_inputs = build_inputs  # type: ignore[method-assign]
    dec.select = checked_select  # type: ignore[method-assign]
    want = run_to_completion(standard, PROMPTS, params)
    got = run_to_completion(spec, PROMPTS, params)
    for g, w in zip(got, want, strict=True):
        _close(_entries(g), _entries(w))
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
    assert spec.get_stats()["spec_num_drafts"] > 0


def test_probabilities_are_normalised_over_the_vocabulary(tiny_model_dir: str) -> None:
    engine = LLMEngine(tiny_engine_config(tiny_model_dir))
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=20)
    out = run_to_completion(engine, [PROMPTS[1]], params)[0]
    for entry in _entries(out)[1:]:
        assert entry is not None
        mass = sum(math.exp(v) for v in entry[3])
        assert 0.0 < mass <= 1.0 + 1e-5
        # the chosen token is in the top list exactly when its logprob reaches the 20th
        assert (entry[0] in entry[2]) == (entry[1] >= entry[3][-1] - 1e-6)
