"""Resolve device and dtype, then load the model, tokenizer and EOS ids for the engine."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from slipstream.config import ModelConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """Everything the engine needs from the model folder."""

    path: str
    model: Any
    arch: Any
    tokenizer: Any
    eos_token_ids: frozenset[int]
    max_model_len: int
    dtype: torch.dtype
    device: torch.device


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls run natively (else they are emulated, slowly)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    if name == "auto":
        if device.type == "cuda" or cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose {', '.join(_DTYPES)} or auto")
    return _DTYPES[name]


def load_engine_model(config: ModelConfig) -> LoadedModel:
    """Load weights and tokenizer as ModelConfig says."""
    from slipstream.engine.models.default_model import resolve_model_path
    from slipstream.engine.models.loader import load_model
    from slipstream.engine.tokenizer import eos_token_ids, load_tokenizer
    from slipstream.kernels.cpu.skinny_linear import skinny_unavailable_reason

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    path = resolve_model_path(config.model)
    torch.manual_seed(config.seed)
    model, arch = load_model(path, dtype, device)
    pack = getattr(model, "pack_for_cpu", None)
    packed_for = pack() if pack is not None else None
    if packed_for == "skinny_linear":
        logger.info("bf16 weights packed for skinny_linear (the C++ AVX512-BF16 kernel)")
    elif packed_for == "skinny_linear_f32":
        from slipstream.kernels.cpu.skinny_linear_f32 import GroupedBf16Weight

        copies = isinstance(getattr(model, "lm_head_f32", None), GroupedBf16Weight)
        logger.info(
            "float32 products of up to 32 rows run skinny_linear_f32 (C++, AVX2), reading %s",
            "exact bf16 copies of the weights (grouped)"
            if copies
            else "the float32 weights in place",
        )
    elif packed_for == "onednn":
        reason = skinny_unavailable_reason()
        logger.info("bf16 weights pre-packed for oneDNN (skinny_linear unavailable: %s)", reason)
    elif device.type == "cpu" and dtype == torch.bfloat16:
        from slipstream.engine.models.llama import onednn_bf16_packing_unavailable_reason

        logger.warning(
            "bf16 weights run unpacked, through PyTorch's emulated bf16 matmuls (skinny_linear: "
            "%s; oneDNN packing: %s); --dtype float32 is faster on this CPU",
            skinny_unavailable_reason(),
            onednn_bf16_packing_unavailable_reason(),
        )
    if config.batch_invariant:
        from slipstream.engine.batch_invariant import make_batch_invariant

        logger.info("batch-invariant: %s", make_batch_invariant(model, packed_for))
    tokenizer = load_tokenizer(path)
    gen_config = os.path.join(path, "generation_config.json") if os.path.isdir(path) else None
    eos = eos_token_ids(
        tokenizer, gen_config if gen_config and os.path.exists(gen_config) else None
    )
    eos = eos | frozenset(arch.eos_token_ids)
    max_len = arch.max_position_embeddings
    if config.max_model_len is not None:
        if config.max_model_len > max_len:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {max_len}"
            )
        max_len = config.max_model_len
    logger.info("loaded %s (%s, %s, context %d)", path, dtype, device, max_len)
    return LoadedModel(path, model, arch, tokenizer, eos, max_len, dtype, device)
