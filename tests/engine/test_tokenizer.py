"""Tokenizer loading, EOS ids, chat templates, and the tiny test tokenizer itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from slipstream.engine.tokenizer import (
    ChatTemplateError,
    apply_chat_template,
    eos_token_ids,
    load_tokenizer,
)
from slipstream.testing.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(512)


@pytest.mark.parametrize("vocab_size", [259, 300, 512, 1024])
def test_tiny_tokenizer_has_exact_vocab_size(vocab_size: int) -> None:
    tok = build_tiny_tokenizer(vocab_size)
    assert len(tok) == vocab_size
    assert max(tok.get_vocab().values()) == vocab_size - 1


def test_tiny_tokenizer_special_tokens_like_smollm2(tok: PreTrainedTokenizerFast) -> None:
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    # Special tokens are atomic, never split into bytes.
    assert tok.encode("<|im_start|>x<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>x<|im_end|>")[-1] == 2


def test_tiny_tokenizer_is_deterministic_and_returns_fresh_objects() -> None:
    a, b = build_tiny_tokenizer(400), build_tiny_tokenizer(400)
    assert a is not b
    assert a.get_vocab() == b.get_vocab()
    text = "The quick brown fox 😀 jumps 12345 times!"
    assert a.encode(text) == b.encode(text)
    assert a.decode(a.encode(text)) == text
    a.chat_template = None  # mutating one copy leaves the cache intact
    assert build_tiny_tokenizer(400).chat_template is not None


def test_tiny_tokenizer_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match=">= 259"):
        build_tiny_tokenizer(100)
    with pytest.raises(ValueError, match="built-in corpus"):
        build_tiny_tokenizer(50_000)


def test_tiny_tokenizer_round_trips_through_save_and_load(
    tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    text = "Hello there, 日本 café 😀"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.eos_token_id == 2
    assert apply_chat_template(loaded, [{"role": "user", "content": "hi"}]) == (
        apply_chat_template(tok, [{"role": "user", "content": "hi"}])
    )


def test_load_tokenizer_missing_folder_fails_without_network(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "nope"))


def test_eos_ids_merge_generation_config(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    assert eos_token_ids(tok, None) == frozenset({2})
    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert eos_token_ids(tok, str(config)) == frozenset({0, 2})
    config.write_text(json.dumps({"eos_token_id": 1}))
    assert eos_token_ids(tok, str(config)) == frozenset({1, 2})
    config.write_text(json.dumps({"bos_token_id": 1}))
    assert eos_token_ids(tok, str(config)) == frozenset({2})
    assert eos_token_ids(tok, str(tmp_path / "missing.json")) == frozenset({2})


def test_chat_template_renders_chatml_with_generation_prompt(tok: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    ids = apply_chat_template(tok, messages)
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = apply_chat_template(tok, messages, add_generation_prompt=False)
    assert str(tok.decode(without)).endswith("Hello<|im_end|>\n")


def test_chat_template_joins_text_parts(tok: PreTrainedTokenizerFast) -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    ids = apply_chat_template(tok, [{"role": "user", "content": parts}])
    assert "user\nfirst\nsecond<|im_end|>" in tok.decode(ids)
    # None content (an assistant turn with tool calls) renders as empty.
    ids = apply_chat_template(tok, [{"role": "assistant", "content": None}])
    assert "assistant\n<|im_end|>" in tok.decode(ids)


def test_chat_template_errors(tok: PreTrainedTokenizerFast) -> None:
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(ChatTemplateError, match="image_url"):
        apply_chat_template(tok, [{"role": "user", "content": image}])
    with pytest.raises(ChatTemplateError, match="role"):
        apply_chat_template(tok, [{"content": "hi"}])
    bare = build_tiny_tokenizer(512)
    bare.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        apply_chat_template(bare, [{"role": "user", "content": "hi"}])
