"""Loading a model's tokenizer, its EOS ids and its chat template (transformers, local only)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# A chat message as the OpenAI API sends it: {"role": ..., "content": str | list of parts}.
Message = Mapping[str, Any]


class ChatTemplateError(ValueError):
    """The model cannot render a chat conversation (no template, or unsupported content)."""


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a local model folder; never contacts the HF hub."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tokenizer


def eos_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_config_path: str | None = None
) -> frozenset[int]:
    """The tokenizer's EOS id plus every eos_token_id listed in generation_config.json.

    Llama 3 and friends end turns with a token (e.g. <|eot_id|>) that only the generation
    config names, so both sources are needed.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if generation_config_path is not None and os.path.exists(generation_config_path):
        with open(generation_config_path, encoding="utf-8") as f:
            config = json.load(f)
        ids.update(_as_int_list(config.get("eos_token_id")))
    return frozenset(ids)


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Iterable[Message],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """Render messages with the model's chat template and tokenize the result."""
    return chat_prompt(tokenizer, messages, add_generation_prompt, continue_final_message)[1]


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Iterable[Message],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> tuple[str, list[int]]:
    """The prompt text the model's chat template makes of the messages, and its token ids.

    `continue_final_message` leaves the last message open (no end-of-turn after it), so the
    model continues it: an assistant reply prefilled with its first words (vLLM's option of
    the same name). It excludes `add_generation_prompt`, which would open a new turn.
    """
    check_chat_flags(add_generation_prompt, continue_final_message)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError(
            "this model's tokenizer has no chat template, so chat requests cannot be "
            "formatted; use the completions endpoint with a raw prompt instead"
        )
    conversation = [_normalise_message(m) for m in messages]
    text = tokenizer.apply_chat_template(
        conversation,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tokenize=False,
    )
    assert isinstance(text, str), type(text)
    # NOTE: the template already writes any BOS it wants; add_special_tokens=True would add
    # a second one for tokenizers that prepend BOS (Llama).
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return text, ids


def check_chat_flags(add_generation_prompt: bool, continue_final_message: bool) -> None:
    """ChatTemplateError where both are set: one continues the last message, the other
    opens a new assistant turn after it."""
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError(
            "continue_final_message and add_generation_prompt cannot both be true (set "
            "add_generation_prompt to false to continue the last message)"
        )


def _normalise_message(message: Message) -> dict[str, Any]:
    """Copy a message, joining a list of text parts into one content string."""
    if "role" not in message:
        raise ChatTemplateError(f"chat message without a role: {dict(message)!r}")
    out = dict(message)
    out["content"] = _content_text(message.get("content"))
    return out


def _content_text(content: Any) -> str:
    """OpenAI content: a string, None (assistant tool calls) or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatTemplateError(f"unsupported content part type: {kind!r} (only 'text')")
            texts.append(str(part.get("text", "")))
        # OpenAI does not define a separator; vLLM joins text parts with a newline.
        return "\n".join(texts)
    raise ChatTemplateError(f"message content must be a string or a list, got {type(content)}")


def _as_int_list(value: Any) -> list[int]:
    """generation_config's eos_token_id is an int, a list of ints, or absent."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
