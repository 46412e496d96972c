"""Prompt logprobs (SamplingParams.prompt_logprobs): the model's logprob of every prompt token.

vLLM's semantics: entry j is the logprob of prompt token j given tokens < j, with the top-N
alternatives, from the raw distribution (no temperature or penalties); entry 0 is None. The
completions API returns them for `echo` with `logprobs`, which is how lm-eval-harness scores
a continuation's log-likelihood.

Token j's distribution is the logits at position j - 1, so a prefill chunk feeding positions
[base, base + n) yields entries j in [base + 1, base + n] that lie inside the prompt. The
engine adds those rows to the chunk's logits_indices after the decoder built its inputs and
takes them out again before the decoder selects, so no decoder sees rows it did not ask for.
Sequences that want prompt logprobs skip the prefix cache (as in vLLM): cached positions are
never computed, so their logits do not exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slipstream.decoding.base import StepInputs, StepLogits
from slipstream.engine.batch import Batch
from slipstream.engine.outputs import Logprob
from slipstream.engine.sampler import raw_token_logprobs
from slipstream.engine.sequence import Sequence


@dataclass
class PromptRows:
    """One batch item's extra rows: where they sit among its logits rows, what they score."""

    item: int  # batch item index
    seq: Sequence
    original: list[int]  # the decoder's logits_indices for this item
    rows: list[int]  # local row (within the item's rows) of each scored position
    tokens: list[int]  # the prompt token each of those rows scores


def add_prompt_rows(batch: Batch, inputs: StepInputs) -> list[PromptRows]:
    """Ask for the logits rows this step's prefill chunks owe to prompt logprobs.

    Rows the decoder asked for stay (deduplicated); the sampled row, if any, stays last.
    Returns what take_prompt_logprobs needs to find them again.
    """
    plan: list[PromptRows] = []
    for i, (item, si) in enumerate(zip(batch.items, inputs.seqs, strict=True)):
        seq = item.seq
        if seq.params.prompt_logprobs is None or si.parents is not None:
            continue
        num_prompt = seq.num_prompt_tokens
        base = seq.num_computed_tokens
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)  # token 0 has no context
        # Entries so far cover tokens < done; token j needs the logits at position j - 1.
        done = len(seq.prompt_logprobs)
        first = max(done - 1, base)
        last = min(num_prompt - 1, base + len(si.token_ids))  # exclusive
        if first >= last:
            continue
        wanted = list(range(first - base, last - base))  # local positions
        sampled = [si.logits_indices[-1]] if item.samples and si.logits_indices else []
        others = si.logits_indices[: len(si.logits_indices) - len(sampled)]
        merged = sorted(set(others) | set(wanted))
        original = list(si.logits_indices)
        si.logits_indices = merged + sampled
        where = {pos: r for r, pos in enumerate(merged)}
        plan.append(
            PromptRows(
                item=i,
                seq=seq,
                original=original,
                rows=[where[pos] for pos in wanted],
                tokens=[seq.token_ids[base + pos + 1] for pos in wanted],
            )
        )
    return plan


def take_prompt_logprobs(
    plan: list[PromptRows], inputs: StepInputs, logits: StepLogits
) -> StepLogits:
    """Record each planned sequence's prompt logprobs; return the logits the decoder asked for.

    The extra rows are dropped and every item's logits_indices restored, so the decoder's
    select sees exactly its own rows.
    """
    if not plan:
        return logits
    for p in plan:
        start = logits.offsets[p.item]
        rows = torch.tensor([start + r for r in p.rows], device=logits.values.device)
        num_top = p.seq.params.prompt_logprobs or 0
        p.seq.prompt_logprobs.extend(
            raw_token_logprobs(
                logits.values.index_select(0, rows),  # [n, V]
                p.tokens,
                [num_top] * len(p.tokens),
                Logprob,  # decoded text is filled in by the output processor
            )
        )
    # Keep every row the decoder asked for, in its order.
    keep: list[int] = []
    offsets = [0]
    extra = {p.item: p for p in plan}
    for i, si in enumerate(inputs.seqs):
        start = logits.offsets[i]
        owed = extra.get(i)
        if owed is None:
            keep.extend(range(start, logits.offsets[i + 1]))
        else:
            where = {pos: r for r, pos in enumerate(si.logits_indices)}
            keep.extend(start + where[pos] for pos in owed.original)
            si.logits_indices = owed.original
        offsets.append(len(keep))
    index = torch.tensor(keep, dtype=torch.long, device=logits.values.device)
    return StepLogits(values=logits.values.index_select(0, index), offsets=offsets)
