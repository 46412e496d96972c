"""Block top-k's answer votes: the queries of a request's first decoded tokens vote for the
pinned pages too, and the pins are chosen again after them (a question asked before the
text leaves the prompt's closing queries nothing to look for)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slipstream.decoding.sparse.plan import build_plan
from slipstream.decoding.sparse_attention import SparseAttentionOptions
from slipstream.engine.sampling_params import SamplingParams
from slipstream.testing.engines import run_to_completion
from tests.decoding.test_prompt_pages import (
    DIM,
    GROUP,
    KV_HEADS,
    PAGE,
    SCALE,
    _meta,
    _selector,
    pinning_engine,
)

PROMPT = 61  # tokens; the first decode's window starts at page (61 - 8) // 4 = 13
REGION = range(1, 13)  # pages pins come from: above the sink page, below that window


def _votes_reference(queries: torch.Tensor, positions: list[int], keys: torch.Tensor) -> Any:
    """[KV_HEADS, pages] float64: per page, the attention its keys receive from the queries
    (each a softmax over the keys at or before its position, the group's heads summed), each
    key also scored as the best of the 7 keys before it; one query at a time."""
    total = keys.shape[0]
    pages = -(-total // PAGE)
    out = torch.zeros(KV_HEADS, pages, dtype=torch.float64)
    for h in range(KV_HEADS):
        mass = torch.zeros(total, dtype=torch.float64)
        for query, pos in zip(queries, positions, strict=True):
            for j in range(GROUP):
                logits = keys[: pos + 1, h].double() @ query[h * GROUP + j].double() * SCALE
                mass[: pos + 1] += logits.softmax(0)
        spread = torch.stack([mass[max(0, t - 7) : t + 1].max() for t in range(total)])
        for p in range(pages):
            out[h, p] = spread[p * PAGE : (p + 1) * PAGE].sum()
    return out


def _pins_reference(prompt: torch.Tensor, answer: torch.Tensor, count: int) -> list[list[int]]:
    """Per KV head: the count - count // 2 pages of REGION with the most prompt votes, then
    the count // 2 others with the most answer votes."""
    out = []
    for h in range(KV_HEADS):
        by_prompt = sorted(REGION, key=lambda p: -float(prompt[h, p]))
        keep = by_prompt[: count - count // 2]
        rest = sorted((p for p in REGION if p not in keep), key=lambda p: -float(answer[h, p]))
        out.append(sorted(keep + rest[: count // 2]))
    return out


def _decode_with(sel: Any, k_cache: torch.Tensor, table: torch.Tensor, seq_len: int, q: Any) -> Any:
    """One decode step of sequence 0 with query q [1, heads, D]: its chunk lists [H, S]."""
    meta = _meta(table, seq_len, 1, False)
    plan = build_plan(meta, sel.prunes)
    sel.prepare(meta, plan)
    sel.after_store(0, k_cache, plan)
    return sel.select(0, q, k_cache, plan)[0]


@pytest.mark.parametrize(("seed", "votes"), [(0, 1), (1, 2), (2, 3), (3, 2)])
def test_pins_are_chosen_again_from_prompt_and_answer_votes(seed: int, votes: int) -> None:
    torch.manual_seed(seed)
    # Selections reused for 8 steps: the re-pinning step (2 or 3) must choose anew itself.
    sel = _selector(prompt_pages=3, observation_window=5, answer_votes=votes, refresh_interval=8)
    k_cache = torch.randn(40, PAGE, KV_HEADS, DIM)
    table = torch.randperm(40)[:20].int().view(1, -1)
    q_prompt = 3 * torch.randn(7, KV_HEADS * GROUP, DIM)
    sel.observe_prompt(0, q_prompt, k_cache, _meta(table, PROMPT, 7, True), SCALE)
    first_pins = sel.pinned[0][0].clone()
    keys = k_cache[table[0].long()].reshape(-1, KV_HEADS, DIM)
    # Peaked answer queries (x4), so that their votes move the pins.
    q_answer = 4 * torch.randn(votes, KV_HEADS * GROUP, DIM)
    for t in range(votes):
        if t < votes - 1:  # before the last vote the prefill's pins stay
            _decode_with(sel, k_cache, table, PROMPT + 1 + t, q_answer[t : t + 1])
            assert torch.equal(sel.pinned[0][0], first_pins)
        else:
            chunks = _decode_with(sel, k_cache, table, PROMPT + 1 + t, q_answer[t : t + 1])
    prompt_votes = _votes_reference(q_prompt[2:], list(range(PROMPT - 5, PROMPT)), keys[:PROMPT])
    # Decode step t (from 1) feeds the token at position PROMPT + t - 1.
    answer_votes = _votes_reference(
        q_answer, [PROMPT + t for t in range(votes)], keys[: PROMPT + votes]
    )
    want = _pins_reference(prompt_votes, answer_votes, 3)
    assert sel.pinned[0][0].tolist() == want
    # The step that pinned anew read its new pins (it chose the rest of its budget anew).
    for h in range(KV_HEADS):
        assert set(want[h]) <= set(chunks[h].tolist())
    # Voting is over: nothing kept but the pins, which later steps read.
    later = _decode_with(sel, k_cache, table, PROMPT + 1 + votes, 4 * torch.randn(1, 6, DIM))
    assert sel.pinned[0][0].tolist() == want
    assert 0 not in sel.prompt_votes and 0 not in sel.answer_queries
    for h in range(KV_HEADS):
        assert set(want[h]) <= set(later[h].tolist())


def test_answer_votes_can_move_a_pin_the_prompt_missed() -> None:
    """A key the prompt's queries ignore and the first answer query looks at gets pinned;
    the prompt's best page stays."""
    torch.manual_seed(5)
    sel = _selector(prompt_pages=2, observation_window=4, answer_votes=1)
    k_cache = 0.1 * torch.randn(40, PAGE, KV_HEADS, DIM)
    table = torch.arange(20).int().view(1, -1)
    target = torch.randn(DIM)
    target = 6 * target / target.norm()
    # Position 35 (page 8's last slot), both KV heads: the spread carries its votes over the
    # next 7 keys, so page 9 (36-39) gets the most.
    k_cache[8, 3, :] = target
    q_prompt = torch.randn(4, KV_HEADS * GROUP, DIM)
    q_prompt -= (q_prompt @ target).unsqueeze(-1) * target / target.dot(target)  # orthogonal
    sel.observe_prompt(0, q_prompt, k_cache, _meta(table, PROMPT, 4, True), SCALE)
    before = sel.pinned[0][0].tolist()
    assert all(9 not in pins for pins in before)
    best = sel.prompt_votes[0][0][:, 1:13].argmax(-1) + 1  # the prompt's favourite per head
    q = target.repeat(KV_HEADS * GROUP).view(1, KV_HEADS * GROUP, DIM)
    _decode_with(sel, k_cache, table, PROMPT + 1, q)
    after = sel.pinned[0][0].tolist()
    assert after == [sorted([int(best[h]), 9]) for h in range(KV_HEADS)]


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="answer_votes"):
        SparseAttentionOptions(method="block_topk", prompt_pages=2, answer_votes=-1)
    with pytest.raises(ValueError, match="prompt_pages"):
        SparseAttentionOptions(method="block_topk", answer_votes=2)


def test_engine_votes_once_and_forgets(tiny_model_dir: str) -> None:
    """Through the engine (two requests in one batch): pins are chosen again once per
    request, and a finished request leaves no voting state behind."""
    engine = pinning_engine(tiny_model_dir, answer_votes=3)
    sel = engine.decoder.shared.selector  # type: ignore[attr-defined]
    repinned: list[int] = []
    votes = sel._answer_votes

    def spy(layer: int, q: Any, k_cache: Any, sp: Any) -> None:
        before = {
            sid: {k: v.clone() for k, v in layers.items()} for sid, layers in sel.pinned.items()
        }
        votes(layer, q, k_cache, sp)
        if layer == 0:
            repinned.extend(sid for sid in sp.seq_ids if sel._repins(sid))
            for sid in sp.seq_ids:
                if not sel._repins(sid) and sid in before:
                    assert torch.equal(before[sid][0], sel.pinned[sid][0])

    sel._answer_votes = spy
    prompts = [
        [(i * 37 + 11) % 400 + 3 for i in range(150)],
        [(i * 53 + 7) % 400 + 3 for i in range(170)],
    ]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = run_to_completion(engine, prompts, params)
    assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]
    assert sorted(repinned) == sorted(set(repinned)) and len(repinned) == 2
    assert sel.pinned == {} and sel.prompt_votes == {} and sel.answer_queries == {}
    assert sel.decoded == {} and sel.prompt_len == {}
