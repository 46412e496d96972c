"""CNTP (cautious sampling): the gate, the trial count, the lowest-perplexity pick, and trials
as forked sequences in the engine (KV, outputs and block counts consistent)."""

from __future__ import annotations

import math

import pytest
import torch

from slipstream.decoding.base import (
    DecoderContext,
    SeqInputs,
    StepInputs,
    StepLogits,
    StepResult,
)
from slipstream.decoding.cautious import CautiousDecoder, CautiousOptions, entropy, trial_count
from slipstream.decoding.cautious_trials import lowest_perplexity, perplexity
from slipstream.decoding.punctuation import ends_with_punctuation, punctuation_token_ids
from slipstream.engine.batch import Batch, ScheduledSeq
from slipstream.engine.engine import LLMEngine
from slipstream.engine.outputs import RequestOutput
from slipstream.engine.sampler import Sampler, SamplingContext
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.sequence import Sequence
from slipstream.testing.engines import run_to_completion, tiny_engine_config

PROMPT = [11, 42, 7, 99, 123, 5, 64, 300, 17, 250, 31, 8, 77, 19, 401, 222, 3, 58]
PROMPTS = [PROMPT, PROMPT[:7], PROMPT[3:]]
NEG = float("-inf")


# ------------------------------------------------------------------ pure helpers
def test_trial_count_is_the_official_linear_map() -> None:
    assert trial_count(0.0) == 1
    assert trial_count(0.175) == 1  # below 0.01 + 1.49 / 9
    assert trial_count(0.176) == 2
    assert trial_count(0.43) == 3  # the paper's overview figure: 0.43 -> 3, 0.92 -> 6
    assert trial_count(0.92) == 6
    assert trial_count(1.5) == 10
    assert trial_count(7.0) == 10
    assert trial_count(1.0, low=0.5, high=1.5, max_trials=5) == 3  # 1 + 4 * 0.5


def test_entropy_matches_the_official_formula() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1]])
    got = entropy(probs)
    expected = [math.log(4), 0.0, -sum(p * math.log(p) for p in (0.4, 0.3, 0.2, 0.1))]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_lowest_perplexity_pick() -> None:
    assert lowest_perplexity([[0.5, 0.9], [0.3], [0.8, 0.5, 0.9]]) == 2
    assert lowest_perplexity([[0.5], [0.5], [0.4]]) == 0  # ties: the earliest trial
    assert perplexity([0.5, 0.5]) == pytest.approx(2.0)
    assert perplexity([1.0]) == pytest.approx(1.0)


def test_punctuation_by_decoded_text() -> None:
    for text in [".", ").", "\n", "\n    ", "! ", "}"]:
        assert ends_with_punctuation(text), text
    for text in [".5", "(", "", " ", "abc", "<|im_end|>"]:
        assert not ends_with_punctuation(text), text
    tok = _StubTokenizer()
    assert punctuation_token_ids(tok, 8) == {4, 7}
    assert punctuation_token_ids(tok, 8, chars="") == frozenset()
    assert punctuation_token_ids(tok, 6) == {4}  # ids past vocab_size are ignored


def test_punctuation_on_a_real_bpe_tokenizer(tiny_model_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = punctuation_token_ids(tok, len(tok))
    for char in ".,\n?!:;)]}":
        # every single-character token of the set is found, whatever encode() would give
        encoded: list[int] = tok.encode(char, add_special_tokens=False)
        assert encoded[-1] in ids, repr(char)
    assert all(ends_with_punctuation(str(tok.decode([i]))) for i in ids)
    assert not ids & set(tok.all_special_ids)


def test_options_validate() -> None:
    with pytest.raises(ValueError):
        CautiousOptions(entropy_low=1.0, entropy_high=1.0)
    with pytest.raises(ValueError):
        CautiousOptions(max_trials=0)
    with pytest.raises(ValueError):
        CautiousOptions(max_trial_tokens=0)
    # Accepted before, then every sampled step failed: a NaN trial count (-inf), 196 GB of
    # trial rows (a million trials). Entropy is never negative.
    with pytest.raises(ValueError, match="entropy_low"):
        CautiousOptions(entropy_low=-math.inf)
    with pytest.raises(ValueError, match="entropy_low"):
        CautiousOptions(entropy_low=-1.0, entropy_high=-0.5)
    with pytest.raises(ValueError, match="max_trials"):
        CautiousOptions(max_trials=1_000_000)
    with pytest.raises(ValueError, match="gate_entropy"):
        CautiousOptions(gate_entropy=-1.0)
    assert trial_count(5.0, 0.01, math.inf, 10) == 1  # an unbounded high end: no NaN
    assert not CautiousOptions(gate_entropy=float("inf")).gates
    assert CautiousOptions().gates


# ------------------------------------------------------------------ crafted logits
class _StubTokenizer:
    """Eight ids: 4 decodes to ",", 7 to ".", 6 is EOS, the rest are letters."""

    all_special_ids = (6,)
    texts = ("a", "b", "c", "d", ",", "e", "</s>", ".")

    def __len__(self) -> int:
        return len(self.texts)

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return ["".join(self.texts[i] for i in row) for row in ids]


def _decoder(**options: object) -> CautiousDecoder:
    ctx = DecoderContext(
        vocab_size=8,
        eos_token_ids=frozenset({6}),
        device=torch.device("cpu"),
        dtype=torch.float32,
        num_layers=1,
        max_model_len=100,
        num_kv_blocks=16,
        block_size=4,
        num_kv_heads=1,
        head_dim=4,
        sampler=Sampler(frozenset({6})),
        tokenizer=_StubTokenizer(),
    )
    return CautiousDecoder(CautiousOptions(**options), ctx)  # type: ignore[arg-type]


def _seq(seq_id: int, seed: int = 0, parent: Sequence | None = None) -> Sequence:
    params = SamplingParams(temperature=1.0, max_tokens=50, seed=seed)
    seq = Sequence(seq_id, "r", [1, 3], params, 0.0)
    seq.num_computed_tokens = seq.num_tokens - 1
    if parent is not None:  # as LLMEngine._fork makes it
        seq.token_ids = list(parent.token_ids)
        seq.num_computed_tokens = parent.num_computed_tokens
        seq.parent_seq_id = parent.seq_id
        seq.hold_output = True
    seq.generator = torch.Generator().manual_seed(seed)
    return seq


def _step(decoder: CautiousDecoder, seqs: list[Sequence], rows: list[list[float]]) -> StepResult:
    """One select() over decode rows (one fed token each) with the given logits rows."""
    batch = Batch([ScheduledSeq(s, 1) for s in seqs])
    inputs = StepInputs([SeqInputs([s.token_ids[-1]], [s.num_tokens - 1], [], [0]) for s in seqs])
    logits = StepLogits(torch.tensor(rows), list(range(len(seqs) + 1)))
    return decoder.select(batch, inputs, logits)


def _apply(seqs: list[Sequence], result: StepResult) -> None:
    """What the engine does with the fed and sampled tokens (tree ops are left to the test)."""
    for seq, res in zip(seqs, result.seqs, strict=True):
        seq.num_computed_tokens += 1
        seq.token_ids.extend(res.new_token_ids)


def _onehot(token: int) -> list[float]:
    return [0.0 if i == token else NEG for i in range(8)]


def test_gate_below_threshold_samples_one_token() -> None:
    decoder = _decoder()
    parent = _seq(0)
    confident = [8.0, 0.0, 0.0, 0.0, NEG, 0.0, NEG, NEG]  # entropy ~0.01: N = 1
    result = _step(decoder, [parent], [confident])
    assert result.forks == {} and not result.adopt and not result.drops
    assert len(result.seqs[0].new_token_ids) == 1
    assert not parent.hold_output and not parent.paused
    assert result.stats["gates_fired"] == 0


def test_gate_above_threshold_forks_trials_and_commits_lowest_perplexity() -> None:
    decoder = _decoder()
    parent = _seq(0)
    gate_probs = [0.4, 0.3, 0.2, 0.1]
    row = [math.log(p) for p in gate_probs] + [NEG] * 4
    n = trial_count(-sum(p * math.log(p) for p in gate_probs))
    assert n == 8
    result = _step(decoder, [parent], [row])
    _apply([parent], result)
    # every first token continues (no punctuation possible), so one child per trial
    assert result.forks == {0: n}
    assert result.seqs[0].new_token_ids == []
    assert parent.hold_output and parent.paused
    assert result.stats == {"gates_fired": 1, "trials_spawned": n, "committed_tokens": 0}
    prefix = list(parent.token_ids)
    children = [_seq(10 + j, seed=j, parent=parent) for j in range(n)]
    decoder.on_fork(parent, children)
    firsts = [c.token_ids[-1] for c in children]
    assert all(c.token_ids[:-1] == prefix for c in children)
    assert set(firsts) <= {0, 1, 2, 3} and len(set(firsts)) > 1
    # step 1: the first half stop at "."; the rest take one more sure token, then stop.
    half = n // 2
    rows = [_onehot(7) if j < half else _onehot(5) for j in range(n)]
    result = _step(decoder, children, rows)
    _apply(children, result)
    assert not result.adopt
    running = children[half:]
    result2 = _step(decoder, running, [_onehot(7)] * len(running))
    drops = set(result.drops) | set(result2.drops)
    trials = [
        [gate_probs[f], 1.0] if j < half else [gate_probs[f], 1.0, 1.0]
        for j, f in enumerate(firsts)
    ]
    winner = children[lowest_perplexity(trials)].seq_id
    assert result2.adopt == {0: winner}
    assert drops == {c.seq_id for c in children} - {winner}
    assert not parent.hold_output and not parent.paused
    assert result2.stats["committed_tokens"] == len(trials[lowest_perplexity(trials)])
    assert not decoder._groups and not decoder._trial_group


def test_trials_ending_at_their_first_token_need_no_fork() -> None:
    decoder = _decoder()
    parent = _seq(0, seed=3)
    # "," and "." only: entropy ln 2 -> 5 trials, each ends at once; the parent commits the
    # most probable (here all tie, so trial 0, its own draw).
    result = _step(decoder, [parent], [[NEG, NEG, NEG, NEG, 0.0, NEG, NEG, 0.0]])
    assert result.forks == {}
    assert result.seqs[0].new_token_ids[0] in (4, 7)
    assert result.stats == {"gates_fired": 1, "trials_spawned": 5, "committed_tokens": 1}
    assert not parent.paused and not parent.hold_output


def test_a_finished_first_token_trial_waits_paused() -> None:
    decoder = _decoder()
    parent = _seq(0, seed=1)
    row = [0.0, 0.0, 0.0, NEG, NEG, NEG, NEG, 0.0]  # "." among three letters: ln 4 -> 9
    result = _step(decoder, [parent], [row])
    _apply([parent], result)
    pending = decoder._groups[0].pending
    done = [t for t in pending if t.done]
    assert len(done) <= 1 and all(t.tokens == [7] for t in done)
    assert result.forks == {0: len(pending)}
    assert sum(not t.done for t in pending) == sum(t.tokens != [7] for t in pending)
    children = [_seq(10 + j, seed=j, parent=parent) for j in range(len(pending))]
    decoder.on_fork(parent, children)
    assert [c.paused for c in children] == [t.done for t in pending]


def test_gate_at_infinity_is_plain_sampling() -> None:
    rows = [[0.1 * i for i in range(8)]]
    got = _step(_decoder(gate_entropy=float("inf")), [_seq(0, seed=5)], rows)
    expected = Sampler(frozenset({6})).sample(torch.tensor(rows), [_context(_seq(0, seed=5))])
    assert got.seqs[0].new_token_ids == expected.token_ids


def _context(seq: Sequence) -> SamplingContext:
    return SamplingContext.of(seq)


# ------------------------------------------------------------------ engine
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7, logprobs=1)


def _engine(model_dir: str, num_blocks: int = 256, **options: object) -> LLMEngine:
    return LLMEngine(
        tiny_engine_config(
            model_dir,
            decoder="cautious",
            decoder_options=dict(options),
            block_size=4,
            num_blocks=num_blocks,
        )
    )


def _tokens(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize(
    "options", [{"gate_entropy": float("inf")}, {"gate_entropy": 1e9}], ids=["inf", "finite"]
)
def test_no_gate_equals_standard_with_the_same_seed(tiny_model_dir: str, options: dict) -> None:
    # inf: CNTP off; 1e9: the entropy path runs on every row but never fires.
    standard = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    params = [SAMPLED, SamplingParams(temperature=0.0, max_tokens=12)]
    expected = _tokens(run_to_completion(standard, PROMPTS[:2], params))
    got = _tokens(run_to_completion(_engine(tiny_model_dir, **options), PROMPTS[:2], params))
    assert got == expected


def test_greedy_never_gates(tiny_model_dir: str) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    standard = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    eng = _engine(tiny_model_dir)
    assert _tokens(run_to_completion(eng, PROMPTS, greedy)) == _tokens(
        run_to_completion(standard, PROMPTS, greedy)
    )
    assert eng.decoder.stats()["gates_fired"] == 0


def _run_checked(eng: LLMEngine, params: SamplingParams) -> tuple[list[RequestOutput], int]:
    free0 = eng.block_manager.num_free_blocks
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"c{i}", p, params)
    done: dict[str, RequestOutput] = {}
    max_running = 0
    for _ in range(2000):
        if not eng.has_unfinished_requests():
            break
        for out in eng.step():
            assert len(out.outputs[0].token_ids) == 0 or out.outputs[0].logprobs
            if out.finished:
                done[out.request_id] = out
        eng.block_manager.check_invariants()
        max_running = max(max_running, len(eng.scheduler.running))
    assert not eng.has_unfinished_requests(), "engine stalled"
    assert eng.block_manager.num_free_blocks == free0 and not eng.seqs
    decoder = eng.decoder
    assert isinstance(decoder, CautiousDecoder)
    assert not decoder._groups and not decoder._trial_group
    return [done[f"c{i}"] for i in range(len(PROMPTS))], max_running


def _assert_kv_consistent(eng: LLMEngine, outs: list[RequestOutput]) -> None:
    """Reported raw logprobs equal a fresh teacher-forced pass over prompt + output.

    A committed trial whose KV did not match its tokens would change every later logit.
    """
    for k, (prompt, out) in enumerate(zip(PROMPTS, outs, strict=True)):
        tokens = prompt + out.outputs[0].token_ids
        seq = Sequence(10**6 + k, "check", tokens, SamplingParams(), 0.0)
        n = len(tokens)
        assert eng.block_manager.allocate_slots(seq, n)
        inputs = StepInputs([SeqInputs(tokens, list(range(n)), None, list(range(n)))])
        logits = eng.runner.forward(Batch([ScheduledSeq(seq, n)]), inputs).values
        eng.block_manager.free(seq)
        logp = torch.log_softmax(logits.float(), dim=-1)
        expected = [
            logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(out.outputs[0].token_ids)
        ]
        reported = [lp.chosen.logprob for lp in out.outputs[0].logprobs or []]
        assert reported == pytest.approx(expected, abs=1e-4)


def test_trials_run_as_forks_and_commit_consistent_kv(tiny_model_dir: str) -> None:
    eng = _engine(tiny_model_dir, max_trial_tokens=3)
    outs, max_running = _run_checked(eng, SAMPLED)
    assert max_running > len(PROMPTS), "trials ran beside their parents"
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    stats = eng.decoder.stats()
    assert stats["gates_fired"] > 0 and stats["trials_spawned"] >= 2 * stats["gates_fired"]
    assert stats["gates_committed"] == stats["gates_fired"]
    assert 1 <= stats["mean_committed_segment_len"] <= 3
    assert stats["output_tokens"] == 3 * 12
    assert stats["forward_tokens_per_output_token"] > 1  # trials cost forwards
    assert eng.get_stats()["decoder"] == stats
    _assert_kv_consistent(eng, outs)


def test_trials_survive_preemption(tiny_model_dir: str) -> None:
    # 20 blocks of 4 slots: three prompts plus up to 10 trials each do not fit at once.
    eng = _engine(tiny_model_dir, num_blocks=20, max_trial_tokens=3)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=7, logprobs=1)
    outs, _ = _run_checked(eng, params)
    assert eng.get_stats()["preemptions"] > 0
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    _assert_kv_consistent(eng, outs)


def test_abort_during_trials_frees_everything(tiny_model_dir: str) -> None:
    eng = _engine(tiny_model_dir, max_trial_tokens=8)
    free0 = eng.block_manager.num_free_blocks
    decoder = eng.decoder
    assert isinstance(decoder, CautiousDecoder)
    eng.add_request("a", PROMPT, SAMPLED)
    while not decoder._groups:
        eng.step()
    eng.step()
    eng.abort_request("a")
    assert eng.block_manager.num_free_blocks == free0 and not eng.seqs
    assert not decoder._groups and not decoder._trial_group


# ------------------------------------------------------------------ benchmark problems
def test_arith_problems_are_reproducible_and_parseable() -> None:
    from slipstream.testing.arith_problems import extract_answer, make_problems

    problems = make_problems(50, seed=0)
    assert problems == make_problems(50, seed=0) and problems != make_problems(50, seed=1)
    assert problems[0].question.startswith("Zoe has 4 stamps.") and problems[0].answer == 4
    assert all(p.answer >= 0 and p.question.endswith("now?") for p in problems)
    assert len({p.question for p in problems}) == 50
    assert extract_answer("3 + 4 = 7. The answer is 7.") == 7
    assert extract_answer("so **Answer: 1,024**") == 1024
    assert extract_answer("she has 12 left") == 12
    assert extract_answer("no idea") is None


def test_scheduler_skips_paused_sequences() -> None:
    from slipstream.config import SchedulerConfig
    from slipstream.engine.block_manager import BlockManager
    from slipstream.engine.scheduler import Scheduler

    sched = Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), BlockManager(8, 4)
    )
    seqs = [Sequence(i, f"s{i}", [1, 2, 3], SamplingParams(), 0.0) for i in range(2)]
    for seq in seqs:
        sched.add(seq)
    assert [item.seq for item in sched.schedule().items] == seqs
    for seq in seqs:
        seq.num_computed_tokens = 3
        seq.token_ids.append(5)
    seqs[0].paused = True
    assert [item.seq for item in sched.schedule().items] == [seqs[1]]
    assert seqs[0] in sched.running  # still holds its KV, just not fed
