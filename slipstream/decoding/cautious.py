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
"""

from __future__ import annotations

import math
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
from slipstream.decoding.cautious_trials import Group, Trial, raw_logprobs
from slipstream.decoding.punctuation import DEFAULT_PUNCTUATION, punctuation_token_ids
from slipstream.decoding.registry import DECODERS
from slipstream.engine.batch import Batch, ScheduledSeq
from slipstream.engine.sampler import SamplingContext
from slipstream.engine.sequence import Sequence

# The official entropy is -sum(p * log(p + 1e-10)): the epsilon keeps log(0) finite.
_ENTROPY_EPS = 1e-10


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row, as the official code computes it. [R, V] -> [R]."""
    return -(probs * torch.log(probs + _ENTROPY_EPS)).sum(dim=-1)


def trial_count(h: float, low: float = 0.01, high: float = 1.5, max_trials: int = 10) -> int:
    """N = int(1 + (max_trials - 1) * clamp((h - low) / (high - low), 0, 1)) (the code's map).

    With the defaults N > 1 from h >= 0.01 + 1.49 / 9 = 0.1756 nats, and N = 10 from 1.5.
    Example: trial_count(0.92) == 6 and trial_count(0.43) == 3 (the paper's overview figure).
    """
    normalised = min(max((h - low) / (high - low), 0.0), 1.0)
    return int(1 + (max_trials - 1) * normalised)


@dataclass(frozen=True)
class CautiousOptions:
    """CNTP knobs; the defaults are the official code's."""

    # Entropy (nats) mapped to 1 trial and to max_trials (entropy_threshold_low / _high).
    entropy_low: float = 0.01
    entropy_high: float = 1.5
    max_trials: int = 10
    # An extra gate: trials only where the entropy is also >= this. 0 = the official rule
    # (trials whenever N > 1); float("inf") turns CNTP off (plain sampling, same draws).
    gate_entropy: float = 0.0
    # Trial length cap in tokens; None = the official behaviour (punctuation, EOS or the
    # request's own limits end a trial).
    max_trial_tokens: int | None = None
    # Characters that end a trial when a token's decoded text ends with one of them.
    punctuation: str = DEFAULT_PUNCTUATION

    def __post_init__(self) -> None:
        if not self.entropy_high > self.entropy_low:
            raise ValueError(f"entropy_high must exceed entropy_low, got {self}")
        if self.max_trials < 1:
            raise ValueError(f"max_trials must be >= 1, got {self.max_trials}")
        if self.max_trial_tokens is not None and self.max_trial_tokens < 1:
            raise ValueError(f"max_trial_tokens must be >= 1, got {self.max_trial_tokens}")

    @property
    def gates(self) -> bool:
        """Whether any entropy can fire the gate."""
        return self.max_trials > 1 and math.isfinite(self.gate_entropy)


@dataclass
class _StepCounts:
    """What one select() did, for StepResult.stats."""

    gates_fired: int = 0
    trials_spawned: int = 0
    committed_tokens: int = 0


@DECODERS.register("cautious")
class CautiousDecoder(Decoder):
    """Entropy-gated trials forked from the sequence, lowest perplexity committed."""

    name = "cautious"
    Options = CautiousOptions
    required_features = frozenset({"fork"})

    def __init__(self, options: CautiousOptions, ctx: DecoderContext) -> None:
        super().__init__(options, ctx)
        self.punctuation_ids = punctuation_token_ids(
            ctx.tokenizer, ctx.vocab_size, options.punctuation
        )
        self._groups: dict[int, Group] = {}  # parent seq_id -> its open gate
        self._trial_group: dict[int, Group] = {}  # child seq_id -> the gate it belongs to
        self._totals: dict[str, float] = dict.fromkeys(
            (
                "gates_fired",
                "trials_spawned",
                "trials_forked",
                "gates_committed",
                "committed_segment_tokens",
                "output_tokens",
                "output_forward_tokens",
            ),
            0.0,
        )

    # ------------------------------------------------------------------------- select
    def select(self, batch: Batch, inputs: StepInputs, logits: StepLogits) -> StepResult:
        """Sample every row; gate uncertain rows into trials; score and commit trials."""
        result = StepResult(seqs=[SeqResult() for _ in batch.items])
        counts = _StepCounts()
        plain: list[int] = []  # rows sampled the ordinary way
        scored: list[int] = []  # rows whose processed distribution we need
        for i, item in enumerate(batch.items):
            self._totals["output_forward_tokens"] += _output_tokens_fed(item)
            if not item.samples:
                continue
            seq = item.seq
            if seq.seq_id in self._groups or seq.paused:
                # A held parent or a finished trial recomputed after preemption: it samples
                # nothing, and a finished trial keeps its last token uncomputed for later.
                if seq.seq_id not in self._groups:
                    result.seqs[i].kv_keep = list(range(item.num_new_tokens - 1))
            elif seq.seq_id in self._trial_group or (
                self.options.gates and not seq.params.is_greedy and not seq.is_trial
            ):
                scored.append(i)
            else:
                plain.append(i)
        self._sample_plain(batch, logits, plain, result)
        if scored:
            self._sample_scored(batch, logits, scored, result, counts)
        result.stats = {
            "gates_fired": float(counts.gates_fired),
            "trials_spawned": float(counts.trials_spawned),
            "committed_tokens": float(counts.committed_tokens),
        }
        return result

    def _sample_plain(
        self, batch: Batch, logits: StepLogits, rows: list[int], result: StepResult
    ) -> None:
        """Sample like the standard decoder (one sampler call, same generator draws)."""
        if not rows:
            return
        contexts = [SamplingContext.of(batch.items[i].seq) for i in rows]
        out = self.ctx.sampler.sample(
            logits.values[[logits.offsets[i + 1] - 1 for i in rows]], contexts
        )
        for k, i in enumerate(rows):
            result.seqs[i].new_token_ids = [out.token_ids[k]]
            lp = out.logprobs[k]
            result.seqs[i].logprobs = [lp] if lp is not None else None
        self._totals["output_tokens"] += len(rows)

    def _sample_scored(
        self,
        batch: Batch,
        logits: StepLogits,
        rows: list[int],
        result: StepResult,
        counts: _StepCounts,
    ) -> None:
        """Sample rows from their processed distribution; gate and score along the way."""
        sampler = self.ctx.sampler
        raw = logits.values[[logits.offsets[i + 1] - 1 for i in rows]]  # [R, V]
        contexts = [SamplingContext.of(batch.items[i].seq) for i in rows]
        probs = sampler.processed_probs(raw, contexts)  # [R, V]
        # NOTE: the exponential race on the processed probabilities is exactly what
        # Sampler.sample does for a non-greedy row, so a row that does not gate gets the
        # token the standard decoder would give it.
        tokens: list[int] = sampler.sample_from_probs(probs, contexts).tolist()
        heights: list[float] = entropy(probs).tolist()
        for k, i in enumerate(rows):
            seq = batch.items[i].seq
            group = self._trial_group.get(seq.seq_id)
            if group is not None:
                self._extend_trial(group, seq, raw[k], probs[k], tokens[k], result, counts, i)
                continue
            n = trial_count(
                heights[k],
                self.options.entropy_low,
                self.options.entropy_high,
                self.options.max_trials,
            )
            if n > 1 and heights[k] >= self.options.gate_entropy:
                self._gate(seq, raw[k], probs[k], contexts[k], tokens[k], n, result, counts, i)
            else:
                result.seqs[i].new_token_ids = [tokens[k]]
                result.seqs[i].logprobs = raw_logprobs(raw[k], [tokens[k]], seq.params.logprobs)
                self._totals["output_tokens"] += 1

    # -------------------------------------------------------------------------- trials
    def _gate(
        self,
        seq: Sequence,
        raw: torch.Tensor,
        probs: torch.Tensor,
        context: SamplingContext,
        first: int,
        n: int,
        result: StepResult,
        counts: _StepCounts,
        row: int,
    ) -> None:
        """Start n trials from seq's current distribution `probs` ([V])."""
        counts.gates_fired += 1
        counts.trials_spawned += n
        self._totals["gates_fired"] += 1
        self._totals["trials_spawned"] += n
        # Trial 0 keeps the draw already made; the others draw from seq's generator.
        more = self.ctx.sampler.sample_from_probs(
            probs.unsqueeze(0).repeat(n - 1, 1), [context] * (n - 1)
        )
        firsts = [first, *more.tolist()]
        p_first: list[float] = probs[firsts].tolist()
        lps = raw_logprobs(raw, firsts, seq.params.logprobs)
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
        if not continuing:
            assert best is not None
            result.seqs[row].new_token_ids = list(best.tokens)
            result.seqs[row].logprobs = list(best.logprobs) or None
            self._count_commit(1, counts)
            return
        group = Group(parent=seq, pending=[*continuing, *([best] if best else [])])
        self._groups[seq.seq_id] = group
        seq.hold_output = True
        seq.paused = True
        result.forks[seq.seq_id] = len(group.pending)
        self._totals["trials_forked"] += len(group.pending)

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

    def _extend_trial(
        self,
        group: Group,
        seq: Sequence,
        raw: torch.Tensor,
        probs: torch.Tensor,
        token: int,
        result: StepResult,
        counts: _StepCounts,
        row: int,
    ) -> None:
        """Append a running trial's next token; finish the trial (and maybe the gate)."""
        trial = group.running[seq.seq_id]
        trial.tokens.append(token)
        trial.probs.append(float(probs[token]))
        lps = raw_logprobs(raw, [token], seq.params.logprobs)
        result.seqs[row].new_token_ids = [token]
        result.seqs[row].logprobs = lps
        if not self._ends_trial(seq, token, len(trial.tokens), seq.num_output_tokens + 1):
            return
        del group.running[seq.seq_id]
        seq.paused = True
        loser = group.offer(trial)
        if loser is not None:
            result.drops.append(loser)
            self._trial_group.pop(loser, None)
        if not group.running:
            self._commit(group, result, counts)

    def _commit(self, group: Group, result: StepResult, counts: _StepCounts) -> None:
        """Every trial ended: the parent adopts the best one and goes on."""
        best = group.best
        assert best is not None and best.seq_id is not None
        parent = group.parent
        result.adopt[parent.seq_id] = best.seq_id
        parent.paused = False
        parent.hold_output = False
        del self._groups[parent.seq_id]
        self._trial_group.pop(best.seq_id, None)
        self._count_commit(len(best.tokens), counts)

    def _count_commit(self, num_tokens: int, counts: _StepCounts) -> None:
        counts.committed_tokens += num_tokens
        self._totals["gates_committed"] += 1
        self._totals["committed_segment_tokens"] += num_tokens
        self._totals["output_tokens"] += num_tokens

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

    # ----------------------------------------------------------------------- lifecycle
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
        gates = t["gates_committed"]
        t["mean_committed_segment_len"] = t["committed_segment_tokens"] / gates if gates else 0.0
        t["mean_trials_per_gate"] = (
            t["trials_spawned"] / t["gates_fired"] if t["gates_fired"] else 0.0
        )
        out = t["output_tokens"]
        t["forward_tokens_per_output_token"] = t["output_forward_tokens"] / out if out else 0.0
        return t


def _output_tokens_fed(item: ScheduledSeq) -> int:
    """Tokens fed this step at output positions (prompt prefill is not CNTP's cost)."""
    seq = item.seq
    start = max(seq.num_computed_tokens, seq.num_prompt_tokens)
    return max(0, seq.num_computed_tokens + item.num_new_tokens - start)
