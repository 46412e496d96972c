"""The vllm backend's mappings, on fake vLLM objects (no vLLM needed), plus one in-process
smoke test that runs where vLLM is importable (`.venv-vllm/bin/python -m pytest -m vllm`)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from slipstream.backends.base import EngineDeadError, GenerateRequest, QueueFullError
from slipstream.backends.vllm_backend import (
    VLLM_TINY_OVERRIDES,
    VllmEngineClient,
    VllmOptions,
    _RequestState,
    _StatsRelay,
    add_vllm_args,
    check_engine_arg_names,
    engine_kwargs,
    finish_reason,
    parse_vllm_arg,
    sampling_kwargs,
    speculative_config,
    step_stats,
    token_logprobs,
    update_state,
    vllm_environment,
    vllm_options_from_args,
)
from slipstream.config import (
    CacheConfig,
    DecoderSpec,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from slipstream.engine.outputs import RequestMetrics, StepStats
from slipstream.engine.sampling_params import SamplingParams

HAS_VLLM = importlib.util.find_spec("vllm") is not None


# --------------------------------------------------------------------------- options
def test_options_validate() -> None:
    assert VllmOptions().tensor_parallel_size == 1
    for bad in (
        {"tensor_parallel_size": 0},
        {"pipeline_parallel_size": 0},
        {"distributed_executor_backend": "slurm"},
        {"gpu_memory_utilization": 0.0},
        {"gpu_memory_utilization": 1.5},
    ):
        with pytest.raises(ValueError):
            VllmOptions(**bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("block_size=64", ("block_size", 64)),
        ("max-num-partial-prefills=2", ("max_num_partial_prefills", 2)),
        ("kv_cache_dtype=fp8", ("kv_cache_dtype", "fp8")),
        ("enable_chunked_prefill=false", ("enable_chunked_prefill", False)),
        (
            'override_generation_config={"temperature": 0.5}',
            (
                "override_generation_config",
                {"temperature": 0.5},
            ),
        ),
        ("tokenizer=a=b", ("tokenizer", "a=b")),
    ],
)
def test_parse_vllm_arg(text: str, expected: tuple[str, Any]) -> None:
    assert parse_vllm_arg(text) == expected


@pytest.mark.parametrize("text", ["block_size", "=3", ""])
def test_parse_vllm_arg_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_vllm_arg(text)


def test_flags_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_vllm_args(parser)
    args = parser.parse_args(
        [
            "--tensor-parallel-size=2",
            "--pipeline-parallel-size=2",
            "--distributed-executor-backend=ray",
            "--gpu-memory-utilization=0.8",
            "--enforce-eager",
            "--vllm-arg",
            "block_size=32",
            "--vllm-arg",
            "swap_space=0",
        ]
    )
    opts = vllm_options_from_args(args)
    assert opts == VllmOptions(
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        distributed_executor_backend="ray",
        gpu_memory_utilization=0.8,
        enforce_eager=True,
        extra_args={"block_size": 32, "swap_space": 0},
    )
    assert vllm_options_from_args(parser.parse_args([])) == VllmOptions()


# --------------------------------------------------------------------------- decoders
def test_standard_decoder_has_no_speculative_config() -> None:
    assert speculative_config(DecoderSpec()) is None


def test_ngram_maps_to_vllm_with_defaults_and_overrides() -> None:
    assert speculative_config(DecoderSpec("ngram")) == {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 1,
    }
    spec = DecoderSpec("ngram", {"num_speculative_tokens": 6, "prompt_lookup_max": 3})
    assert speculative_config(spec) == {
        "method": "ngram",
        "num_speculative_tokens": 6,
        "prompt_lookup_max": 3,
        "prompt_lookup_min": 1,
    }


def test_suffix_maps_to_vllm() -> None:
    got = speculative_config(DecoderSpec("suffix", {"suffix_decoding_max_tree_depth": 8}))
    assert got == {
        "method": "suffix",
        "num_speculative_tokens": 16,
        "suffix_decoding_max_tree_depth": 8,
    }


def test_unknown_speculative_option_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) k .*valid: num_speculative_tokens"):
        speculative_config(DecoderSpec("ngram", {"k": 3}))


@pytest.mark.parametrize(
    "name", ["token_recycling", "sparse_attention", "cautious", "token_recycling+sparse_attention"]
)
def test_research_decoders_need_the_native_backend(name: str) -> None:
    with pytest.raises(ValueError, match="needs the native backend"):
        speculative_config(DecoderSpec(name))
    # The client refuses at construction: a start-up error, not a silent fallback.
    with pytest.raises(ValueError, match="needs the native backend"):
        VllmEngineClient(EngineConfig(decoder=DecoderSpec(name)))


def test_a_decoder_no_backend_knows_is_called_unknown() -> None:
    """Not "needs the native backend": the native one does not know it either."""
    with pytest.raises(ValueError, match="unknown decoder 'hip'; valid decoders: "):
        speculative_config(DecoderSpec("hip"))


# --------------------------------------------------------------------------- engine args
def _config(**cache: Any) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model="/m", dtype="float32", max_model_len=512, seed=7),
        cache=CacheConfig(**cache),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256),
        decoder=DecoderSpec("ngram"),
    )


def test_engine_kwargs_on_cpu() -> None:
    kw = engine_kwargs(_config(kv_cache_memory_gib=0.5), VllmOptions(), "/m", on_gpu=False)
    assert kw["model"] == "/m"
    assert kw["dtype"] == "float32"
    assert kw["seed"] == 7
    assert kw["max_model_len"] == 512
    assert kw["max_num_seqs"] == 8
    assert kw["max_num_batched_tokens"] == 256
    assert kw["enable_prefix_caching"] is True
    assert kw["kv_cache_memory_bytes"] == 2**29
    assert "gpu_memory_utilization" not in kw
    assert kw["speculative_config"]["method"] == "ngram"
    assert kw["disable_log_stats"] is True
    assert "num_gpu_blocks_override" not in kw


def test_engine_kwargs_on_gpu_and_overrides() -> None:
    opts = VllmOptions(
        tensor_parallel_size=4,
        distributed_executor_backend="ray",
        gpu_memory_utilization=0.7,
        enforce_eager=True,
        extra_args={"max_num_seqs": 99, "block_size": 32},
    )
    kw = engine_kwargs(_config(num_blocks=100, enable_prefix_caching=False), opts, "/m", True)
    assert kw["gpu_memory_utilization"] == 0.7
    assert "kv_cache_memory_bytes" not in kw
    assert kw["tensor_parallel_size"] == 4
    assert kw["distributed_executor_backend"] == "ray"
    assert kw["enforce_eager"] is True
    assert kw["num_gpu_blocks_override"] == 100
    assert kw["enable_prefix_caching"] is False
    assert kw["max_num_seqs"] == 99  # --vllm-arg wins
    assert kw["block_size"] == 32


def test_batch_invariant_maps_to_vllms_environment_variable() -> None:
    assert vllm_environment(EngineConfig()) == {}
    config = EngineConfig(model=ModelConfig(model="/m", batch_invariant=True))
    assert vllm_environment(config) == {"VLLM_BATCH_INVARIANT": "1"}


def test_engine_kwargs_leave_max_model_len_to_vllm() -> None:
    config = EngineConfig(model=ModelConfig(model="/m", dtype="bfloat16"))
    kw = engine_kwargs(config, VllmOptions(), "/m", on_gpu=True)
    assert "max_model_len" not in kw
    assert kw["dtype"] == "bfloat16"
    assert engine_kwargs(EngineConfig(), VllmOptions(), "/m", on_gpu=True)["dtype"] == "auto"
    assert engine_kwargs(EngineConfig(), VllmOptions(), "/m", on_gpu=False)["dtype"] in (
        "bfloat16",
        "float32",
    )


def test_unknown_engine_args_are_errors() -> None:
    check_engine_arg_names({"model": 1, "seed": 2}, ["model", "seed", "dtype"])
    with pytest.raises(ValueError, match="blok_size"):
        check_engine_arg_names({"model": 1, "blok_size": 2}, ["model", "block_size"])


# --------------------------------------------------------------------------- sampling
def test_sampling_kwargs_map_every_field() -> None:
    params = SamplingParams(
        n=2,
        temperature=0.7,
        top_p=0.9,
        top_k=-1,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        seed=42,
        max_tokens=33,
        min_tokens=2,
        stop=("END", "\n\n"),
        stop_token_ids=(7, 9),
        ignore_eos=True,
        logprobs=3,
        prompt_logprobs=1,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        logit_bias={5: 1.5},
    )
    assert sampling_kwargs(params) == {
        "n": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,  # vLLM's "all tokens"
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "seed": 42,
        "max_tokens": 33,
        "min_tokens": 2,
        "stop": ["END", "\n\n"],
        "stop_token_ids": [7, 9],
        "ignore_eos": True,
        "logprobs": 3,
        "prompt_logprobs": 1,
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "logit_bias": {5: 1.5},
    }
    assert sampling_kwargs(SamplingParams(top_k=5, max_tokens=None))["top_k"] == 5
    assert sampling_kwargs(SamplingParams())["logit_bias"] is None
    assert sampling_kwargs(SamplingParams(max_tokens=None))["max_tokens"] is None


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (make vllm)")
def test_vllm_accepts_the_mapped_sampling_params() -> None:
    from slipstream.backends.vllm_backend import to_vllm_sampling_params

    sp = to_vllm_sampling_params(
        SamplingParams(temperature=0, stop=("x",), logprobs=2, seed=1, logit_bias={3: -2.0})
    )
    assert sp.logit_bias == {3: -2.0}
    assert sp.stop == ["x"]
    assert sp.logprobs == 2
    assert sp.seed == 1
    assert sp.top_k in (0, -1)


# --------------------------------------------------------------------------- outputs
def _lp(logprob: float, rank: int | None, text: str) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=text)


def _comp(index: int, text: str, ids: list[int], **kw: Any) -> SimpleNamespace:
    base = {"finish_reason": None, "stop_reason": None, "logprobs": None}
    return SimpleNamespace(index=index, text=text, token_ids=ids, **{**base, **kw})


def _out(outputs: list[SimpleNamespace], finished: bool = False, **kw: Any) -> SimpleNamespace:
    base = {"num_cached_tokens": 0, "prompt_logprobs": None, "metrics": None}
    return SimpleNamespace(outputs=outputs, finished=finished, **{**base, **kw})


def _state(params: SamplingParams, prompt: list[int] | None = None) -> _RequestState:
    request = GenerateRequest("r1", prompt or [5, 6, 7], params, prompt="p")
    return _RequestState(request=request, metrics=RequestMetrics(arrival_time=1.0))


def test_finish_reasons() -> None:
    assert finish_reason(None) is None
    for reason in ("stop", "length", "abort", "error"):
        assert finish_reason(reason) == reason
    assert finish_reason("repetition") == "stop"


def test_token_logprobs_keeps_top_by_rank() -> None:
    position = {11: _lp(-2.0, 3, "c"), 12: _lp(-0.5, 1, "a"), 13: _lp(-1.0, 2, "b")}
    got = token_logprobs(11, position, num_top=2)
    assert (got.chosen.token_id, got.chosen.logprob, got.chosen.decoded) == (11, -2.0, "c")
    assert [lp.token_id for lp in got.top] == [12, 13]
    assert token_logprobs(11, position, num_top=0).top == []


def test_update_state_single_completion_stream() -> None:
    state = _state(SamplingParams(max_tokens=3))
    first = update_state(state, _out([_comp(0, "He", [1])]))
    assert first.request_id == "r1"
    assert first.prompt == "p"
    assert first.prompt_token_ids == [5, 6, 7]
    assert first.outputs[0].text == "He"
    assert first.outputs[0].token_ids == [1]
    assert not first.finished
    assert state.metrics.first_token_time is not None
    last = update_state(
        state,
        _out(
            [_comp(0, "Hello", [1, 2, 3], finish_reason="stop", stop_reason="!")],
            finished=True,
            num_cached_tokens=2,
            metrics=SimpleNamespace(scheduled_ts=1.5, num_preemptions=1),
        ),
    )
    assert last.finished
    assert last.outputs[0].finish_reason == "stop"
    assert last.outputs[0].stop_reason == "!"
    assert last.outputs[0].logprobs is None
    assert last.num_cached_tokens == 2
    assert last.metrics is state.metrics
    assert state.metrics.first_scheduled_time == 1.5
    assert state.metrics.num_preemptions == 1
    assert state.metrics.finished_time is not None
    assert state.metrics.last_token_time is not None


def test_update_state_merges_n_children_and_logprobs() -> None:
    params = SamplingParams(n=2, logprobs=1, temperature=1.0)
    state = _state(params)
    pos_a = {1: _lp(-0.1, 1, "a")}
    pos_b = {2: _lp(-0.2, 1, "b")}
    pos_c = {3: _lp(-3.0, 4, "c"), 4: _lp(-0.3, 1, "d")}
    # vLLM streams each child on its own (cumulative per child).
    out = update_state(state, _out([_comp(1, "a", [1], logprobs=[pos_a])]))
    assert [o.index for o in out.outputs] == [0, 1]
    assert out.outputs[0].token_ids == []  # not seen yet
    assert out.outputs[1].text == "a"
    out = update_state(state, _out([_comp(0, "b", [2], logprobs=[pos_b])]))
    out = update_state(
        state,
        _out([_comp(1, "ac", [1, 3], logprobs=[pos_a, pos_c], finish_reason="length")]),
    )
    lps = out.outputs[1].logprobs
    assert lps is not None
    assert [p.chosen.token_id for p in lps] == [1, 3]
    assert [t.token_id for t in lps[1].top] == [4]
    assert out.outputs[0].text == "b"
    assert out.outputs[1].finish_reason == "length"
    assert out.outputs[0].finish_reason is None


def test_update_state_prompt_logprobs() -> None:
    state = _state(SamplingParams(prompt_logprobs=1), prompt=[5, 6])
    position = {6: _lp(-1.5, 2, "x"), 9: _lp(-0.1, 1, "y")}
    out = update_state(state, _out([_comp(0, "", [])], prompt_logprobs=[None, position]))
    assert out.prompt_logprobs is not None
    assert out.prompt_logprobs[0] is None
    second = out.prompt_logprobs[1]
    assert second is not None
    assert second.chosen.logprob == -1.5
    assert [t.token_id for t in second.top] == [9]


# --------------------------------------------------------------------------- stats
def test_step_stats_from_vllm_stats() -> None:
    sched = SimpleNamespace(
        num_running_reqs=3,
        num_waiting_reqs=2,
        num_skipped_waiting_reqs=1,
        kv_cache_usage=0.25,
        prefix_cache_stats=SimpleNamespace(queries=100, hits=40),
        spec_decoding_stats=SimpleNamespace(
            num_drafts=2,
            num_draft_tokens=8,
            num_accepted_tokens=5,
            num_accepted_tokens_per_pos=[2, 2, 1, 0],
        ),
    )
    it = SimpleNamespace(
        prompt_token_stats=SimpleNamespace(computed=60),
        num_prompt_tokens=100,
        num_generation_tokens=7,
        num_preempted_reqs=1,
    )
    s = step_stats(sched, it, step_time_s=0.01)
    assert (s.num_running, s.num_waiting, s.kv_cache_usage) == (3, 3, 0.25)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (100, 40)
    assert (s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens) == (2, 8, 5)
    assert s.spec_accepted_per_pos == [2, 2, 1, 0]
    assert (s.num_prompt_tokens, s.num_generation_tokens, s.num_preemptions) == (60, 7, 1)
    assert s.num_forward_tokens == 60 + 7 + 8
    assert s.step_time_s == 0.01
    assert step_stats(None, None) == StepStats()


def test_stats_relay_calls_listeners_and_survives_failures() -> None:
    relay = _StatsRelay()
    seen: list[StepStats] = []

    def broken(_: StepStats) -> None:
        raise RuntimeError("boom")

    relay.listeners += [broken, seen.append]
    busy = SimpleNamespace(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0.5)
    relay.record(busy, None)
    relay.record(busy, None)
    assert len(seen) == 2
    assert seen[0].step_time_s == 0.0
    assert seen[1].step_time_s >= 0.0
    assert relay.last is seen[1]


# --------------------------------------------------------------------------- client
def test_client_before_start() -> None:
    client = VllmEngineClient(EngineConfig())
    with pytest.raises(EngineDeadError):
        _ = client.model_info
    with pytest.raises(EngineDeadError):
        _ = client.tokenizer
    with pytest.raises(EngineDeadError):
        asyncio.run(client.check_health())
    assert client.num_free_blocks() == 0
    seen: list[StepStats] = []
    client.add_stats_listener(seen.append)
    client._relay.record(None, None)
    assert len(seen) == 1


def test_client_admission_limit() -> None:
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=2, max_queued_requests=1))
    client = VllmEngineClient(config)
    request = GenerateRequest("x", [1], SamplingParams())
    client._admit(request)
    client._inflight = {"a": 1, "b": 1, "c": 1}
    with pytest.raises(QueueFullError):
        client._admit(request)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_start_without_vllm_says_how_to_get_it() -> None:
    from slipstream.backends.base import EngineError

    with pytest.raises(EngineError, match="make vllm"):
        asyncio.run(VllmEngineClient(EngineConfig()).start())


# --------------------------------------------------------------------------- in-process
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (make vllm)")
def test_in_process_generate_and_abort(tmp_path: Path) -> None:
    from slipstream.testing.tiny_model import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "tiny", **VLLM_TINY_OVERRIDES)
    config = EngineConfig(
        model=ModelConfig(model=str(model), dtype="float32", max_model_len=256),
        cache=CacheConfig(kv_cache_memory_gib=0.25),
    )

    async def run() -> None:
        client = VllmEngineClient(config, VllmOptions(enforce_eager=True))
        stats: list[StepStats] = []
        client.add_stats_listener(stats.append)
        await client.start()
        try:
            ids = client.tokenizer.encode("The river ran slowly")
            params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            outs = [o async for o in client.generate(GenerateRequest("a", ids, params))]
            assert outs[-1].finished
            assert len(outs[-1].outputs[0].token_ids) == 8
            assert outs[-1].outputs[0].finish_reason == "length"
            assert stats and sum(s.num_generation_tokens for s in stats) >= 8
            total = client.num_free_blocks()
            long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            gen = client.generate(GenerateRequest("b", ids, long))
            async for _ in gen:
                break
            await gen.aclose()  # type: ignore[attr-defined]
            assert client.num_free_blocks() == total
            await client.check_health()
        finally:
            await client.shutdown()

    asyncio.run(run())


def test_suffix_without_arctic_inference_is_a_startup_error() -> None:
    if importlib.util.find_spec("arctic_inference") is not None:
        pytest.skip("arctic_inference is installed")
    with pytest.raises(ValueError, match="arctic-inference"):
        VllmEngineClient(EngineConfig(decoder=DecoderSpec("suffix")))
