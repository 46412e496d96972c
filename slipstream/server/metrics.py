"""Every Prometheus metric the server exports, named like vLLM's with the prefix `slipstream:`.

The engine never imports Prometheus: it hands a StepStats to `ServerMetrics.record_step`
after each step (gauges, cache, preemption and speculative counters), and the request
handlers feed a `RequestTracker` with each RequestOutput (token counts and latencies).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from slipstream.engine.outputs import RequestOutput, StepStats

PREFIX = "slipstream:"
FINISH_REASONS = ("stop", "length", "abort", "error")
# vLLM's buckets, plus a few below its smallest ones: a GPU step takes a few milliseconds.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def token_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's build_1_2_5_buckets)."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(float(value))
        exponent += 1


class ServerMetrics:
    """The metric objects of one app, in their own registry (several apps may share a process)."""

    def __init__(self, max_model_len: int = 8192) -> None:
        self.registry = CollectorRegistry()
        self.model_name: str | None = None
        self.decoder: str | None = None
        self._define_engine_metrics()
        self._define_request_metrics(max_model_len)
        self._define_http_metrics()

    def _gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
        labels = ("model_name", "decoder", *extra)
        return Gauge(PREFIX + name, doc, labels, registry=self.registry)

    def _counter(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
        labels = ("model_name", "decoder", *extra)
        return Counter(PREFIX + name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        labels = ("model_name", "decoder")
        return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

    def _define_engine_metrics(self) -> None:
        self.num_requests_running = self._gauge(
            "num_requests_running", "Requests in the running batch."
        )
        self.num_requests_waiting = self._gauge("num_requests_waiting", "Requests waiting.")
        self.kv_cache_usage_perc = self._gauge(
            "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)."
        )
        self.num_preemptions = self._counter("num_preemptions", "Preempted requests.")
        self.prefix_cache_queries = self._counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_cache_hits = self._counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache."
        )
        self.spec_num_drafts = self._counter(
            "spec_decode_num_drafts", "Speculative drafts verified."
        )
        self.spec_num_draft_tokens = self._counter(
            "spec_decode_num_draft_tokens", "Draft tokens proposed."
        )
        self.spec_num_accepted_tokens = self._counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted."
        )
        self.spec_accepted_per_pos = self._counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft.",
            ("position",),
        )
        self.iteration_tokens = self._histogram(
            "iteration_tokens_total", "Tokens fed to the model per step.", ITERATION_TOKEN_BUCKETS
        )
        self.decoder_stat = self._gauge(
            "decoder_stat", "A decoder-specific number from the last step.", ("stat",)
        )
        self.decoder_stat_sum = self._counter(
            "decoder_stat_sum",
            "A decoder-specific number summed over the steps that report it "
            "(its mean: divide by decoder_stat_steps of the same stat).",
            ("stat",),
        )
        # Not engine_steps: a decoder reports some numbers on some steps only (sparse
        # attention's on steps that decode, not on prefill-only ones).
        self.decoder_stat_steps = self._counter(
            "decoder_stat_steps", "Steps that reported the decoder-specific number.", ("stat",)
        )
        self.engine_steps = self._counter("engine_steps", "Engine steps run.")

    def _define_request_metrics(self, max_model_len: int) -> None:
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens of served requests.")
        self.generation_tokens = self._counter("generation_tokens", "Generated tokens.")
        self.request_success = self._counter(
            "request_success",
            "Finished completions by finish reason (a request with n choices counts n, as "
            "vLLM counts sequences).",
            ("finished_reason",),
        )
        self.ttft = self._histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS
        )
        self.itl = self._histogram(
            "inter_token_latency_seconds", "Time between successive token outputs.", ITL_BUCKETS
        )
        self.tpot = self._histogram(
            "request_time_per_output_token_seconds",
            "Per request: decode time / (generated tokens - 1).",
            ITL_BUCKETS,
        )
        self.e2e = self._histogram(
            "e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS
        )
        self.queue_time = self._histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS
        )
        self.prefill_time = self._histogram(
            "request_prefill_time_seconds", "First scheduled to first token.", LATENCY_BUCKETS
        )
        self.decode_time = self._histogram(
            "request_decode_time_seconds", "First token to last token.", LATENCY_BUCKETS
        )
        buckets = token_buckets(max_model_len)
        self.request_prompt_tokens = self._histogram(
            "request_prompt_tokens", "Prompt length per request.", buckets
        )
        self.request_generation_tokens = self._histogram(
            "request_generation_tokens", "Generated tokens per request.", buckets
        )

    def _define_http_metrics(self) -> None:
        labels = ("method", "route", "status")
        self.http_requests = Counter(
            PREFIX + "http_requests", "HTTP requests.", labels, registry=self.registry
        )
        self.http_latency = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP request latency, until the last byte (streams included).",
            labels,
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )

    # ---- binding and recording ------------------------------------------------------

    def bind(self, model_name: str, decoder: str) -> None:
        """Fix the model_name and decoder labels (known once the engine has started)."""
        self.model_name, self.decoder = model_name, decoder
        labels = (model_name, decoder)
        # Touch every child so that scrapers see zeros before the first request
        # (the speculative counters stay 0 until a speculative decoder runs).
        for metric in (
            self.num_requests_running,
            self.num_requests_waiting,
            self.kv_cache_usage_perc,
            self.num_preemptions,
            self.prefix_cache_queries,
            self.prefix_cache_hits,
            self.spec_num_drafts,
            self.spec_num_draft_tokens,
            self.spec_num_accepted_tokens,
            self.prompt_tokens,
            self.generation_tokens,
            self.engine_steps,
        ):
            metric.labels(*labels)
        for reason in FINISH_REASONS:
            self.request_success.labels(*labels, reason)

    @property
    def labels(self) -> tuple[str, str]:
        """(model_name, decoder) once bound."""
        if self.model_name is None or self.decoder is None:
            raise RuntimeError("ServerMetrics.bind() has not been called")
        return self.model_name, self.decoder

    @property
    def bound(self) -> bool:
        """Whether bind() has been called."""
        return self.model_name is not None

    def record_step(self, stats: StepStats) -> None:
        """Record one engine step (called by the engine, maybe from its own thread)."""
        if not self.bound:
            return
        labels = self.labels
        self.num_requests_running.labels(*labels).set(stats.num_running)
        self.num_requests_waiting.labels(*labels).set(stats.num_waiting)
        self.kv_cache_usage_perc.labels(*labels).set(stats.kv_cache_usage)
        _inc(self.num_preemptions.labels(*labels), stats.num_preemptions)
        _inc(self.prefix_cache_queries.labels(*labels), stats.prefix_cache_queries)
        _inc(self.prefix_cache_hits.labels(*labels), stats.prefix_cache_hits)
        _inc(self.spec_num_drafts.labels(*labels), stats.spec_num_drafts)
        _inc(self.spec_num_draft_tokens.labels(*labels), stats.spec_num_draft_tokens)
        _inc(self.spec_num_accepted_tokens.labels(*labels), stats.spec_num_accepted_tokens)
        for position, accepted in enumerate(stats.spec_accepted_per_pos):
            _inc(self.spec_accepted_per_pos.labels(*labels, str(position)), accepted)
        if stats.num_forward_tokens > 0:
            self.iteration_tokens.labels(*labels).observe(stats.num_forward_tokens)
            self.engine_steps.labels(*labels).inc()
        for name, value in stats.decoder.items():
            if math.isfinite(value):
                self.decoder_stat.labels(*labels, name).set(value)
                _inc(self.decoder_stat_sum.labels(*labels, name), value)
                self.decoder_stat_steps.labels(*labels, name).inc()

    def observe_http(self, method: str, route: str, status: int, duration_s: float) -> None:
        """Count one HTTP request by route template and status."""
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_latency.labels(method, route, str(status)).observe(duration_s)

    def exposition(self) -> bytes:
        """The text exposition format of this registry."""
        return generate_latest(self.registry)


def _inc(counter: Counter, value: float) -> None:
    # Counters only go up; a negative or NaN value from a buggy engine must not crash /metrics.
    if value > 0 and math.isfinite(value):
        counter.inc(value)


@dataclass
class RequestTracker:
    """One request's token counts and timings, recorded as its outputs arrive."""

    metrics: ServerMetrics
    arrival_time: float
    num_generated: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    done: bool = False

    def on_output(self, output: RequestOutput) -> None:
        """Count the new tokens in a cumulative output; observe TTFT or inter-token latency."""
        if not self.metrics.bound:
            return
        labels = self.metrics.labels
        total = sum(len(c.token_ids) for c in output.outputs)
        new = total - self.num_generated
        if new <= 0:
            return
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
            self.metrics.ttft.labels(*labels).observe(now - self.arrival_time)
            self.metrics.prompt_tokens.labels(*labels).inc(len(output.prompt_token_ids))
        elif self.last_token_time is not None:
            self.metrics.itl.labels(*labels).observe(now - self.last_token_time)
        self.last_token_time = now
        self.num_generated = total
        self.metrics.generation_tokens.labels(*labels).inc(new)

    def on_finish(self, output: RequestOutput | None, reason: str | None = None) -> None:
        """Record the request's end once; `reason` overrides (abort, error) unfinished ones."""
        if self.done or not self.metrics.bound:
            return
        self.done = True
        m, labels = self.metrics, self.metrics.labels
        completions = output.outputs if output is not None else []
        finishes = [reason or c.finish_reason or "abort" for c in completions]
        for finish in finishes or [reason or "abort"]:
            m.request_success.labels(*labels, finish).inc()
        if output is None:
            return
        now = time.monotonic()
        m.e2e.labels(*labels).observe(now - self.arrival_time)
        m.request_prompt_tokens.labels(*labels).observe(len(output.prompt_token_ids))
        longest = max((len(c.token_ids) for c in completions), default=0)
        m.request_generation_tokens.labels(*labels).observe(self.num_generated)
        self._observe_phases(output, longest)

    def _observe_phases(self, output: RequestOutput, longest: int) -> None:
        m, labels = self.metrics, self.metrics.labels
        times = output.metrics
        first, last = self.first_token_time, self.last_token_time
        if times is not None and times.first_token_time is not None:
            first, last = times.first_token_time, times.last_token_time or last
            if times.first_scheduled_time is not None:
                m.queue_time.labels(*labels).observe(
                    max(0.0, times.first_scheduled_time - times.arrival_time)
                )
                m.prefill_time.labels(*labels).observe(
                    max(0.0, times.first_token_time - times.first_scheduled_time)
                )
        if first is None or last is None:
            return
        decode = max(0.0, last - first)
        m.decode_time.labels(*labels).observe(decode)
        if longest > 1:
            m.tpot.labels(*labels).observe(decode / (longest - 1))
