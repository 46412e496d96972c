"""Llama-family models implemented in PyTorch, and loading them from HF folders and GGUF files."""

from slipstream.engine.models.config import SUPPORTED_ARCHITECTURES, ModelArchConfig
from slipstream.engine.models.llama import LlamaForCausalLM
from slipstream.engine.models.loader import load_model
from slipstream.engine.models.registry import MODELS, CausalLM

__all__ = [
    "MODELS",
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "LlamaForCausalLM",
    "ModelArchConfig",
    "load_model",
]
