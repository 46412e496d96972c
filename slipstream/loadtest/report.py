"""Statistics of a run from recorded timings: pure functions, no I/O."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from slipstream.loadtest.client import RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def resolve_output_tokens(
    records: Sequence[RequestRecord], count_tokens: Callable[[str], int] | None
) -> str:
    """Fill output_tokens where the server sent no usage; return how they were counted.

    The answer is "server_usage", "tokenizer", "chunks" (one token per text chunk, an
    undercount under speculative decoding) or a "+"-joined mix of them.
    """
    sources = set()
    for r in records:
        if not r.success:
            continue
        if r.output_tokens is not None:
            sources.add("server_usage")
        elif count_tokens is not None:
            r.output_tokens = count_tokens(r.generated_text)
            sources.add("tokenizer")
        else:
            r.output_tokens = len(r.chunk_times)
            sources.add("chunks")
    return "+".join(s for s in ("server_usage", "tokenizer", "chunks") if s in sources) or "none"


def tpot(record: RequestRecord) -> float | None:
    """(E2EL - TTFT) / (output tokens - 1), or None with fewer than two tokens."""
    n = record.output_tokens or 0
    return (record.latency - record.ttft) / (n - 1) if n > 1 else None


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """Whether a successful request met every SLO (TPOT is vacuous for 1-token outputs)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "e2el": record.latency, "tpot": tpot(record)}
    for name, limit_ms in slos_ms.items():
        value = values[name]
        if value is not None and value * 1000.0 > limit_ms:
            return False
    return True


def distribution(values_s: Sequence[float], percentiles: Sequence[float], name: str) -> dict:
    """mean/median/std/pNN of `values_s` (seconds) as `{stat}_{name}_ms` keys."""
    arr = np.asarray(values_s, dtype=float) * 1000.0
    empty = arr.size == 0
    out = {
        f"mean_{name}_ms": 0.0 if empty else float(arr.mean()),
        f"median_{name}_ms": 0.0 if empty else float(np.median(arr)),
        f"std_{name}_ms": 0.0 if empty else float(arr.std()),
    }
    # p99 always: it is vllm's default and the key tools that read these files expect.
    for p in sorted({*percentiles, 99.0}):
        out[f"p{_pct_label(p)}_{name}_ms"] = 0.0 if empty else float(np.percentile(arr, p))
    return out


def token_timeline(
    records: Sequence[RequestRecord], bucket_s: float = 1.0
) -> tuple[list[float], list[float]]:
    """Output tokens/s per time bucket (bucket start times, rates).

    A request's output tokens are spread evenly over its text chunks, because a chunk may
    carry several tokens (speculative decoding) and the server reports only the total.
    """
    events: list[tuple[float, float]] = []
    for r in records:
        if r.success and r.chunk_times and r.output_tokens:
            per_chunk = r.output_tokens / len(r.chunk_times)
            events.extend((r.start + t, per_chunk) for t in r.chunk_times)
    if not events:
        return [], []
    num_buckets = int(max(t for t, _ in events) // bucket_s) + 1
    counts = [0.0] * num_buckets
    for t, n in events:
        counts[int(t // bucket_s)] += n
    return [i * bucket_s for i in range(num_buckets)], [c / bucket_s for c in counts]


def max_concurrency_seen(records: Sequence[RequestRecord]) -> int:
    """Peak number of requests in flight at once (sweep over start/end events)."""
    events = []
    for r in records:
        if r.latency > 0:
            events += [(r.start, 1), (r.start + r.latency, -1)]
    peak = running = 0
    for _, step in sorted(events):  # ends sort before starts at equal times
        running += step
        peak = max(peak, running)
    return peak


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float] = (50.0, 90.0, 99.0),
    goodput_slos_ms: dict[str, float] | None = None,
    save_texts: bool = False,
) -> dict[str, Any]:
    """The run's metrics under vllm bench serve's JSON keys, plus slipstream's extras.

    `records` are the requests that finished (succeeded or failed); output_tokens must
    already be resolved for successful ones (see resolve_output_tokens).
    """
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    input_lens = [_input_len(r) for r in ok]
    output_lens = [r.output_tokens or 0 for r in ok]
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    itls = [gap for r in ok for gap in r.itl]
    duration = max(duration_s, 1e-9)
    total_in, total_out = sum(input_lens), sum(output_lens)
    _, rates = token_timeline(ok)
    good = sum(meets_slos(r, goodput_slos_ms) for r in ok) if goodput_slos_ms else None
    summary: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if good is not None else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": max(rates, default=0.0),
        "max_concurrent_requests": max_concurrency_seen(records),
    }
    summary |= distribution([r.ttft for r in ok], percentiles, "ttft")
    summary |= distribution(tpots, percentiles, "tpot")
    summary |= distribution(itls, percentiles, "itl")
    summary |= distribution([r.latency for r in ok], percentiles, "e2el")
    summary |= distribution([r.queue_time for r in ok], percentiles, "client_queue_time")
    summary |= {
        "input_lens": input_lens,
        "output_lens": output_lens,
        "ttfts": [r.ttft for r in ok],
        "itls": [r.itl for r in ok],
        "latencies": [r.latency for r in ok],
        "start_times": [r.start for r in ok],
        "queue_times": [r.queue_time for r in ok],
        "errors": [f"{r.error_type}: {r.error}" for r in failed],
        "errors_by_type": dict(Counter(r.error_type for r in failed)),
        "tokens_per_s_timeline": rates,
    }
    if save_texts:
        summary["generated_texts"] = [r.generated_text for r in ok]
        summary["generated_indices"] = [r.index for r in ok]  # which request each text answers
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """vllm-style console table of a summary dict."""
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(label: str, value: Any) -> None:
        if isinstance(value, float):
            value = f"{value:.2f}"
        lines.append(f"{label + ':':<40}{value!s:>10}")

    row("Successful requests", summary["completed"])
    row("Failed requests", summary["failed"])
    for err_type, count in sorted(summary.get("errors_by_type", {}).items()):
        row(f"  {err_type}", count)
    if summary.get("interrupted"):
        row("Stopped early", summary.get("stop_reason", "yes"))
        if "num_not_finished" in summary:  # cancelled in flight, or never sent
            row("  requests not finished", summary["num_not_finished"])
    if summary.get("max_concurrency") is not None:
        row("Maximum request concurrency", summary["max_concurrency"])
    if "request_rate" in summary:
        row("Request rate configured (RPS)", _fmt_rate(summary["request_rate"]))
    row("Benchmark duration (s)", summary["duration"])
    row("Total input tokens", summary["total_input_tokens"])
    row("Total generated tokens", summary["total_output_tokens"])
    if "output_tokens_source" in summary:
        row("Output tokens counted by", summary["output_tokens_source"])
    row("Request throughput (req/s)", summary["request_throughput"])
    if summary.get("request_goodput") is not None:
        row("Request goodput (req/s)", summary["request_goodput"])
    row("Output token throughput (tok/s)", summary["output_throughput"])
    row("Peak output token throughput (tok/s)", summary["max_output_tokens_per_s"])
    row("Peak concurrent requests", summary["max_concurrent_requests"])
    row("Total token throughput (tok/s)", summary["total_token_throughput"])
    for name in LATENCY_METRICS:
        lines.append("{s:{c}^{n}}".format(s=f" {_TITLES[name]} ", n=w, c="-"))
        row(f"Mean {name.upper()} (ms)", summary[f"mean_{name}_ms"])
        row(f"Median {name.upper()} (ms)", summary[f"median_{name}_ms"])
        for key in _percentile_keys(summary, name):
            if key.startswith("p50_"):
                continue  # the median, already shown
            row(f"{key.split('_')[0].upper()} {name.upper()} (ms)", summary[key])
    if "spec_decode_acceptance_rate" in summary:
        lines.append("{s:{c}^{n}}".format(s=" Speculative Decoding ", n=w, c="-"))
        row("Acceptance rate (%)", 100.0 * summary["spec_decode_acceptance_rate"])
        row("Accepted tokens per draft step", summary["spec_decode_mean_accepted_tokens_per_step"])
        row("Acceptance length (incl. bonus)", summary["spec_decode_acceptance_length"])
        row("Drafts", int(summary["spec_decode_num_drafts"]))
        row("Draft tokens", int(summary["spec_decode_draft_tokens"]))
        row("Accepted tokens", int(summary["spec_decode_accepted_tokens"]))
    lines.append("=" * w)
    return "\n".join(lines)


def _percentile_keys(summary: dict[str, Any], name: str) -> list[str]:
    suffix = f"_{name}_ms"
    keys = [k for k in summary if k.startswith("p") and k.endswith(suffix)]
    return sorted(keys, key=lambda k: float(k[1 : -len(suffix)]))


def _input_len(record: RequestRecord) -> int:
    # The server's count is authoritative (it applied the chat template); ours is the fallback.
    if record.prompt_tokens is not None:
        return record.prompt_tokens
    return record.prompt_len or 0


def _pct_label(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else f"{p:g}"


def _fmt_rate(rate: Any) -> str:
    return "inf" if rate is None or (isinstance(rate, float) and math.isinf(rate)) else str(rate)
