"""Incremental detokenization: split UTF-8 characters, bounded windows, stop strings."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slipstream.engine.detokenizer import IncrementalDetokenizer
from slipstream.testing.tiny_tokenizer import build_tiny_tokenizer

FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(512)


def _byte_to_symbol() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_SYMBOL = _byte_to_symbol()


def byte_ids(tok: PreTrainedTokenizerFast, data: bytes) -> list[int]:
    """One token per byte: the most adversarial split of a UTF-8 string."""
    ids = tok.convert_tokens_to_ids([BYTE_SYMBOL[b] for b in data])
    assert isinstance(ids, list) and tok.unk_token_id not in ids
    return ids


def stream(
    d: IncrementalDetokenizer, ids: list[int], chunk: int = 1, flush: bool = True
) -> list[str]:
    """Feed ids in chunks; return the deltas (plus the flush, if asked)."""
    deltas = [d.add_tokens(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    if flush:
        deltas.append(d.flush())
    return deltas


def chunks(ids: list[int], sizes: Iterable[int]) -> list[list[int]]:
    """Split ids into consecutive pieces of the given sizes (the rest in the last piece)."""
    out, i = [], 0
    for n in sizes:
        if i >= len(ids):
            break
        out.append(ids[i : i + n])
        i += n
    if i < len(ids):
        out.append(ids[i:])
    return out


def test_tiny_tokenizer_stream_reconstructs_text(tok: PreTrainedTokenizerFast) -> None:
    text = "Hello 😀 world, 日本語 and café: the end."
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    deltas = stream(d, ids)
    assert "".join(deltas) == text == d.text
    assert not any(FFFD in x for x in deltas)


@pytest.mark.parametrize("char", ["😀", "日", "é", "❤"])
def test_multibyte_char_split_into_byte_tokens_is_held_until_complete(
    tok: PreTrainedTokenizerFast, char: str
) -> None:
    data = char.encode()
    ids = byte_ids(tok, b"a" + data + b"b")
    d = IncrementalDetokenizer(tok, [])
    deltas = stream(d, ids, flush=False)
    # 'a', then nothing until the last byte of the char, then the char, then 'b'.
    assert deltas == ["a", *[""] * (len(data) - 1), char, "b"]


def test_several_tokens_per_call_emit_up_to_the_last_complete_char(
    tok: PreTrainedTokenizerFast,
) -> None:
    ids = byte_ids(tok, "ab😀".encode())  # a, b, then 4 bytes
    d = IncrementalDetokenizer(tok, [])
    # A speculative chunk ending inside the emoji still emits "ab" right away.
    assert d.add_tokens(ids[:4]) == "ab"
    assert d.add_tokens(ids[4:]) == "😀"
    assert d.flush() == ""


def test_flush_emits_incomplete_tail_like_full_decode(tok: PreTrainedTokenizerFast) -> None:
    ids = byte_ids(tok, b"ok" + "😀".encode()[:2])
    d = IncrementalDetokenizer(tok, [])
    deltas = stream(d, ids)
    assert deltas[-1].endswith(FFFD)
    assert "".join(deltas) == tok.decode(ids)


def test_prompt_context_and_special_tokens(tok: PreTrainedTokenizerFast) -> None:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tok.encode(prompt)
    out_ids = tok.encode(" Hello there<|im_end|>")
    kept = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=False)
    assert "".join(stream(kept, out_ids)) == " Hello there<|im_end|>"
    skipped = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=True)
    assert "".join(stream(skipped, out_ids)) == " Hello there"


def test_window_stays_bounded(
    tok: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step decodes a few tokens, however long the output is (no O(n^2) re-decoding)."""
    ids = tok.encode("The river ran slowly past the old mill, 😀 日本語. " * 40)
    assert len(ids) > 500
    sizes: list[int] = []
    real_decode = tok.decode

    def spy(token_ids: list[int], **kwargs: object) -> str:
        sizes.append(len(token_ids))
        return str(real_decode(token_ids, **kwargs))  # type: ignore[arg-type]

    d = IncrementalDetokenizer(tok, tok.encode("prompt text here"))
    monkeypatch.setattr(tok, "decode", spy)
    deltas = stream(d, ids)
    monkeypatch.undo()
    assert "".join(deltas) == tok.decode(ids)
    # A window holds the last emitted tokens plus at most 4 byte tokens of one character.
    assert max(sizes) <= 10


def test_stop_string_spanning_tokens_is_held_then_cut(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("Hello world and more")
    d = IncrementalDetokenizer(tok, [], stop=("o wor",))
    deltas = stream(d, ids, flush=False)
    assert d.stopped_by == "o wor"
    assert d.text == "".join(deltas) == "Hell"
    # Nothing after the stop, not even from flush.
    assert d.add_tokens(tok.encode(" again")) == ""
    assert d.flush() == ""


def test_include_stop_str_in_output(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("one two three four")
    d = IncrementalDetokenizer(tok, [], stop=("three",), include_stop_str_in_output=True)
    stream(d, ids)
    assert d.text == "one two three"
    assert d.stopped_by == "three"


def test_stop_prefix_held_back_then_released(tok: PreTrainedTokenizerFast) -> None:
    d = IncrementalDetokenizer(tok, [], stop=("END!",))
    assert d.add_tokens(tok.encode("abc EN")) == "abc "
    # "EN" then "Dx": not the stop string after all, so it is released.
    assert d.add_tokens(tok.encode("Dx")) == "ENDx"
    assert d.add_tokens(tok.encode(" E")) == " "
    assert d.flush() == "E"  # finished without the stop: held text comes out
    assert d.stopped_by is None and d.text == "abc ENDx E"


def test_stop_in_the_middle_of_a_multi_token_chunk(tok: PreTrainedTokenizerFast) -> None:
    d = IncrementalDetokenizer(tok, [], stop=("stop", "the"))
    assert d.add_tokens(tok.encode("we stop at the end")) == "we "
    assert d.stopped_by == "stop"


def test_stop_that_completes_first_wins(tok: PreTrainedTokenizerFast) -> None:
    # "bc" completes (at 'c') before "abcd" would (at 'd'), as token-by-token streaming sees.
    d = IncrementalDetokenizer(tok, [], stop=("abcd", "bc"))
    assert d.add_tokens(tok.encode("xabcd")) == "xa"
    assert d.stopped_by == "bc"


def test_stop_string_with_emoji_split_over_byte_tokens(tok: PreTrainedTokenizerFast) -> None:
    ids = byte_ids(tok, "hi 😀 there".encode())
    d = IncrementalDetokenizer(tok, [], stop=("😀",))
    deltas = stream(d, ids)
    assert d.text == "hi " and d.stopped_by == "😀"
    assert not any(FFFD in x for x in deltas)


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (▁ marks spaces, a leading one is dropped when decoding)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator(["the cat sat on the mat", "a dog and a cat"] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_sentencepiece_style_leading_spaces_survive_windows() -> None:
    tok = _metaspace_tokenizer()
    prompt = tok.encode("a dog sat")
    out = tok.encode("the cat sat on the mat and a dog")
    d = IncrementalDetokenizer(tok, prompt)
    text = "".join(stream(d, out))
    full = tok.decode(prompt + out)
    assert text == full[len(tok.decode(prompt)) :]
    assert text.startswith(" the cat")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ids=st.lists(st.integers(0, 511), max_size=40),
    sizes=st.lists(st.integers(1, 5), max_size=40),
    skip=st.booleans(),
)
def test_random_ids_stream_equals_full_decode(
    tok: PreTrainedTokenizerFast, ids: list[int], sizes: list[int], skip: bool
) -> None:
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    deltas = [d.add_tokens(c) for c in chunks(ids, sizes)]
    deltas.append(d.flush())
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full == d.text
    # No delta before the flush ends in a replacement char that may yet become a character.
    assert not any(x.endswith(FFFD) for x in deltas[:-1] if not full.count(FFFD))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ids=st.lists(st.integers(3, 511), min_size=1, max_size=30),
    sizes=st.lists(st.integers(1, 4), max_size=30),
    span=st.tuples(st.integers(0, 200), st.integers(1, 4)),
    include=st.booleans(),
)
def test_random_ids_with_stop_equal_truncated_full_decode(
    tok: PreTrainedTokenizerFast,
    ids: list[int],
    sizes: list[int],
    span: tuple[int, int],
    include: bool,
) -> None:
    full = str(tok.decode(ids))
    start = span[0] % len(full) if full else 0
    stop = full[start : start + span[1]] or "zz"
    d = IncrementalDetokenizer(tok, [], stop=(stop,), include_stop_str_in_output=include)
    deltas = [d.add_tokens(c) for c in chunks(ids, sizes)]
    deltas.append(d.flush())
    i = full.find(stop)
    if i < 0:
        expected = full
        assert d.stopped_by is None
    else:
        expected = full[: i + len(stop)] if include else full[:i]
        assert d.stopped_by == stop
    assert "".join(deltas) == expected == d.text


def test_stop_strings_count_from_min_tokens_on(tok: PreTrainedTokenizerFast) -> None:
    """As in vLLM: a stop string that completes before the min_tokens-th output token is
    text; one that completes at or after it stops the output."""
    ids = byte_ids(tok, b"ab ab ab")  # one token per character
    early = IncrementalDetokenizer(tok, [], stop=("ab",), min_tokens=5)
    deltas = stream(early, ids, flush=False)
    # "ab" completes at tokens 2 and 5: the first is text, the second stops (cut before it).
    assert early.stopped_by == "ab" and early.text == "".join(deltas) == "ab "
    # A stop string that starts before min_tokens and completes after it counts too.
    straddling = IncrementalDetokenizer(tok, [], stop=("b ab",), min_tokens=4)
    stream(straddling, ids, flush=False)
    assert straddling.stopped_by == "b ab" and straddling.text == "a"
    # Without min_tokens the first occurrence stops.
    plain = IncrementalDetokenizer(tok, [], stop=("ab",))
    stream(plain, ids, flush=False)
    assert plain.stopped_by == "ab" and plain.text == ""
    # min_tokens past the whole output: no stop at all, every character emitted.
    never = IncrementalDetokenizer(tok, [], stop=("ab",), min_tokens=9)
    assert "".join(stream(never, ids)) == "ab ab ab" and never.stopped_by is None
