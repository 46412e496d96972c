"""Every capability the Decoder interface promises, proven on the tiny model.

Tree-masked forward == each root-to-leaf path on its own; compaction leaves exactly the KV
sequential decoding writes; fork/adopt/drop keep ref counts right; a per-layer attention
backend can be swapped; lookahead slots are reserved; per-step decoder stats reach StepStats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from slipstream.decoding.base import (
    Decoder,
    SeqInputs,
    StepInputs,
    StepLogits,
    StepResult,
    sample_last_tokens,
)
from slipstream.decoding.registry import DECODERS
from slipstream.engine.attention import AttentionBackend, AttentionMetadata
from slipstream.engine.batch import Batch, ScheduledSeq
from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampling_params import SamplingParams
from slipstream.engine.sequence import Sequence
from slipstream.testing.engines import run_to_completion, tiny_engine_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPT = [11, 42, 7, 99, 123, 5, 64, 300, 17, 250, 31, 8, 77, 19, 401, 222, 3, 58]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> LLMEngine:
    return LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))


def _prefilled_seq(engine: LLMEngine, seq_id: int) -> Sequence:
    seq = Sequence(seq_id, f"s{seq_id}", list(PROMPT), GREEDY, 0.0)
    assert engine.block_manager.allocate_slots(seq, len(PROMPT))
    n = len(PROMPT)
    batch = Batch([ScheduledSeq(seq, n)])
    engine.runner.forward(batch, StepInputs([SeqInputs(PROMPT, list(range(n)))]))
    seq.num_computed_tokens = n
    return seq


def _feed(
    engine: LLMEngine, seq: Sequence, tokens: list[int], parents: list[int] | None
) -> torch.Tensor:
    """Feed tokens (a chain or a tree) after seq's computed prefix; logits of all of them."""
    n = seq.num_computed_tokens
    depth = _depths(parents) if parents is not None else list(range(len(tokens)))
    assert engine.block_manager.allocate_slots(seq, 1, len(tokens) - 1)
    inputs = SeqInputs(tokens, [n + d for d in depth], parents, list(range(len(tokens))))
    out = engine.runner.forward(
        Batch([ScheduledSeq(seq, 1, len(tokens) - 1)]), StepInputs([inputs])
    )
    return out.values


def _depths(parents: list[int]) -> list[int]:
    depth: list[int] = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    return depth


def _kv_at(engine: LLMEngine, seq: Sequence, positions: list[int]) -> torch.Tensor:
    slots = torch.tensor([engine.block_manager.slot(seq, p) for p in positions])
    return torch.stack([kv.view(2, -1, *kv.shape[3:])[:, slots] for kv in engine.runner.kv_caches])


def test_tree_forward_equals_each_path_alone(engine: LLMEngine) -> None:
    # tree: r -> a -> c, r -> b, b -> d
    r, a, b, c, d = 10, 20, 30, 40, 50
    tree = _prefilled_seq(engine, 1000)
    tree_logits = _feed(engine, tree, [r, a, b, c, d], [-1, 0, 0, 1, 2])
    path1 = _feed(engine, _prefilled_seq(engine, 1001), [r, a, c], None)
    path2 = _feed(engine, _prefilled_seq(engine, 1002), [r, b, d], None)
    torch.testing.assert_close(tree_logits[[0, 1, 3]], path1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tree_logits[[0, 2, 4]], path2, atol=1e-5, rtol=1e-5)
    # and the branches really differ, so the mask matters
    assert not torch.allclose(tree_logits[3], tree_logits[4])


def test_compaction_keeps_exactly_the_sequential_kv(engine: LLMEngine) -> None:
    r, a, b, c = 10, 20, 30, 40
    tree = _prefilled_seq(engine, 2000)
    base = tree.num_computed_tokens
    _feed(engine, tree, [r, b, a, c], [-1, 0, 0, 2])  # accept path r -> a -> c (indices 0, 2, 3)
    moves = engine.block_manager.compaction_moves(tree, base, [0, 2, 3])
    engine.runner.copy_slots(moves)
    chain = _prefilled_seq(engine, 2001)
    _feed(engine, chain, [r, a, c], None)
    positions = list(range(base + 3))
    torch.testing.assert_close(_kv_at(engine, tree, positions), _kv_at(engine, chain, positions))


# --------------------------------------------------------------- engine-level decoders
@dataclass(frozen=True)
class _ForkOptions:
    fork_after: int = 2
    num_children: int = 2
    commit_after: int = 3


class _ForkingDecoder(Decoder):
    """Forks every visible sequence once, lets the trials run, adopts one, drops the rest."""

    name = "test_forking"
    Options = _ForkOptions

    def __init__(self, options: Any, ctx: Any) -> None:
        super().__init__(options, ctx)
        self.trials: dict[int, list[Sequence]] = {}
        self.steps_since_fork: dict[int, int] = {}
        self.forked: set[int] = set()
        self.finished: list[int] = []

    def select(self, batch: Batch, inputs: StepInputs, logits: StepLogits) -> StepResult:
        result = StepResult(seqs=sample_last_tokens(self.ctx.sampler, batch, logits))
        for item in batch.items:
            seq = item.seq
            if seq.is_trial or seq.is_prefilling:
                continue
            if seq.seq_id not in self.forked and seq.num_output_tokens >= self.options.fork_after:
                result.forks[seq.seq_id] = self.options.num_children
                self.forked.add(seq.seq_id)
                seq.hold_output = True
            elif seq.seq_id in self.trials:
                self.steps_since_fork[seq.seq_id] += 1
                if self.steps_since_fork[seq.seq_id] >= self.options.commit_after:
                    winner, *losers = self.trials.pop(seq.seq_id)
                    result.adopt[seq.seq_id] = winner.seq_id
                    result.drops.extend(s.seq_id for s in losers)
                    seq.hold_output = False
        return result

    def on_fork(self, parent: Sequence, children: list[Sequence]) -> None:
        self.trials[parent.seq_id] = children
        self.steps_since_fork[parent.seq_id] = 0

    def on_finish(self, seq: Sequence) -> None:
        self.finished.append(seq.seq_id)


class _CountingBackend:
    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.calls = 0

    def forward(
        self, q: Any, k: Any, v: Any, kc: Any, vc: Any, meta: AttentionMetadata, scale: float
    ) -> Any:
        self.calls += 1
        return self.inner.forward(q, k, v, kc, vc, meta, scale)


@dataclass(frozen=True)
class _ProbeOptions:
    lookahead: int = 3


class _ProbeDecoder(Decoder):
    """Swaps layer 1's attention, asks for lookahead slots, reports a stat each step."""

    name = "test_probe"
    Options = _ProbeOptions

    def __init__(self, options: Any, ctx: Any) -> None:
        super().__init__(options, ctx)
        self.backend: _CountingBackend | None = None
        self.max_blocks_seen = 0

    def attention_backend(self, layer_idx: int, default: AttentionBackend) -> AttentionBackend:
        if layer_idx != 1:
            return default
        self.backend = _CountingBackend(default)
        return self.backend

    def num_lookahead_slots(self, seq: Sequence, num_running: int) -> int:
        return self.options.lookahead

    def select(self, batch: Batch, inputs: StepInputs, logits: StepLogits) -> StepResult:
        for item in batch.items:
            needed = item.seq.num_computed_tokens + item.num_new_tokens + item.num_lookahead_slots
            assert len(item.seq.block_table) * 4 >= needed
        return StepResult(
            seqs=sample_last_tokens(self.ctx.sampler, batch, logits), stats={"probe": 1.0}
        )


for _cls in (_ForkingDecoder, _ProbeDecoder):
    if _cls.name not in DECODERS:
        DECODERS.register(_cls.name)(_cls)


def test_fork_adopt_drop_keeps_ref_counts_and_output(tiny_model_dir: str) -> None:
    prompts = [PROMPT, PROMPT[:7], PROMPT[3:]]
    standard = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    expected = [o.outputs[0].token_ids for o in run_to_completion(standard, prompts, GREEDY)]
    eng = LLMEngine(tiny_engine_config(tiny_model_dir, decoder="test_forking", block_size=4))
    free0 = eng.block_manager.num_free_blocks
    for i, p in enumerate(prompts):
        eng.add_request(f"f{i}", p, GREEDY)
    done = {}
    max_running = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        max_running = max(max_running, len(eng.scheduler.running))
        eng.block_manager.check_invariants()
    assert max_running > len(prompts), "trials ran beside their parents"
    got = [done[f"f{i}"].outputs[0].token_ids for i in range(len(prompts))]
    assert got == expected  # greedy trials continue exactly as the parent would
    decoder = eng.decoder
    assert isinstance(decoder, _ForkingDecoder)
    assert len(decoder.finished) == len(prompts) * 3  # parents + 2 trials each
    assert eng.block_manager.num_free_blocks == free0
    assert not eng.seqs


def test_attention_backend_lookahead_and_stats(tiny_model_dir: str) -> None:
    eng = LLMEngine(tiny_engine_config(tiny_model_dir, decoder="test_probe", block_size=4))
    out = run_to_completion(eng, [PROMPT], GREEDY)
    standard = LLMEngine(tiny_engine_config(tiny_model_dir, block_size=4))
    assert (
        out[0].outputs[0].token_ids
        == run_to_completion(standard, [PROMPT], GREEDY)[0].outputs[0].token_ids
    )
    decoder = eng.decoder
    assert isinstance(decoder, _ProbeDecoder) and decoder.backend is not None
    assert decoder.backend.calls == eng.num_steps
    assert eng.last_stats.decoder == {"probe": 1.0}


def test_step_logits_take_returns_the_asked_rows() -> None:
    values = torch.arange(6 * 5, dtype=torch.float32).view(6, 5)
    logits = StepLogits(values=values, offsets=[0, 2, 6])
    run = logits.take([2, 3, 4])  # consecutive: a view of the same storage
    assert torch.equal(run, values[2:5]) and run.data_ptr() == values[2].data_ptr()
    assert torch.equal(logits.take([5, 1, 3]), values[[5, 1, 3]])
    assert torch.equal(logits.take([4, 4]), values[[4, 4]])
    assert logits.take([]).shape == (0, 5)
