"""A decoder made of several: each exclusive hook from the part that overrides it.

See decoding/registry.py for the naming ("a+b") and options format.
"""

from __future__ import annotations

from typing import Any

from slipstream.decoding.base import (
    Decoder,
    DecoderContext,
    StepInputs,
    StepLogits,
    StepResult,
    sample_last_tokens,
)
from slipstream.decoding.registry import hook_owners
from slipstream.engine.attention import AttentionBackend
from slipstream.engine.batch import Batch
from slipstream.engine.sequence import Sequence


class CompositeDecoder(Decoder):
    """Routes each exclusive hook to its owning part; broadcasts notifications."""

    def __init__(self, options: Any, ctx: DecoderContext, parts: list[Decoder]) -> None:
        super().__init__(options, ctx)
        self.parts = parts
        for part in parts:
            part.peers = [other for other in parts if other is not part]
        owner_classes = hook_owners([type(p) for p in parts])
        self.owner: dict[str, Decoder | None] = {
            hook: next((p for p in parts if type(p) is cls), None)
            for hook, cls in owner_classes.items()
        }

    def num_lookahead_slots(self, seq: Sequence, num_running: int) -> int:
        """The owning part's lookahead (0 if none overrides it)."""
        part = self.owner["num_lookahead_slots"]
        return 0 if part is None else part.num_lookahead_slots(seq, num_running)

    def prefill_tail(self) -> int:
        """The longest any part needs."""
        return max(part.prefill_tail() for part in self.parts)

    def attention_backend(self, layer_idx: int, default: AttentionBackend) -> AttentionBackend:
        """The owning part's backend for this layer (the default if none overrides it)."""
        part = self.owner["attention_backend"]
        return default if part is None else part.attention_backend(layer_idx, default)

    def build_inputs(self, batch: Batch) -> StepInputs:
        """The owning part's inputs (standard decoding if none overrides them)."""
        part = self.owner["build_inputs"]
        return super().build_inputs(batch) if part is None else part.build_inputs(batch)

    def select(self, batch: Batch, inputs: StepInputs, logits: StepLogits) -> StepResult:
        """The owning part's selection, with every other part's step stats merged in."""
        part = self.owner["select"]
        if part is None:
            result = StepResult(seqs=sample_last_tokens(self.ctx.sampler, batch, logits))
        else:
            result = part.select(batch, inputs, logits)
        for other in self.parts:
            if other is not part:
                result.stats.update(other.step_stats())
        return result

    def step_stats(self) -> dict[str, float]:
        """Every part's step stats (for a composite nested in another)."""
        merged: dict[str, float] = {}
        for part in self.parts:
            merged.update(part.step_stats())
        return merged

    def on_fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Tell every part."""
        for part in self.parts:
            part.on_fork(parent, children)

    def on_finish(self, seq: Sequence) -> None:
        """Tell every part."""
        for part in self.parts:
            part.on_finish(seq)

    def stats(self) -> dict[str, float]:
        """Every part's cumulative stats."""
        merged: dict[str, float] = {}
        for part in self.parts:
            merged.update(part.stats())
        return merged


def composite_class(name: str, parts: list[Decoder]) -> type[CompositeDecoder]:
    """A CompositeDecoder subclass carrying the composite's name and required features."""
    features: frozenset[str] = frozenset().union(*(type(p).required_features for p in parts))
    attrs = {"name": name, "required_features": features, "Options": dict}
    return type(f"Composite[{name}]", (CompositeDecoder,), attrs)
