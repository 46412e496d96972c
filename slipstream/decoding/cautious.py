"""CNTP, Cautious Next Token Prediction (Wang et al., arXiv 2507.03038), as forked trials.

When the distribution a sequence samples from is uncertain (high entropy), sample N trials
from that point, each up to punctuation, and commit the one with the lowest perplexity.
The official code runs the trials one after another at batch 1 on cloned KV caches; here
they are forked sequences that share the prefix KV blocks and decode in the same batches as
every other request.

How one gate plays out (sequence P, whose fed token gave the uncertain distribution p):
    step t    P samples N first tokens from p (trial 0 is its ordinary draw). Trials whose
              first token already ends them (punctuation, EOS, length) are scored at once;
              if none continues, the best token is appended like a normal one. Otherwise P
              appends nothing, is held (hold_output) and paused, and forks one child per
              continuing trial plus one for the best finished one.
    on_fork   each child gets its first token appended (its KV is computed next step).
    t+1...    the children decode; a child whose trial ends is paused with its last token
              uncomputed and kept only while it is the best finished trial so far.
    last      when no trial runs, P adopts the best child (tokens, KV, logprobs), is
              unpaused and released for output; it then continues like any sequence.

Deliberate differences from the official code (research-decoders.md section 3):
- Greedy requests never gate: the distribution they sample is a point mass (entropy 0),
  whereas the official code would run sampled trials off the unprocessed distribution.
- The first token of every trial is drawn from the gate step's distribution instead of
  re-running that step per trial: the same distribution, N fewer forwards.
- Finished trials that cannot win anymore are dropped at once, so at most one finished
  trial per gate holds KV; the winner (lowest perplexity, earliest trial on ties) is the
  same as comparing all at the end.
- Punctuation is found by decoding the vocabulary (see punctuation.py).
- Stop strings are not checked inside a trial; the output processor cuts the committed
  segment at one as it would any tokens.

Engine capability used: Sequence.paused (the scheduler skips the sequence but it keeps its
KV), so a parent and a finished trial wait without being fed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slipstream.decoding.base import (
    Decoder,
    DecoderContext,
    SeqResult,
    StepInputs,
    StepLogits,
    StepResult,
)
from slipstream.decoding.cautious_trials import (
    CautiousOptions,
    Group,
    Trial,
    entropy,
    raw_logprobs,
    trial_count,
)
from slipstream.decoding.punctuation import punctuation_token_ids
from slipstream.decoding.registry import DECODERS
from slipstream.engine.batch import Batch, ScheduledSeq
from slipstream.engine.outputs import TokenLogprobs
from slipstream.engine.sampler import SamplingContext
from slipstream.engine.sequence import Sequence


@dataclass
class _Row:
    """One sequence whose processed distribution this step is known."""

    result: SeqResult
    seq: Sequence
    raw: torch.Tensor  # [V] raw logits (logprobs are reported from these)
    probs: torch.Tensor  # [V] the distribution the token was drawn from
    context: SamplingContext
    token: int

    def take(self, tokens: list[int], logprobs: list[TokenLogprobs] | None) -> None:
        """Append `tokens` to the sequence this step."""
        self.result.new_token_ids = tokens
        self.result.logprobs = logprobs


_STEP_KEYS = ("gates_fired", "trials_spawned", "committed_tokens")


@DECODERS.register("cautious")
class CautiousDecoder(Decoder):
    """Entropy-gated trials forked from the sequence, lowest perplexity committed."""

    name = "cautious"
    Options = CautiousOptions
    required_features = frozenset({"fork"})

    def __init__(self, options: CautiousOptions, ctx: DecoderContext) -> None:
        super().__init__(options, ctx)
        self.options: CautiousOptions = options
        self.punctuation_ids = punctuation_token_ids(
            ctx.tokenizer, ctx.vocab_size, options.punctuation
        )
        self._groups: dict[int, Group] = {}  # parent seq_id -> its open gate
        self._trial_group: dict[int, Group] = {}  # child seq_id -> the gate it belongs to
        self._step: dict[str, float] = dict.fromkeys(_STEP_KEYS, 0.0)
        self._totals: dict[str, float] = dict.fromkeys(
            (
                *_STEP_KEYS,
                "trials_forked",
                "gates_committed",
                "output_tokens",
                "output_forward_tokens",
            ),
            0.0,
        )

    # ------------------------------------------------------------------------- select
    def select(self, batch: Batch, inputs: StepInputs, logits: StepLogits) -> StepResult:
        """Sample every row; gate uncertain rows into trials; score and commit trials."""
        result = StepResult(seqs=[SeqResult() for _ in batch.items])
        self._step = dict.fromkeys(_STEP_KEYS, 0.0)
        plain: list[int] = []  # rows sampled the ordinary way
        scored: list[int] = []  # rows whose processed distribution we need
        for i, item in enumerate(batch.items):
            self._count("output_forward_tokens", _output_tokens_fed(item))
            seq = item.seq
            if not item.samples:
                continue
            if seq.seq_id in self._groups:
                pass  # a held parent recomputed after preemption: it samples nothing
            elif seq.paused:
                # A finished trial recomputed after preemption: its last token stays
                # uncomputed, to be fed once its parent adopts it.
                result.seqs[i].kv_keep = list(range(item.num_new_tokens - 1))
            elif seq.seq_id in self._trial_group or (
                self.options.gates and not seq.params.is_greedy and not seq.is_trial
            ):
                scored.append(i)
            else:
                plain.append(i)
        self._sample_plain(batch, logits, plain, result)
        self._sample_scored(batch, logits, scored, result)
        result.stats = dict(self._step)
        return result

    def _sample_plain(
        self, batch: Batch, logits: StepLogits, rows: list[int], result: StepResult
    ) -> None:
        """Sample like the standard decoder (one sampler call, same generator draws)."""
        if not rows:
            return
        contexts = [SamplingContext.of(batch.items[i].seq) for i in rows]
        last = [logits.offsets[i + 1] - 1 for i in rows]
        out = self.ctx.sampler.sample(logits.take(last), contexts)
        for k, i in enumerate(rows):
            lp = out.logprobs[k]
            result.seqs[i].new_token_ids = [out.token_ids[k]]
            result.seqs[i].logprobs = [lp] if lp is not None else None
        self._count("output_tokens", len(rows))

    def _sample_scored(
        self, batch: Batch, logits: StepLogits, rows: list[int], result: StepResult
    ) -> None:
        """Sample rows from their processed distribution; gate and score along the way."""
        if not rows:
            return
        sampler = self.ctx.sampler
        raw = logits.values[[logits.offsets[i + 1] - 1 for i in rows]]  # [R, V]
        contexts = [SamplingContext.of(batch.items[i].seq) for i in rows]
        probs = sampler.processed_probs(raw, contexts)  # [R, V]
        # NOTE: a draw from the processed probabilities is what Sampler.sample does for a
        # non-greedy row, so a row that does not gate gets the standard token.
        tokens: list[int] = sampler.sample_from_probs(probs, contexts).tolist()
        heights: list[float] = entropy(probs).tolist()
        opts = self.options
        for k, i in enumerate(rows):
            row = _Row(result.seqs[i], batch.items[i].seq, raw[k], probs[k], contexts[k], tokens[k])
            group = self._trial_group.get(row.seq.seq_id)
            if group is not None:
                self._extend_trial(group, row, result)
                continue
            n = trial_count(heights[k], opts.entropy_low, opts.entropy_high, opts.max_trials)
            if n > 1 and heights[k] >= opts.gate_entropy:
                self._gate(row, n, result)
            else:
                row.take([row.token], raw_logprobs(row.raw, [row.token], row.seq.params.logprobs))
                self._count("output_tokens", 1)

    # -------------------------------------------------------------------------- trials
    def _gate(self, row: _Row, n: int, result: StepResult) -> None:
        """Start n trials from the row's distribution."""
        seq = row.seq
        self._count("gates_fired", 1)
        self._count("trials_spawned", n)
        # Trial 0 keeps the draw already made; the others draw from seq's generator.
        more = self.ctx.sampler.sample_from_probs(
            row.probs.unsqueeze(0).repeat(n - 1, 1), [row.context] * (n - 1)
        )
        firsts = [row.token, *more.tolist()]
        p_first: list[float] = row.probs[firsts].tolist()
        lps = raw_logprobs(row.raw, firsts, seq.params.logprobs)
        trials = [
            Trial(
                index=j,
                tokens=[tok],
                probs=[p_first[j]],
                logprobs=[lps[j]] if lps is not None else [],
                done=self._ends_trial(seq, tok, 1, seq.num_output_tokens + 1),
            )
            for j, tok in enumerate(firsts)
        ]
        finished = [t for t in trials if t.done]
        best = min(finished, key=Trial.key) if finished else None
        continuing = [t for t in trials if not t.done]
        if not continuing:  # every trial ended at once: commit the best like a normal token
            assert best is not None
            row.take(list(best.tokens), list(best.logprobs) or None)
            self._count_commit(1)
            return
        group = Group(parent=seq, pending=[*continuing, *([best] if best else [])])
        self._groups[seq.seq_id] = group
        seq.hold_output = True
        seq.paused = True
        result.forks[seq.seq_id] = len(group.pending)
        self._count("trials_forked", len(group.pending))

    def on_fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Give each child its trial's first token (its KV is computed in the next step)."""
        group = self._groups[parent.seq_id]
        assert len(children) == len(group.pending), "one child per pending trial"
        for child, trial in zip(children, group.pending, strict=True):
            trial.seq_id = child.seq_id
            child.token_ids.extend(trial.tokens)
            child.output_logprobs.extend(trial.logprobs)
            self._trial_group[child.seq_id] = group
            if trial.done:
                child.paused = True
                group.best = trial
            else:
                group.running[child.seq_id] = trial
        group.pending = []

    def _extend_trial(self, group: Group, row: _Row, result: StepResult) -> None:
        """Append a running trial's next token; finish the trial (and maybe the gate)."""
        seq = row.seq
        trial = group.running[seq.seq_id]
        trial.tokens.append(row.token)
        trial.probs.append(float(row.probs[row.token]))
        row.take([row.token], raw_logprobs(row.raw, [row.token], seq.params.logprobs))
        if not self._ends_trial(seq, row.token, len(trial.tokens), seq.num_output_tokens + 1):
            return
        del group.running[seq.seq_id]
        seq.paused = True
        loser = group.offer(trial)
        if loser is not None:
            result.drops.append(loser)
            self._trial_group.pop(loser, None)
        if not group.running:
            self._commit(group, result)

    def _commit(self, group: Group, result: StepResult) -> None:
        """Every trial ended: the parent adopts the best one and goes on."""
        best = group.best
        assert best is not None and best.seq_id is not None
        parent = group.parent
        result.adopt[parent.seq_id] = best.seq_id
        parent.paused = False
        parent.hold_output = False
        del self._groups[parent.seq_id]
        self._trial_group.pop(best.seq_id, None)
        self._count_commit(len(best.tokens))

    def _ends_trial(self, seq: Sequence, token: int, trial_len: int, num_output: int) -> bool:
        """A trial stops right after punctuation, EOS, a stop id or any length limit."""
        params = seq.params
        cap = self.options.max_trial_tokens
        return (
            token in self.punctuation_ids
            or (token in self.ctx.eos_token_ids and not params.ignore_eos)
            or token in params.stop_token_ids
            or (params.max_tokens is not None and num_output >= params.max_tokens)
            or seq.num_prompt_tokens + num_output >= self.ctx.max_model_len
            or (cap is not None and trial_len >= cap)
        )

    # ---------------------------------------------------------------------- accounting
    def _count(self, key: str, value: float) -> None:
        if key in self._step:
            self._step[key] += value
        self._totals[key] += value

    def _count_commit(self, num_tokens: int) -> None:
        self._count("committed_tokens", num_tokens)
        self._count("gates_committed", 1)
        self._count("output_tokens", num_tokens)

    def on_finish(self, seq: Sequence) -> None:
        """Forget a released parent's gate or a released trial."""
        group = self._groups.pop(seq.seq_id, None)
        if group is not None:
            for trial_id in group.member_ids():
                self._trial_group.pop(trial_id, None)
        group = self._trial_group.pop(seq.seq_id, None)
        if group is not None:
            group.running.pop(seq.seq_id, None)
            if group.best is not None and group.best.seq_id == seq.seq_id:
                group.best = None

    def stats(self) -> dict[str, float]:
        """Cumulative counters, mean segment length and output-side forward cost."""
        t = dict(self._totals)
        fired, committed, out = t["gates_fired"], t["gates_committed"], t["output_tokens"]
        t["mean_trials_per_gate"] = t["trials_spawned"] / fired if fired else 0.0
        t["mean_committed_segment_len"] = t["committed_tokens"] / committed if committed else 0.0
        t["forward_tokens_per_output_token"] = t["output_forward_tokens"] / out if out else 0.0
        return t


def _output_tokens_fed(item: ScheduledSeq) -> int:
    """Tokens fed this step at output positions (prompt prefill is not CNTP's cost)."""
    seq = item.seq
    start = max(seq.num_computed_tokens, seq.num_prompt_tokens)
    return max(0, seq.num_computed_tokens + item.num_new_tokens - start)


__all__ = ["CautiousDecoder", "CautiousOptions", "entropy", "trial_count"]
