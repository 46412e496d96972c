"""Finding and loading the tokenizer the load tester uses for prompt lengths and counting."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# `--tokenizer none` turns tokenization off: the random dataset is then unavailable and output
# tokens the server does not report are counted as streamed chunks (and the report says so).
NO_TOKENIZER = "none"


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the load tester uses."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]:
        """Text to token ids."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """Token ids to text."""
        ...


class TokenizerUnavailable(RuntimeError):
    """Raised when a dataset needs a tokenizer and none can be found."""


def default_tokenizer_path() -> str | None:
    """The default model's folder (which holds its tokenizer), or None when it is not installed."""
    try:
        # Imported lazily: the engine package is heavy and the default model may be absent.
        from slipstream.engine.models.default_model import resolve_model_path
    except ImportError:
        return None
    try:
        path = resolve_model_path(None)
    except Exception as exc:  # any failure to locate or convert just means "no default"
        logger.warning("default model tokenizer unavailable: %s", exc)
        return None
    return str(path) if path is not None else None


def load_tokenizer(path: str | None) -> Tokenizer:
    """Load a local HF tokenizer folder (None = the default model's); raise TokenizerUnavailable."""
    if path == NO_TOKENIZER:
        raise TokenizerUnavailable("tokenization is turned off (--tokenizer none)")
    resolved = path or default_tokenizer_path()
    if resolved is None:
        raise TokenizerUnavailable(
            "no tokenizer: pass --tokenizer PATH (a local Hugging Face tokenizer folder); "
            "the default model's tokenizer is not available"
        )
    if not Path(resolved).exists():
        raise TokenizerUnavailable(f"tokenizer folder {resolved} does not exist")
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(resolved, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerUnavailable(f"cannot load a tokenizer from {resolved}: {exc}") from exc
    return tokenizer


class LazyTokenizer:
    """Loads the tokenizer on first use and remembers a failure instead of retrying."""

    def __init__(self, path: str | None, preloaded: Tokenizer | None = None) -> None:
        self._path = path
        self._tokenizer = preloaded
        self._error: str | None = None

    def get(self) -> Tokenizer | None:
        """The tokenizer, or None when it cannot be loaded (the reason is in `error`)."""
        if self._tokenizer is None and self._error is None:
            try:
                self._tokenizer = load_tokenizer(self._path)
            except TokenizerUnavailable as exc:
                self._error = str(exc)
        return self._tokenizer

    def require(self) -> Tokenizer:
        """The tokenizer, or TokenizerUnavailable with the reason."""
        tokenizer = self.get()
        if tokenizer is None:
            raise TokenizerUnavailable(self._error or "no tokenizer")
        return tokenizer

    @property
    def error(self) -> str | None:
        """Why loading failed, if it did."""
        return self._error
