"""ngram (prompt-lookup) decoding: draft the continuation of the latest suffix seen before.

The train-free baseline every speculative-decoding comparison quotes (Saxena's prompt lookup
decoding; vLLM's `ngram` method). Like vLLM: find the longest n in [prompt_lookup_min,
prompt_lookup_max] such that the last n tokens (prompt + output) occurred earlier, take the
earliest such occurrence, and draft up to num_speculative_tokens tokens that followed it as a
chain (suffix_index.py, an index each sequence keeps). Verification is the tree path of
tree_verify.py (a chain is a one-branch tree), so greedy output equals standard decoding and
sampling stays lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

from slipstream.decoding.base import DecoderContext
from slipstream.decoding.draft_tree import TreeTemplate, chain_template
from slipstream.decoding.registry import DECODERS
from slipstream.decoding.suffix_index import SuffixIndex
from slipstream.decoding.tree_verify import Draft, TreeSpecDecoder
from slipstream.engine.batch import ScheduledSeq
from slipstream.engine.sequence import Sequence


@dataclass(frozen=True)
class NgramOptions:
    """--decoder-config keys of ngram (vLLM's names and defaults: both lookup bounds 5)."""

    prompt_lookup_min: int = 5
    prompt_lookup_max: int = 5
    # vLLM requires this; the vLLM-CPU runs used 4 (3.1 tokens/step) and 8 (4.0).
    num_speculative_tokens: int = 4

    def __post_init__(self) -> None:
        check_lookup_bounds(self.prompt_lookup_min, self.prompt_lookup_max)
        if self.num_speculative_tokens < 1:
            raise ValueError(
                f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}"
            )


def check_lookup_bounds(min_n: int, max_n: int) -> None:
    """Prompt-lookup suffix lengths: 1 <= min <= max (ngram and token recycling's graft)."""
    if not 1 <= min_n <= max_n:
        raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}")


@DECODERS.register("ngram")
class NgramDecoder(TreeSpecDecoder):
    """Prompt-lookup drafts, verified as a chain in one forward."""

    name = "ngram"
    Options = NgramOptions
    required_features = frozenset({"tree_mask", "kv_compaction"})

    def __init__(self, options: NgramOptions, ctx: DecoderContext) -> None:
        super().__init__(options, ctx)
        self.opts = options
        self._chains: dict[int, TreeTemplate] = {}

    def plan_draft(self, seq: Sequence, num_running: int) -> int:
        """Look the draft up now so that only matched sequences reserve slots."""
        o = self.opts
        index = SuffixIndex.of(seq, "ngram_lookup", o.prompt_lookup_min, o.prompt_lookup_max)
        draft = index.draft(seq.token_ids, o.num_speculative_tokens)
        seq.decoder_state["ngram_draft"] = draft
        return len(draft)

    def propose(self, items: list[ScheduledSeq]) -> list[Draft | None]:
        """The looked-up chain, cut to the slots granted."""
        out: list[Draft | None] = []
        for item in items:
            seq = item.seq
            draft = list(seq.decoder_state.pop("ngram_draft", []))[: item.num_lookahead_slots]
            if not draft:
                out.append(None)
                continue
            n = len(draft)
            if n not in self._chains:
                self._chains[n] = chain_template(n)
            out.append(Draft(self._chains[n], [seq.token_ids[-1], *draft]))
        return out
