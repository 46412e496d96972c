"""HiP and block top-k selectors: which KV chunks each pruned sequence's KV heads read.

HiP (Lee et al., arXiv 2406.09827, ICLR 2025): a hierarchical mask search over key blocks
of b_k tokens, the mask cached per (sequence, layer) and refreshed every N decode steps.
Block top-k (Kinetics, Sadhukhan et al., arXiv 2506.05333): per step and KV head, pages
scored by (mean GQA query) . (page mean key), the top k kept; or, with page_scoring
"bounds", by Quest's upper bound on the page's logits from per-channel min/max keys (Tang et
al., arXiv 2406.10774).
Both add sink and local-window chunks; the chunk list feeds kernels/sparse_paged_attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from slipstream.decoding.sparse.plan import StepPlan, SubBatch
from slipstream.engine.attention import AttentionMetadata
from slipstream.kernels.cpu.page_topk import Rerank, select_top_pages
from slipstream.kernels.hip_mask import hip_mask
from slipstream.kernels.page_summaries import page_key_bounds, page_mean_keys
from slipstream.kernels.page_votes import page_votes


@dataclass(frozen=True)
class Geometry:
    """Sink, local window and budget in chunks of `chunk` tokens."""

    chunk: int  # tokens per chunk (HiP b_k, or the KV page for block top-k)
    sink: int  # always-attended first tokens
    window: int  # always-attended last cached tokens
    top_k: int  # chunks selected from the region between sink and window (the cap, below)
    # None: a fixed budget. f: the whole read (sink + window + current chunk + selected) is
    # f x the cached context, the selected part capped at top_k; long contexts stay fast.
    budget_fraction: float | None = None
    # Decodes with fewer cached keys stay dense. The sparse path costs a fixed ~0.5 ms per
    # layer on a 2-core CPU (selection ops), more than dense attention over a few thousand
    # keys: a quarter-budget config with rerank ran at 0.64x dense at 256 tokens.
    dense_below: int = 0

    def top_k_at(self, ctx: int) -> int:
        """Chunks selected for a decode with `ctx` cached keys."""
        if self.budget_fraction is None:
            return self.top_k
        fixed = self.sink_chunks * self.chunk + self.window + self.chunk
        return max(1, min(self.top_k, int(self.budget_fraction * ctx - fixed) // self.chunk))

    @property
    def sink_chunks(self) -> int:
        """Chunks covering the sink tokens."""
        return -(-self.sink // self.chunk)

    def window_start(self, ctx: int) -> int:
        """First chunk of the local window for `ctx` cached keys."""
        return max(self.sink_chunks, (ctx - self.window) // self.chunk)

    def prunes(self, ctx: int) -> bool:
        """Whether the region between sink and window holds more chunks than the budget
        (and the context reaches dense_below)."""
        if ctx < self.dense_below:
            return False
        return self.window_start(ctx) - self.sink_chunks > self.top_k_at(ctx)

    def fixed_chunks(self, ctx: int, window_start: int | None = None) -> list[int]:
        """Sink chunks, then window chunks up to the one holding the last cached key."""
        start = self.window_start(ctx) if window_start is None else window_start
        return list(range(self.sink_chunks)) + list(range(start, (ctx - 1) // self.chunk + 1))


def _pad(rows: list[list[int]], device: torch.device) -> torch.Tensor:  # [n, max_len] int64
    """Lists of chunk ids as one tensor, -1 padded."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor(
        [r + [-1] * (width - len(r)) for r in rows], dtype=torch.long, device=device
    )


def stack_padded(chunk_lists: list[torch.Tensor]) -> torch.Tensor:  # [len, ..., max width]
    """Chunk-id tensors that differ only in their last width, stacked, -1 padded."""
    width = max(c.shape[-1] for c in chunk_lists)
    return torch.stack(
        [
            c if c.shape[-1] == width else F.pad(c, (0, width - c.shape[-1]), value=-1)
            for c in chunk_lists
        ]
    )


class Selector:
    """Chooses the chunks each pruned sequence reads, layer by layer."""

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self.refreshes = 0  # sequences whose selection was recomputed from scratch this step
        # Keys whose exact logit the selection computed this step (per KV head, summed over
        # sequences and layers); None for selectors that never read keys to choose.
        self.scored_keys: float | None = None

    @property
    def chunk_size(self) -> int:
        """Tokens per selected chunk."""
        return self.geometry.chunk

    def prunes(self, ctx: int) -> bool:
        """Whether a decode with `ctx` cached keys is pruned (else it runs dense)."""
        return self.geometry.prunes(ctx)

    def prepare(self, meta: AttentionMetadata, plan: StepPlan) -> None:
        """Per-step bookkeeping, once, before the first sparse layer attends."""

    def after_store(self, layer: int, k_cache: torch.Tensor, plan: StepPlan) -> None:
        """Called in every sparse layer after this step's K/V are stored."""

    def observe_prompt(
        self,
        layer: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], the whole step's queries
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> None:
        """Called in every sparse layer, after the store, in a step where some sequence ends
        its prefill (meta.prefill_ends)."""

    def select(
        self,
        layer: int,
        q: torch.Tensor,  # [num_rows, num_heads, head_dim], the pruned sequences' rows
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        plan: StepPlan,
    ) -> torch.Tensor:  # [num_pruned, num_kv_heads, max_chunks] int64, -1 padded
        """Chunks to read for each pruned sequence and KV head."""
        raise NotImplementedError

    def forget(self, seq_id: int) -> None:
        """Drop a finished sequence's state."""

    def positions_served(self, seq_id: int, ctx: int) -> int | None:
        """Positions from `ctx` on that read the selection a step with ctx cached keys uses
        (see the module function); None for a selector that chooses at every step."""
        return None

    def prefill_tail(self) -> int:
        """Prompt tokens whose queries observe_prompt reads at the prefill's end (0: none)."""
        return 0


@dataclass
class _Reused:
    """One sequence's selection, reused between refreshes (HiP masks, block top-k pages)."""

    ctx: int  # cached keys when the selection was made: the position it was made at
    region_end: int  # the searched region ended here (chunks); the window covers the rest
    chunks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H, K] int64


def positions_served(seqs: dict[int, _Reused], seq_id: int, ctx: int, interval: int) -> int:
    """Positions from `ctx` on (the root of a step with ctx cached keys) that read the
    selection this step uses: a selection made at position c serves c .. c + interval - 1,
    and a step at or past the end (or before c: preempted and recomputed, rolled back)
    chooses anew, serving `interval` positions from its own. Refreshes go by position
    rather than by step so that a verification tree, kept within them, makes its choices
    where decoding one token a step would (see SparseAttentionDecoder.draft_depth_limit)."""
    st = seqs.get(seq_id)
    if st is None or _refresh_due(st, ctx, interval):
        return interval
    return st.ctx + interval - ctx


def _refresh_due(st: _Reused | None, ctx: int, interval: int) -> bool:
    """Whether a step at `ctx` chooses anew (see positions_served). Before the selection's
    own position (preempted and recomputed, or rolled back), its chunks may no longer be
    cached."""
    return st is None or ctx < st.ctx or ctx - st.ctx >= interval


def plan_refreshes(
    seqs: dict[int, _Reused],
    sp: SubBatch,
    geometry: Geometry,
    interval: int,
    force: frozenset[int] = frozenset(),
) -> tuple[list[int], list[list[int]]]:
    """(positions in sp whose selection is made anew this step, every pruned sequence's
    fixed chunks); starts a fresh _Reused for each refreshing sequence. Sequences in
    `force` (seq ids) refresh whatever their selection's age."""
    g = geometry
    refresh: list[int] = []
    fixed: list[list[int]] = []
    for i, (sid, ctx) in enumerate(zip(sp.seq_ids, sp.ctx, strict=True)):
        st = seqs.get(sid)
        if _refresh_due(st, ctx, interval) or sid in force:
            st = _Reused(ctx=ctx, region_end=g.window_start(ctx))
            seqs[sid] = st
            refresh.append(i)
        assert st is not None
        # Between refreshes the window stretches back to where the searched region ended,
        # so the tokens decoded since are never skipped (at most N - 1 extra).
        fixed.append(g.fixed_chunks(ctx, min(g.window_start(ctx), st.region_end)))
    return refresh, fixed


def reused_plus_fixed(
    seqs: dict[int, _Reused],
    sp: SubBatch,
    layer: int,
    refresh: list[int],
    found: torch.Tensor | None,  # [len(refresh), H, K] this layer's new selections
    fixed: torch.Tensor,  # [num_pruned, W] sink + window chunks
) -> torch.Tensor:  # [num_pruned, H, K + W] int64, -1 padded
    """Keep the refreshing sequences' new selections, then every pruned sequence's
    selection (new or reused) followed by its fixed chunks."""
    if found is not None:
        for j, i in enumerate(refresh):
            seqs[sp.seq_ids[i]].chunks[layer] = found[j]
    if found is not None and len(refresh) == sp.size:
        chosen = found
    else:
        # Selections made at different steps may differ in width (budget_fraction).
        chosen = stack_padded([seqs[sid].chunks[layer] for sid in sp.seq_ids])
    n, heads = chosen.shape[0], chosen.shape[1]
    return torch.cat([chosen, fixed.unsqueeze(1).expand(n, heads, fixed.shape[1])], -1)


class CombinedChunks:
    """Each sparse layer's finished chunk lists (reused_plus_fixed's output), kept while
    neither part changes: between refreshes the same sequences read the same selection,
    and their fixed chunks move only when the window enters a new chunk (every `chunk`
    decoded tokens). Rebuilding the lists (stack, pad, cat) cost ~25 us a layer, ~0.7 ms
    of a ~16 ms block top-k step at 8k on 2 CPU cores with refresh_interval 8."""

    def __init__(self) -> None:
        self.key: tuple[tuple[int, ...], tuple[tuple[int, ...], ...]] | None = None
        self.by_layer: dict[int, torch.Tensor] = {}  # [num_pruned, H, S] int64 each

    def new_step(self, seq_ids: list[int], fixed: list[list[int]], refresh: list[int]) -> None:
        """Forget the lists unless this step's sequences, fixed chunks and selections (no
        refresh) are the last step's."""
        key = (tuple(seq_ids), tuple(tuple(f) for f in fixed))
        if refresh or key != self.key:
            self.by_layer = {}
        self.key = key


# ----------------------------------------------------------------------------- HiP


@dataclass
class _HipStep:
    """This step's refresh set and fixed chunks."""

    refresh: list[int]  # positions in plan.sparse whose masks are recomputed
    rows: torch.Tensor | None  # [R] the root row of each refreshing sequence; None = all rows
    query_start_loc: torch.Tensor  # [len(refresh) + 1] int32
    block_tables: torch.Tensor  # [len(refresh), max_blocks] int32
    region_start: torch.Tensor  # [len(refresh)] int64
    region_end: torch.Tensor  # [len(refresh)] int64
    fixed: torch.Tensor  # [num_pruned, W] int64 sink + window chunks


def _roots(
    sp: SubBatch, index: list[int]
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(rows of sp's q, query_start_loc, block_tables) of sequences `index` of sp, one row
    each: the first of its new tokens (a verification tree's root), the query a one-token
    step would have made its choice with. (A tree's mean query chose other chunks, so that a
    drafting decoder changed the answers of sparse attention, and with the tree sizes, which
    follow the load, made them depend on the other requests.)"""
    if index == list(range(sp.size)) and all(n == 1 for n in sp.num_q):
        return None, sp.query_start_loc, sp.block_tables
    offsets = [0]
    for n in sp.num_q:
        offsets.append(offsets[-1] + n)
    rows = [offsets[i] for i in index]
    qsl = list(range(len(index) + 1))
    dev = sp.seq_lens.device
    idx = torch.tensor(index, dtype=torch.long, device=dev)
    return (
        torch.tensor(rows, dtype=torch.long, device=dev),
        torch.tensor(qsl, dtype=torch.int32, device=dev),
        sp.block_tables.index_select(0, idx),
    )


class HipSelector(Selector):
    """HiP: hierarchical mask search, masks reused for `refresh_interval` decode steps."""

    def __init__(self, geometry: Geometry, refresh_interval: int) -> None:
        super().__init__(geometry)
        self.refresh_interval = refresh_interval
        self.seqs: dict[int, _Reused] = {}
        self.combined = CombinedChunks()

    def prepare(self, meta: AttentionMetadata, plan: StepPlan) -> None:
        """Decide which pruned sequences refresh their masks; build the fixed chunks."""
        self.refreshes = 0
        sp = plan.sparse
        if sp is None:
            return
        g = self.geometry
        refresh, fixed = plan_refreshes(self.seqs, sp, g, self.refresh_interval)
        self.refreshes = len(refresh)
        self.combined.new_step(sp.seq_ids, fixed, refresh)
        rows, qsl, tables = _roots(sp, refresh)
        dev = sp.seq_lens.device
        plan.extra["hip"] = _HipStep(
            refresh=refresh,
            rows=rows,
            query_start_loc=qsl,
            block_tables=tables,
            region_start=torch.full((len(refresh),), g.sink_chunks, dtype=torch.long, device=dev),
            region_end=torch.tensor(
                [self.seqs[sp.seq_ids[i]].region_end for i in refresh], dtype=torch.long, device=dev
            ),
            fixed=_pad(fixed, dev),
        )

    def select(
        self,
        layer: int,
        q: torch.Tensor,  # [num_rows, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        plan: StepPlan,
    ) -> torch.Tensor:  # [num_pruned, num_kv_heads, max_chunks] int64
        """Cached masks (searched anew for the refreshing sequences) + sink + window."""
        sp = plan.sparse
        assert sp is not None
        step: _HipStep = plan.extra["hip"]
        cached = self.combined.by_layer.get(layer)
        if cached is not None:
            return cached
        g = self.geometry
        found: torch.Tensor | None = None
        if step.refresh:
            qr = q if step.rows is None else q.index_select(0, step.rows)
            found = hip_mask(
                qr,
                k_cache,
                step.block_tables,
                step.query_start_loc,
                step.region_start,
                step.region_end,
                g.top_k,
                g.chunk,
            )  # [R, H, K]
        chunks = reused_plus_fixed(self.seqs, sp, layer, step.refresh, found, step.fixed)
        self.combined.by_layer[layer] = chunks
        return chunks

    def forget(self, seq_id: int) -> None:
        """Drop the sequence's masks."""
        self.seqs.pop(seq_id, None)

    def positions_served(self, seq_id: int, ctx: int) -> int | None:
        """See Selector.positions_served."""
        return positions_served(self.seqs, seq_id, ctx, self.refresh_interval)


# ----------------------------------------------------------------------------- block top-k

# Prompt pages: a key's vote also counts for the next _SPREAD - 1 keys (see _prompt_pages).
_SPREAD = 8


@dataclass
class _TopkStep:
    """This step's refresh set, dirty pages and the pruned sequences' fixed pages."""

    pages: torch.Tensor  # [num_dirty] int64 physical pages whose summary is recomputed
    counts: torch.Tensor  # [num_dirty] int64 filled slots of each
    fixed: torch.Tensor | None  # [num_pruned, W] int64 sink + window pages
    refresh: list[int] = field(default_factory=list)  # positions in plan.sparse choosing anew
    seq_ids: list[int] = field(default_factory=list)  # their sequence ids
    rows: torch.Tensor | None = None  # [R] the root row of each refreshing sequence in q
    tables: torch.Tensor | None = None  # [R, max_blocks] int32 block tables of `refresh`
    num_scored: int = 0  # pages scored per refreshing sequence: max region end
    top_k: int = 0  # pages selected per refreshing sequence (the largest, with budget_fraction)
    # Per refreshing sequence: its searched region ends here (pages), and its budget.
    region_ends: list[int] = field(default_factory=list)
    top_ks: list[int] = field(default_factory=list)


class BlockTopkSelector(Selector):
    """Block top-k over KV pages, with per-page key summaries kept per layer."""

    def __init__(
        self,
        geometry: Geometry,
        num_kv_blocks: int,
        group_pooling: str = "mean",
        page_scoring: str = "mean",
        rerank_factor: int = 0,
        refresh_interval: int = 1,
        prompt_pages: int = 0,
        observation_window: int = 32,
        answer_votes: int = 0,
    ) -> None:
        super().__init__(geometry)
        self.num_kv_blocks = num_kv_blocks
        # "mean": Kinetics' score, (mean of the group's queries) . page mean key. "max": each
        # query head scores the page and the group keeps the best, so a page that one head
        # needs (a copied fact) is not outvoted by the group's other heads.
        self.group_pooling = group_pooling
        # "mean": the page's mean key (Kinetics), i.e. its mean logit. "bounds": Quest's
        # upper bound from per-channel min/max keys, i.e. (at most) its best logit: one
        # matching key among 16 no longer drowns in the page average.
        self.page_scoring = page_scoring
        # > 0: the page score only shortlists rerank_factor * top_k pages; the top_k kept are
        # those whose best key logit (exact, any query head of the group) is highest. Page
        # summaries dilute the one key a copy step needs (a digit among 16 tokens); reading
        # the shortlist's keys costs rerank_factor times the selected pages' K.
        self.rerank_factor = rerank_factor
        self.scored_keys = 0.0 if rerank_factor > 0 else None
        # 1 (Kinetics, Quest): pages chosen every decode step. N > 1: a sequence's pages are
        # reused for N steps, as HiP reuses its masks; the window stretches back to where the
        # scored region ended, so no key decoded since is skipped. Choosing (scores, top-k,
        # rerank) was 40-60% of the sparse path's per-layer cost at 8k on 2 CPU cores.
        self.refresh_interval = refresh_interval
        # > 0: that many of the budget's pages per KV head are fixed at the end of the
        # prefill by the attention of the prompt's last `observation_window` queries
        # (SnapKV); a closing question ("what is the number?") points at what the answer
        # copies, which a page's mean key at decode time often misses.
        self.prompt_pages = prompt_pages
        self.observation_window = observation_window
        # > 0: the queries of the sequence's first `answer_votes` decoded tokens vote too,
        # and the pins are chosen again after them. An answer restates what it looks for
        # ("The secret number is") before it copies it, and those queries find the
        # passage where a prompt that asks first and ends on the text gives the prompt's
        # closing queries nothing to look for.
        self.answer_votes = answer_votes
        # seq_id -> layer -> [H, pages] the prompt's votes per page (kept for answer_votes)
        self.prompt_votes: dict[int, dict[int, torch.Tensor]] = {}
        # seq_id -> layer -> [(position, [num_heads, D] query)] of the decoded tokens so far
        self.answer_queries: dict[int, dict[int, list[tuple[int, torch.Tensor]]]] = {}
        # seq_id -> pruned decode steps so far (while answer_votes are being collected)
        self.decoded: dict[int, int] = {}
        self.prompt_len: dict[int, int] = {}  # seq_id -> its first decode's context
        self.scale = 1.0  # the attention scale (observe_prompt's)
        # seq_id -> layer -> [H, P] int64 logical pages, sorted, all in the scored region
        # below the window the sequence's first decode has (so never a sink or window page).
        self.pinned: dict[int, dict[int, torch.Tensor]] = {}
        self.seqs: dict[int, _Reused] = {}
        self.combined = CombinedChunks()
        # layer -> [H, num_kv_blocks, D] fp32 mean keys, or [H, num_kv_blocks, 2 D] =
        # (high | low), so that one gather and one batched product score a page (see
        # _page_scores). Head-major and fp32 because the scoring then needs no permute or
        # cast of the gathered rows: 81 vs 146 us for 500 pages (means, 2 cores). Memory:
        # 1/16 (means) or 1/8 (bounds) of a bf16 KV cache's bytes.
        self.summaries: dict[int, torch.Tensor] = {}
        # seq_id -> (pages below this one are summarised, the physical pages they were
        # summarised at): kept only for sequences that have been pruned (see prepare).
        self.summarised: dict[int, tuple[int, torch.Tensor]] = {}

    def prepare(self, meta: AttentionMetadata, plan: StepPlan) -> None:
        """Which pruned sequences choose pages anew, the pages whose summaries they need
        refreshed, and per-step tensors.

        Summaries are kept lazily: only sequences choosing pages this step update theirs, so
        short (dense) decodes and steps that reuse a selection pay nothing (measured at 256
        tokens of context, eager upkeep cost 9% of decode speed). And only pages that can be
        scored are summarised: those wholly below the window, which are full and final (keys
        below the context are never rewritten; tree verification compacts accepted KV at
        and above it). The prompt's pages are summarised when its prefill ends, if its first
        decode will be pruned: done by that decode instead, they cost it ~50 ms at 8k (30
        layers, 2 CPU cores), 2x a decode step. Later choices summarise the pages that left
        the window since: one page every 16 decoded tokens, not the page being written at
        every step (~1.7 ms per step at 30 layers on 2 CPU cores).
        """
        self.refreshes = 0
        sp = plan.sparse
        if sp is None:
            plan.extra["topk"] = _TopkStep(*self._dirty_pages(meta, self._prompts(meta)), None)
            return
        g = self.geometry
        self._count_answer_steps(sp)
        # New pins this step: the rest of the budget is chosen anew too.
        repin = frozenset(sid for sid in sp.seq_ids if self._repins(sid))
        refresh, fixed = plan_refreshes(self.seqs, sp, g, self.refresh_interval, repin)
        self.refreshes = len(refresh)
        self.combined.new_step(sp.seq_ids, fixed, refresh)
        dev = meta.block_tables.device
        choosing = [(sp.index[i], sp.ctx[i]) for i in refresh]
        prompts = self._prompts(meta, {b for b, _ in choosing})
        step = _TopkStep(*self._dirty_pages(meta, choosing + prompts), _pad(fixed, dev))
        step.refresh = refresh
        step.seq_ids = [sp.seq_ids[i] for i in refresh]
        plan.extra["topk"] = step
        if not refresh:
            return
        # Per step, not per layer: ~30 layers share these.
        step.rows, _, step.tables = _roots(sp, refresh)
        ends = [self.seqs[sp.seq_ids[i]].region_end for i in refresh]
        step.region_ends = ends
        step.num_scored = max(ends)
        # Pinned prompt pages are part of the budget: the per-step choice takes the rest.
        step.top_ks = [
            max(1, g.top_k_at(sp.ctx[i]) - self._pinned_count(sp.seq_ids[i])) for i in refresh
        ]
        step.top_k = max(step.top_ks)

    def _count_answer_steps(self, sp: SubBatch) -> None:
        """Count the decode steps of sequences still collecting answer votes."""
        if not self.answer_votes:
            return
        for sid in sp.seq_ids:
            if sid in self.prompt_votes:
                self.decoded[sid] = self.decoded.get(sid, 0) + 1
                if self.decoded[sid] > self.answer_votes:  # pinned anew last step
                    del self.prompt_votes[sid], self.decoded[sid]
                    self.answer_queries.pop(sid, None)

    def _collects(self, seq_id: int) -> bool:
        """Whether this step's query of the sequence is an answer vote: decode steps 1..N
        (the first decodes the first answer token; the prompt's last query voted already)."""
        return seq_id in self.prompt_votes and self.decoded.get(seq_id, 0) >= 1

    def _repins(self, seq_id: int) -> bool:
        """Whether the sequence's pins are chosen again this step (its last answer vote)."""
        return seq_id in self.prompt_votes and self.decoded.get(seq_id, 0) == self.answer_votes

    def _pinned_count(self, seq_id: int) -> int:
        """Pages per KV head pinned for the sequence (the same in every layer), or 0."""
        layers = self.pinned.get(seq_id)
        return next(iter(layers.values())).shape[-1] if layers else 0

    def _prompts(
        self, meta: AttentionMetadata, skip: set[int] | frozenset[int] = frozenset()
    ) -> list[tuple[int, int]]:
        """(batch index, first decode's context) of the sequences whose prefill ends this step
        and whose first decode will be pruned (those in `skip` aside)."""
        return [
            (b, meta.seq_lens_list[b])
            for b, ends in enumerate(meta.prefill_ends)
            if ends and b not in skip and self.prunes(meta.seq_lens_list[b])
        ]

    def _dirty_pages(
        self, meta: AttentionMetadata, sequences: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # ([num_dirty] int64 pages, [num_dirty] counts)
        """Physical pages whose summaries `sequences` ((batch index in meta, the context of
        the decode that chooses) each) need updated."""
        page = self.geometry.chunk
        flat: list[int] = []
        width = meta.block_tables.shape[1]
        for b, ctx in sequences:
            end = self.geometry.window_start(ctx)  # pages below it are full and final
            sid = meta.seq_ids[b] if meta.seq_ids else b
            table = meta.block_tables[b, :end]
            first, seen = self.summarised.get(sid, (0, table[:0]))
            # min: a context that shrank (recomputed, rolled back) may rewrite pages above.
            first = min(first, end)
            # Pages summarised before may have moved (preemption frees and reallocates
            # them): then start over from the first page.
            if first and not torch.equal(seen[:first], table[:first]):
                first = 0
            self.summarised[sid] = (end, table.clone())
            flat.extend(b * width + p for p in range(first, end))
        counts = [page] * len(flat)
        dev = meta.block_tables.device
        idx = torch.tensor(flat, dtype=torch.long, device=dev)
        pages = meta.block_tables.reshape(-1).index_select(0, idx).long()
        return pages, torch.tensor(counts, dtype=torch.long, device=dev)

    def after_store(self, layer: int, k_cache: torch.Tensor, plan: StepPlan) -> None:
        """Summarise the pages the choosing sequences need (see prepare)."""
        summary = self.summaries.get(layer)
        head_dim = k_cache.shape[3]
        if summary is None:
            width = head_dim if self.page_scoring == "mean" else 2 * head_dim
            shape = (k_cache.shape[2], self.num_kv_blocks, width)
            summary = torch.zeros(shape, dtype=torch.float32, device=k_cache.device)
            self.summaries[layer] = summary
        step: _TopkStep = plan.extra["topk"]
        if not step.pages.numel():
            return
        summary = summary.transpose(0, 1)  # [num_kv_blocks, H, W], as the kernels write it
        if self.page_scoring == "mean":
            page_mean_keys(k_cache, summary, step.pages, step.counts)
        else:
            high, low = summary[..., :head_dim], summary[..., head_dim:]
            page_key_bounds(k_cache, low, high, step.pages, step.counts)

    def select(
        self,
        layer: int,
        q: torch.Tensor,  # [num_rows, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        plan: StepPlan,
    ) -> torch.Tensor:  # [num_pruned, num_kv_heads, max_chunks] int64
        """Top-k pages (chosen anew for the refreshing sequences, else reused), plus sink and
        window pages."""
        sp = plan.sparse
        assert sp is not None
        step: _TopkStep = plan.extra["topk"]
        assert step.fixed is not None
        if self.prompt_votes:  # some sequence still collects answer votes
            self._answer_votes(layer, q, k_cache, sp)
        cached = self.combined.by_layer.get(layer)
        if cached is not None:
            return cached
        found: torch.Tensor | None = None
        if step.refresh:
            q_r = q if step.rows is None else q.index_select(0, step.rows)
            found = self._choose(layer, q_r, k_cache, step)  # [R, H, P + k]
        chunks = reused_plus_fixed(self.seqs, sp, layer, step.refresh, found, step.fixed)
        self.combined.by_layer[layer] = chunks
        return chunks

    def _choose(
        self,
        layer: int,
        q: torch.Tensor,  # [R, num_heads, head_dim], each refreshing sequence's root row
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        step: _TopkStep,
    ) -> torch.Tensor:  # [R, num_kv_heads, P + top_k] int64 logical pages, -1 padded
        """The refreshing sequences' pinned pages, then the top-k pages by the page score
        (optionally reranked by exact key logits), less those pinned: every page is listed
        once, as the attention kernels need, and the read stays within the budget. (Choosing
        among the unpinned pages only spends the whole budget instead: at 8k it read 0.136
        of the KV rather than 0.116, and decoded no faster.)"""
        assert step.tables is not None
        heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        n = len(step.refresh)
        qh = q.float().view(n, heads, -1, head_dim)  # [n, H, G, D]
        # Kinetics scores with the group's mean query (G = 1 then)
        qm = qh.mean(2, keepdim=True) if self.group_pooling == "mean" else qh
        if self.page_scoring == "bounds":
            # sum_d max(q_d low_d, q_d high_d) = q+ . high + q- . low: positive query
            # channels pair with the highest key value, negative ones with the lowest.
            qm = torch.cat([qm.clamp(min=0), qm.clamp(max=0)], -1)  # [n, H, G, 2 D]
        shortlist = min(self.rerank_factor * step.top_k, step.num_scored)
        rerank = None
        if shortlist > step.top_k:  # else every scored page is kept anyway
            rerank = Rerank(qh, k_cache, shortlist)
            assert self.scored_keys is not None
            self.scored_keys += n * shortlist * self.geometry.chunk
        return select_top_pages(
            qm,
            self.summaries[layer],
            step.tables,
            step.region_ends,
            self.geometry.sink_chunks,
            step.top_ks,
            rerank,
            self._pins(layer, step.seq_ids),
        )

    def _pins(self, layer: int, seq_ids: list[int]) -> torch.Tensor | None:
        """[R, H, P] int64 the sequences' pinned pages in this layer, -1 padded (a sequence
        without pins: a row of -1); None when none of them has pins."""
        pins = [self.pinned.get(sid, {}).get(layer) for sid in seq_ids]
        if len(pins) == 1:  # one sequence refreshing: the common case, no copy
            return None if pins[0] is None else pins[0].unsqueeze(0)
        some = next((p for p in pins if p is not None), None)
        if some is None or not any(p.shape[-1] for p in pins if p is not None):
            return None
        return stack_padded([some[:, :0] if p is None else p for p in pins])

    def _answer_votes(
        self,
        layer: int,
        q: torch.Tensor,  # [num_rows, num_heads, head_dim], the pruned sequences' rows
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        sp: SubBatch,
    ) -> None:
        """Keep the collecting sequences' queries (a tree's root row: the token decoded
        last); at a sequence's last vote, pin the pages its prompt and answer votes favour."""
        row = 0
        for i, sid in enumerate(sp.seq_ids):
            if self._collects(sid):
                votes = self.answer_queries.setdefault(sid, {}).setdefault(layer, [])
                votes.append((sp.ctx[i], q[row].float().clone()))
                if self._repins(sid):
                    prompt = self.prompt_votes[sid][layer]  # [H, prompt pages]
                    positions = [p for p, _ in votes]
                    qs = torch.stack([v for _, v in votes])  # [N, num_heads, D]
                    mass = self._page_votes(
                        qs, k_cache, sp.block_tables[i], sp.ctx[i] + 1, positions, self.scale
                    )
                    self.pinned[sid][layer] = self._split_pins(
                        prompt,
                        mass[:, : prompt.shape[1]],
                        self.prompt_len[sid],
                        self.pinned[sid][layer].shape[1],
                    )
                    del self.answer_queries[sid][layer]
            row += sp.num_q[i]

    def observe_prompt(
        self,
        layer: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> None:
        """Pin the prompt pages of the sequences whose prefill ends this step."""
        if not self.prompt_pages:
            return
        starts = meta.query_start_loc_list
        for b, ends in enumerate(meta.prefill_ends):
            if not ends:
                continue
            sid = meta.seq_ids[b] if meta.seq_ids else b
            if layer in self.pinned.get(sid, {}):
                # Preempted and recomputed: its prompt is the one pinned before, and new pins
                # (from the end of prompt + output) would make its answer another's.
                continue
            # The final chunk holds the whole window when the prompt does (prefill_tail).
            w = min(self.observation_window, starts[b + 1] - starts[b])
            seq_len = meta.seq_lens_list[b]
            self.scale = scale
            self.prompt_len.setdefault(sid, seq_len)
            mass = self._page_votes(
                q[starts[b + 1] - w : starts[b + 1]],
                k_cache,
                meta.block_tables[b],
                seq_len,
                list(range(seq_len - w, seq_len)),
                scale,
            )
            pages = self._top_pins(mass, seq_len)
            if pages is None:
                self.pinned.pop(sid, None)
                self.prompt_votes.pop(sid, None)
            else:
                self.pinned.setdefault(sid, {})[layer] = pages
                if self.answer_votes:
                    self.prompt_votes.setdefault(sid, {})[layer] = mass
                    self.decoded[sid] = 0

    def _page_votes(
        self,
        q_obs: torch.Tensor,  # [w, num_heads, head_dim] the voting queries
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        table: torch.Tensor,  # [>= pages of seq_len] int32 the sequence's block table
        seq_len: int,  # keys cached
        positions: list[int],  # [w] each query's position (it sees the keys up to it)
        scale: float,
    ) -> torch.Tensor:  # [num_kv_heads, pages of seq_len] fp32 votes per page
        """SnapKV's votes per KV head (kernels/page_votes.py): the attention each page
        receives, summed over the voting queries and the group's heads. What the answer
        copies follows what the question looks at ("the secret number is" -> its digits),
        often on the next page: each key also scores as the best key of the _SPREAD before
        it (SnapKV max-pools its votes over neighbours for the same reason)."""
        pos = torch.tensor(positions, dtype=torch.int64)
        return page_votes(q_obs, k_cache, table, seq_len, pos, scale, _SPREAD)

    def _split_pins(
        self,
        prompt: torch.Tensor,  # [H, pages] the prompt's votes
        answer: torch.Tensor,  # [H, pages] the answer's votes
        seq_len: int,  # prompt tokens cached (the first decode's context)
        count: int,  # P, the pins the prefill chose
    ) -> torch.Tensor:  # [num_kv_heads, P] int64 sorted logical pages
        """P pins per KV head: the prompt's best P - P // 2, then the answer's best of the
        rest. A sum of the two groups' votes (or of their shares) let the first answer
        query's votes reorder what the prompt's votes found: a needle's digits fell out of 7
        more layer-heads of 87 at 2k, and the reply lost them."""
        keep = self._top_pins(prompt, seq_len, count - count // 2)
        assert keep is not None  # count - count // 2 >= 1 pages fit where count did
        taken = torch.zeros_like(answer, dtype=torch.bool).scatter_(1, keep, True)
        rest = self._top_pins(answer.masked_fill(taken, -1.0), seq_len, count // 2)
        if rest is None:
            return keep
        return torch.cat([keep, rest], 1).sort(-1).values

    def _top_pins(
        self,
        mass: torch.Tensor,  # [num_kv_heads, >= region pages] votes per page
        seq_len: int,  # prompt tokens cached (the first decode's context)
        limit: int | None = None,  # at most this many (else prompt_pages)
    ) -> torch.Tensor | None:  # [num_kv_heads, P] int64 sorted logical pages, or None
        """The P pages with the most votes per KV head, in the scored region (between the
        sink and the first decode's window)."""
        g = self.geometry
        region_end = g.window_start(seq_len)
        wanted = self.prompt_pages if limit is None else limit
        count = min(wanted, region_end - g.sink_chunks, g.top_k_at(seq_len))
        if count <= 0:
            return None
        best = mass[:, g.sink_chunks : region_end].topk(count, -1).indices + g.sink_chunks
        return best.sort(-1).values

    def forget(self, seq_id: int) -> None:
        """Drop the sequence's selection and page bookkeeping."""
        self.seqs.pop(seq_id, None)
        self.summarised.pop(seq_id, None)
        self.pinned.pop(seq_id, None)
        self.prompt_votes.pop(seq_id, None)
        self.answer_queries.pop(seq_id, None)
        self.decoded.pop(seq_id, None)
        self.prompt_len.pop(seq_id, None)

    def positions_served(self, seq_id: int, ctx: int) -> int | None:
        """See Selector.positions_served. (With answer_votes the pins are chosen again at
        the N-th decode step, which a verification tree does not keep to.)"""
        return positions_served(self.seqs, seq_id, ctx, self.refresh_interval)

    def prefill_tail(self) -> int:
        """The observation window, with prompt pins (see observe_prompt)."""
        return self.observation_window if self.prompt_pages else 0
