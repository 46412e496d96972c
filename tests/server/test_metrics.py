"""/metrics, parsed with prometheus-client's parser, against what the test sent."""

from __future__ import annotations

import contextlib
import time

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from slipstream.engine.outputs import StepStats
from slipstream.server.metrics import ServerMetrics
from tests.server.conftest import MODEL, live_server
from tests.server.fake_engine import FakeConfig, FakeEngine

LABELS = {"model_name": MODEL, "decoder": "standard"}


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of every sample."""
    text = httpx.get(url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset({**LABELS, **labels}.items()))]


def test_counters_and_histograms_match_requests() -> None:
    engine = FakeEngine(FakeConfig(name=MODEL))
    with live_server(engine) as srv:
        before = scrape(srv.url)
        assert value(before, "slipstream:prompt_tokens_total") == 0
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        usages = []
        for i in range(3):
            resp = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"question {i}"}],
                max_tokens=5 + i,
            )
            usages.append(resp.usage)
        for i in range(2):
            stream = client.completions.create(
                model=MODEL,
                prompt=f"stream {i}",
                max_tokens=7,
                stream=True,
                stream_options={"include_usage": True},
            )
            usages.append(list(stream)[-1].usage)
        with_stop = client.completions.create(model=MODEL, prompt="s", max_tokens=50, stop=["o"])
        usages.append(with_stop.usage)
        httpx.get(srv.url + "/v1/no-such-route")
        httpx.post(srv.url + "/v1/completions", json={"prompt": 5})
        time.sleep(0.05)  # the idle StepStats after the last step
        m = scrape(srv.url)

    prompt = sum(u.prompt_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages)
    assert value(m, "slipstream:prompt_tokens_total") == prompt
    assert value(m, "slipstream:generation_tokens_total") == generated
    assert value(m, "slipstream:request_success_total", finished_reason="length") == 5
    assert value(m, "slipstream:request_success_total", finished_reason="stop") == 1
    assert value(m, "slipstream:request_success_total", finished_reason="abort") == 0
    assert value(m, "slipstream:prefix_cache_queries_total") == prompt
    assert value(m, "slipstream:num_requests_running") == 0
    assert value(m, "slipstream:num_requests_waiting") == 0
    assert value(m, "slipstream:kv_cache_usage_perc") == 0
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert value(m, f"slipstream:{name}_count") == 6, name
    assert value(m, "slipstream:request_prompt_tokens_sum") == prompt
    assert value(m, "slipstream:request_generation_tokens_sum") == generated
    # The fake engine emits one token per step: one inter-token gap per token after the first.
    assert value(m, "slipstream:inter_token_latency_seconds_count") == generated - 6
    multi = sum(1 for u in usages if u.completion_tokens > 1)  # TPOT needs two tokens
    assert value(m, "slipstream:request_time_per_output_token_seconds_count") == multi
    # Speculative counters exist at zero for a non-speculative decoder.
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert value(m, f"slipstream:spec_decode_{name}_total") == 0
    http = {
        (dict(labels)["route"], dict(labels)["status"]): v
        for (name, labels), v in m.items()
        if name == "slipstream:http_requests_total"
    }
    assert http[("/v1/chat/completions", "200")] == 3
    assert http[("/v1/completions", "200")] == 3
    assert http[("/v1/completions", "400")] == 1
    assert http[("unmatched", "404")] == 1
    assert (
        m[
            (
                "slipstream:http_request_duration_seconds_count",
                frozenset(
                    {"method": "POST", "route": "/v1/chat/completions", "status": "200"}.items()
                ),
            )
        ]
        == 3
    )


def test_speculative_counters_and_decoder_stats() -> None:
    engine = FakeEngine(FakeConfig(name=MODEL, spec_stats=True, decoder="fake_spec"))
    with live_server(engine) as srv:
        resp = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 6})
        assert resp.status_code == 200
        m = scrape(srv.url)
    labels = {"decoder": "fake_spec"}
    drafts = value(m, "slipstream:spec_decode_num_drafts_total", **labels)
    assert drafts == 6
    assert value(m, "slipstream:spec_decode_num_draft_tokens_total", **labels) == 18
    assert value(m, "slipstream:spec_decode_num_accepted_tokens_total", **labels) == 12
    per_pos = "slipstream:spec_decode_num_accepted_tokens_per_pos_total"
    assert value(m, per_pos, position="0", **labels) == 6
    assert value(m, per_pos, position="2", **labels) == 0
    assert abs(value(m, "slipstream:decoder_stat", stat="fake_acceptance", **labels) - 2 / 3) < 1e-9


def test_decoder_stats_count_the_steps_that_report_them() -> None:
    """A decoder reports some numbers on some steps only (sparse attention: not on steps
    that only prefill), so their mean is the sum over the steps that reported them."""
    metrics = ServerMetrics()
    metrics.bind(MODEL, "fake")
    for decoder in ({}, {"read": 0.2}, {}, {"read": 0.4}):
        metrics.record_step(StepStats(num_forward_tokens=1, decoder=decoder))
    text = metrics.exposition().decode()
    m = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    labels = {"model_name": MODEL, "decoder": "fake"}
    steps = value(m, "slipstream:decoder_stat_steps_total", stat="read", **labels)
    total = value(m, "slipstream:decoder_stat_sum_total", stat="read", **labels)
    assert steps == 2 and abs(total / steps - 0.3) < 1e-9
    assert value(m, "slipstream:engine_steps_total", **labels) == 4


def test_aborted_requests_are_counted() -> None:
    engine = FakeEngine(FakeConfig(name=MODEL, step_delay_s=0.02))
    with live_server(engine) as srv:
        body = {"prompt": "x", "max_tokens": 100}
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=0.2)
        deadline = time.monotonic() + 5
        while not engine.aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        m = scrape(srv.url)
    assert value(m, "slipstream:request_success_total", finished_reason="abort") == 1
    assert (
        m[
            (
                "slipstream:http_requests_total",
                frozenset({"method": "POST", "route": "/v1/completions", "status": "499"}.items()),
            )
        ]
        == 1
    )


def test_http_labels_stay_bounded_whatever_clients_send() -> None:
    """Made-up methods and paths add no series: method "other", route "unmatched" (each
    one was a new series, an API key or not). The docs' routes keep their own paths."""
    with live_server(api_key="k") as srv:
        for i in range(5):
            httpx.request(f"M{i}", srv.url + "/v1/completions")
            httpx.get(srv.url + f"/no/such/path/{i}")
        httpx.get(srv.url + "/openapi.json")
        samples = scrape(srv.url)
    http = [dict(labels) for name, labels in samples if name == "slipstream:http_requests_total"]
    methods = {s["method"] for s in http}
    routes = {s["route"] for s in http}
    assert methods <= {"GET", "POST", "other"} and "other" in methods
    assert not any(r.startswith("/no/such") for r in routes)
    assert "/openapi.json" in routes and "unmatched" in routes
