"""PNG plots of runs: latency CDFs, tokens/s over time, sweeps and side-by-side comparisons."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

_METRIC_ARRAYS = {
    "TTFT": "ttfts",
    "E2EL": "latencies",
}


def _pyplot() -> Any:
    # Imported here so the CLI starts fast; Agg renders without a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(summary: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Latency CDFs (TTFT, TPOT, ITL, E2EL) and output tokens/s over time for one run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for label, values in _latency_series(summary).items():
        if values:
            xs = sorted(v * 1000.0 for v in values)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=label)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of samples")
    ax.set_title("Latency CDFs")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    rates = list(summary.get("tokens_per_s_timeline", []))
    # One more point so the last one-second bucket is drawn as a step, not a lone edge.
    ax.plot(range(len(rates) + 1), [*rates, *rates[-1:]] or [0.0], drawstyle="steps-post")
    ax.axhline(summary.get("output_throughput", 0.0), ls="--", c="gray", label="mean")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Output throughput over time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title or str(summary.get("label", "")))
    return _save(fig, path)


def plot_sweep(summaries: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Output throughput against median/p99 TPOT and TTFT, one point per sweep setting."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [s["output_throughput"] for s in summaries]
    for ax, metric in zip(axes, ("tpot", "ttft"), strict=True):
        for stat in ("median", "p99"):
            key = f"{stat}_{metric}_ms"
            ys = [s.get(key, 0.0) for s in summaries]
            ax.plot(xs, ys, marker="o", label=f"{stat} {metric.upper()}")
        for s, x in zip(summaries, xs, strict=True):
            ax.annotate(_point_name(s), (x, s.get(f"median_{metric}_ms", 0.0)), fontsize=8)
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "throughput vs latency")
    return _save(fig, path)


def plot_compare(
    summaries: Sequence[dict[str, Any]], names: Sequence[str], path: str | Path
) -> Path:
    """Bars of throughput and median latencies per run, e.g. one run per decoder."""
    plt = _pyplot()
    panels = [
        ("output_throughput", "output tokens/s"),
        ("median_ttft_ms", "median TTFT (ms)"),
        ("median_tpot_ms", "median TPOT (ms)"),
        ("median_e2el_ms", "median E2EL (ms)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.bar(list(names), [float(s.get(key) or 0.0) for s in summaries])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _latency_series(summary: dict[str, Any]) -> dict[str, list[float]]:
    series = {label: list(summary.get(key, [])) for label, key in _METRIC_ARRAYS.items()}
    series["ITL"] = [gap for gaps in summary.get("itls", []) for gap in gaps]
    # Per-request TPOT from the arrays, same formula as report.tpot.
    tpots = []
    for ttft, e2el, n in zip(
        summary.get("ttfts", []),
        summary.get("latencies", []),
        summary.get("output_lens", []),
        strict=False,
    ):
        if n > 1:
            tpots.append((e2el - ttft) / (n - 1))
    series["TPOT"] = tpots
    return {k: series[k] for k in ("TTFT", "TPOT", "ITL", "E2EL")}


def _point_name(summary: dict[str, Any]) -> str:
    if summary.get("max_concurrency"):
        return f"c={summary['max_concurrency']}"
    return f"{summary.get('request_rate')} rps"


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out
