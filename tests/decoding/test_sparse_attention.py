"""The sparse-attention decoder: options, block selection vs dense top-k, engine behaviour
(degenerate equivalence, real pruning, HiP mask refresh, composition with token recycling)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slipstream.config import DecoderSpec
from slipstream.decoding.base import DecoderContext
from slipstream.decoding.registry import decoder_options
from slipstream.decoding.sparse.plan import build_plan
from slipstream.decoding.sparse.selectors import Geometry, Selector
from slipstream.decoding.sparse_attention import (
    SparseAttentionDecoder,
    SparseAttentionOptions,
    _Shared,
)
from slipstream.engine.attention import AttentionMetadata
from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampling_params import SamplingParams
from slipstream.kernels.cpu.paged_decode_attention import decode_attention_unavailable_reason
from slipstream.testing.contexts import decoder_context
from slipstream.testing.engines import run_to_completion, tiny_engine_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Long enough (with block_size 4) that a small budget prunes; tiny model allows 256 positions.
PROMPTS = [
    [(i * 37 + 11) % 400 + 3 for i in range(150)],
    [(i * 13 + 5) % 400 + 3 for i in range(90)],
]
SMALL = {"top_k": 16, "window": 8, "sink": 4, "dense_layers": 0}


def _ctx(
    num_blocks: int = 64, block_size: int = 4, kv_heads: int = 2, head_dim: int = 8
) -> DecoderContext:
    return decoder_context(
        num_kv_blocks=num_blocks, block_size=block_size, num_kv_heads=kv_heads, head_dim=head_dim
    )


def _selector(ctx: DecoderContext, **options: Any) -> Any:
    """The selector a sparse_attention decoder builds from these options."""
    return SparseAttentionDecoder(SparseAttentionOptions(**options), ctx).shared.selector


def _engine(
    model_dir: str, decoder: str = "standard", options: dict[str, Any] | None = None
) -> LLMEngine:
    return LLMEngine(
        tiny_engine_config(
            model_dir, decoder=decoder, decoder_options=options, block_size=4, num_blocks=512
        )
    )


def _tokens(engine: LLMEngine) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in run_to_completion(engine, PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def standard_tokens(tiny_model_dir: str) -> list[list[int]]:
    return _tokens(_engine(tiny_model_dir))


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="method"):
        decoder_options(DecoderSpec("sparse_attention", {"method": "quest"}))
    with pytest.raises(ValueError, match="not both"):
        decoder_options(DecoderSpec("sparse_attention", {"top_k": 64, "top_k_pages": 4}))
    with pytest.raises(ValueError, match="unknown option"):
        decoder_options(DecoderSpec("sparse_attention", {"budget": 3}))
    with pytest.raises(ValueError, match="group_pooling"):
        decoder_options(DecoderSpec("sparse_attention", {"group_pooling": "median"}))
    with pytest.raises(ValueError, match="rerank_factor"):
        decoder_options(DecoderSpec("sparse_attention", {"rerank_factor": -1}))
    with pytest.raises(ValueError, match="page_scoring"):
        decoder_options(DecoderSpec("sparse_attention", {"page_scoring": "min"}))
    opts = decoder_options(
        DecoderSpec("sparse_attention", {"method": "block_topk", "top_k_pages": 8})
    )
    assert isinstance(opts, SparseAttentionOptions) and opts.top_k_pages == 8


def test_default_config_prunes_at_needle_lengths() -> None:
    """The defaults must prune a 1k-token decode on the default model's geometry."""
    ctx = decoder_context(
        dtype=torch.bfloat16,
        num_layers=30,
        max_model_len=8192,
        num_kv_blocks=600,
        block_size=16,
        num_kv_heads=3,
        head_dim=64,
    )
    for method in ("hip", "block_topk"):
        dec = SparseAttentionDecoder(SparseAttentionOptions(method=method), ctx)
        assert dec.shared.selector.prunes(1000)
        g = dec.shared.selector.geometry
        budget = g.sink_chunks * g.chunk + g.top_k * g.chunk + g.window + g.chunk
        assert budget <= 1024 // 2, (method, budget)
    # The default configuration: what a sparse layer reads at 1k-8k cached keys, and the
    # model's read with its dense layer 0 counted, at most a quarter of the context.
    dec = SparseAttentionDecoder(SparseAttentionOptions(), ctx)
    g = dec.shared.selector.geometry
    assert dec.dense_layers == 1
    for context in (1024, 2048, 4096, 8192):
        assert dec.shared.selector.prunes(context)
        # The window may straddle one more page than it fills.
        window = (-(-g.window // g.chunk) + 1) * g.chunk
        read = g.sink_chunks * g.chunk + g.top_k_at(context) * g.chunk + window + g.chunk
        model_read = (context * dec.dense_layers + read * (30 - dec.dense_layers)) / (30 * context)
        assert model_read <= 0.25, (context, read, model_read)
        assert read >= 0.15 * context or g.top_k_at(context) == 48, (context, read)


def test_default_configuration_fills_only_what_is_unset() -> None:
    """No method: block top-k with DEFAULT_CONFIGURATION's keys where the options leave them
    unset; a budget in any unit replaces its budget; a named method keeps its own defaults."""
    default = SparseAttentionOptions()
    assert (default.method, default.budget_fraction, default.top_k_pages) == (
        "block_topk",
        0.21,
        48,
    )
    assert (default.prompt_pages, default.refresh_interval, default.answer_votes) == (32, 8, 0)
    one_knob = SparseAttentionOptions(refresh_interval=1, prompt_pages=0)
    assert (one_knob.refresh_interval, one_knob.prompt_pages, one_knob.budget_fraction) == (
        1,
        0,
        0.21,
    )
    votes = SparseAttentionOptions(answer_votes=1)  # an option of the default's pins
    assert (votes.answer_votes, votes.prompt_pages, votes.refresh_interval) == (1, 32, 8)
    with pytest.raises(ValueError, match="prompt_pages"):
        SparseAttentionOptions(prompt_pages=0, answer_votes=2)
    tokens = SparseAttentionOptions(top_k=64)
    assert (tokens.top_k, tokens.top_k_pages, tokens.budget_fraction) == (64, None, None)
    assert tokens.prompt_pages == 32
    assert SparseAttentionOptions(budget_fraction=0.5).top_k_pages is None
    for method in ("hip", "block_topk"):
        named = SparseAttentionOptions(method=method)
        assert (
            named.prompt_pages,
            named.budget_fraction,
            named.refresh_interval,
            named.answer_votes,
        ) == (0, None, None, 0)
    with pytest.raises(ValueError, match="method"):
        SparseAttentionOptions(method="quest")


def _decode_meta(tables: torch.Tensor, lens: list[int]) -> AttentionMetadata:
    """One decode step (one new token each) of sequences 0..n-1 with `lens` tokens."""
    n = len(lens)
    return AttentionMetadata(
        torch.arange(n + 1, dtype=torch.int32),
        torch.tensor(lens, dtype=torch.int32),
        tables,
        torch.arange(n),
        None,
        n,
        max(lens),
        seq_ids=list(range(n)),
        query_start_loc_list=list(range(n + 1)),
        seq_lens_list=lens,
    )


def _select_batch(
    sel: Any, k_cache: torch.Tensor, tables: torch.Tensor, lens: list[int], q: torch.Tensor
) -> torch.Tensor:  # [num_seqs, H, S] chunk ids
    """One decode step of the sequences with `lens` tokens (the last one new), the
    selector's own bookkeeping included (as the engine calls it: prepare, after_store,
    select). q: [num_seqs, heads, D]."""
    meta = _decode_meta(tables, lens)
    plan = build_plan(meta, sel.prunes)
    sel.prepare(meta, plan)
    sel.after_store(0, k_cache, plan)  # a first pruned step summarises every page
    return sel.select(0, q, k_cache, plan)


def _select_pages(
    sel: Any, k_cache: torch.Tensor, table: torch.Tensor, seq_len: int, q: torch.Tensor
) -> torch.Tensor:  # [H, S] chunk ids
    """_select_batch for one sequence."""
    return _select_batch(sel, k_cache, table, [seq_len], q)[0]


@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize("page_scoring", ["mean", "bounds"])
@pytest.mark.parametrize("group_pooling", ["mean", "max"])
def test_block_topk_selection_equals_dense_top_k(
    group_pooling: str, page_scoring: str, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kinetics' score: mean over the page's keys and the GQA group of the logits ("max":
    the best head of the group instead); by linearity the decoder computes it from page
    mean keys. Quest's ("bounds"): sum over channels of max(q * min key, q * max key).
    Compare with scores computed from the full keys, through the C++ selection (where it
    builds) and PyTorch's (SLIPSTREAM_CPU_KERNELS=0)."""
    if kernels == "off":
        monkeypatch.setenv("SLIPSTREAM_CPU_KERNELS", "0")
    ctx = _ctx(num_blocks=40, block_size=4, kv_heads=2, head_dim=8)
    sel = _selector(
        ctx,
        method="block_topk",
        top_k_pages=3,
        sink=4,
        window=8,
        dense_layers=0,
        group_pooling=group_pooling,
        page_scoring=page_scoring,
    )
    k_cache = torch.randn(40, 4, 2, 8)
    seq_len = 61
    n_pages = -(-seq_len // 4)
    table = torch.randperm(40)[:n_pages].int().view(1, -1)
    q = torch.randn(1, 6, 8)  # 3 query heads per KV head
    chunks = _select_pages(sel, k_cache, table, seq_len, q)
    ctx_len = seq_len - 1
    window_start = (ctx_len - 8) // 4
    keys = k_cache[table[0].long()].reshape(-1, 2, 8)[: window_start * 4]  # [T, H, D]
    queries = q[0].view(2, 3, 8)  # [H, G, D]
    if group_pooling == "mean":
        queries = queries.mean(1, keepdim=True)
    if page_scoring == "mean":
        logits = torch.einsum("hgd,thd->hgt", queries, keys)  # [H, G, T]
        per_head = logits.view(2, -1, window_start, 4).mean(-1)  # [H, G, pages]
    else:
        paged = keys.view(window_start, 4, 2, 8)
        low, high = paged.amin(1), paged.amax(1)  # [pages, H, D]
        qd = queries.unsqueeze(2)  # [H, G, 1, D]
        per_head = torch.maximum(
            qd * low.transpose(0, 1).unsqueeze(1), qd * high.transpose(0, 1).unsqueeze(1)
        ).sum(-1)  # [H, G, pages]
    page_scores = per_head.amax(1)
    page_scores[:, :1] = float("-inf")  # the sink page is always read, not selected
    for h in range(2):
        want = set(torch.topk(page_scores[h], 3).indices.tolist())
        assert set(chunks[h, :3].tolist()) == want
        fixed = chunks[h, 3:].tolist()
        assert fixed == [0] + list(range(window_start, (ctx_len - 1) // 4 + 1))


def test_page_summaries_are_kept_only_for_pruned_sequences() -> None:
    """Dense steps summarise nothing; a sequence's first pruned step summarises the pages
    below its window, later ones the pages that left the window since; when its pages move
    (preempted and recomputed elsewhere) all of them again."""
    ctx = _ctx(num_blocks=40, block_size=4, kv_heads=2, head_dim=8)
    sel = _selector(ctx, method="block_topk", top_k_pages=2, sink=4, window=8, dense_layers=0)
    first_table = torch.arange(11, dtype=torch.int32).view(1, -1)
    moved_table = torch.arange(20, 31, dtype=torch.int32).view(1, -1)

    def summarised(table: torch.Tensor, seq_len: int, pruned: bool) -> list[int]:
        meta = _decode_meta(table, [seq_len])
        plan = build_plan(meta, sel.prunes if pruned else lambda c: False)
        sel.prepare(meta, plan)
        return plan.extra["topk"].pages.tolist()

    assert summarised(first_table, 30, pruned=False) == []
    # 40 cached keys, window 8: pages 0-7 lie below the window (full, final, scorable)
    assert summarised(first_table, 41, pruned=True) == list(range(8))
    assert summarised(first_table, 42, pruned=True) == []  # nothing left the window
    assert summarised(first_table, 45, pruned=True) == [8]  # page 8 did
    assert summarised(moved_table, 46, pruned=True) == list(range(20, 29))
    sel.forget(0)
    assert not sel.summarised


def _prefill_meta(table: torch.Tensor, start: int, seq_len: int, ends: bool) -> AttentionMetadata:
    """One prefill chunk of sequence 0: tokens start .. seq_len - 1."""
    n = seq_len - start
    return AttentionMetadata(
        torch.tensor([0, n], dtype=torch.int32),
        torch.tensor([seq_len], dtype=torch.int32),
        table,
        torch.arange(start, seq_len),
        None,
        n,
        seq_len,
        seq_ids=[0],
        query_start_loc_list=[0, n],
        seq_lens_list=[seq_len],
        prefill_ends=[ends],
    )


def test_a_prompt_is_summarised_when_its_prefill_ends() -> None:
    """The chunk that ends a prefill summarises the pages its first decode will score (if
    that decode is pruned), so the decode summarises nothing; earlier chunks and prompts
    that decode densely summarise nothing."""
    ctx = _ctx(num_blocks=40, block_size=4, kv_heads=2, head_dim=8)
    sel = _selector(ctx, method="block_topk", top_k_pages=2, sink=4, window=8, dense_layers=0)
    table = torch.arange(11, dtype=torch.int32).view(1, -1)

    def summarised(meta: AttentionMetadata) -> list[int]:
        plan = build_plan(meta, sel.prunes)
        sel.prepare(meta, plan)
        return plan.extra["topk"].pages.tolist()

    assert summarised(_prefill_meta(table, 0, 24, ends=False)) == []  # a first chunk
    # 41 prompt tokens: the first decode (41 cached keys, window 8) scores pages 0-7.
    assert summarised(_prefill_meta(table, 24, 41, ends=True)) == list(range(8))
    assert summarised(_decode_meta(table, [42])) == []  # the first decode: done already
    assert summarised(_decode_meta(table, [45])) == [8]  # page 8 left the window since
    sel.forget(0)
    assert summarised(_prefill_meta(table, 0, 12, ends=True)) == []  # 12 tokens: dense


def test_key_bounds_find_the_page_with_one_matching_key() -> None:
    """A page whose one key matches the query (a planted fact among 15 unrelated keys, whose
    mean cancels it) is found by Quest's bounds and missed by the mean key."""
    torch.manual_seed(0)
    ctx = _ctx(num_blocks=40, block_size=16, kv_heads=1, head_dim=16)
    q = torch.randn(1, 1, 16)
    k_cache = 0.3 * torch.randn(40, 16, 1, 16)
    needle_page = 5  # logical page; its slot 7 holds the matching key
    k_cache[needle_page, :, 0] -= 0.25 * q[0, 0]  # the rest of the page leans away from q
    k_cache[needle_page, 7, 0] = 2.0 * q[0, 0]
    table = torch.arange(40, dtype=torch.int32).view(1, -1)
    seq_len = 40 * 16
    found = {}
    for scoring in ("mean", "bounds"):
        sel = _selector(
            ctx,
            method="block_topk",
            top_k_pages=2,
            sink=16,
            window=32,
            dense_layers=0,
            page_scoring=scoring,
        )
        found[scoring] = needle_page in _select_pages(sel, k_cache, table, seq_len, q)[0, :2]
    assert found == {"mean": False, "bounds": True}


@pytest.mark.parametrize("dtype, dim", [(torch.float32, 16), (torch.bfloat16, 64)])
def test_rerank_keeps_the_shortlisted_pages_with_the_best_key(dtype: torch.dtype, dim: int) -> None:
    """rerank_factor: page means shortlist F * top_k pages, the best single key logit (any
    query head of the group) picks top_k of them. Distractor pages whose every key leans a
    little towards q beat the needle page on the mean; its one strong key wins the rerank.
    A bf16 cache with 64-wide heads takes the C++ rerank, float32 PyTorch's."""
    torch.manual_seed(1)
    ctx = _ctx(num_blocks=40, block_size=16, kv_heads=1, head_dim=dim)
    q = torch.randn(1, 2, dim)  # two query heads share the KV head
    k_cache = 0.3 * torch.randn(40, 16, 1, dim)
    k_cache[10:14, :, 0] += 0.3 * q[0, 1]  # distractors: high mean, no standout key
    needle_page = 25
    k_cache[needle_page, 7, 0] = 2.0 * q[0, 1]  # only query head 1 matches it
    k_cache = k_cache.to(dtype)
    table = torch.arange(40, dtype=torch.int32).view(1, -1)
    picked = {}
    for factor in (0, 4):
        sel = _selector(
            ctx,
            method="block_topk",
            top_k_pages=2,
            sink=16,
            window=32,
            dense_layers=0,
            group_pooling="max",
            rerank_factor=factor,
        )
        picked[factor] = set(_select_pages(sel, k_cache, table, 40 * 16, q)[0, :2].tolist())
    # Without reranking: the two best page means (the distractors). With it: the best
    # single key among the 8 best means, which is the needle's, plus the next best.
    keys = k_cache.float()
    means = keys[1:37, :, 0].mean(1) @ q[0].T  # [36 eligible pages, 2 heads]
    shortlist = (means.amax(1).topk(8).indices + 1).tolist()
    assert needle_page in shortlist and picked[0] <= {10, 11, 12, 13}
    best_key = torch.einsum("psd,gd->psg", keys[shortlist, :, 0], q[0]).flatten(1).amax(1)
    want = {shortlist[i] for i in best_key.topk(2).indices.tolist()}
    assert needle_page in want and picked[4] == want


def test_rerank_reports_the_keys_it_scored(tiny_model_dir: str) -> None:
    opts = {"method": "block_topk", **SMALL, "top_k": 8, "rerank_factor": 2}
    eng = _engine(tiny_model_dir, "sparse_attention", opts)
    out = _tokens(eng)
    assert all(len(t) == GREEDY.max_tokens for t in out)
    stats = eng.get_stats()["decoder"]
    # 2 x 8 tokens' keys scored (2 pages of 4 x 2) per layer of ~100-160 cached: 0.1-0.16.
    assert 0.05 < stats["sparse_rerank_k_fraction"] < 0.2
    assert stats["sparse_kv_read_fraction"] < 0.5


def test_budget_fraction_scales_the_selection_with_the_context() -> None:
    """budget_fraction f: sink + window + current page + selected pages = f x context,
    the selected pages capped by top_k_pages; in a batch each sequence gets its own."""
    ctx = _ctx(num_blocks=80, block_size=4, kv_heads=2, head_dim=8)
    sel = _selector(
        ctx,
        method="block_topk",
        sink=4,
        window=8,
        dense_layers=0,
        budget_fraction=0.5,
        top_k_pages=12,
    )
    g = sel.geometry
    # (c / 2 - sink page 4 - window 8 - current page 4) // 4, at least 1, at most 12
    assert [g.top_k_at(c) for c in (40, 60, 200)] == [1, 3, 12]
    assert not sel.prunes(12) and sel.prunes(60)
    k_cache = torch.randn(80, 4, 2, 8)
    tables = torch.arange(32, dtype=torch.int32).view(2, 16)
    # 40 and 60 cached keys + the new token
    chunks = _select_batch(sel, k_cache, tables, [41, 61], torch.randn(2, 4, 8))  # [2, H, S]
    width = 3  # the larger sequence's budget; the fixed chunks follow
    assert ((chunks[0, :, :width] >= 0).sum(-1) == 1).all()
    assert ((chunks[1, :, :width] >= 0).sum(-1) == 3).all()
    with pytest.raises(ValueError, match="block_topk option"):
        SparseAttentionOptions(method="hip", budget_fraction=0.25)
    with pytest.raises(ValueError, match="budget_fraction"):
        SparseAttentionOptions(method="block_topk", budget_fraction=1.5)


@pytest.mark.parametrize("method", ["hip", "block_topk"])
def test_dense_below_keeps_short_contexts_dense(tiny_model_dir: str, method: str) -> None:
    ctx = _ctx(num_blocks=80, block_size=4, kv_heads=2, head_dim=8)
    geometry = {"sink": 4, "window": 8, "top_k": 8, "dense_layers": 0}
    pruning = _selector(ctx, method=method, **geometry)
    held_back = _selector(ctx, method=method, dense_below=100, **geometry)
    assert pruning.prunes(60) and pruning.prunes(100)
    assert not held_back.prunes(60) and held_back.prunes(100)
    # Above every context the engine never prunes (the tiny prompts stay under 200 tokens).
    eng = _engine(
        tiny_model_dir, "sparse_attention", {"method": method, **SMALL, "dense_below": 4096}
    )
    _tokens(eng)
    assert eng.get_stats()["decoder"]["sparse_pruned_seq_steps"] == 0
    with pytest.raises(ValueError, match="dense_below"):
        SparseAttentionOptions(dense_below=-1)


@pytest.mark.parametrize("method", ["hip", "block_topk"])
def test_budget_covering_context_gives_standard_tokens(
    tiny_model_dir: str, standard_tokens: list[list[int]], method: str
) -> None:
    opts = {"method": method, "top_k": 4096, "dense_layers": 0}
    eng = _engine(tiny_model_dir, "sparse_attention", opts)
    assert _tokens(eng) == standard_tokens
    assert eng.get_stats()["decoder"]["sparse_kv_read_fraction"] == 1.0


def test_read_count_reuses_unchanged_lists_and_recounts_new_ones() -> None:
    """The skipped KV is counted from the chunk lists the layers read; lists handed over
    again (a reused selection) keep their count while the context grows, new ones are
    counted anew."""
    geometry = Geometry(chunk=4, sink=4, window=4, top_k=2)
    shared = _Shared(Selector(geometry), num_layers=2, num_dense=0)
    two = torch.tensor([[[3, 7, -1], [3, 5, 6]]])  # [1 seq, 2 heads, 3]: 2 and 3 chunks
    one = torch.tensor([[[3, -1, -1], [-1, -1, 8]]])  # 1 chunk per head
    for ctx in (40, 44):
        shared.selected, shared.selected_ctx = [two, one], [ctx]
        shared._count_read()
        # Reads: 2.5 chunks (mean over heads) and 1 chunk, of 4 keys each.
        assert shared.saved == pytest.approx((ctx - 10) + (ctx - 4))
        shared.saved = 0.0
    changed = two.clone()
    changed[0, 0, 2] = 9  # 3 chunks in both heads now
    shared.selected, shared.selected_ctx = [changed, one], [44]
    shared._count_read()
    assert shared.saved == pytest.approx((44 - 12) + (44 - 4))


@pytest.mark.parametrize("method", ["hip", "block_topk"])
def test_small_budget_prunes_and_reports(tiny_model_dir: str, method: str) -> None:
    eng = _engine(tiny_model_dir, "sparse_attention", {"method": method, **SMALL})
    out = _tokens(eng)
    assert all(len(t) == GREEDY.max_tokens for t in out)
    stats = eng.get_stats()["decoder"]
    assert 0.1 < stats["sparse_kv_read_fraction"] < 0.5  # ~40 of 100-160 tokens
    assert stats["sparse_pruned_seq_steps"] > 0
    assert eng.last_stats.decoder["sparse_kv_read_fraction"] < 1.0
    assert not eng.decoder.shared.selector.seqs if method == "hip" else True  # type: ignore[attr-defined]


def test_sparse_path_with_everything_selected_matches_dense(tiny_model_dir: str) -> None:
    """Force the sparse kernel (not the dense fallback) with a selection covering the whole
    context: logits must match the standard engine's."""
    eng = _engine(tiny_model_dir, "sparse_attention", {"method": "block_topk", **SMALL})
    sel = eng.decoder.shared.selector  # type: ignore[attr-defined]
    sel.geometry = type(sel.geometry)(chunk=4, sink=0, window=4096, top_k=1)
    sel.prunes = lambda ctx: True
    std = _engine(tiny_model_dir)
    got = _tokens(eng)
    assert got == _tokens(std)
    assert eng.get_stats()["decoder"]["sparse_pruned_seq_steps"] > 0


@pytest.mark.parametrize("method", ["hip", "block_topk"])
def test_selection_refreshes_every_interval(tiny_model_dir: str, method: str) -> None:
    eng = _engine(
        tiny_model_dir, "sparse_attention", {"method": method, "refresh_interval": 4, **SMALL}
    )
    eng.add_request("r", PROMPTS[0], GREEDY)
    refreshes = []
    while eng.has_unfinished_requests():
        eng.step()
        if "sparse_mask_refreshes" in eng.last_stats.decoder:
            refreshes.append(eng.last_stats.decoder["sparse_mask_refreshes"])
    # 11 decode steps after the prefill step samples the first token.
    assert refreshes[:11] == [1, 0, 0, 0] * 2 + [1, 0, 0]


def test_block_topk_reuses_its_pages_between_refreshes() -> None:
    """refresh_interval 3: steps 2 and 3 keep step 1's pages whatever the query, summarise
    nothing, and stretch the window back to where step 1's scored region ended (no page
    decoded since is skipped); step 4 chooses again, catching up the summaries."""
    ctx = _ctx(num_blocks=40, block_size=4, kv_heads=1, head_dim=8)
    sel = _selector(
        ctx,
        method="block_topk",
        top_k_pages=2,
        sink=4,
        window=8,
        dense_layers=0,
        refresh_interval=3,
    )
    k_cache = torch.randn(40, 4, 1, 8)
    table = torch.randperm(40)[:12].int().view(1, -1)
    # 42, 43, 44, 45 cached keys: the window starts at page 8, 8, 9, 9
    picked, fixed, dirty = [], [], []
    for step, seq_len in enumerate((43, 44, 45, 46)):
        q = torch.randn(1, 2, 8) * (1 if step % 2 == 0 else -1)
        meta = _decode_meta(table, [seq_len])
        plan = build_plan(meta, sel.prunes)
        sel.prepare(meta, plan)
        dirty.append(plan.extra["topk"].pages.numel())
        sel.after_store(0, k_cache, plan)
        chunks = sel.select(0, q, k_cache, plan)[0, 0].tolist()
        picked.append(sorted(chunks[:2]))
        fixed.append(chunks[2:])
        if step == 3:
            page_scores = torch.einsum(
                "d,pd->p", q[0].mean(0), k_cache[table[0, :9].long(), :, 0].mean(1)
            )
            page_scores[0] = float("-inf")  # sink
            assert picked[3] == sorted(torch.topk(page_scores, 2).indices.tolist())
    assert picked[0] == picked[1] == picked[2]
    assert dirty == [8, 0, 0, 1]  # first choice: pages below the window; then page 8
    assert fixed[:3] == [[0, 8, 9, 10]] * 3  # the window reaches back to page 8
    assert fixed[3] == [0, 9, 10, 11]
    sel.forget(0)
    assert not sel.seqs and not sel.summarised


@pytest.mark.parametrize("method", ["hip", "block_topk"])
def test_reused_chunk_lists_follow_the_window(method: str) -> None:
    """Between refreshes a layer's finished chunk list is kept (CombinedChunks) while the
    window stays in its chunk, and rebuilt when a new chunk enters the window: the lists
    equal those of a selector that rebuilds them every step."""
    ctx = _ctx(num_blocks=40, block_size=4, kv_heads=1, head_dim=8)
    budget = {"top_k_pages": 2} if method == "block_topk" else {"top_k": 8}
    options = {"method": method, "sink": 4, "window": 8, "dense_layers": 0, **budget}
    sel = _selector(ctx, refresh_interval=20, **options)
    rebuilt = _selector(ctx, refresh_interval=20, **options)
    rebuilt.combined.new_step = lambda *args: setattr(rebuilt.combined, "by_layer", {})
    k_cache = torch.randn(40, 4, 1, 8)
    table = torch.randperm(40)[:14].int().view(1, -1)
    lists = []
    for seq_len in range(43, 53):
        q = torch.randn(1, 2, 8)
        meta = _decode_meta(table, [seq_len])
        got = []
        for s in (sel, rebuilt):
            plan = build_plan(meta, s.prunes)
            s.prepare(meta, plan)
            s.after_store(0, k_cache, plan)
            got.append(s.select(0, q, k_cache, plan))
        assert torch.equal(got[0], got[1])
        lists.append(got[0])
    kept = [lists[i] is lists[i - 1] for i in range(1, len(lists))]
    grew = [lists[i].shape != lists[i - 1].shape for i in range(1, len(lists))]
    assert any(kept) and any(grew)
    # The fixed chunks only grow between refreshes: a list is kept exactly when they did not.
    assert kept == [not g for g in grew]


def test_composes_with_token_recycling(
    tiny_model_dir: str, standard_tokens: list[list[int]]
) -> None:
    covering = {"sparse_attention": {"top_k": 4096, "dense_layers": 0}}
    eng = _engine(tiny_model_dir, "token_recycling+sparse_attention", covering)
    assert _tokens(eng) == standard_tokens
    assert eng.decoder.name == "token_recycling+sparse_attention"
    assert {"tree_mask", "attention_backend"} <= eng.decoder.required_features
    # HiP's mask, and the default configuration (block top-k with prompt pins).
    for small in ({"method": "hip", **SMALL}, SMALL):
        pruned = _engine(
            tiny_model_dir, "token_recycling+sparse_attention", {"sparse_attention": small}
        )
        out = _tokens(pruned)
        assert all(len(t) == GREEDY.max_tokens for t in out)
        stats = pruned.get_stats()["decoder"]
        assert stats["sparse_kv_read_fraction"] < 0.6 and stats["sparse_pruned_seq_steps"] > 0
    # Block top-k reranking under verification trees (scored with each tree's root query).
    quest = {"method": "block_topk", **SMALL, "top_k": 8, "rerank_factor": 2}
    quest |= {"page_scoring": "bounds", "group_pooling": "max"}
    reranked = _engine(
        tiny_model_dir, "token_recycling+sparse_attention", {"sparse_attention": quest}
    )
    assert all(len(t) == GREEDY.max_tokens for t in _tokens(reranked))
    assert reranked.get_stats()["decoder"]["sparse_rerank_k_fraction"] > 0
    # Prompt pages: pinned at the end of the prefill, read by every verification tree.
    pins = {"method": "block_topk", **SMALL, "prompt_pages": 2}
    pinned = _engine(tiny_model_dir, "token_recycling+sparse_attention", {"sparse_attention": pins})
    selector = pinned.decoder.parts[1].shared.selector  # type: ignore[attr-defined]
    read: list[bool] = []
    select = selector.select

    def spy(layer: int, q: torch.Tensor, k_cache: torch.Tensor, plan: Any) -> torch.Tensor:
        out = select(layer, q, k_cache, plan)
        for i, sid in enumerate(plan.sparse.seq_ids):
            pages = selector.pinned[sid][layer]
            read.extend(set(pages[h].tolist()) <= set(out[i, h].tolist()) for h in range(2))
        return out

    selector.select = spy
    assert all(len(t) == GREEDY.max_tokens for t in _tokens(pinned))
    assert read and all(read)
    assert selector.pinned == {}  # dropped with the finished requests


def test_page_summaries_are_current_at_every_choice(tiny_model_dir: str) -> None:
    """Under tree verification (token recycling compacts accepted KV) and reuse, whenever
    block top-k chooses, the summary of every page it scores equals the page's mean key
    recomputed from the cache."""
    options = {"method": "block_topk", **SMALL, "refresh_interval": 2}
    eng = _engine(tiny_model_dir, "token_recycling+sparse_attention", {"sparse_attention": options})
    sparse = next(p for p in eng.decoder.parts if isinstance(p, SparseAttentionDecoder))
    sel = sparse.shared.selector
    choose = sel._choose
    checked = 0

    def checking_choose(layer: int, q: torch.Tensor, k_cache: torch.Tensor, step: Any) -> Any:
        nonlocal checked
        ends = [sel.seqs[sid].region_end for sid in [step_ids[i] for i in step.refresh]]
        for table, end in zip(step.tables.long(), ends, strict=True):
            pages = table[:end]
            want = k_cache[pages].float().mean(1)  # [end, H, D]
            got = sel.summaries[layer][:, pages].transpose(0, 1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            checked += 1
        return choose(layer, q, k_cache, step)

    select = sel.select

    def select_with_ids(layer: int, q: torch.Tensor, k_cache: torch.Tensor, plan: Any) -> Any:
        nonlocal step_ids
        step_ids = plan.sparse.seq_ids
        return select(layer, q, k_cache, plan)

    step_ids: list[int] = []
    sel._choose = checking_choose
    sel.select = select_with_ids
    out = _tokens(eng)
    assert all(len(t) == GREEDY.max_tokens for t in out)
    assert checked > 0
    assert eng.get_stats()["decoder"]["sparse_pruned_seq_steps"] > 0


def test_composition_rejects_conflicts_and_bad_options() -> None:
    with pytest.raises(ValueError, match="both override select"):
        decoder_options(DecoderSpec("token_recycling+cautious", {}))
    with pytest.raises(ValueError, match="unknown decoder"):
        decoder_options(DecoderSpec("sparse_attention+nope", {}))
    with pytest.raises(ValueError, match="keyed by part"):
        decoder_options(DecoderSpec("token_recycling+sparse_attention", {"top_k": 3}))
    with pytest.raises(ValueError, match="twice"):
        decoder_options(DecoderSpec("sparse_attention+sparse_attention", {}))


@pytest.fixture(scope="module")
def bf16_head64_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model whose heads are 64 wide, so bf16 steps take the C++ attention."""
    from slipstream.testing.tiny_model import make_tiny_model_dir

    folder = tmp_path_factory.mktemp("tiny-head64")
    return str(make_tiny_model_dir(folder, hidden_size=128, num_attention_heads=2))


def _bf16_engine(model_dir: str, decoder: str, options: dict[str, Any] | None = None) -> Any:
    cfg = tiny_engine_config(
        model_dir,
        decoder=decoder,
        decoder_options=options,
        block_size=4,
        num_blocks=512,
        dtype="bfloat16",
    )
    return LLMEngine(cfg)


@pytest.mark.skipif(
    decode_attention_unavailable_reason() is not None,
    reason=f"{decode_attention_unavailable_reason()}",
)
@pytest.mark.parametrize("method", ["hip", "block_topk"])
def test_bf16_sparse_steps_run_the_cpp_kernel(
    bf16_head64_dir: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on an AVX512-BF16 CPU: pruned steps go through the C++ attention with their
    chunk lists; with a budget covering the context the tokens are standard's, bit for bit
    (the kernel reads the listed keys in position order, as dense decoding does)."""
    import slipstream.kernels.sparse_paged_attention as spa

    sparse_calls: list[int] = []
    real = spa.paged_decode_attention

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        sparse_calls.append(int(args[-2].shape[-1]))  # chunks per row
        return real(*args, **kwargs)

    monkeypatch.setattr(spa, "paged_decode_attention", counting)
    want = _tokens(_bf16_engine(bf16_head64_dir, "standard"))
    covering = _bf16_engine(
        bf16_head64_dir,
        "sparse_attention",
        {"method": method, "top_k": 4096, "dense_layers": 0},
    )
    sel = covering.decoder.shared.selector
    sel.prunes = lambda ctx: True  # take the sparse path although nothing is left out
    assert _tokens(covering) == want
    assert sparse_calls, "the sparse layers did not reach the C++ kernel"
    sparse_calls.clear()
    pruned = _bf16_engine(bf16_head64_dir, "sparse_attention", {"method": method, **SMALL})
    out = _tokens(pruned)
    assert all(len(t) == GREEDY.max_tokens for t in out)
    assert pruned.get_stats()["decoder"]["sparse_kv_read_fraction"] < 0.5
    assert sparse_calls
