"""Engine logprobs -> the OpenAI shapes (chat: content list; completions: parallel lists)."""

from __future__ import annotations

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


def _value(logprob: float) -> float:
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB


class TokenText:
    """Token id -> display text, preferring the engine's decoded string."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, lp: Logprob) -> str:
        """The token's text."""
        if lp.decoded:
            return lp.decoded
        return str(self.tokenizer.decode([lp.token_id]))


def chat_logprobs(
    entries: Sequence[TokenLogprobs], num_top: int, token_text: TokenText
) -> ChatLogprobs:
    """choices[i].logprobs for chat: one entry per generated token."""
    content = []
    for entry in entries:
        text = token_text(entry.chosen)
        top = [
            TopLogprob(token=(t := token_text(alt)), logprob=_value(alt.logprob), bytes=_bytes(t))
            for alt in entry.top[:num_top]
        ]
        content.append(
            ChatTokenLogprob(
                token=text,
                logprob=_value(entry.chosen.logprob),
                bytes=_bytes(text),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    entries: Sequence[TokenLogprobs | None],
    num_top: int,
    token_text: TokenText,
    text_offset: int,
    token_ids: Sequence[int] | None = None,
) -> CompletionLogprobs:
    """Legacy logprobs; a None entry (the first prompt token) has no logprob.

    `token_ids` names the tokens of None entries; `text_offset` is where the first token's
    text starts in the choice's text.
    """
    out = CompletionLogprobs()
    offset = text_offset
    for i, entry in enumerate(entries):
        if entry is None:
            token_id = token_ids[i] if token_ids is not None else 0
            text = token_text(Logprob(token_id=token_id, logprob=0.0))
            out.tokens.append(text)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            text = token_text(entry.chosen)
            out.tokens.append(text)
            out.token_logprobs.append(_value(entry.chosen.logprob))
            top = {token_text(alt): _value(alt.logprob) for alt in entry.top[:num_top]}
            out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))
