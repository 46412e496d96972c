"""Training-free sparse attention for decoding: HiP mask search or Kinetics block top-k.

Papers:
- HiP: Lee et al., "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical
  Attention Pruning", arXiv 2406.09827 (ICLR 2025 version: "A Training-Free Sub-quadratic
  Cost Transformer Model Serving Framework with Hierarchically Pruned Attention").
- Kinetics: Sadhukhan et al., "Kinetics: Rethinking Test-Time Scaling Laws", arXiv
  2506.05333 (block top-k sparse attention over 16-token pages with mean keys).

The decoder only replaces attention (`attention_backend`): prefill chunks stay dense, and
each decode token (or verification tree) reads sink + local window + the selected chunks of
the paged KV. Options (`--decoder-config`), defaults per method:

    method            "hip", "block_topk", or unset: the default configuration (below)
    top_k             tokens selected between sink and window (hip 256, block_topk 256)
    top_k_pages       the same budget in KV pages (block_topk's unit); set one of the two
    sink              first tokens always read (hip 16, block_topk 4 -> its first page)
    window            last tokens always read (hip 128, block_topk 64, + the current page)
    dense_layers      first layers left dense (hip 3, block_topk 1 = layer 0)
    block_k           HiP key block b_k in tokens (2)
    refresh_interval  decode steps a selection is reused before it is made again (hip 8,
                      as HiP reuses masks; block_topk 1, Kinetics and Quest choose every
                      step); between refreshes the window reaches back to the scored region
    group_pooling     block_topk: "mean" (Kinetics: the GQA group's mean query scores a
                      page) or "max" (each query head scores it, the best counts)
    page_scoring      block_topk: "mean" (Kinetics: query . page mean key, the page's mean
                      logit) or "bounds" (Quest, arXiv 2406.10774: an upper bound on the
                      page's best logit from per-channel min/max keys; twice the summary
                      memory, finds a page that holds one relevant key)
    budget_fraction   block_topk: None (fixed budget) or f in (0, 1]: read f x the context
                      (sink + window + current page + selected pages), the selected pages
                      capped by top_k / top_k_pages when one is set
    dense_below       decodes with fewer cached keys than this stay dense (0); the sparse
                      path has a fixed per-layer cost that short contexts do not repay
                      (quarter budget + rerank: 0.64x dense at 256 tokens on 2 CPU cores)
    rerank_factor     block_topk: 0 (Kinetics) or F > 0: the page score shortlists F x
                      top_k pages, and the top_k whose best key logit (exact, over the
                      page's keys and the group's query heads) is highest are read; costs
                      reading the shortlist's K (F times the budget), recovers the copy
                      steps of needle retrieval that page means miss
    prompt_pages      block_topk: 0 (the default configuration: 32), or P > 0 pages of
                      the budget per KV head chosen once, at the end of the prefill, by
                      the attention the prompt's last `observation_window` tokens pay
                      them (SnapKV, Li et al., arXiv 2404.14469: a prompt's closing
                      question looks at what the answer will need), then read at every
                      decode step; the other top_k - P pages are chosen per step as usual.
                      Costs one pass over the prompt's keys per layer at the end of the
                      prefill, nothing per decode step
    observation_window  block_topk with prompt_pages: prompt tokens whose queries vote (32)
    answer_votes      block_topk with prompt_pages: 0, or N > 0: the queries of a request's
                      first N decoded tokens vote too, and at its N-th decode step the pins
                      are chosen again: the prompt's best half, then the answer's best of
                      the rest. For a question asked before the text, where the prompt ends
                      on the text and its closing queries look at nothing in particular,
                      while the answer's first query already looks at the passage it will
                      copy: with 1, 15/30 such needles against the default's 5/30 (dense
                      18/30), but needles asked after the text 56/60 against 58/60, so
                      the default configuration leaves it off (BENCHMARKS.md, session 26).
                      Costs one pass over the keys per sparse layer in that step

The default configuration (no `method` named): block top-k reading 0.21 of the context in
each sparse layer (`budget_fraction`; with layer 0 dense and pages of 16 tokens the model
reads at most a quarter of the KV: 0.24 at 1k tokens, where 0.22 read 0.251), at most 48
selected pages (768 tokens; an 8k context reads ~12%), 32 of them pinned by the prompt's
end (`prompt_pages`), the rest chosen every 8th step (`refresh_interval` 8). Each key not
set is filled from it, so `{"refresh_interval": 1}` changes one knob of it, and a budget in
any unit (`top_k`, `top_k_pages` or `budget_fraction`) replaces its budget; naming a method
starts from that method's defaults instead. Why: on the needle set of
benchmarks/sparse_attention.py (60 needles at 1k-4k) HiP's defaults found 28/60 and
Kinetics' block top-k 33/60 where dense found 59/60; with pins and a quarter budget block
top-k found 58/60 and decoded 1.8-2.3x dense at 8k (BENCHMARKS.md, sessions 19-25). Its weak
spot: a question placed before the text, where the pins look at the wrong tokens (this
configuration 5/30 against dense's 18/30, session 25; `answer_votes` 1 finds 15/30 there).
On needles in real text (licences) it found 56/60 where dense found 55/60 (session 26).

Where the official defaults differ: HiP ships k=512, window 256 (v1.1; 128 in v1.0), sized
for 32k-128k contexts; Kinetics' benchmark keeps 64 pages (1024 tokens). Our default model
has an 8k window and the needle benchmark runs at 1k-4k, so the defaults halve HiP's k and
window and use 16 pages for block top-k: ~400 tokens per KV head, a quarter of a 1.6k
context, so decoding actually prunes there. A decode whose context fits the budget runs the
dense kernel (HiP's "dense for short prompts"), which makes budget >= context exact.

Under a drafting decoder (`token_recycling+sparse_attention`, `ngram+sparse_attention`) a
verification tree is pruned as a decode is, and its greedy tokens are this decoder's own:
selections are made anew by position (every `refresh_interval` positions, not steps) with
the query of the step's first token, and drafts stop short of that position and of any
switch between dense and pruned attention (draft_depth_limit), so every node reads the keys
it would read decoded alone. (With `answer_votes` the pins are chosen again at a decode step,
which trees do not keep to.)

Stats per step: sparse_kv_read_fraction (KV tokens read / available, all layers, decode and
verification tokens only), sparse_pruned_seqs, sparse_mask_refreshes (pruned sequences whose
selection was made anew: HiP mask searches, block top-k choices), sparse_rerank_k_fraction
(block top-k with rerank_factor: keys whose exact logit was computed to choose pages, / the
same denominator; K only, in addition to the KV read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from slipstream.decoding.base import Decoder, DecoderContext
from slipstream.decoding.registry import DECODERS
from slipstream.decoding.sparse.plan import StepPlan, build_plan
from slipstream.decoding.sparse.selectors import (
    BlockTopkSelector,
    Geometry,
    HipSelector,
    Selector,
    stack_padded,
)
from slipstream.engine.attention import AttentionBackend, AttentionMetadata
from slipstream.engine.sequence import Sequence
from slipstream.kernels.paged_attention import paged_attention
from slipstream.kernels.sparse_paged_attention import sparse_paged_attention
from slipstream.kernels.store_kv import store_kv

METHODS = ("hip", "block_topk")
# method -> (top_k tokens, sink, window, dense_layers, refresh_interval); see the module
# docstring.
_DEFAULTS = {"hip": (256, 16, 128, 3, 8), "block_topk": (256, 4, 64, 1, 1)}
# What an options object without a method gets, key by key where the key is unset (see the
# module docstring for why).
DEFAULT_CONFIGURATION: dict[str, Any] = {
    "method": "block_topk",
    "budget_fraction": 0.21,
    "top_k_pages": 48,
    "prompt_pages": 32,
    "refresh_interval": 8,
}


@dataclass(frozen=True)
class SparseAttentionOptions:
    """Knobs of the sparse-attention decoder; None = the method's default."""

    method: str | None = None  # None: DEFAULT_CONFIGURATION's method and its other keys
    top_k: int | None = None
    top_k_pages: int | None = None
    sink: int | None = None
    window: int | None = None
    dense_layers: int | None = None
    block_k: int = 2
    refresh_interval: int | None = None
    group_pooling: str = "mean"
    page_scoring: str = "mean"
    rerank_factor: int = 0
    budget_fraction: float | None = None
    dense_below: int = 0
    prompt_pages: int | None = None  # None: 32 in the default configuration, else 0
    observation_window: int = 32
    answer_votes: int = 0

    def __post_init__(self) -> None:
        if self.method is None:  # the default configuration fills what was left unset
            # A budget given in any unit (tokens, pages, fraction) replaces its whole budget.
            budget = ("top_k", "top_k_pages", "budget_fraction")
            budget_set = any(getattr(self, name) is not None for name in budget)
            for name, value in DEFAULT_CONFIGURATION.items():
                if getattr(self, name) is None and not (budget_set and name in budget):
                    object.__setattr__(self, name, value)
        if self.prompt_pages is None:
            object.__setattr__(self, "prompt_pages", 0)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.top_k is not None and self.top_k_pages is not None:
            raise ValueError("set top_k (tokens) or top_k_pages, not both")
        if self.group_pooling not in ("mean", "max"):
            raise ValueError(f"group_pooling must be 'mean' or 'max', got {self.group_pooling!r}")
        if self.page_scoring not in ("mean", "bounds"):
            raise ValueError(f"page_scoring must be 'mean' or 'bounds', got {self.page_scoring!r}")
        for name in ("top_k", "top_k_pages", "block_k", "refresh_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.budget_fraction is not None:
            if not 0 < self.budget_fraction <= 1:
                raise ValueError(f"budget_fraction must be in (0, 1], got {self.budget_fraction}")
            if self.method != "block_topk":
                raise ValueError("budget_fraction is a block_topk option")
        if self.prompt_pages and self.method != "block_topk":
            raise ValueError("prompt_pages is a block_topk option")
        if self.method != "block_topk":  # HiP would ignore them
            for name, default in (
                ("group_pooling", "mean"),
                ("page_scoring", "mean"),
                ("rerank_factor", 0),
            ):
                if getattr(self, name) != default:
                    raise ValueError(f"{name} is a block_topk option")
        if self.answer_votes < 0:
            raise ValueError(f"answer_votes must be >= 0, got {self.answer_votes}")
        if self.answer_votes and not self.prompt_pages:
            raise ValueError("answer_votes chooses prompt_pages again: set prompt_pages too")
        if self.observation_window < 1:
            raise ValueError(f"observation_window must be >= 1, got {self.observation_window}")
        for name in (
            "sink",
            "window",
            "dense_layers",
            "rerank_factor",
            "dense_below",
            "prompt_pages",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def resolved_method(self) -> str:
        """The method in effect (__post_init__ fills an unset one)."""
        assert self.method is not None
        return self.method


def make_selector(options: SparseAttentionOptions, ctx: DecoderContext) -> Selector:
    """The method's selector with defaults filled in."""
    top_k, sink, window, _, refresh = _DEFAULTS[options.resolved_method]
    if options.refresh_interval is not None:
        refresh = options.refresh_interval
    if options.top_k_pages is not None:
        top_k = options.top_k_pages * ctx.block_size
    elif options.top_k is not None:
        top_k = options.top_k
    sink = sink if options.sink is None else options.sink
    window = window if options.window is None else options.window
    if options.method == "hip":
        b_k = options.block_k
        if ctx.block_size % b_k:
            raise ValueError(f"block_k {b_k} must divide the KV block size {ctx.block_size}")
        geometry = Geometry(
            chunk=b_k,
            sink=sink,
            window=window,
            top_k=max(1, top_k // b_k),
            dense_below=options.dense_below,
        )
        return HipSelector(geometry, refresh)
    page = ctx.block_size
    if (
        options.budget_fraction is not None
        and options.top_k is None
        and options.top_k_pages is None
    ):
        top_k = ctx.max_model_len  # no cap: the fraction alone sizes the budget
    geometry = Geometry(
        chunk=page,
        sink=sink,
        window=window,
        top_k=max(1, -(-top_k // page)),
        budget_fraction=options.budget_fraction,
        dense_below=options.dense_below,
    )
    return BlockTopkSelector(
        geometry,
        ctx.num_kv_blocks,
        options.group_pooling,
        options.page_scoring,
        options.rerank_factor,
        refresh,
        options.prompt_pages or 0,
        options.observation_window,
        options.answer_votes or 0,
    )


class _Shared:
    """State every sparse layer shares: the selector, the step plan, the read counters."""

    def __init__(self, selector: Selector, num_layers: int, num_dense: int) -> None:
        self.selector = selector
        self.num_layers = num_layers
        self.num_dense = num_dense
        self.key = f"sparse_attention:{id(self)}"
        self.decode_kv_tokens = 0  # this step's denominator (per layer)
        self.saved = 0.0  # KV tokens skipped, summed over sparse layers
        # This plan's chunk lists, one per sparse layer, counted once per step (_count_read):
        # seven small ops per layer cost ~1 ms per decode step at 30 layers on CPU.
        self.selected: list[torch.Tensor] = []  # [num_pruned, H, S] each
        self.selected_ctx: list[int] = []  # cached keys of each pruned sequence
        # The last count's lists and their keys read ([layers][num_pruned] floats): between
        # refreshes the layers hand over the same list objects (CombinedChunks) step after
        # step, and counting them anew cost ~0.5 ms a step at 8k (30 layers, 2 CPU cores).
        self._counted: tuple[list[torch.Tensor], list[list[float]]] | None = None
        self.pruned = 0
        self.totals = {"steps": 0.0, "kv_read": 0.0, "kv_total": 0.0, "refreshes": 0.0}
        self.totals["pruned_seqs"] = 0.0
        self.totals["scored_keys"] = 0.0

    def plan(self, meta: AttentionMetadata) -> StepPlan:
        """This step's plan, built by the first sparse layer and cached in meta.scratch."""
        plan = meta.scratch.get(self.key)
        if plan is None:
            self._count_read()
            plan = build_plan(meta, self.selector.prunes)
            self.selector.prepare(meta, plan)
            meta.scratch[self.key] = plan
            self.decode_kv_tokens = plan.decode_kv_tokens
            self.pruned = 0 if plan.sparse is None else plan.sparse.size
            self.selected_ctx = [] if plan.sparse is None else plan.sparse.ctx
        assert isinstance(plan, StepPlan)
        return plan

    def _count_read(self) -> None:
        """Add the KV tokens the selected chunks skipped (a partly filled last chunk counts
        whole) to `saved`."""
        if not self.selected:
            return
        last = self._counted
        if last is not None and _same_objects(last[0], self.selected):
            read = last[1]
        else:
            chunks = stack_padded(self.selected)  # [layers, num_pruned, H, S]
            counts = (chunks >= 0).sum(-1).float().mean(-1) * self.selector.chunk_size
            read = counts.tolist()
            self._counted = (self.selected, read)
        # In Python: the few torch ops this took cost ~0.1 ms a step at 8k (2 CPU cores),
        # run right after a forward that streamed the weights out of the caches.
        ctx = self.selected_ctx
        self.saved += sum(c - min(r, c) for row in read for r, c in zip(row, ctx, strict=True))
        self.selected = []

    def step_stats(self) -> dict[str, float]:
        """Fraction of KV read this step; resets the counters."""
        self._count_read()
        total = self.decode_kv_tokens * self.num_layers
        if total == 0:
            return {}
        read = total - self.saved
        stats = {
            "sparse_kv_read_fraction": read / total,
            "sparse_pruned_seqs": float(self.pruned),
            "sparse_mask_refreshes": float(self.selector.refreshes),
        }
        t = self.totals
        t["steps"] += 1
        t["kv_read"] += read
        t["kv_total"] += total
        t["refreshes"] += self.selector.refreshes
        t["pruned_seqs"] += self.pruned
        scored = self.selector.scored_keys
        if scored is not None:
            # Block top-k reranking reads the shortlist's keys: K only, on top of the KV read.
            stats["sparse_rerank_k_fraction"] = scored / total
            t["scored_keys"] += scored
            self.selector.scored_keys = 0.0
        self.decode_kv_tokens = 0
        self.saved = 0.0
        self.pruned = 0
        self.selector.refreshes = 0
        return stats


def _same_objects(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether the two lists hold the very same tensors, in order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class SparseAttentionBackend:
    """One sparse layer: store, then dense or block-sparse attention per sequence."""

    def __init__(self, layer_idx: int, shared: _Shared) -> None:
        self.layer_idx = layer_idx
        self.shared = shared

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Attention output for this step's tokens."""
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping, meta.scratch)
        shared = self.shared
        plan = shared.plan(meta)
        selector = shared.selector
        selector.after_store(self.layer_idx, k_cache, plan)
        if plan.prefill_ends:
            selector.observe_prompt(self.layer_idx, q, k_cache, meta, scale)
        sp = plan.sparse
        if sp is None:
            return paged_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.seq_lens,
                scale,
                meta.tree_mask,
                meta.scratch,
            )
        q_sp = q if sp.rows is None else q.index_select(0, sp.rows)
        chunks = selector.select(self.layer_idx, q_sp, k_cache, plan)  # [n, H, S]
        out_sp = sparse_paged_attention(
            q_sp,
            k_cache,
            v_cache,
            sp.block_tables,
            sp.query_start_loc,
            sp.seq_lens,
            chunks,
            selector.chunk_size,
            scale,
            sp.tree_mask,
            plan.extra.setdefault("attention", {}),
        )
        shared.selected.append(chunks)
        if sp.rows is None:
            return out_sp
        out = torch.empty_like(q)
        out.index_copy_(0, sp.rows, out_sp)
        d = plan.dense
        if d is not None:
            assert d.rows is not None
            out_d = paged_attention(
                q.index_select(0, d.rows),
                k_cache,
                v_cache,
                d.block_tables,
                d.query_start_loc,
                d.seq_lens,
                scale,
                d.tree_mask,
                plan.extra.setdefault("dense_attention", {}),
            )
            out.index_copy_(0, d.rows, out_d)
        return out


@DECODERS.register("sparse_attention")
class SparseAttentionDecoder(Decoder):
    """Replaces attention in layers >= dense_layers; every other hook is standard decoding."""

    name = "sparse_attention"
    Options = SparseAttentionOptions
    required_features = frozenset({"attention_backend"})

    def __init__(self, options: Any, ctx: DecoderContext) -> None:
        super().__init__(options, ctx)
        dense = options.dense_layers
        if dense is None:
            dense = _DEFAULTS[options.resolved_method][3]
        self.dense_layers = min(dense, ctx.num_layers)
        self.shared = _Shared(make_selector(options, ctx), ctx.num_layers, self.dense_layers)
        self.backends: list[SparseAttentionBackend] = []
        # [max_model_len + 1]: for each context, the next context where the selector's
        # prunes() answers otherwise (max_model_len + 1: never); built at first use.
        self._next_switch: list[int] | None = None

    def attention_backend(self, layer_idx: int, default: AttentionBackend) -> AttentionBackend:
        """Layers below dense_layers keep the default; the rest get a sparse backend."""
        if layer_idx < self.dense_layers:
            return default
        backend = SparseAttentionBackend(layer_idx, self.shared)
        self.backends.append(backend)
        return backend

    def step_stats(self) -> dict[str, float]:
        """This step's fraction of KV read, pruned sequences and HiP mask refreshes."""
        return self.shared.step_stats()

    def prefill_tail(self) -> int:
        """Block top-k's prompt pins vote with the queries of a prompt's last
        `observation_window` tokens, which must all be computed in its final chunk."""
        return self.shared.selector.prefill_tail()

    def draft_depth_limit(self, seq: Sequence) -> int | None:
        """With a drafting decoder (token_recycling+sparse_attention, ngram+...): no draft
        node at or past the position where this sequence's selection is made anew, nor where
        its attention would switch between dense and pruned. Then every node reads the keys
        it would read decoded alone (the selection, sink and window of the root's step; its
        ancestors in place of the window's newest keys), the next choice is made at the
        same position with the root's query, and greedy answers are sparse attention's own,
        whatever the drafts or the load. None: a dense context with no switch ahead."""
        ctx = seq.num_computed_tokens  # the root's position: the keys cached before the step
        selector = self.shared.selector
        switches = self._switches()
        end = len(switches)  # no switch ahead
        switch = switches[ctx] if ctx < end else end
        limit = None if switch >= end else switch - ctx - 1
        if selector.prunes(ctx):
            served = selector.positions_served(seq.seq_id, ctx)
            if served is not None:
                limit = served - 1 if limit is None else min(limit, served - 1)
        return limit

    def _switches(self) -> list[int]:
        """next_switch[c]: the first context after c where prunes() differs from prunes(c)
        (len(next_switch): none). A table, since pruning need not be monotone in the context
        (a budget_fraction budget grows with it); 8k contexts build it in a few ms, once."""
        if self._next_switch is None:
            size = self.ctx.max_model_len + 1
            prunes = [self.shared.selector.prunes(c) for c in range(size)]
            table = [size] * size
            for c in range(size - 2, -1, -1):
                table[c] = c + 1 if prunes[c + 1] != prunes[c] else table[c + 1]
            self._next_switch = table
        return self._next_switch

    def on_finish(self, seq: Sequence) -> None:
        """Drop the sequence's masks or page bookkeeping."""
        self.shared.selector.forget(seq.seq_id)

    def stats(self) -> dict[str, float]:
        """Cumulative: mean fraction of KV read, mask refreshes, pruned sequence-steps."""
        t = self.shared.totals
        if not t["steps"]:
            return {}
        return {
            "sparse_kv_read_fraction": t["kv_read"] / t["kv_total"],
            "sparse_mask_refreshes": t["refreshes"],
            "sparse_pruned_seq_steps": t["pruned_seqs"],
            "sparse_decode_steps": t["steps"],
            **(
                {"sparse_rerank_k_fraction": t["scored_keys"] / t["kv_total"]}
                if self.shared.selector.scored_keys is not None
                else {}
            ),
        }
