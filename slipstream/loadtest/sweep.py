"""`bench sweep`: the same workload at several concurrencies or request rates."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from slipstream.loadtest.config import BenchConfig
from slipstream.loadtest.runner import BenchResult, ProgressFn, run_benchmark

SweepAxis = Literal["concurrency", "rate"]


def point_config(base: BenchConfig, axis: SweepAxis, value: float) -> BenchConfig:
    """The base config at one sweep value, labelled with it."""
    if axis == "concurrency":
        return dataclasses.replace(
            base, max_concurrency=int(value), label=f"{base.label}-c{int(value)}"
        )
    name = "inf" if math.isinf(value) else f"{value:g}"
    return dataclasses.replace(base, request_rate=value, label=f"{base.label}-r{name}")


def run_sweep(
    base: BenchConfig,
    axis: SweepAxis,
    values: Sequence[float],
    out_dir: str | Path,
    progress_for: Callable[[str], ProgressFn | None] | None = None,
) -> list[BenchResult]:
    """Run every point in order, writing `{label}.json` for each; stops after an interrupt.

    NOTE: every point sends the same prompts (same seed), so a server's prefix cache is warm
    after the first point; restart the server between points where that matters.
    """
    results = []
    for value in values:
        config = point_config(base, axis, value)
        result = run_benchmark(config, progress_for(config.label) if progress_for else None)
        result.save(Path(out_dir) / f"{config.label}.json")
        results.append(result)
        if result.summary.get("interrupted"):
            break
    return results


def parse_values(text: str, name: str, whole: bool = False) -> list[float]:
    """`"1,4,16"` -> [1.0, 4.0, 16.0]; each must be > 0; `inf` allowed unless `whole`
    (counts: concurrencies), where each must be a whole number."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{name} {text!r}: expected comma-separated numbers") from exc
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{name} {text!r}: values must be > 0")
    if whole and any(not math.isfinite(v) or v != int(v) for v in values):
        raise ValueError(f"{name} {text!r}: values must be whole numbers")
    return values
