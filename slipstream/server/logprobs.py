"""Engine logprobs -> the OpenAI shapes (chat: content list; completions: parallel lists)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from slipstream.engine.outputs import Logprob, TokenLogprobs
from slipstream.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)

# JSON has no -inf; vLLM clamps the same way so that strict JSON parsers accept the body.
MIN_LOGPROB = -9999.0
REPLACEMENT_CHAR = "\ufffd"


def _value(logprob: float) -> float:
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB


class TokenText:
    """Token id -> (display text, UTF-8 bytes), as OpenAI shows tokens in logprobs.

    A byte-level BPE token may hold part of a multi-byte character; its text is then shown
    as OpenAI does ("bytes:\\xe6\\x97") and its `bytes` are the real ones, so a client can
    rebuild the text by concatenating bytes.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, lp: Logprob) -> str:
        """The token's display text."""
        return self.lookup(lp)[0]

    def lookup(self, lp: Logprob) -> tuple[str, list[int]]:
        """(display text, bytes) of a token."""
        if lp.decoded and REPLACEMENT_CHAR not in lp.decoded:
            return lp.decoded, list(lp.decoded.encode("utf-8"))
        cached = self._cache.get(lp.token_id)
        if cached is None:
            raw = token_bytes(self.tokenizer, lp.token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            cached = self._cache[lp.token_id] = (text, list(raw))
        return cached


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes a token stands for (byte-level BPE, SentencePiece byte fallback, or text)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        decoder = _byte_decoder()
        decoded = tokenizer.decode([token_id])
        if REPLACEMENT_CHAR in decoded and all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        return str(decoded).encode("utf-8")
    return str(tokenizer.decode([token_id])).encode("utf-8")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it encodes (GPT-2 scheme)."""
    # Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in order,
    # to U+0100 onwards.
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {chr(b): b for b in keep}
    shift = 0
    for b in range(256):
        if b not in keep:
            mapping[chr(256 + shift)] = b
            shift += 1
    return mapping


def chat_logprobs(
    entries: Sequence[TokenLogprobs], num_top: int, token_text: TokenText
) -> ChatLogprobs:
    """choices[i].logprobs for chat: one entry per generated token."""
    content = []
    for entry in entries:
        top = []
        for alt in entry.top[:num_top]:
            alt_text, alt_bytes = token_text.lookup(alt)
            top.append(TopLogprob(token=alt_text, logprob=_value(alt.logprob), bytes=alt_bytes))
        text, raw = token_text.lookup(entry.chosen)
        content.append(
            ChatTokenLogprob(
                token=text, logprob=_value(entry.chosen.logprob), bytes=raw, top_logprobs=top
            )
        )
    return ChatLogprobs(content=content)


class TextOffsets:
    """Where each token starts in the text its tokens decode to, in characters, fed token by
    token (its bytes). A token that ends inside a multi-byte character moves the offset only
    once a later token completes the character: the 2-byte halves of an emoji both start at
    the emoji, and the next token one character after it. (Counting each token's display
    text instead, "bytes:\\xf0\\x9f" is 14 characters, put offsets past the text's end.)

    Example: tokens b"Hi", b"\\xf0\\x9f", b"\\x8e\\x89", b"!" -> offsets 0, 2, 2, 3.
    """

    def __init__(self) -> None:
        self.chars = 0
        self._partial = b""  # the start of a character whose last bytes are still to come

    def next(self, raw: bytes) -> int:
        """The offset of the token with bytes `raw`, then move past it."""
        offset = self.chars
        data = self._partial + raw
        try:
            self.chars += len(data.decode("utf-8"))
            self._partial = b""
        except UnicodeDecodeError as exc:
            complete = exc.reason == "unexpected end of data" and len(data) - exc.start < 4
            head = data[: exc.start] if complete else data
            self.chars += len(head.decode("utf-8", errors="replace"))
            self._partial = data[exc.start :] if complete else b""
        return offset


def completion_logprobs(
    entries: Sequence[TokenLogprobs | None],
    num_top: int,
    token_text: TokenText,
    offsets: TextOffsets,
    token_ids: Sequence[int] | None = None,
) -> CompletionLogprobs:
    """Legacy logprobs; a None entry (the first prompt token) has no logprob.

    `token_ids` names the tokens of None entries; `offsets` holds where the choice's text
    stands before the first of these tokens (a stream carries it from chunk to chunk, so
    streamed offsets equal the whole response's).
    """
    out = CompletionLogprobs()
    for i, entry in enumerate(entries):
        if entry is None:
            token_id = token_ids[i] if token_ids is not None else 0
            text, raw = token_text.lookup(Logprob(token_id=token_id, logprob=0.0))
            out.tokens.append(text)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            text, raw = token_text.lookup(entry.chosen)
            out.tokens.append(text)
            out.token_logprobs.append(_value(entry.chosen.logprob))
            top = {token_text(alt): _value(alt.logprob) for alt in entry.top[:num_top]}
            out.top_logprobs.append(top)
        out.text_offset.append(offsets.next(bytes(raw)))
    return out
