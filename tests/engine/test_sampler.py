"""Sampler tests on crafted logits: greedy, penalties, masks, statistics, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from slipstream.engine.sampler import Sampler, SamplingContext
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.sequence import Sequence

EOS = 2
NEG_INF = float("-inf")


def ctx(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
    **params: object,
) -> SamplingContext:
    """A context with SamplingParams(**params)."""
    return SamplingContext(
        params=SamplingParams(**params),  # type: ignore[arg-type]
        prompt_token_ids=prompt or [],
        output_token_ids=output or [],
        generator=generator,
    )


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded like the engine does per sequence."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(eos_token_ids=frozenset({EOS}))


def test_context_of_sequence_reads_prompt_output_and_generator() -> None:
    g = gen(1)
    seq = Sequence(
        seq_id=0,
        request_id="r",
        prompt_token_ids=[5, 6],
        params=SamplingParams(seed=1),
        arrival_time=0.0,
        generator=g,
    )
    seq.token_ids.extend([7, 8])
    c = SamplingContext.of(seq)
    assert list(c.prompt_token_ids) == [5, 6]
    assert list(c.output_token_ids) == [7, 8]
    assert c.generator is g


def test_greedy_fast_path_is_argmax_with_lowest_index_on_ties(sampler: Sampler) -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0], [0.0, 0.0, 0.0, 9.0]])
    out = sampler.sample(logits, [ctx(temperature=0.0) for _ in range(3)])
    assert out.token_ids == [1, 0, 3]
    assert out.logprobs == [None, None, None]


def test_sample_does_not_modify_callers_logits(sampler: Sampler) -> None:
    logits = torch.randn(2, 16)
    before = logits.clone()
    rows = [
        ctx(temperature=0.7, top_k=3, top_p=0.8, min_p=0.1, output=[1, 1], frequency_penalty=1.0),
        ctx(temperature=0.0, repetition_penalty=1.5, prompt=[3, 4], logprobs=2),
    ]
    sampler.sample(logits, rows)
    sampler.processed_probs(logits, rows)
    assert torch.equal(logits, before)


def test_repetition_penalty_divides_positive_and_multiplies_negative(sampler: Sampler) -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -3.0]])
    row = ctx(prompt=[0], output=[1], temperature=0.0, repetition_penalty=2.0)
    got = sampler.processed_logits(logits, [row])
    # tokens 0 (prompt) and 1 (output) are penalised, the rest untouched.
    assert torch.allclose(got, torch.tensor([[1.0, -2.0, 0.5, 1.0, -3.0]]))
    # Token 0 fell to 1.0 and ties with token 3: the lowest index wins.
    assert sampler.sample(logits, [row]).token_ids == [0]


def test_repetition_penalty_changes_greedy_choice(sampler: Sampler) -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    row = ctx(output=[0], temperature=0.0, repetition_penalty=2.0)
    assert sampler.sample(logits, [row]).token_ids == [1]  # 3/2 = 1.5 < 2


def test_frequency_and_presence_penalties_hand_computed(sampler: Sampler) -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    # token 0 appears 3 times, token 1 once; the prompt's token 3 is not an output.
    row = ctx(
        prompt=[3],
        output=[0, 0, 1, 0],
        temperature=0.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    got = sampler.processed_logits(logits, [row])
    expected = torch.tensor([[1.0 - 3 * 0.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0, 1.0]])
    assert torch.allclose(got, expected)


def test_penalties_apply_only_to_their_rows(sampler: Sampler) -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rows = [ctx(output=[2], temperature=0.0, presence_penalty=2.0), ctx(temperature=0.0)]
    got = sampler.processed_logits(logits, rows)
    assert torch.allclose(got, torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 3.0]]))
    assert sampler.sample(logits, rows).token_ids == [1, 2]


def test_min_tokens_suppresses_eos_and_stop_token_ids_until_reached(sampler: Sampler) -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 2.0]])  # EOS (2) best, stop id 3 next
    early = ctx(temperature=0.0, min_tokens=2, stop_token_ids=(3,), output=[1])
    assert sampler.sample(logits, [early]).token_ids == [4]
    probs = sampler.processed_probs(logits, [ctx(min_tokens=2, stop_token_ids=(3,), output=[1])])
    assert probs[0, 2] == 0 and probs[0, 3] == 0
    reached = ctx(temperature=0.0, min_tokens=2, stop_token_ids=(3,), output=[1, 1])
    assert sampler.sample(logits, [reached]).token_ids == [2]


def test_logit_bias_adds_to_its_rows_before_penalties(sampler: Sampler) -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5], [1.0, 2.0, 3.0, 0.5]])
    rows = [
        ctx(temperature=0.0, logit_bias={0: 2.5, 2: -100.0}),
        ctx(temperature=0.0, output=[3], repetition_penalty=2.0, logit_bias={3: 1.5}),
    ]
    got = sampler.processed_logits(logits, rows)
    # Row 1: 0.5 + 1.5 = 2.0, then the repetition penalty halves it.
    expected = torch.tensor([[3.5, 2.0, -97.0, 0.5], [1.0, 2.0, 3.0, 1.0]])
    assert torch.allclose(got, expected)
    assert sampler.sample(logits, rows).token_ids == [0, 2]
    # A biased greedy row leaves the argmax fast path; an unbiased batch keeps it.
    one = logits[:1]
    assert sampler.sample(one, [ctx(temperature=0.0, logit_bias={3: 100})]).token_ids == [3]
    # Sampled rows draw from the biased distribution: -100 bans, +100 forces.
    banned = ctx(generator=gen(0), logit_bias={2: -100.0, 1: -100.0})
    forced = ctx(generator=gen(1), logit_bias={3: 100.0})
    for _ in range(20):
        assert sampler.sample(logits, [banned, forced]).token_ids[1] == 3
        assert sampler.sample(one, [banned]).token_ids[0] in (0, 3)
    # min_tokens' -inf stays -inf whatever the bias.
    early = ctx(temperature=0.0, min_tokens=1, logit_bias={EOS: 100.0})
    assert sampler.processed_logits(one, [early])[0, EOS] == NEG_INF


def test_logit_bias_is_checked_and_kept_sorted() -> None:
    params = SamplingParams(logit_bias={"7": 1, 3: -2.5})  # type: ignore[dict-item]
    assert params.logit_bias == ((3, -2.5), (7, 1.0))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 100.5})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})


def test_temperature_scales_logits(sampler: Sampler) -> None:
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    probs = sampler.processed_probs(logits, [ctx(temperature=0.5)])
    assert torch.allclose(probs, torch.softmax(logits / 0.5, dim=-1))


def test_top_k_keeps_k_largest(sampler: Sampler) -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    probs = sampler.processed_probs(logits, [ctx(top_k=2)])
    expected = torch.zeros(1, 5)
    expected[0, [1, 4]] = torch.softmax(torch.tensor([3.0, 2.5]), dim=0)
    assert torch.allclose(probs, expected)


def test_top_p_keeps_smallest_top_set_reaching_p(sampler: Sampler) -> None:
    base = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = base.log()
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep the top two.
    probs = sampler.processed_probs(logits, [ctx(top_p=0.7)])
    assert torch.allclose(probs, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))
    # p = 0.5 exactly reached by the first token alone.
    probs = sampler.processed_probs(logits, [ctx(top_p=0.5)])
    assert torch.allclose(probs, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_min_p_masks_below_fraction_of_max(sampler: Sampler) -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # threshold 0.4 * 0.5 = 0.2: keep 0.5 and 0.3.
    probs = sampler.processed_probs(logits, [ctx(min_p=0.4)])
    assert torch.allclose(probs, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))


def test_top_k_and_top_p_combine_per_row(sampler: Sampler) -> None:
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().repeat(3, 1)
    rows = [ctx(top_k=3, top_p=0.75), ctx(top_k=-1), ctx(temperature=0.0)]
    probs = sampler.processed_probs(logits, rows)
    # row 0: top-3 renormalised = [4/9, 3/9, 2/9]; top-p 0.75 keeps the first two (7/9 >= .75).
    assert torch.allclose(probs[0], torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))
    assert torch.allclose(probs[1], torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert torch.equal(probs[2], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_processed_logprobs_is_log_of_processed_probs(sampler: Sampler) -> None:
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    lp = sampler.processed_logprobs(logits, [ctx(top_k=2)])
    assert lp[0, 2] == NEG_INF
    assert torch.allclose(lp[0, :2].exp(), torch.tensor([4 / 7, 3 / 7]))


def test_sampling_frequencies_match_renormalised_distribution(sampler: Sampler) -> None:
    torch.manual_seed(1234)
    vocab = 12
    logits = torch.randn(1, vocab) * 1.5
    row = ctx(temperature=0.8, top_k=6, top_p=0.9, min_p=0.02)
    expected = sampler.processed_probs(logits, [row])[0]
    # Sample many rows in one call: the same row repeated, global RNG.
    n = 20000
    out = sampler.sample(logits.repeat(n, 1), [row] * n)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=vocab).float()
    freq = counts / n
    # Never a masked token.
    assert torch.all(counts[expected == 0] == 0)
    # Total variation bound: E[TV] ~ sum sqrt(p(1-p)/n) ~ 0.01 for n = 20000.
    tv = 0.5 * (freq - expected).abs().sum().item()
    assert tv < 0.02, (tv, freq, expected)
    # Chi-square over the support; df <= 5, the 99.9% quantile for df 5 is 20.5.
    support = expected > 0
    chi2 = (((counts - n * expected) ** 2) / (n * expected))[support].sum().item()
    assert chi2 < 20.5, chi2


def test_seeded_rows_from_per_row_generators_match(sampler: Sampler) -> None:
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(1, vocab)

    def run(extra_rows: int, seed: int = 7, steps: int = 20) -> list[int]:
        g = gen(seed)
        others = [ctx(temperature=1.0) for _ in range(extra_rows)]
        tokens = []
        for _ in range(steps):
            # The seeded row sits in the middle of a batch of unseeded and greedy rows.
            rows = [*others, ctx(temperature=1.0, generator=g), ctx(temperature=0.0)]
            batch = torch.cat([torch.randn(extra_rows, vocab), logits, logits])
            tokens.append(sampler.sample(batch, rows).token_ids[extra_rows])
        return tokens

    alone = run(0)
    assert alone == run(5)
    assert alone == run(2)
    assert len(set(alone)) > 1  # it actually samples
    assert run(0, seed=8) != alone


def test_global_rng_used_without_generator(sampler: Sampler) -> None:
    logits = torch.zeros(1, 100)
    torch.manual_seed(3)
    a = [sampler.sample(logits, [ctx()]).token_ids[0] for _ in range(10)]
    torch.manual_seed(3)
    b = [sampler.sample(logits, [ctx()]).token_ids[0] for _ in range(10)]
    assert a == b and len(set(a)) > 1


def test_logprobs_are_raw_log_softmax(sampler: Sampler) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    rows = [
        ctx(temperature=0.0, logprobs=3),
        ctx(temperature=0.5, top_k=2, logprobs=0, generator=gen(1)),
        ctx(temperature=0.0),
    ]
    out = sampler.sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    lp0 = out.logprobs[0]
    assert lp0 is not None
    assert lp0.chosen.token_id == out.token_ids[0] == int(logits[0].argmax())
    assert math.isclose(lp0.chosen.logprob, raw[0, out.token_ids[0]].item(), rel_tol=1e-6)
    vals, idx = raw[0].topk(3)
    assert [t.token_id for t in lp0.top] == idx.tolist()
    assert [t.logprob for t in lp0.top] == pytest.approx(vals.tolist())
    lp1 = out.logprobs[1]
    assert lp1 is not None and lp1.top == []
    # Raw, not the temperature/top-k distribution.
    assert math.isclose(lp1.chosen.logprob, raw[1, out.token_ids[1]].item(), rel_tol=1e-6)
    assert out.logprobs[2] is None


def test_logprob_decoded_text_uses_decode_token() -> None:
    sampler = Sampler(frozenset({EOS}), decode_token=lambda i: f"<{i}>")
    out = sampler.sample(torch.tensor([[0.0, 5.0, 1.0]]), [ctx(temperature=0.0, logprobs=1)])
    lp = out.logprobs[0]
    assert lp is not None and lp.chosen.decoded == "<1>" and lp.top[0].decoded == "<1>"


def test_sample_from_probs_uses_row_generator(sampler: Sampler) -> None:
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    a = [int(sampler.sample_from_probs(probs, [ctx(generator=gen(s))])[0]) for s in range(20)]
    b = [int(sampler.sample_from_probs(probs, [ctx(generator=gen(s))])[0]) for s in range(20)]
    assert a == b
    assert set(a) == {1, 2}
    u = sampler.uniform([ctx(generator=gen(4)), ctx(generator=gen(4))], device="cpu")
    assert u[0] == u[1] and 0 <= u[0] < 1


def test_greedy_fast_path_is_one_argmax(sampler: Sampler, monkeypatch: pytest.MonkeyPatch) -> None:
    """The all-greedy batch never enters the processing pipeline."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("pipeline used on the greedy fast path")

    monkeypatch.setattr(sampler, "_process", boom)
    out = sampler.sample(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), [ctx(temperature=0.0)] * 2)
    assert out.token_ids == [1, 0]


def test_seeded_path_frequencies_match_distribution(sampler: Sampler) -> None:
    """The per-row generator path samples the right distribution (a zero stays zero)."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    logits = probs.log().unsqueeze(0)
    g = gen(99)
    n = 4000
    out = sampler.sample(logits.repeat(n, 1), [ctx(generator=g) for _ in range(n)])
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=5).float() / n
    assert freq[4] == 0
    assert 0.5 * (freq - probs).abs().sum().item() < 0.03
