"""Verifying a draft tree in one forward pass: greedy longest-path acceptance and lossless
speculative sampling over the tree. Shared by token recycling and ngram (a chain is a tree).

Greedy (Token Recycling, arXiv 2408.08696, as its official code does it): a node matches when
its token equals its parent's argmax; the accepted path is the root-to-leaf path with the
longest run of matches from the root; the bonus token is the argmax at its last node.

Sampling (SpecInfer / EAGLE's recursive rejection sampling with point-mass drafts): at node u
with target distribution p, try its children in rank order; child token x is accepted with
probability p(x) / sum(p); on rejection p(x) is set to 0. When no child is accepted the
bonus token is drawn from what is left of p. Each emitted token therefore follows exactly p.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from slipstream.decoding.base import (
    Decoder,
    DecoderContext,
    SeqInputs,
    SeqResult,
    SpecStats,
    StepInputs,
    StepLogits,
    StepResult,
    default_seq_inputs,
)
from slipstream.decoding.draft_tree import TreeTemplate, subtree
from slipstream.engine.batch import Batch, ScheduledSeq
from slipstream.engine.outputs import TokenLogprobs
from slipstream.engine.sampler import Sampler, SamplingContext, _is_plain_greedy
from slipstream.engine.sequence import Sequence
from slipstream.engine.vocab_topk import vocab_argmax


def accept_greedy(tmpl: TreeTemplate, tokens: list[int], targets: list[int]) -> list[int]:
    """Accepted node indices (root first): the longest root path on which every node's
    token is its parent's argmax (`targets[parent]`).

    A walk over the matching nodes only, in Python: at batch 1 a step matches a handful of
    nodes, and the walk takes ~5 us where a batched cumprod over every root-to-leaf path
    took ~0.4 ms of tensor ops (2 cores). Equally long paths emit the same tokens (each
    node's token is its parent's argmax); the first in child (rank) order wins.
    Example: root -> a, root -> b, a -> c; tokens [10, 11, 12, 13], targets [11, 13, 0, 5]
    -> [0, 1, 3].
    """
    best = [0]
    stack = [[0]]
    while stack:
        path = stack.pop()
        if len(path) > len(best):
            best = path
        want = targets[path[-1]]
        for child in reversed(tmpl.children[path[-1]]):
            if tokens[child] == want:
                stack.append([*path, child])
    return best


def matching_nodes(tmpl: TreeTemplate, tokens: list[int], emitted: list[int]) -> list[int]:
    """Nodes (root excluded) whose path's tokens are a prefix of `emitted`: every node that
    would have been accepted, on the accepted path or on a branch that drafted the same
    tokens. Greedy: exactly the nodes matching the model's argmax all the way from the root.

    Example: tree root -> a (1), root -> b (2), a -> c (3); tokens [r, 5, 5, 7], emitted
    [5, 7, 9] -> [1, 2, 3] (nodes 1 and 2 both drafted 5).
    """
    ok = [True] + [False] * (len(tokens) - 1)
    out = []
    for i in range(1, len(tokens)):  # BFS order: parents first
        depth = tmpl.depths[i]
        if ok[tmpl.parents[i]] and depth <= len(emitted) and tokens[i] == emitted[depth - 1]:
            ok[i] = True
            out.append(i)
    return out


@dataclass
class WalkResult:
    """Accepted nodes (root first) and the tokens they emit (accepted drafts + bonus)."""

    nodes: list[int]
    new_tokens: list[int]
    contexts: list[SamplingContext] = field(default_factory=list)


def verify_walk(
    sampler: Sampler,
    seq: Sequence,
    tmpl: TreeTemplate,
    tokens: list[int],  # [T] fed tokens
    logits: torch.Tensor,  # [T, V] raw logits of every node
) -> WalkResult:
    """Walk the tree from the root under the sequence's own sampling params (any params).

    Each node gets the sampling context it would have in sequential decoding (its path's
    tokens appended to the output), so penalties and min_tokens stay exact.
    """
    base = SamplingContext.of(seq)
    output = list(base.output_token_ids)
    greedy = base.params.is_greedy
    node, nodes = 0, [0]
    emitted: list[int] = []
    contexts: list[SamplingContext] = []
    while True:
        ctx = SamplingContext(base.params, base.prompt_token_ids, output + emitted, base.generator)
        contexts.append(ctx)
        row = logits[node : node + 1]
        nxt: int | None = None
        if greedy:
            target = int(sampler.processed_logits(row, [ctx]).argmax(dim=-1).item())
            nxt = next((c for c in tmpl.children[node] if tokens[c] == target), None)
            if nxt is None:
                emitted.append(target)
                break
        else:
            probs = sampler.processed_probs(row, [ctx])[0]  # [V]
            for c in tmpl.children[node]:
                x = tokens[c]
                mass = float(probs.sum())
                px = float(probs[x])
                if px > 0.0 and float(sampler.uniform([ctx], probs.device)[0]) * mass < px:
                    nxt = c
                    break
                probs[x] = 0.0  # rejected: the residual is p without x
            if nxt is None:
                emitted.append(int(sampler.sample_from_probs(probs.unsqueeze(0), [ctx])[0]))
                break
        emitted.append(tokens[nxt])
        nodes.append(nxt)
        node = nxt
    return WalkResult(nodes, emitted, contexts)


# Depth-cut templates kept (_within_depth); dropped all at once past this many shapes.
_CUT_CACHE_LIMIT = 4096


@dataclass
class Draft:
    """What one sequence feeds this step: a template and its tokens (root first)."""

    tmpl: TreeTemplate
    tokens: list[int]
    # A prompt-lookup chain drafted into the tree, if any (its own acceptance is tracked).
    chain: tuple[int, ...] = ()


class TreeSpecDecoder(Decoder):
    """Draft (subclass), feed root + tree, verify, keep the accepted path's KV.

    Subclasses implement plan_draft (at schedule time) and propose (at build time); they may
    override greedy_targets and observe to reuse the step's logits (the recycling matrix).
    """

    name = "tree_spec_base"

    def __init__(self, options: Any, ctx: DecoderContext) -> None:
        super().__init__(options, ctx)
        self._drafts: list[Draft | None] = []
        self._cuts: dict[tuple[tuple[tuple[int, ...], ...], int], TreeTemplate] = {}
        self._t_build = 0.0
        self._standard_path_now = 0  # this step's sequences on the standard path (counted)
        self.totals: dict[str, float] = {
            "verify_steps": 0,
            "draft_tokens": 0,
            "accepted_tokens": 0,
            "emitted_tokens": 0,
            "standard_path_seqs": 0,
        }

    # ---------------------------------------------------------------- subclass hooks
    def plan_draft(self, seq: Sequence, num_running: int) -> int:
        """Draft tokens wanted for this sequence's next step (0 = none)."""
        return 0

    def propose(self, items: list[ScheduledSeq]) -> list[Draft | None]:
        """Drafts for sequences in plain decode (each item has lookahead slots granted)."""
        return [None] * len(items)

    def greedy_targets(self, values: torch.Tensor) -> torch.Tensor:
        """[R, V] -> [R] argmax with the sampler's rule (ties: lowest index)."""
        return vocab_argmax(values)

    def observe(
        self,
        fed_tokens: list[int],
        prev_tokens: list[int],
        values: torch.Tensor,
        num_tokens: int,
        seconds: float,
        decode_only: bool = True,
    ) -> None:
        """Once per step: each logits row's fed token and the token before it in that row's
        context (-1: none), the logits, the tokens fed, the step's time and whether every
        sequence fed one new token (else the step carried a prefill chunk)."""

    def step_stats(self) -> dict[str, float]:
        """Per-step numbers for StepStats.decoder (the server exports them as
        slipstream:decoder_stat and, summed, decoder_stat_sum): sequences whose params kept
        them on the standard path this step (seeded sampling; token recycling's sampling
        when turned off)."""
        return {"standard_path_seqs": float(self._standard_path_now)}

    def drafts_allowed(self, seq: Sequence) -> bool:
        """Whether this sequence's params can take drafts (if not, the standard path).

        Seeded sampling cannot: a seed must repeat its output, but the random draws of
        tree rejection sampling depend on the draft, which depends on what else runs (the
        step's token budget, a shared recycling matrix). On the standard path a seeded
        request gives standard decoding's tokens for that seed, every time."""
        return seq.params.is_greedy or seq.params.seed is None

    # ---------------------------------------------------------------- engine hooks
    def num_lookahead_slots(self, seq: Sequence, num_running: int) -> int:
        """Room for this step's draft."""
        if not self.drafts_allowed(seq):
            return 0
        room = self.ctx.max_model_len - seq.num_tokens  # positions left for draft tokens
        return max(0, min(self.plan_draft(seq, num_running), room - 1))

    def build_inputs(self, batch: Batch) -> StepInputs:
        """Root + tree for drafting sequences, the default chain for the rest."""
        t0 = time.perf_counter()
        want = [
            i
            for i, item in enumerate(batch.items)
            if item.num_lookahead_slots > 0 and item.num_new_tokens == 1 and item.samples
        ]
        self._drafts = [None] * len(batch.items)
        for i, draft in zip(want, self.propose([batch.items[i] for i in want]), strict=True):
            if draft is not None and self.peers:
                draft = self._within_depth(draft, self.peer_depth_limit(batch.items[i].seq))
            self._drafts[i] = draft
        seqs: list[SeqInputs] = []
        for item, draft in zip(batch.items, self._drafts, strict=True):
            if draft is None:
                seqs.append(default_seq_inputs(item))
                continue
            base = item.seq.num_computed_tokens
            tmpl = draft.tmpl
            seqs.append(
                SeqInputs(
                    token_ids=draft.tokens,
                    positions=[base + d for d in tmpl.depths],
                    parents=tmpl.parents,
                    logits_indices=list(range(tmpl.num_tokens)),
                    tree_mask=tmpl.mask,
                )
            )
        self._t_build = t0
        return StepInputs(seqs)

    def _within_depth(self, draft: Draft, limit: int | None) -> Draft | None:
        """The draft less its nodes deeper than `limit` (None: whole; 0: no draft), for a
        composite part that limits draft depth (Decoder.draft_depth_limit). Cut templates
        are cached by shape, as dynamic trees cache theirs."""
        if limit is None or draft.tmpl.max_depth <= limit:
            return draft
        if limit <= 0:
            return None
        key = (draft.tmpl.paths, limit)
        cut = self._cuts.get(key)
        if cut is None:
            if len(self._cuts) >= _CUT_CACHE_LIMIT:
                self._cuts.clear()
            cut = subtree(draft.tmpl, [i for i, d in enumerate(draft.tmpl.depths) if d <= limit])
            self._cuts[key] = cut
        token_of = dict(zip(draft.tmpl.paths, draft.tokens, strict=True))
        return Draft(cut, [token_of[p] for p in cut.paths], draft.chain[:limit])

    def select(self, batch: Batch, inputs: StepInputs, logits: StepLogits) -> StepResult:
        """Verify every drafted sequence, sample the others."""
        values = logits.values
        results = [SeqResult() for _ in batch.items]
        spec = SpecStats()
        fed, prev = _fed_and_previous(batch, inputs)
        fast: list[int] = []  # drafted, plain greedy: verified from the argmax alone
        walk: list[int] = []  # drafted, any other params: walked node by node
        plain: list[int] = []  # not drafted, samples this step
        self._standard_path_now = 0
        for i, item in enumerate(batch.items):
            if self._drafts[i] is not None:
                (fast if _is_plain_greedy(SamplingContext.of(item.seq)) else walk).append(i)
            elif item.samples:
                plain.append(i)
                if not self.drafts_allowed(item.seq):
                    self._standard_path_now += 1
        self.totals["standard_path_seqs"] += self._standard_path_now
        targets = self.greedy_targets(values) if values.shape[0] else None
        if fast and targets is not None:
            self._verify_fast(batch, logits, targets, fast, results, spec)
        for i in walk:
            self._verify_walk(batch.items[i].seq, logits.for_item(i), i, results, spec)
        if plain:
            self._sample_plain(batch, logits, targets, plain, results)
        # Timed through verification: walking a tree node by node (penalties, sampling)
        # costs per drafted node on top of the forward, and the tree sizer must see it.
        decode_only = all(item.num_new_tokens == 1 for item in batch.items)
        seconds = time.perf_counter() - self._t_build
        self.observe(fed, prev, values, inputs.num_tokens, seconds, decode_only)
        return StepResult(
            seqs=results, spec=spec if spec.num_drafts else None, stats=self.step_stats()
        )

    # ---------------------------------------------------------------- verification
    def _verify_fast(
        self,
        batch: Batch,
        logits: StepLogits,
        targets: torch.Tensor,
        idx: list[int],
        results: list[SeqResult],
        spec: SpecStats,
    ) -> None:
        host_targets: list[int] = targets.tolist()
        for i in idx:
            draft = self._drafts[i]
            assert draft is not None
            off = logits.offsets[i]
            mine = host_targets[off : logits.offsets[i + 1]]
            nodes = accept_greedy(draft.tmpl, draft.tokens, mine)
            self._finish(results, spec, i, nodes, [mine[n] for n in nodes], draft.tmpl, None)

    def _verify_walk(
        self, seq: Sequence, rows: torch.Tensor, i: int, results: list[SeqResult], spec: SpecStats
    ) -> None:
        draft = self._drafts[i]
        assert draft is not None
        res = verify_walk(self.ctx.sampler, seq, draft.tmpl, draft.tokens, rows)
        logprobs = None
        if seq.params.logprobs is not None:
            chosen = rows[res.nodes]  # [n, V] the logits each emitted token was drawn from
            lps = self.ctx.sampler._logprobs(chosen, res.contexts, res.new_tokens)
            logprobs = [lp for lp in lps if lp is not None]
        self._finish(results, spec, i, res.nodes, res.new_tokens, draft.tmpl, logprobs)

    def _finish(
        self,
        results: list[SeqResult],
        spec: SpecStats,
        i: int,
        nodes: list[int],
        new: list[int],
        tmpl: TreeTemplate,
        logprobs: list[TokenLogprobs] | None,
    ) -> None:
        results[i] = SeqResult(new_token_ids=new, logprobs=logprobs, kv_keep=nodes)
        spec.add(tmpl.num_draft, len(nodes) - 1)
        self.totals["verify_steps"] += 1
        self.totals["draft_tokens"] += tmpl.num_draft
        self.totals["accepted_tokens"] += len(nodes) - 1
        self.totals["emitted_tokens"] += len(new)
        draft = self._drafts[i]
        assert draft is not None
        self.accepted(draft, new)

    def accepted(self, draft: Draft, emitted: list[int]) -> None:
        """Called for every verified draft with the tokens the step emitted (accepted
        drafts, then the bonus), for acceptance statistics."""

    def _sample_plain(
        self,
        batch: Batch,
        logits: StepLogits,
        targets: torch.Tensor | None,
        idx: list[int],
        results: list[SeqResult],
    ) -> None:
        rows = [logits.offsets[i + 1] - 1 for i in idx]
        contexts = [SamplingContext.of(batch.items[i].seq) for i in idx]
        if targets is not None and all(_is_plain_greedy(c) for c in contexts):
            picked: list[int] = targets[rows].tolist()
            for i, tok in zip(idx, picked, strict=True):
                results[i] = SeqResult(new_token_ids=[tok])
            return
        out = self.ctx.sampler.sample(logits.take(rows), contexts)
        for k, i in enumerate(idx):
            lp = out.logprobs[k]
            results[i] = SeqResult(new_token_ids=[out.token_ids[k]], logprobs=[lp] if lp else None)

    def stats(self) -> dict[str, float]:
        """Cumulative counters; mean accepted tokens per verification step (bonus included)."""
        out = dict(self.totals)
        steps = self.totals["verify_steps"]
        if steps:
            out["mean_accepted_tokens_per_step"] = self.totals["emitted_tokens"] / steps
        return out


def _fed_and_previous(batch: Batch, inputs: StepInputs) -> tuple[list[int], list[int]]:
    """Each logits row's fed token, and the token before it in that row's context: a tree
    node's parent's token, a chain's previous token, the sequence's last computed token
    for the first fed one (-1 at position 0).

    Example: computed [5, 6], fed root 7 with nodes 8 (parent root) and 9 (parent 8), every
    row a logits row -> fed [7, 8, 9], previous [6, 7, 8].
    """
    fed: list[int] = []
    prev: list[int] = []
    for item, si in zip(batch.items, inputs.seqs, strict=True):
        base = item.seq.num_computed_tokens
        before = item.seq.token_ids[base - 1] if base > 0 else -1
        toks = si.token_ids
        for j in si.logits_indices:
            fed.append(toks[j])
            if si.parents is not None:
                parent = si.parents[j]
                prev.append(toks[parent] if parent >= 0 else before)
            else:
                prev.append(toks[j - 1] if j > 0 else before)
    return fed, prev
