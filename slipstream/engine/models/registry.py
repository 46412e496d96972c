"""Model classes by HF architecture name, and the interface the engine expects of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from slipstream.engine.attention import AttentionBackend, AttentionMetadata
from slipstream.engine.models.config import ModelArchConfig
from slipstream.utils.registry import Registry


class CausalLM(Protocol):
    """What the model runner and the decoders call on a model."""

    config: ModelArchConfig

    def __call__(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        """Final (normed) hidden states of every fed token."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab] float32."""
        ...

    def set_attention_backend(self, layer_idx: int, backend: AttentionBackend) -> None:
        """Replace one layer's attention backend."""
        ...

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Take HF-named tensors into the model's own layout."""
        ...


class ModelClass(Protocol):
    """A constructor of a CausalLM (parameters left uninitialised until load_weights)."""

    def __call__(
        self,
        config: ModelArchConfig,
        dtype: torch.dtype = ...,
        device: torch.device | str = ...,
        max_positions: int | None = ...,
    ) -> CausalLM:
        """Build the model."""
        ...


MODELS: Registry[ModelClass] = Registry("model architecture")
