"""Which token ids count as punctuation, found by decoding the vocabulary once.

CNTP (cautious sampling) ends a trial right after a punctuation token. The official code
takes `tokenizer.encode(c)[0]` for each character, which breaks on tokenizers whose first
piece is not the character itself (a SentencePiece "\\n" encodes to the bare-space piece
first) and misses merged tokens such as ").", ".\\n" or "\\n\\n". Decoding every id instead
finds all of them, whatever the tokenizer.
"""

from __future__ import annotations

from typing import Any

# The ten characters of the official code: . , newline ? ! : ; ) ] }
DEFAULT_PUNCTUATION = ".,\n?!:;)]}"

# Decoded text is matched after dropping these from its end, so a token such as "\n    "
# (a line break plus indentation) or ". " still counts as ending in punctuation.
_TRAILING_BLANKS = " \t"


def ends_with_punctuation(text: str, chars: str = DEFAULT_PUNCTUATION) -> bool:
    """Whether `text`, trailing spaces and tabs ignored, ends with one of `chars`.

    Example: ").", "\\n   " and "!" do; ".5", "(" and "" do not.
    """
    stripped = text.rstrip(_TRAILING_BLANKS)
    return bool(stripped) and stripped[-1] in chars


def punctuation_token_ids(
    tokenizer: Any, vocab_size: int, chars: str = DEFAULT_PUNCTUATION
) -> frozenset[int]:
    """Ids (below vocab_size) whose decoded text ends with one of `chars`; special ids never.

    `tokenizer` is a transformers tokenizer (anything with batch_decode). Decoding a 128k
    vocabulary in one batch takes about a second, once per engine start.
    """
    if tokenizer is None or not chars:
        return frozenset()
    num_ids = min(vocab_size, len(tokenizer))
    texts: list[str] = tokenizer.batch_decode([[i] for i in range(num_ids)])
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    return frozenset(
        i for i, text in enumerate(texts) if i not in special and ends_with_punctuation(text, chars)
    )
