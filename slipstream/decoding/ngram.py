"""ngram (prompt-lookup) decoding: draft the continuation of the latest suffix seen before.

The train-free baseline every speculative-decoding comparison quotes (Saxena's prompt lookup
decoding; vLLM's `ngram` method). Like vLLM: find the longest n in [prompt_lookup_min,
prompt_lookup_max] such that the last n tokens (prompt + output) occurred earlier, take the
earliest such occurrence, and draft up to num_speculative_tokens tokens that followed it as a
chain. Verification is the tree path of tree_verify.py (a chain is a one-branch tree), so
greedy output equals standard decoding and sampling stays lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def longest_suffix_match(
    tokens: list[int] | np.ndarray, min_n: int, max_n: int
) -> tuple[np.ndarray, int, int]:
    """The earliest occurrence of the longest suffix of `tokens` (min_n..max_n tokens) that
    also occurred earlier: (tokens as an array, where what followed it starts, its length);
    length 0 where no suffix of min_n tokens occurred before.

    The suffix is grown one token backwards at a time, from the last token, among the
    occurrences still matching: ~15 us for 400 tokens where comparing every min_n-token
    window took ~60 us. The decoders look up through suffix_index.SuffixIndex, which keeps
    this answer per sequence as it grows; this scan is the rule it is tested against.
    Example: tokens [1, 2, 3, 4, 2, 3], min_n 2, max_n 3 -> [4, 2, 3] never occurred before;
    [2, 3] did, at index 1 -> what followed starts at 3, length 2.
    """
    arr = np.asarray(tokens, dtype=np.int64)
    total = arr.shape[0]
    if total - 1 < min_n:
        return arr, 0, 0
    # ends: where earlier occurrences of the matched suffix end, ascending (before the last
    # token, so that something follows them).
    ends = np.flatnonzero(arr[: total - 1] == arr[total - 1])
    n = 1
    while n < max_n and ends.size > 1:
        back = ends[ends >= n]  # occurrences with room for one more token before them
        back = back[arr[back - n] == arr[total - 1 - n]]
        if not back.size:
            break
        ends, n = back, n + 1
    if ends.size == 1:  # one occurrence left: compare token by token (~0.1 us, not ~3)
        end = int(ends[0])
        seq = tokens if isinstance(tokens, list) else arr.tolist()
        while n < max_n and end - n >= 0 and seq[end - n] == seq[total - 1 - n]:
            n += 1
    if n < min_n or not ends.size:
        return arr, 0, 0
    return arr, int(ends[0]) + 1, n


def find_draft(tokens: list[int] | np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the earliest occurrence of the longest matching suffix.

    Example: tokens [1, 2, 3, 4, 2, 3], min_n 2, max_n 3, k 4 -> the suffix [4, 2, 3] never
    occurred before; [2, 3] did, at index 1, followed by [4, 2, 3] -> returns [4, 2, 3].
    """
    arr, begin, n = longest_suffix_match(tokens, min_n, max_n)
    return arr[begin : begin + k].tolist() if n else []


def find_longest_draft(
    tokens: list[int] | np.ndarray, min_n: int, max_n: int, k: int, factor: float
) -> list[int]:
    """find_draft's answer, at most `factor` x the matched suffix's length long.

    A suffix matched over 20 tokens is a copy or a loop and its continuation is likely;
    one matched over 3 tokens is a common phrase and may go anywhere. vLLM's suffix
    decoding bounds its drafts the same way (max_spec_factor, default 1.0). Offline, on 48
    builtin prompts (5 tree nodes plus the chain), lookup bounds 3..32 with 16 tokens and
    factor 1 gave 2.05 tokens per step where 5..5 with 8 tokens gave 1.98.
    Example: tokens [1, 2, 3, 9, 1, 2, 3], min_n 2, max_n 8, k 8, factor 1.0 -> [1, 2, 3]
    matched at index 0, followed by [9, 1, 2, 3] -> 3 tokens: [9, 1, 2].
    """
    arr, begin, n = longest_suffix_match(tokens, min_n, max_n)
    if not n:
        return []
    return arr[begin : begin + min(k, max(1, int(factor * n)))].tolist()


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
        index = seq.decoder_state.get("ngram_lookup")
        if index is None:
            index = SuffixIndex(o.prompt_lookup_min, o.prompt_lookup_max)
            seq.decoder_state["ngram_lookup"] = index
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
