"""Block top-k's prompt pages (SnapKV-style): pages pinned at the end of the prefill by the
attention of the prompt's last queries, then read at every decode step within the budget."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slipstream.decoding.sparse.plan import build_plan
from slipstream.decoding.sparse_attention import SparseAttentionDecoder, SparseAttentionOptions
from slipstream.engine.attention import AttentionMetadata
from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampling_params import SamplingParams
from slipstream.testing.engines import run_to_completion, tiny_engine_config
from tests.decoding.test_sparse_attention import _ctx

PAGE, KV_HEADS, GROUP, DIM = 4, 2, 3, 8
SCALE = DIM**-0.5
OPTIONS = {"method": "block_topk", "top_k_pages": 3, "sink": 4, "window": 8, "dense_layers": 0}


def _selector(**options: Any) -> Any:
    ctx = _ctx(num_blocks=40, block_size=PAGE, kv_heads=KV_HEADS, head_dim=DIM)
    opts = SparseAttentionOptions(**{**OPTIONS, **options})
    return SparseAttentionDecoder(opts, ctx).shared.selector


def _meta(table: torch.Tensor, seq_len: int, fed: int, prefill_end: bool) -> AttentionMetadata:
    """One sequence (id 0) feeding its last `fed` tokens of `seq_len` as a causal run."""
    return AttentionMetadata(
        torch.tensor([0, fed], dtype=torch.int32),
        torch.tensor([seq_len], dtype=torch.int32),
        table,
        torch.arange(fed),
        None,
        fed,
        seq_len,
        seq_ids=[0],
        query_start_loc_list=[0, fed],
        seq_lens_list=[seq_len],
        prefill_ends=[prefill_end],
    )


def _decode(sel: Any, k_cache: torch.Tensor, table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One decode step's chunk lists [H, S] for sequence 0 with `seq_len` tokens."""
    meta = _meta(table, seq_len, 1, False)
    plan = build_plan(meta, sel.prunes)
    sel.prepare(meta, plan)
    sel.after_store(0, k_cache, plan)
    return sel.select(0, torch.randn(1, KV_HEADS * GROUP, DIM), k_cache, plan)[0]


def _snapkv_reference(
    q_obs: torch.Tensor, keys: torch.Tensor, count: int, first: int, end: int
) -> list[list[int]]:
    """Per KV head, the `count` pages in [first, end) with the most attention from the
    observation queries (each a softmax over the keys at or before its position), spread
    forward over 8 keys; float64, one query and one key at a time."""
    w, seq_len = q_obs.shape[0], keys.shape[0]
    out = []
    for h in range(KV_HEADS):
        mass = torch.zeros(seq_len, dtype=torch.float64)
        for i in range(w):
            visible = seq_len - w + i + 1
            for j in range(GROUP):
                query = q_obs[i, h * GROUP + j].double()
                logits = keys[:visible, h].double() @ query * SCALE
                mass[:visible] += logits.softmax(0)
        # Each key also scores as the best of the 7 keys before it (what follows a looked-at
        # key is what gets copied).
        spread = torch.stack([mass[max(0, t - 7) : t + 1].max() for t in range(seq_len)])
        pages = {p: float(spread[p * PAGE : (p + 1) * PAGE].sum()) for p in range(first, end)}
        out.append(sorted(sorted(pages, key=lambda p: -pages[p])[:count]))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_prompt_pages_are_the_observation_window_attention_top_pages(seed: int) -> None:
    torch.manual_seed(seed)
    sel = _selector(prompt_pages=2, observation_window=5)
    k_cache = torch.randn(40, PAGE, KV_HEADS, DIM)
    seq_len = 61
    table = torch.randperm(40)[: -(-seq_len // PAGE)].int().view(1, -1)
    # The chunk that ends the prefill feeds 7 tokens; the last 5 are the observation window.
    # Peaked attention (x3), so which keys each query may see (causality) moves the choice.
    q = 3 * torch.randn(7, KV_HEADS * GROUP, DIM)
    sel.observe_prompt(0, q, k_cache, _meta(table, seq_len, 7, True), SCALE)
    keys = k_cache[table[0].long()].reshape(-1, KV_HEADS, DIM)[:seq_len]
    # Candidates: above the sink page, below the first decode's window ((61 - 8) // 4 = 13).
    want = _snapkv_reference(q[2:], keys, 2, 1, 13)
    assert sel.pinned[0][0].tolist() == want


def test_decode_reads_the_pinned_pages_within_the_budget() -> None:
    """Every decode step reads the pinned pages whatever its query, and chooses only
    top_k_pages - prompt_pages more: the read stays at the budget."""
    torch.manual_seed(1)
    sel = _selector(prompt_pages=2)
    k_cache = torch.randn(40, PAGE, KV_HEADS, DIM)
    table = torch.randperm(40)[:20].int().view(1, -1)
    sel.observe_prompt(0, torch.randn(6, 6, DIM), k_cache, _meta(table, 61, 6, True), SCALE)
    pinned = sel.pinned[0][0]
    for seq_len in (62, 63, 66, 70):
        chunks = _decode(sel, k_cache, table, seq_len)
        ctx = seq_len - 1
        fixed = [0, *range((ctx - 8) // PAGE, (ctx - 1) // PAGE + 1)]
        for h in range(KV_HEADS):
            pages = [c for c in chunks[h].tolist() if c >= 0]
            assert len(pages) == len(set(pages))
            assert set(pinned[h].tolist()) <= set(pages)
            chosen = set(pages) - set(fixed) - set(pinned[h].tolist())
            assert len(chosen) <= 3 - 2
            assert set(fixed) <= set(pages)


def test_pins_of_the_refreshing_sequences_padded_per_layer() -> None:
    """The pins handed to the page choice: per sequence and KV head, -1 padded where a
    sequence has fewer (or none); None when no refreshing sequence has pins."""
    sel = _selector(prompt_pages=2)
    sel.pinned = {7: {0: torch.tensor([[2, 5], [3, 4]])}, 9: {0: torch.tensor([[6], [1]])}}
    pins = sel._pins(0, [7, 8, 9])  # sequence 8 has no pins
    assert pins is not None
    assert pins.tolist() == [[[2, 5], [3, 4]], [[-1, -1], [-1, -1]], [[6, -1], [1, -1]]]
    one = sel._pins(0, [7])
    assert one is not None and one.tolist() == [[[2, 5], [3, 4]]]
    assert sel._pins(0, [8]) is None and sel._pins(1, [7, 9]) is None


def test_no_pins_when_the_region_is_empty_or_the_option_is_off() -> None:
    k_cache = torch.randn(40, PAGE, KV_HEADS, DIM)
    table = torch.arange(20).int().view(1, -1)
    off = _selector()
    off.observe_prompt(0, torch.randn(4, 6, DIM), k_cache, _meta(table, 61, 4, True), SCALE)
    assert off.pinned == {}
    short = _selector(prompt_pages=2)  # 12 tokens: sink page, then the window
    short.observe_prompt(0, torch.randn(4, 6, DIM), k_cache, _meta(table, 12, 4, True), SCALE)
    assert short.pinned == {}


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="block_topk"):
        SparseAttentionOptions(method="hip", prompt_pages=4)
    with pytest.raises(ValueError, match="prompt_pages"):
        SparseAttentionOptions(method="block_topk", prompt_pages=-1)
    with pytest.raises(ValueError, match="observation_window"):
        SparseAttentionOptions(method="block_topk", prompt_pages=2, observation_window=0)


def pinning_engine(
    model_dir: str, config: dict[str, Any] | None = None, **options: Any
) -> LLMEngine:
    """The tiny model with block top-k (OPTIONS, a 16-token budget) pinning 2 pages;
    `options` add to the decoder's, `config` to the engine's."""
    opts = {**OPTIONS, "top_k": 16, "prompt_pages": 2, **options}
    opts.pop("top_k_pages")
    return LLMEngine(
        tiny_engine_config(
            model_dir,
            decoder="sparse_attention",
            decoder_options=opts,
            block_size=PAGE,
            num_blocks=512,
            **(config or {}),
        )
    )


@pytest.mark.parametrize("chunk", [256, 48])
def test_engine_pins_once_per_request_at_the_end_of_its_prefill(
    tiny_model_dir: str, chunk: int
) -> None:
    """The runner flags the prefill's last chunk (chunked or not), not decode steps; the
    pinned pages are read by every decode step and dropped when the request ends."""
    engine = pinning_engine(tiny_model_dir, {"max_num_batched_tokens": chunk})
    sel = engine.decoder.shared.selector  # type: ignore[attr-defined]
    observed: list[tuple[int, int]] = []
    chunk_lists: list[tuple[torch.Tensor, torch.Tensor]] = []
    observe, select = sel.observe_prompt, sel.select

    def spy_observe(
        layer: int, q: Any, k_cache: Any, meta: AttentionMetadata, scale: float
    ) -> None:
        observe(layer, q, k_cache, meta, scale)
        if layer == 0:
            ends = zip(meta.seq_ids, meta.seq_lens_list, meta.prefill_ends, strict=True)
            observed.extend((sid, n) for sid, n, end in ends if end)

    def spy_select(layer: int, *args: Any) -> torch.Tensor:
        out = select(layer, *args)
        if layer == 0:
            chunk_lists.append((out[0].clone(), sel.pinned[next(iter(sel.pinned))][0].clone()))
        return out

    sel.observe_prompt, sel.select = spy_observe, spy_select
    prompt = [(i * 37 + 11) % 400 + 3 for i in range(150)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = run_to_completion(engine, [prompt], params)
    assert len(out[0].outputs[0].token_ids) == 8
    assert [n for _, n in observed] == [150]
    assert len(chunk_lists) == 7  # the decode steps after the prefill sampled token 1
    for chunks, pinned in chunk_lists:
        for h in range(chunks.shape[0]):
            assert set(pinned[h].tolist()) <= set(chunks[h].tolist())
    assert sel.pinned == {}


def test_pins_do_not_depend_on_chunking_or_the_prefix_cache(tiny_model_dir: str) -> None:
    """The pins vote with the queries of the prompt's last 32 tokens, which the final prefill
    chunk computes whatever the step budget and whatever the prefix cache holds
    (Decoder.prefill_tail): a 150-token prompt cut 64 + 64 + 22 had only 22 voters, and a
    repeated prompt, its cached pages taken, 2. The pins, and then the answers, were
    another's."""
    prompt = [(i * 37 + 11) % 400 + 3 for i in range(150)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def run(engine: LLMEngine) -> tuple[list[int], list[int], list[int]]:
        """(layer 0's pins of KV head 0, the answer, the prompt's chunks)"""
        sel = engine.decoder.shared.selector  # type: ignore[attr-defined]
        schedule, forget = engine.scheduler.schedule, sel.forget
        chunks: list[int] = []
        pins: list[int] = []

        def spy_schedule() -> Any:
            batch = schedule()
            chunks.extend(i.num_new_tokens for i in batch.items if i.num_new_tokens > 1)
            return batch

        def spy_forget(seq_id: int) -> None:
            pins.extend(sel.pinned[seq_id][0][0].tolist())
            forget(seq_id)

        engine.scheduler.schedule, sel.forget = spy_schedule, spy_forget  # type: ignore[method-assign]
        answer = run_to_completion(engine, [prompt], params)[0].outputs[0].token_ids
        return pins, list(answer), chunks

    whole = run(pinning_engine(tiny_model_dir, {"max_num_batched_tokens": 256}))
    assert whole[2] == [150]
    chunked = run(pinning_engine(tiny_model_dir, {"max_num_batched_tokens": 64}))
    assert chunked[2] == [64, 54, 32]  # not 64 + 64 + 22
    assert chunked[:2] == whole[:2]
    engine = pinning_engine(tiny_model_dir, {"max_num_batched_tokens": 256})
    run(engine)  # fills the prefix cache
    again = run(engine)
    assert again[2] == [34]  # 116 tokens (29 full pages) from the cache, not 148
    assert again[:2] == whole[:2]


def test_a_preempted_request_keeps_its_pins(tiny_model_dir: str) -> None:
    """Recomputed after a preemption, a request's prefill ends again (prompt + output so
    far): its pins stay those of its prompt, and its answer is the uninterrupted one."""
    prompts = [[(i * (7 + 2 * j) + j) % 400 + 3 for i in range(60 + 5 * j)] for j in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    options = {k: v for k, v in OPTIONS.items() if k != "top_k_pages"}

    def engine(num_blocks: int) -> LLMEngine:
        opts = {**options, "top_k": 16, "prompt_pages": 2}
        config = tiny_engine_config(
            tiny_model_dir,
            decoder="sparse_attention",
            decoder_options=opts,
            block_size=PAGE,
            num_blocks=num_blocks,
        )
        return LLMEngine(config)

    # 64 pages of 4 cannot hold four ~100-token sequences at once: preemption happens.
    roomy, tight = engine(256), engine(64)
    expected = [o.outputs[0].token_ids for o in run_to_completion(roomy, prompts, params)]
    got = [o.outputs[0].token_ids for o in run_to_completion(tight, prompts, params)]
    assert tight.get_stats()["preemptions"] > 0
    assert tight.get_stats()["decoder"]["sparse_pruned_seq_steps"] > 0
    assert got == expected
