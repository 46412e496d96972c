"""Build engines on the tiny model for tests and benchmarks."""

from __future__ import annotations

from typing import Any

from slipstream.config import (
    CacheConfig,
    DecoderSpec,
    Device,
    DType,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from slipstream.engine.engine import LLMEngine
from slipstream.engine.outputs import RequestOutput
from slipstream.engine.sampling_params import SamplingParams


def tiny_engine_config(
    model_dir: str,
    decoder: str = "standard",
    decoder_options: dict[str, Any] | None = None,
    num_blocks: int = 256,
    block_size: int = 16,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 256,
    enable_prefix_caching: bool = True,
    max_queued_requests: int | None = None,
    dtype: DType = "float32",
    device: Device = "cpu",
    batch_invariant: bool = False,
) -> EngineConfig:
    """An engine config over a tiny model folder (float32 on CPU unless told otherwise)."""
    return EngineConfig(
        model=ModelConfig(
            model=model_dir, dtype=dtype, device=device, batch_invariant=batch_invariant
        ),
        cache=CacheConfig(
            block_size=block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_queued_requests=max_queued_requests,
        ),
        decoder=DecoderSpec(decoder, dict(decoder_options or {})),
    )


def run_to_completion(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> list[RequestOutput]:
    """Add every prompt, step until all finish, return outputs in prompt order."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    base = engine.num_steps
    ids = [f"r{base}-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, plist, strict=True):
        engine.add_request(rid, prompt, p)
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[rid] for rid in ids]
