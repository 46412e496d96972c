"""Legacy completions' text_offset: characters of the choice's text, not of display strings."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from slipstream.engine.outputs import Logprob, TokenLogprobs
from slipstream.server.logprobs import TextOffsets, TokenText, completion_logprobs
from slipstream.testing.tiny_tokenizer import build_tiny_tokenizer

FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(512)


def expected_offsets(tok: PreTrainedTokenizerFast, ids: list[int]) -> list[int]:
    """Token i starts after the complete characters of tokens 0..i-1."""
    return [len(tok.decode(ids[:i]).rstrip(FFFD)) for i in range(len(ids))]


def test_text_offsets_step_over_characters_split_between_tokens() -> None:
    offsets = TextOffsets()
    pieces = [b"Hi", b"\xf0\x9f", b"\x8e\x89", b"!", b"\xff", b"a"]
    assert [offsets.next(p) for p in pieces] == [0, 2, 2, 3, 4, 5]
    assert offsets.chars == len(b"Hi\xf0\x9f\x8e\x89!\xffa".decode("utf-8", errors="replace"))


def test_completion_offsets_index_the_text(tok: PreTrainedTokenizerFast) -> None:
    text = "Party: 🎉🎉 and 日本 ok"  # 🎉 is not in the tiny tokenizer's corpus: byte tokens
    ids = list(tok.encode(text, add_special_tokens=False))
    assert len(ids) > len(text.split()), "the emoji should split into several tokens"
    token_text = TokenText(tok)
    entries: list[TokenLogprobs | None] = [None] + [
        TokenLogprobs(chosen=Logprob(token_id=t, logprob=-1.0, decoded=tok.decode([t])), top=[])
        for t in ids[1:]
    ]
    out = completion_logprobs(entries, 0, token_text, TextOffsets(), ids)
    assert out.text_offset == expected_offsets(tok, ids)
    assert max(out.text_offset) < len(text)
    # Display strings of split characters are long ("bytes:\\xf0\\x9f"): counting them, as
    # before, ran past the text's end.
    assert sum(len(t) for t in out.tokens) > len(text)


def test_offsets_carried_across_chunks_equal_one_pass(tok: PreTrainedTokenizerFast) -> None:
    ids = list(tok.encode("a 🎉 b 🎉🎉 c", add_special_tokens=False))
    token_text = TokenText(tok)
    entries = [TokenLogprobs(chosen=Logprob(token_id=t, logprob=-1.0), top=[]) for t in ids]
    whole = completion_logprobs(entries, 0, token_text, TextOffsets()).text_offset
    carried = TextOffsets()
    streamed: list[int] = []
    for start in range(0, len(entries), 3):
        chunk = completion_logprobs(entries[start : start + 3], 0, token_text, carried)
        streamed.extend(chunk.text_offset)
    assert streamed == whole == expected_offsets(tok, ids)
