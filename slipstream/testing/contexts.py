"""A DecoderContext for tests that build a decoder without an engine."""

from __future__ import annotations

from typing import Any

import torch

from slipstream.decoding.base import DecoderContext


def decoder_context(**overrides: Any) -> DecoderContext:
    """A small CPU float32 context (10-token vocabulary, 2 layers, 64 KV pages of 4 tokens,
    2 KV heads of 8, no sampler), with any field overridden."""
    fields: dict[str, Any] = {
        "vocab_size": 10,
        "eos_token_ids": frozenset(),
        "device": torch.device("cpu"),
        "dtype": torch.float32,
        "num_layers": 2,
        "max_model_len": 256,
        "num_kv_blocks": 64,
        "block_size": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "sampler": None,
    }
    fields.update(overrides)
    return DecoderContext(**fields)
