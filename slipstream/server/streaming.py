"""Server-sent events: `data: {chunk}` framing, safe text deltas, and the error/[DONE] tail."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from slipstream.backends.base import EngineError
from slipstream.server.errors import APIError, from_engine_error

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any]) -> bytes:
    """One SSE event carrying a JSON object."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + body.encode("utf-8") + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    """The error event sent when a stream fails after its 200 header went out."""
    if isinstance(exc, APIError):
        error = exc
    elif isinstance(exc, EngineError):
        error = from_engine_error(exc)
    else:
        error = APIError(500, "Internal server error while streaming the response.")
    return sse(error.envelope())


async def with_error_tail(events: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """Pass `events` through; on failure emit an error event; always end with [DONE].

    Cancellation (the client went away) is not an Exception and passes straight through;
    `events` is closed on every path, so its cleanup (the engine abort) runs promptly.
    """
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                yield event
        except Exception as exc:
            if not isinstance(exc, APIError | EngineError):
                logger.exception("stream failed")
            yield sse_error(exc)
    yield DONE


class TextDelta:
    """Turns a completion's cumulative text into deltas that never split a character.

    Byte-level BPE spreads a multi-byte UTF-8 character over several tokens, and the first
    of them decode to U+FFFD; such a tail is held back until the character completes. So
    is a tail that could still grow into a stop string (the engine may later cut it off).
    """

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.sent = 0

    def step(self, text: str, finished: bool) -> str:
        """The new text to send for cumulative `text` (everything once `finished`)."""
        end = len(text) if finished else self._safe_end(text)
        if end <= self.sent:
            return ""
        delta = text[self.sent : end]
        self.sent = end
        return delta

    def _safe_end(self, text: str) -> int:
        end = len(text.rstrip(REPLACEMENT_CHAR))
        held = 0
        for stop in self.stops:
            # The longest proper prefix of `stop` that ends the text may still become `stop`.
            for k in range(min(len(stop) - 1, end), held, -1):
                if text.endswith(stop[:k], 0, end):
                    held = k
                    break
        return end - held
