"""report.py on synthetic timings: no server, exact expectations."""

from __future__ import annotations

import math

import pytest

from slipstream.loadtest.report import (
    format_summary,
    max_concurrency_seen,
    meets_slos,
    resolve_output_tokens,
    summarize,
    token_timeline,
    tpot,
)
from tests.loadtest.fakes import record


def test_tpot_excludes_first_token() -> None:
    r = record(ttft=0.1, latency=1.1, output_tokens=11)
    assert tpot(r) == pytest.approx(0.1)
    assert tpot(record(ttft=0.1, latency=0.1, output_tokens=1)) is None


def test_tpot_amortizes_multi_token_chunks_but_itl_does_not() -> None:
    # 5 chunks of 4 tokens 40 ms apart: ITL 40 ms, TPOT 160 ms / 19 tokens.
    r = record(ttft=0.05, latency=0.21, output_tokens=20, num_chunks=5)
    assert r.itl == pytest.approx([0.04] * 4)
    assert tpot(r) == pytest.approx(0.16 / 19)


def test_summary_counts_throughput_and_percentiles() -> None:
    records = [record(ttft=0.01 * (i + 1), latency=1.0, output_tokens=10) for i in range(100)]
    records.append(record(ttft=0, latency=0.5, output_tokens=0, success=False))
    s = summarize(records, duration_s=4.0, percentiles=(50, 99, 99.9))
    assert s["completed"] == 100 and s["failed"] == 1
    assert s["total_output_tokens"] == 1000 and s["total_input_tokens"] == 1000
    assert s["request_throughput"] == pytest.approx(25.0)
    assert s["output_throughput"] == pytest.approx(250.0)
    assert s["total_token_throughput"] == pytest.approx(500.0)
    # TTFTs are 10, 20, ..., 1000 ms: numpy's linear-interpolation percentiles.
    assert s["mean_ttft_ms"] == pytest.approx(505.0)
    assert s["median_ttft_ms"] == pytest.approx(505.0)
    assert s["p99_ttft_ms"] == pytest.approx(990.1)
    assert "p99.9_ttft_ms" in s
    assert s["errors_by_type"] == {"HTTP 500": 1}
    assert s["request_goodput"] is None


def test_goodput_needs_every_slo() -> None:
    fast = record(ttft=0.05, latency=0.5, output_tokens=10)  # tpot 50 ms
    slow_ttft = record(ttft=0.3, latency=0.5, output_tokens=10)
    slow_tpot = record(ttft=0.05, latency=1.0, output_tokens=10)
    slos = {"ttft": 100.0, "tpot": 60.0}
    assert [meets_slos(r, slos) for r in (fast, slow_ttft, slow_tpot)] == [True, False, False]
    s = summarize([fast, slow_ttft, slow_tpot], duration_s=2.0, goodput_slos_ms=slos)
    assert s["request_goodput"] == pytest.approx(0.5)


def test_max_concurrency_and_token_timeline() -> None:
    records = [
        record(0.1, 1.0, 10, start=0.0),
        record(0.1, 1.0, 10, start=0.5),
        record(0.1, 1.0, 10, start=1.0),  # starts exactly when the first ends
    ]
    assert max_concurrency_seen(records) == 2
    starts, rates = token_timeline(records)
    assert sum(rates) == pytest.approx(30.0)
    assert starts == [0.0, 1.0, 2.0]  # the last chunk arrives at t = 1.0 + 1.0


def test_output_tokens_fall_back_to_tokenizer_then_chunks() -> None:
    with_usage = record(0.1, 1.0, 5)
    no_usage = record(0.1, 1.0, 4)
    no_usage.output_tokens, no_usage.generated_text = None, "a b c d e f"
    assert resolve_output_tokens([with_usage, no_usage], lambda t: len(t.split())) == (
        "server_usage+tokenizer"
    )
    assert no_usage.output_tokens == 6
    no_usage.output_tokens = None
    assert resolve_output_tokens([no_usage], None) == "chunks"
    assert no_usage.output_tokens == 4


def test_empty_run_has_zero_stats_not_nan() -> None:
    s = summarize([], duration_s=1.0)
    assert s["completed"] == 0 and s["mean_ttft_ms"] == 0.0
    assert not any(isinstance(v, float) and math.isnan(v) for v in s.values())


def test_console_table_has_every_section() -> None:
    s = summarize([record(0.1, 1.0, 10)], duration_s=1.0) | {
        "spec_decode_acceptance_rate": 0.5,
        "spec_decode_mean_accepted_tokens_per_step": 1.5,
        "spec_decode_acceptance_length": 2.5,
        "spec_decode_num_drafts": 10,
        "spec_decode_draft_tokens": 30,
        "spec_decode_accepted_tokens": 15,
    }
    text = format_summary(s)
    for title in ("Time to First Token", "Inter-token Latency", "Speculative Decoding"):
        assert title in text
    assert "P99 TPOT (ms)" in text


def test_answers_are_compared_request_by_request() -> None:
    from slipstream.loadtest.compare import format_compare, identical_answers

    # Requests finish in another order on each server: texts are matched by index.
    base = {"completed": 3, "generated_texts": ["a", "b", "c"], "generated_indices": [0, 1, 2]}
    same = {"completed": 3, "generated_texts": ["c", "a", "b"], "generated_indices": [2, 0, 1]}
    one_off = {"completed": 2, "generated_texts": ["x", "b"], "generated_indices": [0, 1]}
    assert identical_answers(base, same) == (3, 3)
    assert identical_answers(base, one_off) == (1, 2)  # request 2 failed there: not counted
    assert identical_answers(base, {"completed": 3}) is None  # no texts kept
    table = format_compare([base, same, one_off], ["std", "tr", "ngram"])
    assert table.splitlines()[-1].split() == ["answers", "as", "the", "first", "-", "3/3", "1/2"]
    assert "answers" not in format_compare([base, {"completed": 3}], ["std", "tr"])
