"""BenchConfig: every knob of one load-test run; the CLI reads its defaults from here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from slipstream.loadtest.datasets import DATASETS, DatasetName

Endpoint = Literal["chat", "completions"]
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class BenchConfig:
    """One run: target server, workload, arrivals, limits and reporting options."""

    base_url: str = "http://127.0.0.1:8000"
    # None = the first model the server lists at /v1/models.
    model: str | None = None
    endpoint: Endpoint = "chat"
    api_key: str | None = None
    dataset: DatasetName = "random"
    dataset_path: str | None = None
    # Builtin-suite categories; None = all six.
    categories: tuple[str, ...] | None = None
    # Same defaults as `vllm bench serve --dataset-name random`.
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    num_prompts: int = 100
    seed: int = 0
    ignore_eos: bool = False
    # Overrides each request's output length; datasets without one use 256.
    max_tokens: int | None = None
    temperature: float = 0.0
    # Requests per second; inf = all at t=0. Gaps are gamma(burstiness) (1.0 = Poisson).
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    # SLOs in ms, e.g. {"ttft": 200, "tpot": 50}; a request is "good" when it meets all of them.
    goodput: dict[str, float] = field(default_factory=dict)
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    # Per-request limit, from send to last byte.
    timeout_s: float = 600.0
    # Whole-run limit: when reached, in-flight requests are cancelled and a partial report made.
    max_duration_s: float = 3600.0
    # Sequential requests before the run, not measured; the first also checks the server works.
    num_warmups: int = 1
    label: str = "slipstream"
    # Local HF tokenizer folder; None = the default model's; "none" = no tokenizer.
    tokenizer: str | None = None
    # Also keep generated texts in the JSON.
    save_detailed: bool = False
    scrape_metrics: bool = True

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be chat or completions, got {self.endpoint!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset {self.dataset!r} unknown; choose from {DATASETS}")
        if self.dataset in ("sharegpt", "jsonl") and not self.dataset_path:
            raise ValueError(f"--dataset {self.dataset} needs --dataset-path")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (or inf), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name, seconds in (("timeout", self.timeout_s), ("max duration", self.max_duration_s)):
            # Finite: the result JSON (strict, no inf or NaN) records them.
            if not (seconds > 0 and math.isfinite(seconds)):
                raise ValueError(f"{name} must be a number of seconds > 0, got {seconds}")
        if self.num_warmups < 0:
            raise ValueError(f"num_warmups must be >= 0, got {self.num_warmups}")
        for name, ms in self.goodput.items():
            if name not in GOODPUT_METRICS or not ms > 0:
                raise ValueError(
                    f"goodput SLO {name}:{ms} invalid; use ttft, tpot or e2el with a value > 0 ms"
                )
        for p in self.percentiles:
            if not 0 < p < 100:
                raise ValueError(f"percentiles must be in (0, 100), got {p}")


def parse_goodput(items: list[str]) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for item in items:
        name, sep, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not sep or name not in GOODPUT_METRICS or not ms > 0:
            raise ValueError(f"--goodput {item!r}: expected NAME:MS with NAME in ttft, tpot, e2el")
        slos[name] = ms
    return slos


def parse_percentiles(text: str) -> tuple[float, ...]:
    """`"50,90,99"` -> (50.0, 90.0, 99.0)."""
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise ValueError(f"--percentiles {text!r}: expected numbers like 50,90,99") from exc
    if not values or not all(0 < p < 100 for p in values):
        raise ValueError(f"--percentiles {text!r}: each must be in (0, 100)")
    return values
