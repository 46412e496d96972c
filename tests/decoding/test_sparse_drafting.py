"""Sparse attention under a drafting decoder (token_recycling+sparse_attention, ngram+...):
draft trees kept within the selection's refresh interval give sparse attention's own greedy
tokens, whatever the drafts and the other requests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from slipstream.decoding.draft_tree import build_template
from slipstream.decoding.sparse.selectors import _Reused
from slipstream.decoding.sparse_attention import SparseAttentionDecoder, SparseAttentionOptions
from slipstream.decoding.tree_verify import Draft, TreeSpecDecoder
from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampling_params import SamplingParams
from slipstream.testing.contexts import decoder_context
from slipstream.testing.engines import run_to_completion, tiny_engine_config

# Pages of 4 tokens; prompts of 90-150 tokens are pruned by this budget (as in
# test_sparse_attention.py), and a refresh every 4 positions puts many boundaries in reach
# of the drafts.
SMALL = {"top_k": 16, "window": 8, "sink": 4, "dense_layers": 0, "refresh_interval": 4}
PROMPTS = [
    [(i * 37 + 11) % 400 + 3 for i in range(150)],
    [(i * 13 + 5) % 400 + 3 for i in range(90)],
    [7, 8, 9, 10] * 30,  # a loop: drafts get accepted
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)


def _engine(model_dir: str, decoder: str, options: dict[str, Any]) -> LLMEngine:
    return LLMEngine(
        tiny_engine_config(
            model_dir, decoder=decoder, decoder_options=options, block_size=4, num_blocks=512
        )
    )


def _options(method: str) -> dict[str, Any]:
    sparse: dict[str, Any] = {"method": method, **SMALL}
    if method == "block_topk":
        sparse["prompt_pages"] = 2  # pins chosen at the prefill's end, as by default
    return sparse


@pytest.mark.parametrize("drafter", ["token_recycling", "ngram"])
@pytest.mark.parametrize("method", ["hip", "block_topk"])
def test_drafts_keep_sparse_attentions_answers(
    tiny_model_dir: str, method: str, drafter: str
) -> None:
    sparse = _options(method)
    alone = [
        run_to_completion(_engine(tiny_model_dir, "sparse_attention", sparse), [p], GREEDY)[0]
        for p in PROMPTS
    ]
    eng = _engine(tiny_model_dir, f"{drafter}+sparse_attention", {"sparse_attention": sparse})
    spec = eng.decoder.parts[0]  # type: ignore[attr-defined]
    within = spec._within_depth
    cuts = []

    def counting(draft: Draft, limit: int | None) -> Draft | None:
        out = within(draft, limit)
        cuts.append(out is not draft)
        return out

    spec._within_depth = counting
    together = run_to_completion(eng, PROMPTS, GREEDY)  # all three in each step
    # Token recycling's trees grow within the limit (their nodes go into breadth there);
    # ngram's chains are cut to it.
    assert not any(cuts) if drafter == "token_recycling" else any(cuts)
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    stats = eng.get_stats()
    # The drafts did their part: 13-42 tokens accepted here (the tiny model's random weights
    # follow the tests run before, so the count moves with them).
    assert stats["spec_num_accepted_tokens"] > 0
    assert stats["decoder"]["sparse_pruned_seq_steps"] > 0


def _decoder(**options: Any) -> SparseAttentionDecoder:
    return SparseAttentionDecoder(SparseAttentionOptions(**options), decoder_context())


def _seq(seq_id: int, computed: int) -> Any:
    return SimpleNamespace(seq_id=seq_id, num_computed_tokens=computed)


def test_depth_limit_stops_before_the_next_choice_and_the_switch_to_pruning() -> None:
    dec = _decoder(method="block_topk", top_k=8, sink=4, window=8, refresh_interval=4)
    sel = dec.shared.selector
    first = next(c for c in range(256) if sel.prunes(c))  # the first pruned context
    # A dense root: nodes up to the last dense position.
    assert dec.draft_depth_limit(_seq(1, first - 3)) == 2
    assert dec.draft_depth_limit(_seq(1, first - 1)) == 0
    # A pruned root whose step chooses anew (no selection yet): 3 positions after it.
    assert dec.draft_depth_limit(_seq(1, first)) == 3
    # A selection made at `first` serves first .. first + 3.
    sel.seqs[1] = _Reused(ctx=first, region_end=sel.geometry.window_start(first))
    assert [dec.draft_depth_limit(_seq(1, first + i)) for i in range(5)] == [3, 2, 1, 0, 3]
    assert dec.draft_depth_limit(_seq(1, first - 1)) == 0  # rolled back: dense again
    # A larger budget (pruned from 176 on): a dense root draws its limit from the switch.
    wide = _decoder(method="block_topk", top_k=160, sink=4, window=8, refresh_interval=4)
    assert wide.draft_depth_limit(_seq(2, 5)) == 170
    assert wide.draft_depth_limit(_seq(2, 170)) == 5
    # Pruning need not be monotone in the context: the limit stops at every switch.
    odd = _decoder(method="block_topk", top_k=8, sink=4, window=8, refresh_interval=4)
    odd.shared.selector.prunes = lambda c: 50 <= c < 60 or c >= 100  # type: ignore[method-assign]
    assert [odd.draft_depth_limit(_seq(4, c)) for c in (40, 55, 60, 99)] == [9, 3, 39, 0]
    # dense_below beyond the model's window: never pruned, no limit.
    never = _decoder(method="block_topk", top_k=8, sink=4, window=8, dense_below=1000)
    assert never.draft_depth_limit(_seq(3, 100)) is None


class _Drafting(TreeSpecDecoder):
    """A TreeSpecDecoder that drafts nothing itself (for _within_depth alone)."""

    name = "test_drafting"


def test_drafts_are_cut_to_the_peers_limit() -> None:
    dec = _Drafting(None, None)  # type: ignore[arg-type]
    tmpl = build_template([(0,), (1,), (0, 0), (0, 0, 0), (1, 0)], k=2, source_index=range(1, 6))
    # BFS order: root, (0,), (1,), (0, 0), (1, 0), (0, 0, 0)
    draft = Draft(tmpl, [50, 51, 52, 53, 54, 55], chain=(51, 53, 55))
    assert dec._within_depth(draft, None) is draft
    assert dec._within_depth(draft, 3) is draft
    assert dec._within_depth(draft, 0) is None
    cut = dec._within_depth(draft, 2)
    assert cut is not None
    assert [list(p) for p in cut.tmpl.paths] == [[], [0], [1], [0, 0], [1, 0]]
    assert cut.tokens == [50, 51, 52, 53, 54] and cut.chain == (51, 53)
    assert cut.tmpl.source_index == [0, 1, 2, 3, 5]
    one = dec._within_depth(draft, 1)
    assert one is not None and one.tokens == [50, 51, 52] and one.chain == (51,)
    assert dec._within_depth(draft, 2).tmpl is cut.tmpl  # type: ignore[union-attr]  # cached
