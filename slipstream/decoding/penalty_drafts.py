"""Recycled candidates re-ranked the way a request's penalties will move them.

Token recycling stores the model's raw top-k per token. A repetition penalty (prompt and
output tokens) or a frequency / presence penalty (output tokens) changes which of them the
request will pick: with repetition_penalty 1.2 a token already in the context loses a sixth
of a positive logit, so the raw favourite, often a token seen before, is rarely the one
chosen. On 12 builtin prompts (bf16, 2 cores) token recycling's drafts under that penalty
were accepted so seldom that the calibrated tree stayed empty: 1.04 tokens per step.

The matrix keeps each candidate's raw logit beside its probability, so a drafting step can
apply the request's penalties to a row's k candidates, as the sampler will apply them to the
whole vocabulary, and order them by the result. Drafts only: verification applies the
penalties exactly, so outputs do not change, only how often drafts match.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from slipstream.engine.sequence import Sequence


@dataclass(frozen=True)
class PenalisedRows:
    """A sequence's penalties, applied to rows of recycled candidates (see the module doc).

    Called with a row's candidate ids and raw logits ([k] each); returns the ids and the
    softmax over their penalised logits, best first (ties keep the stored order)."""

    seen: frozenset[int]  # tokens under the repetition penalty: prompt and output
    counts: dict[int, int]  # output token -> occurrences (frequency / presence penalties)
    repetition: float
    frequency: float
    presence: float

    @classmethod
    def of(cls, seq: Sequence) -> PenalisedRows | None:
        """The sequence's penalties, or None when it has none."""
        p = seq.params
        if p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0:
            return None
        seen = frozenset(seq.token_ids) if p.repetition_penalty != 1.0 else frozenset()
        counts: dict[int, int] = {}
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            counts = dict(Counter(seq.output_token_ids))
        return cls(seen, counts, p.repetition_penalty, p.frequency_penalty, p.presence_penalty)

    def penalised(self, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """[k] the row's logits after the penalties, in the sampler's order (repetition,
        then frequency and presence)."""
        out = logits.astype(np.float32, copy=True)
        for i, token in enumerate(ids.tolist()):
            if token in self.seen:
                v = out[i]
                out[i] = v / self.repetition if v > 0 else v * self.repetition
            n = self.counts.get(token, 0)
            if n:
                out[i] -= self.frequency * n + self.presence
        return out

    def __call__(self, ids: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = self.penalised(ids, logits)
        order = np.argsort(-scores, kind="stable")
        ranked = scores[order]
        weights = np.exp(ranked - ranked[0])
        return ids[order], (weights / weights.sum()).astype(np.float32)
