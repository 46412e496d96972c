"""Incremental detokenization with stop strings.

Two layers:
1. Token ids -> safe text. Decoding the whole output every step costs O(output) per token;
   instead (vLLM's prefix/read offsets) we keep only a short window of ids: window[:read_offset]
   were emitted last time and serve as context, window[read_offset:] are new. The new text is
   decode(window) minus decode(window[:read_offset]); after each emit the window slides to
   start at the old read offset, so its length stays a few tokens. Starting
   the window a few tokens back keeps context-dependent decoders (SentencePiece's leading
   space) right. Text ending in U+FFFD is held back: byte-level BPE splits a multi-byte
   character over several tokens, and the first ones alone decode to the replacement char.
2. Safe text -> emitted text. A suffix that could still grow into a stop string is held
   back; once a stop string completes, the text is cut before it (or after it with
   include_stop_str_in_output) and nothing more is emitted. As in vLLM, a stop string
   counts only where it completes at or after the `min_tokens`-th output token.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
# How many prompt tokens the first window reaches back (vLLM uses 5): enough context for
# decoders whose output depends on the previous token.
INITIAL_WINDOW = 5


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas that are safe to stream."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.min_tokens = min_tokens
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(s for s in stop if s)
        self.include_stop_str_in_output = include_stop_str_in_output
        # NOTE: only the window is kept: ids before it are never decoded again.
        tail = list(prompt_token_ids[-INITIAL_WINDOW:])
        self._ids: list[int] = tail
        self._read_offset = len(tail)
        self._prefix_text = self._decode(tail)
        # Decoded text not yet emitted because it may be the start of a stop string.
        self._pending = ""
        self.text = ""
        self.stopped_by: str | None = None
        self.num_output_tokens = 0

    @property
    def stopped(self) -> bool:
        """A stop string completed; further tokens produce no text."""
        return self.stopped_by is not None

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly emittable text (maybe empty)."""
        self.num_output_tokens += len(new_token_ids)
        if self.stopped or not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        return self._emit(self._advance(), final=False)

    def flush(self) -> str:
        """At finish: emit everything held back (incomplete characters, stop-string prefixes)."""
        if self.stopped:
            return ""
        window_text = self._decode(self._ids)
        tail = window_text[len(self._prefix_text) :]
        self._compact(len(self._ids))
        return self._emit(tail, final=True)

    def _advance(self) -> str:
        """Decode the window; return the new safe text and move the offsets past it."""
        # Try all new tokens at once (the common case), then shorter prefixes of them, so a
        # split character at the end of a speculative chunk does not hold back the rest.
        for end in range(len(self._ids), self._read_offset, -1):
            window_text = self._decode(self._ids[:end])
            if len(window_text) > len(self._prefix_text) and not window_text.endswith(
                REPLACEMENT_CHAR
            ):
                delta = window_text[len(self._prefix_text) :]
                self._compact(end)
                return delta
        return ""

    def _compact(self, end: int) -> None:
        """Make ids[read_offset:end] the new prefix window and drop the ids before it."""
        del self._ids[: self._read_offset]
        self._read_offset = end - self._read_offset
        # NOTE: decoded on its own, not cut from the longer window: the next window starts
        # here, and decoders like SentencePiece's drop a leading space at a window's start.
        self._prefix_text = self._decode(self._ids[: self._read_offset])

    def _emit(self, new_text: str, final: bool) -> str:
        """Pass decoded text through the stop-string filter; record and return what is emitted."""
        if not self.stop:
            self.text += new_text
            return new_text
        buffer = self._pending + new_text
        # Before min_tokens a stop string that completes is emitted as text; one that may
        # still complete later stays held back.
        live = self.num_output_tokens >= self.min_tokens
        hit = _find_first_stop(buffer, self.stop) if live else None
        if hit is not None:
            index, stop_str = hit
            end = index + len(stop_str) if self.include_stop_str_in_output else index
            out = buffer[:end]
            self.stopped_by = stop_str
            self._pending = ""
        else:
            keep = 0 if final else _longest_stop_prefix_suffix(buffer, self.stop)
            out = buffer[: len(buffer) - keep]
            self._pending = buffer[len(buffer) - keep :]
        self.text += out
        return out

    def _decode(self, ids: list[int]) -> str:
        """Decode a window of ids without cleanup, so window texts concatenate exactly."""
        if not ids:
            return ""
        text = self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )
        assert isinstance(text, str), type(text)
        return text


def _find_first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The stop string occurrence that completes first in text: (start index, stop string).

    Ordering by end position is what token-by-token streaming would see; among occurrences
    ending at the same place the one starting earliest (the longer stop string) wins.
    """
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    return None if best is None else (best[1], best[2])


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string.

    Example: text "foo <|e", stops ("<|end|>",) -> 3 ("<|e" may become "<|end|>").
    """
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
