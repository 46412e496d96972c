"""Token recycling on the tiny model: lossless greedy, KV after acceptance, matrix update,
hot start across requests, save/load, and the standard-path fallback counter."""

from __future__ import annotations

import atexit
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slipstream.decoding.token_recycling import TokenRecyclingDecoder
from slipstream.decoding.tree_verify import Draft
from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.sequence import Sequence
from slipstream.testing.engines import run_to_completion, tiny_engine_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = [
    [11, 42, 7, 99, 123, 5, 64, 300, 17] * 3,  # repetitive: drafts get accepted
    [5, 6, 7, 8] * 6,
    [100, 200, 300],
    [401, 222, 3, 58, 9, 77, 19],
]


def _engine(model_dir: str, **options: Any) -> LLMEngine:
    return LLMEngine(
        tiny_engine_config(
            model_dir, decoder="token_recycling", decoder_options=options, block_size=4
        )
    )


def _decoder(engine: LLMEngine) -> TokenRecyclingDecoder:
    assert isinstance(engine.decoder, TokenRecyclingDecoder)
    return engine.decoder


@pytest.fixture(scope="module")
def expected(tiny_model_dir: str) -> list[list[int]]:
    std = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    return [o.outputs[0].token_ids for o in run_to_completion(std, PROMPTS, GREEDY)]


FAITHFUL = {
    "adaptive": False,
    "prompt_lookup_tokens": 0,
    "prompt_seed_rows": 0,
    "dynamic_tree": False,
}


@pytest.mark.parametrize(
    "options",
    [
        FAITHFUL,
        {},
        {"dynamic_tree": False},
        {"tree_size": 0},
        # short suffixes match often, so chains are grafted beside a deep full tree
        {"adaptive": False, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
    ],
    ids=["faithful", "adaptive", "adaptive_static_tree", "lookup_only", "full_tree_and_lookup"],
)
def test_greedy_identical_to_standard(
    tiny_model_dir: str, expected: list[list[int]], options: dict[str, Any]
) -> None:
    eng = _engine(tiny_model_dir, **options)
    for _ in range(2):  # cold, then hot start
        got = [o.outputs[0].token_ids for o in run_to_completion(eng, PROMPTS, GREEDY)]
        assert got == expected
        eng.block_manager.check_invariants()
    stats = eng.get_stats()
    assert stats["spec_num_drafts"] > 0
    assert stats["spec_num_accepted_tokens"] > 0
    assert stats["mean_accepted_tokens_per_step"] > 1.0
    assert sum(stats["spec_accepted_per_pos"][:1]) <= stats["spec_num_drafts"]
    grafted = _decoder(eng).stats()["prompt_lookup_drafts"]
    if options.get("prompt_lookup_tokens") == 0:
        assert grafted == 0
    else:
        assert grafted > 0, "the repetitive prompts match their own suffixes"


def test_mixed_batch_with_standard_path_requests(
    tiny_model_dir: str, expected: list[list[int]]
) -> None:
    eng = _engine(tiny_model_dir, sampling=False, tree_size=12)
    sampled = SamplingParams(temperature=1.0, max_tokens=4, seed=3, ignore_eos=True)
    params = [GREEDY, sampled] * len(PROMPTS)
    prompts = [p for p in PROMPTS for _ in range(2)]
    outs = run_to_completion(eng, prompts, params)
    assert [o.outputs[0].token_ids for o in outs[::2]] == expected
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs[1::2])
    assert _decoder(eng).stats()["standard_path_seqs"] == len(PROMPTS) * 4


def test_short_max_tokens_and_penalties_stay_exact(tiny_model_dir: str) -> None:
    params = [
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=9, min_tokens=4, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=10, logit_bias={5: 4.0, 17: 2.0, 99: -50.0}),
    ]
    std = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    want = run_to_completion(std, PROMPTS[:4], params)
    eng = _engine(tiny_model_dir, adaptive=False)
    run_to_completion(eng, PROMPTS, GREEDY)  # hot matrix: deep drafts
    got = run_to_completion(eng, PROMPTS[:4], params)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
    lp_want = [lp.chosen.logprob for lp in want[2].outputs[0].logprobs or []]
    lp_got = [lp.chosen.logprob for lp in got[2].outputs[0].logprobs or []]
    assert lp_got == pytest.approx(lp_want, abs=1e-4)


@pytest.mark.parametrize(
    "decoder, options",
    [
        ("token_recycling", {"adaptive": False, "prompt_lookup_min": 1, "prompt_lookup_max": 3}),
        ("ngram", {"prompt_lookup_min": 1}),
    ],
)
def test_a_stop_inside_an_accepted_draft_ends_where_standard_ends(
    tiny_model_dir: str, expected: list[list[int]], decoder: str, options: dict[str, Any]
) -> None:
    """A step can accept several tokens at once; when a stop token id, or the max_tokens
    limit, falls inside them, the request must end on the same token, with the same finish
    reason, as one-token decoding: nothing drafted past the stop may reach the output."""
    std = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    eng = LLMEngine(
        tiny_engine_config(tiny_model_dir, decoder=decoder, decoder_options=options, block_size=4)
    )
    run_to_completion(eng, PROMPTS, GREEDY)  # hot matrix: deep drafts from the first step
    accepted_before = eng.get_stats()["spec_num_accepted_tokens"]
    finish_reasons = set()
    stopped_by_text = 0
    for prompt, want in zip(PROMPTS, expected, strict=True):
        for pos in (2, 5, 9, 13):
            # A stop string: the text of the token at pos and the one after it.
            stop = eng.tokenizer.decode(want[pos : pos + 2], clean_up_tokenization_spaces=False)
            cuts = [
                SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[want[pos]]),
                SamplingParams(temperature=0.0, max_tokens=pos + 1, ignore_eos=True),
                SamplingParams(temperature=0.0, max_tokens=16, stop=[stop], logprobs=1),
            ]
            for params in cuts:
                w = run_to_completion(std, [prompt], params)[0].outputs[0]
                g = run_to_completion(eng, [prompt], params)[0].outputs[0]
                assert (g.token_ids, g.finish_reason, g.stop_reason, g.text) == (
                    w.token_ids,
                    w.finish_reason,
                    w.stop_reason,
                    w.text,
                )
                assert len(g.logprobs or []) == len(w.logprobs or [])
                finish_reasons.add(g.finish_reason)
                stopped_by_text += isinstance(g.stop_reason, str)
    assert finish_reasons == {"stop", "length"}
    assert stopped_by_text >= len(PROMPTS)
    assert eng.get_stats()["spec_num_accepted_tokens"] > accepted_before
    eng.block_manager.check_invariants()


@pytest.mark.parametrize(
    "decoder, options",
    [
        ("token_recycling", {"adaptive": False, "tree_size": 12}),
        ("ngram", {"prompt_lookup_min": 1}),
    ],
)
def test_a_kv_pool_too_small_for_the_drafts_keeps_the_answers(
    tiny_model_dir: str, expected: list[list[int]], decoder: str, options: dict[str, Any]
) -> None:
    """Four requests in a pool of 14 four-token pages (they need 32 together): sequences
    are preempted and recomputed, and steps find no room for some drafts' slots. Drafts
    then wait (they once went into slots never allocated: an IndexError, a 500 for the
    whole batch); the answers are standard decoding's."""
    eng = LLMEngine(
        tiny_engine_config(
            tiny_model_dir,
            decoder=decoder,
            decoder_options=options,
            block_size=4,
            num_blocks=14,
        )
    )
    for _ in range(2):  # the second round from a hot matrix: deeper drafts
        outs = run_to_completion(eng, PROMPTS, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == expected
        eng.block_manager.check_invariants()
    stats = eng.get_stats()
    assert stats["preemptions"] > 0 and stats["spec_num_accepted_tokens"] > 0


def test_prompt_positions_seed_the_matrix(tiny_model_dir: str) -> None:
    # Two prompts of distinct tokens prefilled in one step, 5 seed rows for the step: the
    # first prompt's last 5 positions before its sampled one, then none of the second's.
    prompts = [[30 + i for i in range(12)], [80 + i for i in range(9)]]
    one = SamplingParams(temperature=0.0, max_tokens=1)
    eng = _engine(tiny_model_dir, prompt_seed_rows=5, tree_size=0)
    run_to_completion(eng, prompts, one)
    matrix = _decoder(eng).matrix
    std = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    want_logprobs = SamplingParams(temperature=0.0, max_tokens=1, logprobs=8)

    def top8(prefix: list[int]) -> list[int]:
        out = run_to_completion(std, [prefix], want_logprobs)[0].outputs[0]
        return [lp.token_id for lp in (out.logprobs or [])[0].top]

    first, second = prompts
    for i in range(len(first) - 6, len(first)):  # 5 seeded rows + the sampled one
        assert matrix[first[i]].tolist() == top8(first[: i + 1]), i
    assert not matrix[first[: len(first) - 6]].any()
    assert matrix[second[-1]].tolist() == top8(second)  # the sampled row, as always
    assert not matrix[second[:-1]].any()
    unseeded = _engine(tiny_model_dir, prompt_seed_rows=0, tree_size=0)
    run_to_completion(unseeded, prompts, one)
    assert int((_decoder(unseeded).matrix != 0).any(dim=1).sum()) == 2


def test_prompt_seeding_stops_where_the_calibrated_tree_is_empty(tiny_model_dir: str) -> None:
    """Seed rows cost LM-head work per prompt token; when the sizer has chosen no tree at the
    batch size being served, nothing drafts from the matrix, so prompts are not seeded."""
    prompt = [[30 + i for i in range(12)]]
    one = SamplingParams(temperature=0.0, max_tokens=1)
    eng = _engine(tiny_model_dir, prompt_seed_rows=5, calibration_rounds=1)
    dec = _decoder(eng)
    # Calibration over; forward cost steep in tokens fed, so no tree pays at any batch.
    dec.sizer.step = dec.sizer.calibration_steps
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        dec.sizer.cost.add(n, 0.001 + 0.05 * n)
    assert dec.sizer.best_size(1) == 0
    run_to_completion(eng, prompt, one)
    seeded = (dec.matrix != 0).any(dim=1)
    assert int(seeded.sum()) == 1  # only the sampled row, which every step writes
    # Forward cost flat: the full tree pays, and the same prompt's rows are seeded.
    flat = _engine(tiny_model_dir, prompt_seed_rows=5, calibration_rounds=1)
    fdec = _decoder(flat)
    fdec.sizer.step = fdec.sizer.calibration_steps
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        fdec.sizer.cost.add(n, 0.01)
    assert fdec.sizer.best_size(1) > 0
    run_to_completion(flat, prompt, one)
    assert int((fdec.matrix != 0).any(dim=1).sum()) == 6  # 5 seed rows + the sampled one


def test_steps_with_a_prefill_chunk_do_not_time_the_cost_model(tiny_model_dir: str) -> None:
    """A prefill chunk (and the seed rows it carries) costs differently per token than a
    decode or a draft tree, so steps that hold one are counted but not timed, except while
    the cost model is still empty."""
    eng = _engine(tiny_model_dir, prompt_seed_rows=5)
    dec = _decoder(eng)
    steps: list[tuple[list[int], bool]] = []  # per step: each item's new tokens, timed
    select = dec.select
    add = dec.sizer.cost.add
    timed = [False]

    def recording_select(batch: Any, inputs: Any, logits: Any) -> Any:
        timed[0] = False
        result = select(batch, inputs, logits)
        steps.append(([item.num_new_tokens for item in batch.items], timed[0]))
        return result

    def recording_add(n: int, seconds: float) -> None:
        timed[0] = True
        add(n, seconds)

    dec.select = recording_select  # type: ignore[method-assign]
    dec.sizer.cost.add = recording_add  # type: ignore[method-assign]
    eng.add_request("first", PROMPTS[0], GREEDY)
    for _ in range(4):  # "first" prefills, then decodes alone; then "second" prefills beside it
        eng.step()
    run_to_completion(eng, [PROMPTS[1]], GREEDY)
    first_new, first_timed = steps[0]
    assert first_new[0] > 1 and first_timed  # a prefill, timed: nothing else was known
    later_mixed = [t for new, t in steps[1:] if any(k > 1 for k in new)]
    assert later_mixed and not any(later_mixed)  # "second"'s prefill beside a decode
    assert all(t for new, t in steps if all(k == 1 for k in new))
    assert dec.sizer.step == len(steps)  # every step still counts


def test_matrix_update_rule(tiny_model_dir: str) -> None:
    dec = _decoder(_engine(tiny_model_dir))
    vocab = dec.ctx.vocab_size
    logits = torch.full((3, vocab), -5.0)
    for row, tok in enumerate((10, 20, 30)):
        logits[row, tok : tok + 8] = torch.arange(8, 0, -1).float()  # best first
    dec.greedy_targets(logits)
    dec.observe([7, 8, 7], [3, 7, 8], logits, num_tokens=3, seconds=0.01)
    assert dec.matrix[8].tolist() == list(range(20, 28))
    assert dec.matrix[7].tolist() == list(range(30, 38))  # last writer wins
    assert dec.matrix[9].tolist() == [0] * 8
    # Pair rows keep both 7s apart: (3, 7) and (8, 7) are different contexts.
    assert dec.pairs is not None
    assert dec.pairs.ids[dec.pairs.find(3, 7)].tolist() == list(range(10, 18))
    assert dec.pairs.ids[dec.pairs.find(8, 7)].tolist() == list(range(30, 38))


def test_matrix_update_stores_candidate_probabilities(tiny_model_dir: str) -> None:
    dec = _decoder(_engine(tiny_model_dir))
    vocab = dec.ctx.vocab_size
    logits = torch.full((2, vocab), -30.0)
    logits[0, 10:18] = torch.arange(8, 0, -1).float()
    logits[1, 20] = 5.0  # one clear candidate, seven at -30
    dec.greedy_targets(logits)
    dec.observe([7, 8], [-1, 7], logits, num_tokens=2, seconds=0.01)
    want = torch.arange(8, 0, -1).float().softmax(dim=0)
    torch.testing.assert_close(dec.probs[7], want)
    assert dec.probs[8, 0] > 0.999 and dec.matrix[8, 0] == 20
    static = _decoder(_engine(tiny_model_dir, dynamic_tree=False))
    static.greedy_targets(logits)
    static.observe([7, 8], [-1, 7], logits, num_tokens=2, seconds=0.01)
    assert static.matrix[7].tolist() == list(range(10, 18))
    assert not static.probs.any()  # static trees do not use them


@pytest.mark.parametrize("dynamic", [True, False])
def test_host_and_device_record_paths_write_the_same_state(
    tiny_model_dir: str, dynamic: bool
) -> None:
    """observe writes through NumPy on a CPU matrix and through torch on an accelerator;
    run both on the CPU over the same rows (a repeated token, a row of -inf tails, a
    sequence start) and they must leave the same matrix, probabilities and pair rows."""
    gen = torch.Generator().manual_seed(0)
    fed, prev = [7, 8, 7, 9], [3, 7, 8, -1]
    decs = [_decoder(_engine(tiny_model_dir, dynamic_tree=dynamic)) for _ in range(2)]
    vocab = decs[0].ctx.vocab_size
    logits = torch.randn(4, vocab, generator=gen) * 3
    logits[2, 5:] = float("-inf")  # 5 finite logits: three -inf candidates (p = 0)
    top = logits.topk(8, dim=-1)
    decs[0]._record_on_host(fed, prev, top.values, top.indices)
    decs[1]._record_on_device(fed, prev, top.values, top.indices)
    host, device = decs
    assert torch.equal(host.matrix, device.matrix)
    assert host.matrix[7].tolist() == top.indices[2].tolist()  # last writer wins
    torch.testing.assert_close(host.probs, device.probs, rtol=1e-6, atol=1e-7)
    if dynamic:
        assert host.probs[7, 5:].tolist() == [0.0] * 3
    if dynamic:
        assert host.pairs is not None and device.pairs is not None
        assert len(host.pairs) == len(device.pairs) == 3  # (-1, 9) writes no pair
        for key in [(3, 7), (7, 8), (8, 7)]:
            a, b = host.pairs.find(*key), device.pairs.find(*key)
            assert np.array_equal(host.pairs.ids[a], device.pairs.ids[b])
            np.testing.assert_allclose(host.pairs.probs[a], device.pairs.probs[b], rtol=1e-6)
    else:
        assert not host.probs.any()


def test_dynamic_tree_drafts_a_confident_chain(
    tiny_model_dir: str, expected: list[list[int]]
) -> None:
    """Three nodes, the right continuation stored at rank 0 everywhere: the static tree's
    three nodes are (0,), (1,), (0, 0), so it accepts at most 2 tokens a step; the dynamic
    tree follows the confident rows to depth 3."""
    prompt, want = PROMPTS[2], expected[2]
    accepted = {}
    for dynamic in (True, False):
        eng = _engine(tiny_model_dir, tree_size=3, prompt_lookup_tokens=0, dynamic_tree=dynamic)
        dec = _decoder(eng)
        for a, b in itertools.pairwise(prompt + want):
            dec.matrix[a] = torch.arange(b, b + 8) % dec.ctx.vocab_size
            dec.probs[a] = torch.tensor([0.95] + [0.05 / 7] * 7)
        eng.add_request("r", prompt, GREEDY)
        eng.step()  # prefill
        eng.step()  # the first draft
        seq = next(iter(eng.seqs.values()))
        accepted[dynamic] = seq.num_output_tokens - 2  # drafts beyond prefill's + the bonus
        assert seq.output_token_ids == want[: seq.num_output_tokens]
    assert accepted[True] == 3
    assert accepted[False] == 2


def test_chains_count_as_far_as_they_match_even_when_shared_with_the_tree(
    tiny_model_dir: str,
) -> None:
    dec = _decoder(_engine(tiny_model_dir))
    assert dec.dynamic is not None
    # One tree node 11 under root 10; the chain [11, 13] shares it and adds 13 below it.
    tmpl, tokens = dec.dynamic.with_chain(10, [(0,)], [11], [11, 13])
    assert tokens == [10, 11, 13] and tmpl.num_tokens == 3
    draft = Draft(tmpl, tokens, (11, 13))
    dec.accepted(draft, [11, 13, 40])
    assert dec.chains.trials[1:3].tolist() == [1, 1]
    assert dec.chains.hits[1:3].tolist() == [1, 1]  # both chain tokens were taken
    dec.accepted(draft, [11, 40])
    assert dec.chains.hits[1:3].tolist() == [2, 1]


def test_pair_rows_learn_each_fed_tokens_context(tiny_model_dir: str) -> None:
    eng = _engine(tiny_model_dir, tree_size=4)
    dec = _decoder(eng)
    assert dec.pairs is not None
    prompt = PROMPTS[3]
    eng.add_request("r", prompt, GREEDY)
    eng.step()  # prefill: the prompt's rows seed (previous, token) pairs
    assert all(dec.pairs.find(a, b) >= 0 for a, b in itertools.pairwise(prompt))
    assert dec.pairs.find(-1, prompt[0]) == -1  # position 0 has no previous token
    seq = next(iter(eng.seqs.values()))
    while eng.has_unfinished_requests():
        eng.step()
    out = seq.output_token_ids
    # Every emitted token was a step's root or an accepted node: its row was written with
    # the token before it as the key.
    for a, b in itertools.pairwise([prompt[-1], *out[:-1]]):
        slot = dec.pairs.find(a, b)
        assert slot >= 0, (a, b)
        assert np.all(np.diff(dec.pairs.probs[slot]) <= 0)  # a top-k, best first
    dec.reset_matrix()
    assert len(dec.pairs) == 0


def test_kv_after_acceptance_equals_sequential(
    tiny_model_dir: str, expected: list[list[int]]
) -> None:
    prompt, want = PROMPTS[0], expected[0]
    eng = _engine(tiny_model_dir, adaptive=False)
    dec = _decoder(eng)
    # Seed M with the known continuation so that deep drafts are accepted.
    chain = prompt + want
    for a, b in itertools.pairwise(chain):
        dec.matrix[a, 0] = b
        dec.probs[a, 0] = 1.0  # a written row (the walk leaves unwritten ones alone)
    std = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    eng.add_request("tr", prompt, GREEDY)
    std.add_request("sd", prompt, GREEDY)
    eng.step()
    eng.step()
    seq = next(iter(eng.seqs.values()))
    assert seq.num_output_tokens > 2, "the seeded draft was accepted"
    ref = next(iter(std.seqs.values()))
    while ref.num_computed_tokens < seq.num_computed_tokens:
        std.step()
    n = seq.num_computed_tokens
    torch.testing.assert_close(_kv(eng, seq, n), _kv(std, ref, n), atol=1e-5, rtol=1e-5)


def _kv(engine: LLMEngine, seq: Sequence, n: int) -> torch.Tensor:
    slots = torch.tensor([engine.block_manager.slot(seq, p) for p in range(n)])
    return torch.stack([kv.view(2, -1, *kv.shape[3:])[:, slots] for kv in engine.runner.kv_caches])


def test_hot_start_and_save_load(tiny_model_dir: str, tmp_path: Path) -> None:
    path = str(tmp_path / "m.pt")
    eng = _engine(tiny_model_dir, adaptive=False, matrix_path=path)
    run_to_completion(eng, PROMPTS[:1], GREEDY)
    cold_steps = eng.get_stats()["num_steps"]
    run_to_completion(eng, PROMPTS[:1], GREEDY)
    hot_steps = eng.get_stats()["num_steps"] - cold_steps
    assert hot_steps < cold_steps, "the matrix carried over: fewer steps the second time"
    dec = _decoder(eng)
    dec.save_matrix(path)
    loaded = _engine(tiny_model_dir, adaptive=False, matrix_path=path)
    assert torch.equal(_decoder(loaded).matrix, dec.matrix)
    assert dec.probs.any() and torch.equal(_decoder(loaded).probs, dec.probs)
    run_to_completion(loaded, PROMPTS[:1], GREEDY)
    assert loaded.get_stats()["num_steps"] < cold_steps  # starts hot
    legacy = tmp_path / "legacy.pt"  # a matrix saved without probabilities
    torch.save({"matrix": dec.matrix.cpu(), "vocab_size": dec.ctx.vocab_size}, legacy)
    old = _decoder(_engine(tiny_model_dir, matrix_path=str(legacy)))
    written = (dec.matrix != 0).any(dim=1)
    assert torch.all(old.probs[written] == 1 / 8)  # written rows: candidates ranked alike
    assert not old.probs[~written].any()  # never-written rows stay unknown
    bad = tmp_path / "bad.pt"
    torch.save({"matrix": torch.zeros(3, 8, dtype=torch.int32)}, bad)
    with pytest.raises(ValueError, match="shape"):
        _engine(tiny_model_dir, matrix_path=str(bad))


def test_options_are_validated() -> None:
    from slipstream.config import DecoderSpec
    from slipstream.decoding.registry import decoder_options

    with pytest.raises(ValueError, match="unknown option"):
        decoder_options(DecoderSpec("token_recycling", {"treesize": 3}))
    with pytest.raises(ValueError, match="tree_size"):
        decoder_options(DecoderSpec("token_recycling", {"tree_size": -1}))
    # Refused in one line, not a 2.9 TiB allocation failing at start-up.
    with pytest.raises(ValueError, match="pair_rows"):
        decoder_options(DecoderSpec("token_recycling", {"pair_rows": 10**11}))


def test_a_matrix_path_that_cannot_be_saved(tiny_model_dir: str, tmp_path: Path) -> None:
    """A folder that does not exist is refused at start; a save that fails later (the
    folder removed since) is logged and decoding goes on: it once failed the step."""
    with pytest.raises(ValueError, match="does not exist"):
        _engine(tiny_model_dir, matrix_path=str(tmp_path / "no" / "m.pt"))
    with pytest.raises(ValueError, match="is a folder"):
        _engine(tiny_model_dir, matrix_path=str(tmp_path))
    folder = tmp_path / "gone"
    folder.mkdir()
    eng = _engine(tiny_model_dir, matrix_path=str(folder / "m.pt"), save_interval_s=1e-9)
    folder.rmdir()
    outs = run_to_completion(eng, PROMPTS[:1], GREEDY)
    assert len(outs[0].outputs[0].token_ids) == GREEDY.max_tokens
    atexit.unregister(_decoder(eng)._save_at_exit)  # its warning would go to a closed stream
