"""run_benchmark end to end against the stub server on loopback.

Timing tolerances: the stub sleeps a known time before each chunk, so every latency has a
hard lower bound (the sleep); the upper slack covers event-loop and loopback overhead on a
shared 2-core machine at load average 7-9 (measured there: +20-65 ms on TTFT at concurrency
4, +2-5 ms per ITL gap, and occasional 100 ms stalls, which is why medians are asserted).
Delays are long (150 ms / 40 ms) so that slack stays small relative to them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import pytest

from slipstream.loadtest import BenchConfig, run_benchmark
from slipstream.loadtest.runner import BenchError
from slipstream.loadtest.workload import arrival_times
from tests.loadtest.fakes import WordTokenizer, hf_tokenizer_folder
from tests.loadtest.stub_server import StubBehaviour, run_stub

TTFT, GAP, CHUNKS = 0.150, 0.040, 8
TTFT_SLACK, GAP_SLACK = 0.080, 0.015

# Keys `vllm bench serve --save-result` writes, which ours must keep.
VLLM_KEYS = [
    "date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
    "max_concurrency", "duration", "completed", "failed", "total_input_tokens",
    "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
    "input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "errors",
    *(
        f"{stat}_{m}_ms"
        for m in ("ttft", "tpot", "itl", "e2el")
        for stat in ("mean", "median", "std", "p99")
    ),
]  # fmt: skip


def _config(url: str, **kw: object) -> BenchConfig:
    base: dict[str, object] = {
        "base_url": url,
        "dataset": "builtin",
        "num_prompts": 8,
        "tokenizer": "none",
        "num_warmups": 0,
        "timeout_s": 10.0,
        "max_duration_s": 30.0,
    }
    return BenchConfig(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("tokens_per_chunk", [1, 3])
def test_latencies_and_throughput_match_the_stub_delays(tokens_per_chunk: int) -> None:
    behaviour = StubBehaviour(
        ttft_s=TTFT, interval_s=GAP, num_chunks=CHUNKS, tokens_per_chunk=tokens_per_chunk
    )
    with run_stub(behaviour) as (url, state):
        # One warm-up: the first request in a process pays one-off costs (imports, connection).
        result = run_benchmark(_config(url, max_concurrency=4, num_warmups=1))
    s = result.summary
    n_tokens = CHUNKS * tokens_per_chunk
    e2el = TTFT + (CHUNKS - 1) * GAP
    assert (s["completed"], s["failed"], s["output_tokens_source"]) == (8, 0, "server_usage")
    assert s["total_output_tokens"] == 8 * n_tokens
    assert TTFT * 1e3 <= s["median_ttft_ms"] <= (TTFT + TTFT_SLACK) * 1e3
    # ITL sees chunks, whatever they carry; TPOT divides by tokens.
    assert GAP * 0.9e3 <= s["median_itl_ms"] <= (GAP + GAP_SLACK) * 1e3
    tpot = (CHUNKS - 1) * GAP / (n_tokens - 1)
    assert tpot * 0.95e3 <= s["median_tpot_ms"] <= tpot * 1e3 * (GAP + GAP_SLACK) / GAP
    assert e2el * 1e3 <= s["median_e2el_ms"] <= (e2el + TTFT_SLACK + CHUNKS * GAP_SLACK) * 1e3
    # Two waves of 4 concurrent requests: throughput is 4 per E2EL, less the overhead.
    ideal = 4 / e2el
    assert 0.6 * ideal <= s["request_throughput"] <= 1.02 * ideal
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration"])
    assert s["total_input_tokens"] == 8 * 7  # the stub's usage.prompt_tokens
    assert state.max_in_flight == 4 and s["max_concurrent_requests"] == 4
    # One draft step per chunk, tokens_per_chunk - 1 of 3 drafts accepted.
    assert s["spec_decode_num_drafts"] == 8 * CHUNKS
    assert s["spec_decode_mean_accepted_tokens_per_step"] == pytest.approx(tokens_per_chunk - 1)
    assert s["spec_decode_acceptance_rate"] == pytest.approx((tokens_per_chunk - 1) / 3)


def test_requests_leave_at_their_scheduled_poisson_times() -> None:
    fast = StubBehaviour(ttft_s=0.0, interval_s=0.0, num_chunks=2, metric_prefix="vllm:")
    config_kw = {"num_prompts": 30, "request_rate": 30.0, "seed": 3}
    with run_stub(fast) as (url, state):
        result = run_benchmark(_config(url, **config_kw))
    # The runner draws arrivals from Random(seed + 1); requests left at those offsets.
    expected = arrival_times(30, 30.0, 1.0, random.Random(3 + 1))
    assert [r.scheduled for r in result.records] == expected
    lateness = sorted(r.start - r.scheduled for r in result.records)
    assert lateness[0] >= 0 and lateness[15] < 0.02  # median; a CPU stall may delay a few
    # The server saw the same schedule. Arrivals are compared after aligning them on their
    # median offset, and most (not all) must sit within 50 ms: one CI run saw a 100 ms stall
    # on the last request, which failed the earlier check on the span first-to-last alone.
    assert len(state.arrivals) == 30
    offsets = sorted(t - s for t, s in zip(sorted(state.arrivals), expected, strict=True))
    median_offset = offsets[15]
    on_time = [abs(o - median_offset) < 0.05 for o in offsets]
    assert sum(on_time) >= 25, offsets
    assert result.summary["request_rate"] == 30.0
    assert "spec_decode_acceptance_rate" in result.summary  # the vllm: prefix is read too


def test_json_has_vllm_keys_and_is_strict_json(tmp_path: Path) -> None:
    with run_stub(StubBehaviour(ttft_s=0.0, interval_s=0.001, metric_prefix="")) as (url, _):
        result = run_benchmark(
            _config(url, goodput={"ttft": 1000.0}, percentiles=(50.0, 99.9), num_warmups=1)
        )
    path = result.save(tmp_path / result.default_filename())
    data = json.loads(path.read_text())
    missing = [k for k in VLLM_KEYS if k not in data]
    assert not missing
    assert data["model_id"] == "stub-model" and data["request_rate"] == "inf"
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    assert "p99.9_ttft_ms" in data and "p50_itl_ms" in data
    assert "spec_decode_acceptance_rate" not in data  # no counters exported
    assert path.name.startswith("slipstream-infqps-stub-model-")


def test_failures_are_counted_by_type(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text('"ok 1"\n"FAIL500"\n"ERRCHUNK"\n"ok 2"\n')
    with run_stub(StubBehaviour(ttft_s=0.0, interval_s=0.0)) as (url, _):
        s = run_benchmark(_config(url, dataset="jsonl", dataset_path=str(path))).summary
    assert (s["completed"], s["failed"]) == (4, 4)
    assert s["errors_by_type"] == {"HTTP 500": 2, "ServerError": 2}


@pytest.mark.parametrize(("tokenizer", "source"), [("word", "tokenizer"), ("none", "chunks")])
def test_missing_usage_falls_back_and_says_so(tokenizer: str, source: str) -> None:
    behaviour = StubBehaviour(ttft_s=0.0, interval_s=0.0, tokens_per_chunk=2, send_usage=False)
    with run_stub(behaviour) as (url, _):
        tok = WordTokenizer() if tokenizer == "word" else None
        s = run_benchmark(_config(url, num_prompts=2), tokenizer=tok).summary
    assert s["output_tokens_source"] == source
    # 10 chunks of "tok tok ": the tokenizer counts 20 tokens, chunk counting only 10.
    assert s["output_lens"] == ([20, 20] if source == "tokenizer" else [10, 10])


def _hang_file(tmp_path: Path) -> str:
    path = tmp_path / "hang.jsonl"
    path.write_text('"quick"\n"HANG"\n')
    return str(path)


def test_time_limit_cancels_hung_requests_and_reports_the_rest(tmp_path: Path) -> None:
    fast = StubBehaviour(ttft_s=0.0, interval_s=0.0)
    with run_stub(fast) as (url, _):
        config = _config(url, dataset="jsonl", dataset_path=_hang_file(tmp_path), num_prompts=4)
        t0 = time.perf_counter()
        s = run_benchmark(dataclasses.replace(config, max_duration_s=0.5)).summary
        elapsed = time.perf_counter() - t0
    assert elapsed < 3.0
    assert s["interrupted"] and s["stop_reason"] == "max duration 0.5s"
    assert (s["completed"], s["failed"], s["num_not_finished"]) == (2, 0, 2)
    assert 0.5 <= s["duration"] < 1.0


def test_ctrl_c_prints_partial_report(tmp_path: Path) -> None:
    def ctrl_c_after_quick_ones(done: int, total: int) -> None:
        # Called by the runner while its SIGINT handler is installed; the HANG ones are pending.
        if done == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with run_stub(StubBehaviour(ttft_s=0.0, interval_s=0.0)) as (url, _):
        config = _config(url, dataset="jsonl", dataset_path=_hang_file(tmp_path), num_prompts=4)
        s = run_benchmark(dataclasses.replace(config, timeout_s=60.0), ctrl_c_after_quick_ones)
    assert s.summary["stop_reason"] == "interrupted" and s.summary["completed"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_unreachable_server_fails_fast_with_a_clear_error() -> None:
    config = _config("http://127.0.0.1:9", model="m", num_warmups=1)
    with pytest.raises(BenchError, match=r"test request to http://127\.0\.0\.1:9/v1/chat"):
        run_benchmark(config)
    with pytest.raises(BenchError, match="cannot find a model"):
        run_benchmark(_config("http://127.0.0.1:9"))


def test_rate_and_concurrency_combine() -> None:
    behaviour = StubBehaviour(ttft_s=0.1, interval_s=0.0, num_chunks=1)
    with run_stub(behaviour) as (url, state):
        s = run_benchmark(_config(url, request_rate=100.0, max_concurrency=2)).summary
    assert state.max_in_flight <= 2 and s["completed"] == 8
    # The gate, not the 100 rps schedule, sets the pace: 8 requests / 2 slots x 100 ms.
    assert s["duration"] >= 0.4 and s["mean_client_queue_time_ms"] > 50
    assert not math.isnan(s["p99_client_queue_time_ms"])


def test_random_workload_sends_prompts_of_the_sampled_length(tmp_path: Path) -> None:
    folder = hf_tokenizer_folder(tmp_path / "tok")
    fast = StubBehaviour(ttft_s=0.0, interval_s=0.0, num_chunks=50)
    with run_stub(fast) as (url, state):
        result = run_benchmark(
            _config(
                url,
                dataset="random",
                endpoint="completions",
                tokenizer=folder,
                num_prompts=5,
                random_input_len=24,
                random_output_len=6,
                ignore_eos=True,
            )
        )
    assert [len(b["prompt"].split()) for b in state.bodies] == [24] * 5
    assert all(b["max_tokens"] == 6 and b["ignore_eos"] for b in state.bodies)
    assert result.summary["output_lens"] == [6] * 5
    assert result.summary["completed"] == 5
