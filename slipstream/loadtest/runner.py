"""run_benchmark: send a workload on schedule, collect timings, build the result."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import logging
import math
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from slipstream.loadtest.client import RequestRecord, Target, api_root, send_request, server_root
from slipstream.loadtest.config import BenchConfig
from slipstream.loadtest.datasets import SampleRequest
from slipstream.loadtest.metrics_scrape import scrape, spec_decode_delta
from slipstream.loadtest.report import resolve_output_tokens, summarize
from slipstream.loadtest.tokenizer import LazyTokenizer, Tokenizer
from slipstream.loadtest.workload import DEFAULT_MAX_TOKENS, arrival_times, build_samples

logger = logging.getLogger(__name__)

# (requests finished, requests total) after each request ends.
ProgressFn = Callable[[int, int], None]


class BenchError(RuntimeError):
    """The run could not start (server unreachable, no model, test request failed)."""


@dataclass
class BenchResult:
    """A finished (or stopped) run: the JSON summary and the per-request records."""

    config: BenchConfig
    summary: dict[str, Any]
    records: list[RequestRecord] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        """Write the summary as JSON (creating parent folders); returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.summary, indent=2, allow_nan=False) + "\n")
        return out

    def default_filename(self) -> str:
        """`{label}-{rate}qps[-concurrency{C}]-{model}-{date}.json`, as vllm names results."""
        s = self.summary
        conc = f"-concurrency{s['max_concurrency']}" if s.get("max_concurrency") else ""
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", str(s.get("model_id", "model")).split("/")[-1])
        return f"{s['label']}-{s['request_rate']}qps{conc}-{model}-{s['date']}.json"


def run_benchmark(
    config: BenchConfig,
    progress: ProgressFn | None = None,
    tokenizer: Tokenizer | None = None,
) -> BenchResult:
    """Run one benchmark to completion (or its time limit, or Ctrl-C) and return the result."""
    return asyncio.run(arun_benchmark(config, progress, tokenizer))


async def arun_benchmark(
    config: BenchConfig,
    progress: ProgressFn | None = None,
    tokenizer: Tokenizer | None = None,
) -> BenchResult:
    """The async form of run_benchmark, for callers already inside an event loop."""
    tok = LazyTokenizer(config.tokenizer, preloaded=tokenizer)
    samples = build_samples(config, tok)
    limits = httpx.Limits(
        max_connections=config.max_concurrency or config.num_prompts,
        max_keepalive_connections=config.max_concurrency or config.num_prompts,
    )
    # The per-request limit is enforced by asyncio.timeout around each request; this one
    # only bounds connection setup and silent reads.
    timeout = httpx.Timeout(config.timeout_s, connect=min(30.0, config.timeout_s))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = config.model or await _first_model(client, config)
        target = Target(
            config.base_url,
            model,
            config.endpoint,
            config.api_key,
            config.temperature,
            config.ignore_eos,
        )
        await _warm_up(client, target, samples[0], config)
        metrics_url = f"{server_root(config.base_url)}/metrics"
        before = await scrape(client, metrics_url) if config.scrape_metrics else None
        # A full garbage collection in a process holding torch or transformers can pause the
        # event loop for hundreds of ms (seen as 1.2 s TTFT outliers on a loaded 2-core box);
        # collect once now and freeze the survivors so the run's collections stay small.
        gc.collect()
        gc.freeze()
        try:
            records, duration, stop_reason = await _run_schedule(
                client, target, samples, config, progress
            )
        finally:
            gc.unfreeze()
        after = await scrape(client, metrics_url) if before is not None else None
    summary = _build_summary(config, model, records, duration, tok)
    if stop_reason:
        summary |= {"interrupted": True, "stop_reason": stop_reason}
        summary["num_not_finished"] = config.num_prompts - len(records)
    spec = spec_decode_delta(before, after) if before is not None and after is not None else None
    if spec is not None:
        summary |= spec.to_json()
    return BenchResult(config, summary, records)


async def _run_schedule(
    client: httpx.AsyncClient,
    target: Target,
    samples: list[SampleRequest],
    config: BenchConfig,
    progress: ProgressFn | None,
) -> tuple[list[RequestRecord], float, str]:
    """Launch requests at their arrival times; stop at the end, the time limit or Ctrl-C."""
    times = arrival_times(
        len(samples), config.request_rate, config.burstiness, random.Random(config.seed + 1)
    )
    gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    finished: list[RequestRecord] = []
    zero = time.perf_counter()

    async def one(i: int, sample: SampleRequest) -> None:
        record = RequestRecord(i, times[i], sample.prompt_len, sample.category)
        max_tokens = config.max_tokens or sample.output_len or DEFAULT_MAX_TOKENS
        async with gate or contextlib.nullcontext():
            await send_request(client, target, sample, max_tokens, record, zero, config.timeout_s)
        finished.append(record)
        if progress is not None:
            progress(len(finished), len(samples))

    async def launch_all() -> None:
        tasks = []
        for i, sample in enumerate(samples):
            delay = zero + times[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, sample)))
        await asyncio.gather(*tasks)

    stop = asyncio.Event()
    runner = asyncio.create_task(launch_all())
    stopper = asyncio.create_task(stop.wait())
    with _sigint_sets(stop):
        done, _ = await asyncio.wait(
            {runner, stopper}, timeout=config.max_duration_s, return_when=asyncio.FIRST_COMPLETED
        )
    duration = time.perf_counter() - zero
    stop_reason = ""
    if runner not in done:
        stop_reason = "interrupted" if stop.is_set() else f"max duration {config.max_duration_s:g}s"
        await _cancel_all(runner)
    stopper.cancel()
    if runner in done:
        runner.result()  # re-raises a bug in the launcher instead of hiding it
    finished.sort(key=lambda r: r.index)
    return finished, duration, stop_reason


async def _cancel_all(runner: asyncio.Task[None]) -> None:
    # Cancelling the launcher cancels its gather, which cancels every in-flight request.
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner


@contextlib.contextmanager
def _sigint_sets(stop: asyncio.Event) -> Any:
    """While active, Ctrl-C sets `stop` (for a partial report) instead of raising."""
    loop = asyncio.get_running_loop()
    installed = False
    if threading.current_thread() is threading.main_thread():
        try:
            loop.add_signal_handler(signal.SIGINT, stop.set)
            installed = True
        except (NotImplementedError, RuntimeError):
            pass  # not on this platform / loop: Ctrl-C keeps its default behaviour
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)


async def _first_model(client: httpx.AsyncClient, config: BenchConfig) -> str:
    url = f"{api_root(config.base_url)}/models"
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        resp = await client.get(url, headers=headers, timeout=30.0)
        if resp.status_code == 401:
            raise BenchError(f"{url} answered 401: the server wants an API key (--api-key)")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise BenchError(f"cannot find a model at {url} (pass --model): {exc}") from exc


async def _warm_up(
    client: httpx.AsyncClient, target: Target, sample: SampleRequest, config: BenchConfig
) -> None:
    for i in range(config.num_warmups):
        record = RequestRecord(-1, 0.0)
        max_tokens = min(config.max_tokens or sample.output_len or DEFAULT_MAX_TOKENS, 16)
        await send_request(
            client, target, sample, max_tokens, record, time.perf_counter(), config.timeout_s
        )
        if i == 0 and not record.success:
            raise BenchError(
                f"test request to {target.url} failed: {record.error_type}: {record.error}"
            )


def _build_summary(
    config: BenchConfig,
    model: str,
    records: list[RequestRecord],
    duration: float,
    tok: LazyTokenizer,
) -> dict[str, Any]:
    needs_counting = any(r.success and r.output_tokens is None for r in records)
    count = None
    if needs_counting and (t := tok.get()) is not None:

        def count(text: str) -> int:
            return len(t.encode(text, add_special_tokens=False))

    source = resolve_output_tokens(records, count)
    if "chunks" in source:
        logger.warning(
            "the server sent no usage and no tokenizer is available (%s): output tokens are "
            "counted as streamed chunks, which undercounts under speculative decoding",
            tok.error,
        )
    elif "tokenizer" in source:
        logger.warning("the server sent no usage: output tokens counted with the tokenizer")
    summary = summarize(
        records, duration, config.percentiles, config.goodput or None, config.save_detailed
    )
    rate = config.request_rate
    meta = {
        "date": dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "label": config.label,
        "backend": f"openai-{config.endpoint}",
        "base_url": config.base_url,
        "endpoint": config.endpoint,
        "model_id": model,
        "tokenizer_id": config.tokenizer,
        "dataset": config.dataset,
        "num_prompts": config.num_prompts,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "seed": config.seed,
        "goodput_slos_ms": dict(config.goodput),
        "percentiles": list(config.percentiles),
        "output_tokens_source": source,
        "config": _config_json(config),
    }
    return meta | summary


def _config_json(config: BenchConfig) -> dict[str, Any]:
    # JSON has no inf; api keys do not belong in result files.
    out = dataclasses.asdict(config)
    out["request_rate"] = "inf" if math.isinf(config.request_rate) else config.request_rate
    out["api_key"] = "***" if config.api_key else None
    return out
