"""CNTP's pure parts (Wang et al., arXiv 2507.03038): options, the entropy gate's trial
count, the lowest-perplexity pick, and the bookkeeping of one gate's trials.

Nothing here touches the engine, so the rules are testable on hand-written numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from slipstream.decoding.punctuation import DEFAULT_PUNCTUATION
from slipstream.engine.outputs import Logprob, TokenLogprobs
from slipstream.engine.sequence import Sequence

# Trials per gated step at most: each is a sequence with its own KV and a vocabulary-sized
# probability row a step (the official code runs 10); a million asked for 196 GB at once.
MAX_TRIALS = 64


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
        # Entropy is never negative; an infinite low end made every trial count NaN (a
        # failed step for every request in it).
        if not 0.0 <= self.entropy_low < math.inf:
            raise ValueError(f"entropy_low must be finite and >= 0, got {self.entropy_low}")
        if not self.entropy_high > self.entropy_low:
            raise ValueError(f"entropy_high must exceed entropy_low, got {self}")
        if not self.gate_entropy >= 0.0:
            raise ValueError(f"gate_entropy must be >= 0 (inf: off), got {self.gate_entropy}")
        if not 1 <= self.max_trials <= MAX_TRIALS:
            raise ValueError(f"max_trials must be in [1, {MAX_TRIALS}], got {self.max_trials}")
        if self.max_trial_tokens is not None and self.max_trial_tokens < 1:
            raise ValueError(f"max_trial_tokens must be >= 1, got {self.max_trial_tokens}")

    @property
    def gates(self) -> bool:
        """Whether any entropy can fire the gate."""
        return self.max_trials > 1 and math.isfinite(self.gate_entropy)


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


# A sampled token's probability is > 0, but float32 may round a tiny one to 0.
_MIN_PROB = 1e-30


def perplexity(probs: Seq[float]) -> float:
    """exp(mean(-log p)) over a trial's tokens, p = each token's processed probability."""
    assert probs, "a trial has at least one token"
    nll = -sum(math.log(max(p, _MIN_PROB)) for p in probs)
    return math.exp(nll / len(probs))


def lowest_perplexity(trials: Seq[Seq[float]]) -> int:
    """Index of the trial with the lowest perplexity; the earliest one on ties.

    Each trial is the list of processed probabilities of its tokens, punctuation included
    (the official code scores all of a trial's tokens the same way).

    Example: three trials stopped at punctuation,
        [0.5, 0.9]        perplexity exp((0.693 + 0.105) / 2) = 1.49
        [0.3]             perplexity 1 / 0.3 = 3.33
        [0.8, 0.5, 0.9]   perplexity exp((0.223 + 0.693 + 0.105) / 3) = 1.41
    lowest_perplexity([[0.5, 0.9], [0.3], [0.8, 0.5, 0.9]]) == 2: a longer trial wins
    when its tokens are surer on average.
    """
    scores = [perplexity(t) for t in trials]
    return min(range(len(scores)), key=lambda i: (scores[i], i))


@dataclass
class Trial:
    """One trial of a gate: its tokens so far, their probabilities and raw logprobs."""

    index: int  # order of the draw: the earliest wins a tie, as the official min() does
    tokens: list[int]
    probs: list[float]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    done: bool = False
    seq_id: int | None = None  # the forked child running it (None before on_fork)

    def key(self) -> tuple[float, int]:
        """Sort key: lower is better."""
        return perplexity(self.probs), self.index


@dataclass
class Group:
    """The trials of one gate: running children, and the best finished one so far."""

    parent: Sequence
    # Trials waiting for their child (set by select, consumed by on_fork), in fork order.
    pending: list[Trial] = field(default_factory=list)
    running: dict[int, Trial] = field(default_factory=dict)  # child seq_id -> trial
    best: Trial | None = None

    def offer(self, trial: Trial) -> int | None:
        """Record a finished trial; return the seq_id of the one that can no longer win."""
        trial.done = True
        if self.best is None:
            self.best = trial
            return None
        if trial.key() < self.best.key():
            loser, self.best = self.best, trial
            return loser.seq_id
        return trial.seq_id

    def member_ids(self) -> list[int]:
        """Seq ids of the children still held (running or best finished)."""
        ids = list(self.running)
        if self.best is not None and self.best.seq_id is not None:
            ids.append(self.best.seq_id)
        return ids


def raw_logprobs(
    logits: torch.Tensor, tokens: list[int], num_top: int | None
) -> list[TokenLogprobs] | None:
    """Raw-model logprobs of `tokens` at one position, as the Sampler reports them.

    logits: [V] raw logits of the position. None when the request asked for no logprobs.
    """
    if num_top is None:
        return None
    raw = torch.log_softmax(logits.float(), dim=-1)  # [V]
    chosen: list[float] = raw[tokens].tolist()
    top: list[Logprob] = []
    if num_top > 0:
        vals, idx = raw.topk(min(num_top, raw.shape[0]))
        top = [Logprob(t, v) for t, v in zip(idx.tolist(), vals.tolist(), strict=True)]
    return [
        TokenLogprobs(chosen=Logprob(tok, lp), top=list(top))
        for tok, lp in zip(tokens, chosen, strict=True)
    ]
