"""Side-by-side table of result JSONs, each metric as a ratio against the first."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (key, higher is better); shown when present in at least one file.
COMPARE_KEYS: tuple[tuple[str, bool], ...] = (
    ("completed", True),
    ("failed", False),
    ("duration", False),
    ("request_throughput", True),
    ("request_goodput", True),
    ("output_throughput", True),
    ("total_token_throughput", True),
    ("max_output_tokens_per_s", True),
    *(
        (f"{stat}_{metric}_ms", False)
        for metric in ("ttft", "tpot", "itl", "e2el")
        for stat in ("mean", "median", "p90", "p99")
    ),
    ("spec_decode_acceptance_rate", True),
    ("spec_decode_acceptance_length", True),
    ("spec_decode_mean_accepted_tokens_per_step", True),
)


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read result JSONs; a missing or non-object file is a ValueError naming it."""
    results = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read result {path}: {exc}") from exc
        if not isinstance(data, dict) or "completed" not in data:
            raise ValueError(f"{path} is not a benchmark result (no 'completed' key)")
        results.append(data)
    return results


def compare_rows(results: Sequence[dict[str, Any]]) -> list[tuple[str, list[Any], list[float]]]:
    """(metric, values per result, ratio of each to the first) for every comparable metric."""
    rows = []
    for key, _ in COMPARE_KEYS:
        values = [r.get(key) for r in results]
        if all(v is None for v in values):
            continue
        base = values[0]
        ratios = [
            v / base
            if isinstance(v, int | float) and isinstance(base, int | float) and base
            else float("nan")
            for v in values
        ]
        rows.append((key, values, ratios))
    return rows


def identical_answers(base: dict[str, Any], other: dict[str, Any]) -> tuple[int, int] | None:
    """(answers equal to base's, requests both answered), matched by request index; None
    where either result kept no texts (`--save-detailed`; `bench decoders` keeps them at
    temperature 0). Under greedy decoding a lossless decoder answers every request as the
    plain one does, at any concurrency."""
    texts = []
    for result in (base, other):
        if "generated_texts" not in result or "generated_indices" not in result:
            return None
        texts.append(dict(zip(result["generated_indices"], result["generated_texts"], strict=True)))
    common = texts[0].keys() & texts[1].keys()
    return sum(texts[0][i] == texts[1][i] for i in common), len(common)


def format_compare(results: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """A plain-text table: one column per result, `value (x ratio)` against the first."""
    better = dict(COMPARE_KEYS)
    rows = compare_rows(results)
    width = max([len(k) for k, _, _ in rows] + [6]) + 2
    col = max([len(n) for n in names] + [20]) + 2
    lines = [f"{'metric':<{width}}" + "".join(f"{n:>{col}}" for n in names)]
    lines.append("-" * len(lines[0]))
    for key, values, ratios in rows:
        cells = []
        for i, (v, ratio) in enumerate(zip(values, ratios, strict=True)):
            text = "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
            if i > 0 and ratio == ratio:  # skip NaN ratios
                text += f" (x{ratio:.2f})"
            cells.append(f"{text:>{col}}")
        arrow = "↑" if better[key] else "↓"
        lines.append(f"{key + ' ' + arrow:<{width}}" + "".join(cells))
    same = [identical_answers(results[0], r) for r in results[1:]]
    if results and all(x is not None for x in same):
        cells = [f"{'-':>{col}}"] + [f"{f'{x[0]}/{x[1]}':>{col}}" for x in same if x is not None]
        lines.append(f"{'answers as the first':<{width}}" + "".join(cells))
    return "\n".join(lines)
