"""Lossless speculative sampling over a draft tree, shown statistically on the tiny model's
own tree logits: the first emitted token follows the root's distribution and, after a child
is accepted, the next token follows that child's distribution."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from slipstream.decoding.base import StepInputs, StepLogits
from slipstream.decoding.draft_tree import TreeTemplate, graft_chain
from slipstream.decoding.token_recycling import TokenRecyclingDecoder
from slipstream.decoding.tree_verify import verify_walk
from slipstream.engine.batch import Batch
from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampler import SamplingContext
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.sequence import Sequence
from slipstream.testing.engines import run_to_completion, tiny_engine_config

PROMPT = [11, 42, 7, 99, 123, 5, 64, 300, 17] * 2
SAMPLED = SamplingParams(temperature=1.0, top_k=12, max_tokens=64, ignore_eos=True)
NUM_WALKS = 3000


@pytest.fixture(scope="module")
def tree_step(
    tiny_model_dir: str,
) -> tuple[TokenRecyclingDecoder, TreeTemplate, list[int], torch.Tensor]:
    """A hot matrix, then one real tree-verification forward: (decoder, tree, tokens, logits)."""
    eng = LLMEngine(
        tiny_engine_config(
            tiny_model_dir,
            decoder="token_recycling",
            decoder_options={"adaptive": False, "prompt_lookup_tokens": 0},
        )
    )
    run_to_completion(
        eng, [PROMPT], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    )
    dec = eng.decoder
    assert isinstance(dec, TokenRecyclingDecoder)
    captured: list[StepLogits] = []
    forward = eng.runner.forward

    def spy(batch: Batch, inputs: StepInputs) -> StepLogits:
        out = forward(batch, inputs)
        captured.append(out)
        return out

    eng.runner.forward = spy  # type: ignore[method-assign]
    eng.add_request("s", PROMPT, SAMPLED)
    eng.step()  # prefill + first token
    eng.step()  # first tree verification
    draft = dec._drafts[0]
    assert draft is not None and draft.tmpl.num_draft == 80
    return dec, draft.tmpl, draft.tokens, captured[-1].for_item(0).clone()


def _probs(
    dec: TokenRecyclingDecoder, seq: Sequence, row: torch.Tensor, extra: list[int]
) -> torch.Tensor:
    ctx = SamplingContext(seq.params, seq.prompt_token_ids, seq.output_token_ids + extra, None)
    return dec.ctx.sampler.processed_probs(row.unsqueeze(0), [ctx])[0]


def _tv(counts: Counter[int], probs: torch.Tensor) -> float:
    total = sum(counts.values())
    support = set(counts) | set(torch.nonzero(probs).flatten().tolist())
    return 0.5 * sum(abs(counts.get(t, 0) / total - float(probs[t])) for t in support)


def test_tree_rejection_sampling_is_lossless(
    tree_step: tuple[TokenRecyclingDecoder, TreeTemplate, list[int], torch.Tensor],
) -> None:
    dec, tmpl, tokens, logits = tree_step
    seq = Sequence(0, "x", list(PROMPT), SAMPLED, 0.0)
    seq.generator = torch.Generator().manual_seed(1234)
    p_root = _probs(dec, seq, logits[0], [])
    # The hot matrix drafted likely tokens: the root's children hold real probability mass.
    child_mass = sum(float(p_root[tokens[c]]) for c in set(tmpl.children[0]))
    assert child_mass > 0.3
    first: Counter[int] = Counter()
    second: dict[int, Counter[int]] = {}
    accepted = 0
    for _ in range(NUM_WALKS):
        res = verify_walk(dec.ctx.sampler, seq, tmpl, tokens, logits)
        assert len(res.new_tokens) == len(res.nodes)
        first[res.new_tokens[0]] += 1
        if len(res.nodes) > 1:
            accepted += 1
            second.setdefault(res.nodes[1], Counter())[res.new_tokens[1]] += 1
    assert accepted > NUM_WALKS * 0.3
    # TV distance of 3000 draws from a <= 12-token distribution: ~0.03 expected; 0.06 bound.
    assert _tv(first, p_root) < 0.06
    node, counts = max(second.items(), key=lambda kv: sum(kv[1].values()))
    draws = sum(counts.values())
    assert draws > 200  # which child is accepted most depends on the recycled tree
    p_child = _probs(dec, seq, logits[node], [tokens[node]])
    assert _tv(counts, p_child) < 2 * _expected_tv(p_child, draws)


def _expected_tv(probs: torch.Tensor, draws: int) -> float:
    """E[TV] of `draws` samples from `probs`: each count's mean absolute error is
    sqrt(2 p (1 - p) / (pi n)) (normal approximation); e.g. 12 equal tokens, 273 draws ->
    0.08, 3000 draws -> 0.024."""
    p = probs[probs > 0].double()
    return float(0.5 * (2 * p * (1 - p) / (torch.pi * draws)).sqrt().sum())


def test_grafted_chain_repeating_a_drafted_token_stays_lossless(
    tree_step: tuple[TokenRecyclingDecoder, TreeTemplate, list[int], torch.Tensor],
) -> None:
    """A prompt-lookup chain whose first token is also the root's first recycled child: the
    walk must not give that token a second chance after rejecting it."""
    dec, tmpl, tokens, logits = tree_step
    graft = graft_chain(tmpl, 2)
    repeated = tokens[tmpl.children[0][0]]
    g_tokens = graft.tokens(tokens, [repeated, tokens[1]])
    # Chain nodes' rows: any rows will do for the first token's law (it depends on the root's
    # distribution and the walk only); take the root's.
    g_logits = logits[[t if t >= 0 else 0 for t in graft.take]]
    seq = Sequence(0, "x", list(PROMPT), SAMPLED, 0.0)
    seq.generator = torch.Generator().manual_seed(99)
    first: Counter[int] = Counter()
    for _ in range(NUM_WALKS):
        res = verify_walk(dec.ctx.sampler, seq, graft.tmpl, g_tokens, g_logits)
        first[res.new_tokens[0]] += 1
    assert _tv(first, _probs(dec, seq, logits[0], [])) < 0.06


def test_a_biased_verifier_is_caught(
    tree_step: tuple[TokenRecyclingDecoder, TreeTemplate, list[int], torch.Tensor],
) -> None:
    """The same check has power: always taking the first child's token fails it."""
    dec, tmpl, tokens, logits = tree_step
    seq = Sequence(0, "x", list(PROMPT), SAMPLED, 0.0)
    p_root = _probs(dec, seq, logits[0], [])
    biased = Counter({tokens[tmpl.children[0][0]]: NUM_WALKS})
    assert _tv(biased, p_root) > 0.1


def test_sampling_requests_use_the_tree(tiny_model_dir: str) -> None:
    eng = LLMEngine(
        tiny_engine_config(
            tiny_model_dir, decoder="token_recycling", decoder_options={"tree_size": 8}
        )
    )
    params = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)
    a = run_to_completion(eng, [PROMPT], params)[0].outputs[0].token_ids
    b = run_to_completion(eng, [PROMPT], params)[0].outputs[0].token_ids
    assert len(a) == len(b) == 12
    stats = eng.get_stats()
    assert stats["spec_num_drafts"] > 0
    assert eng.decoder.stats()["standard_path_seqs"] == 0


@pytest.mark.parametrize(
    ("decoder", "options"),
    [("token_recycling", {"tree_size": 8}), ("ngram", {"prompt_lookup_min": 2})],
)
def test_seeded_sampling_repeats_standard_decoding(
    tiny_model_dir: str, decoder: str, options: dict[str, int]
) -> None:
    # A seeded request must give the same tokens every time. Drafted (from the shared
    # matrix, which the greedy requests in between rewrite, or under a token budget that
    # depends on the batch), its random draws would differ from run to run; on the
    # standard path it gives standard decoding's tokens for the seed.
    seeded = SamplingParams(temperature=0.9, max_tokens=16, seed=11, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    std = LLMEngine(tiny_engine_config(tiny_model_dir))
    want = run_to_completion(std, [PROMPT], seeded)[0].outputs[0].token_ids
    eng = LLMEngine(tiny_engine_config(tiny_model_dir, decoder=decoder, decoder_options=options))
    got = []
    for i in range(3):
        other = [PROMPT[i:] + PROMPT[:i]]
        run_to_completion(eng, other, greedy)  # the matrix changes between the seeded runs
        got.append(run_to_completion(eng, [PROMPT], seeded)[0].outputs[0].token_ids)
    assert got == [want] * 3
    assert eng.decoder.stats()["standard_path_seqs"] == 3 * 16
    # Each of the last request's steps reported it (the server's decoder_stat metrics).
    assert eng.last_stats.decoder["standard_path_seqs"] == 1.0
    assert eng.get_stats()["spec_num_drafts"] > 0  # the greedy requests did draft
