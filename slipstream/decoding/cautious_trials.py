"""CNTP trial bookkeeping: perplexity, the lowest-perplexity pick, a gate's open trials.

Pure Python apart from raw_logprobs, so the selection rule is testable without an engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from slipstream.engine.outputs import Logprob, TokenLogprobs
from slipstream.engine.sequence import Sequence

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
