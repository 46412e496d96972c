"""LLMEngine end to end on the tiny random-weight model (float32, CPU)."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest
import torch

from slipstream.engine.batch import Batch
from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampling_params import SamplingParams
from slipstream.testing.engines import run_to_completion, tiny_engine_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def random_prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> LLMEngine:
    return LLMEngine(tiny_engine_config(tiny_model_dir))


def tokens(outputs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_invariance_16_prompts(engine: LLMEngine) -> None:
    prompts = random_prompts(16)
    together = tokens(run_to_completion(engine, prompts, GREEDY))
    alone = [tokens(run_to_completion(engine, [p], GREEDY))[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 12 for t in together)


def test_chunked_prefill_gives_same_tokens(tiny_model_dir: str) -> None:
    prompts = random_prompts(4, seed=1, lo=30, hi=60)
    big = LLMEngine(tiny_engine_config(tiny_model_dir, max_num_batched_tokens=512))
    small = LLMEngine(tiny_engine_config(tiny_model_dir, max_num_batched_tokens=7))
    assert tokens(run_to_completion(small, prompts, GREEDY)) == tokens(
        run_to_completion(big, prompts, GREEDY)
    )


def test_preemption_keeps_greedy_output(tiny_model_dir: str) -> None:
    prompts = random_prompts(6, seed=2, lo=20, hi=30)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    roomy = LLMEngine(tiny_engine_config(tiny_model_dir, num_blocks=256, block_size=4))
    # 30 blocks of 4 slots cannot hold six ~70-token sequences at once: preemption happens.
    tight = LLMEngine(tiny_engine_config(tiny_model_dir, num_blocks=30, block_size=4))
    expected = tokens(run_to_completion(roomy, prompts, params))
    restored: list[bool] = []
    swap = tight._swap

    def checked_swap(batch: Batch) -> None:
        # A resumed sequence's blocks hold, after the swap, the KV it had when preempted.
        saved = [(seq, seq.swapped_kv.clone()) for seq in batch.swap_in]
        swap(batch)
        kv = tight.runner.kv_all
        for seq, before in saved:
            blocks = torch.tensor(seq.block_table[: before.shape[2]])
            restored.append(torch.equal(kv.index_select(2, blocks), before))

    tight._swap = checked_swap  # type: ignore[method-assign]
    got = tokens(run_to_completion(tight, prompts, params))
    assert tight.get_stats()["preemptions"] > 0
    assert got == expected
    assert restored and all(restored)
    # Swapped, not recomputed: no token was fed twice.
    for key in ("prompt_tokens", "forward_tokens"):
        assert tight.get_stats()[key] == roomy.get_stats()[key], key
    assert tight.block_manager.num_free_blocks == 30


def test_prefix_cache_reuse_across_requests(tiny_model_dir: str) -> None:
    eng = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    shared = random_prompts(1, seed=3, lo=33, hi=33)[0]
    first = run_to_completion(eng, [shared + [7, 8]], GREEDY)
    hits_before = eng.get_stats()["prefix_cache_hits"]
    second = run_to_completion(eng, [shared + [9, 10, 11]], GREEDY)
    assert eng.get_stats()["prefix_cache_hits"] - hits_before >= 32
    assert second[0].num_cached_tokens >= 32
    cold = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4, enable_prefix_caching=False))
    assert tokens(run_to_completion(cold, [shared + [9, 10, 11]], GREEDY)) == tokens(second)
    assert tokens(run_to_completion(cold, [shared + [7, 8]], GREEDY)) == tokens(first)


def test_abort_frees_blocks_at_any_point(tiny_model_dir: str) -> None:
    eng = LLMEngine(tiny_engine_config(tiny_model_dir, max_num_batched_tokens=8))
    free0 = eng.block_manager.num_free_blocks
    prompts = random_prompts(5, seed=4, lo=20, hi=30)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, n=2)
    for i, p in enumerate(prompts):
        eng.add_request(f"a{i}", p, params)
    eng.step()  # some in chunked prefill, others waiting
    eng.abort_request("a0")
    eng.abort_request("a4")
    for _ in range(6):
        eng.step()
    for i in (1, 2, 3):
        out = eng.abort_request(f"a{i}")
        assert out is not None and out.finished
        assert all(c.finish_reason == "abort" for c in out.outputs)
    assert not eng.has_unfinished_requests()
    # Blocks return to the free pool (cached prefixes count as free: they are evictable).
    assert eng.block_manager.num_free_blocks == free0
    eng.block_manager.check_invariants()


def test_stop_token_and_max_tokens(engine: LLMEngine) -> None:
    prompt = random_prompts(1, seed=5)[0]
    free_run = run_to_completion(engine, [prompt], GREEDY)[0].outputs[0]
    stop_at = free_run.token_ids[4]
    first = free_run.token_ids.index(stop_at)
    params = SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=(stop_at,)
    )
    out = run_to_completion(engine, [prompt], params)[0].outputs[0]
    assert out.token_ids == free_run.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert free_run.finish_reason == "length"


def test_a_stop_token_adds_no_text_unless_asked(engine: LLMEngine) -> None:
    """As in vLLM: the token that stops a request (a stop token id) stays in its token ids
    but not in its text, unless include_stop_str_in_output."""
    prompt = random_prompts(1, seed=5)[0]
    free_run = run_to_completion(engine, [prompt], GREEDY)[0].outputs[0]
    ids = free_run.token_ids
    # A stop token that decodes to text of its own, after a few tokens of text.
    decode = engine.tokenizer.decode
    pos = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i] and decode([ids[i]]))
    for include in (False, True):
        params = SamplingParams(
            temperature=0.0,
            max_tokens=16,
            ignore_eos=True,
            stop_token_ids=(ids[pos],),
            include_stop_str_in_output=include,
        )
        out = run_to_completion(engine, [prompt], params)[0].outputs[0]
        assert out.token_ids == ids[: pos + 1] and out.finish_reason == "stop"
        shown = ids[: pos + 1] if include else ids[:pos]
        assert out.text == engine.tokenizer.decode(shown, clean_up_tokenization_spaces=False)


def test_seeded_sampling_is_reproducible_in_any_batch(engine: LLMEngine) -> None:
    prompts = random_prompts(4, seed=6)
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=1234, ignore_eos=True)
    alone = tokens(run_to_completion(engine, [prompts[0]], params))[0]
    mixed = tokens(run_to_completion(engine, prompts, params))[0]
    assert alone == mixed


def test_logit_bias_steers_greedy_and_sampled_requests(engine: LLMEngine) -> None:
    prompts = random_prompts(2, seed=8)
    plain = tokens(run_to_completion(engine, prompts, GREEDY))
    forced = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={77: 100})
    banned = dict.fromkeys(plain[0], -100.0)  # every token greedy decoding chose
    sampled = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, logit_bias=banned)
    outs = tokens(run_to_completion(engine, prompts, [forced, sampled]))
    assert outs[0] == [77] * 6
    assert not set(outs[1]) & set(plain[0])


def test_n_completions_differ_when_sampling(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=7, ignore_eos=True)
    out = run_to_completion(engine, random_prompts(1, seed=7), params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_prompt_longer_than_context_is_rejected(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match="context window"):
        engine.add_request("too-long", [5] * engine.max_model_len, GREEDY)


def test_context_window_fits_the_kv_cache(tiny_model_dir: str) -> None:
    """A prompt longer than the KV cache but within the window once waited forever for
    room, and held up every request behind it. The window now shrinks to the cache (taken
    from the model's config) or the engine refuses to start (set by the user)."""
    config = tiny_engine_config(tiny_model_dir, num_blocks=10, block_size=4)
    eng = LLMEngine(config)
    assert eng.max_model_len == 40
    with pytest.raises(ValueError, match="context window is 40"):
        eng.add_request("long", [5] * 40, GREEDY)
    out = run_to_completion(eng, [[5] * 30], GREEDY)[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"  # 30 + 10 = the window
    explicit = replace(config, model=replace(config.model, max_model_len=64))
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        LLMEngine(explicit)


def test_a_request_is_scheduled_before_its_first_forward(tiny_model_dir: str) -> None:
    """Queue time ends when the scheduler takes the request, before the forward that
    prefills it: stamped after that forward, prefill time read ~0 and queue time held it."""
    eng = LLMEngine(tiny_engine_config(tiny_model_dir))
    forward = eng.runner.forward

    def slow_forward(*args: object, **kwargs: object) -> object:
        time.sleep(0.2)
        return forward(*args, **kwargs)

    eng.runner.forward = slow_forward  # type: ignore[method-assign]
    one = SamplingParams(temperature=0.0, max_tokens=1)
    metrics = run_to_completion(eng, [[5, 6, 7]], one)[0].metrics
    assert metrics.first_scheduled_time is not None and metrics.first_token_time is not None
    assert metrics.first_scheduled_time - metrics.arrival_time < 0.1
    assert metrics.first_token_time - metrics.first_scheduled_time >= 0.2


def test_stats_count_tokens(tiny_model_dir: str) -> None:
    eng = LLMEngine(tiny_engine_config(tiny_model_dir))
    prompts = random_prompts(3, seed=8)
    run_to_completion(eng, prompts, GREEDY)
    stats = eng.get_stats()
    assert stats["generation_tokens"] == 3 * 12
    assert stats["prompt_tokens"] == sum(len(p) for p in prompts)
    assert stats["num_steps"] >= 12
