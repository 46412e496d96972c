"""`slipstream bench serve|sweep|compare|decoders`: argument parsing and output files.

Examples:
    slipstream bench serve --base-url http://127.0.0.1:8000 --dataset builtin \
        --num-prompts 96 --max-concurrency 4 --goodput ttft:500 tpot:100
    slipstream bench sweep --dataset random --tokenizer TOK_DIR --concurrencies 1,4,16
    slipstream bench compare bench-results/a.json bench-results/b.json
    slipstream bench decoders --decoders standard,token_recycling --dataset builtin
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_DEFAULT_RESULT_DIR = "bench-results"


def add_parser(subparsers: Any) -> None:
    """Add `bench` and its sub-subcommands to the top-level `slipstream` parser."""
    from slipstream.loadtest.config import BenchConfig

    d = BenchConfig()
    bench = subparsers.add_parser("bench", help="load-test an OpenAI-compatible server")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    bench.set_defaults(func=lambda _args: bench.print_help() or 2)

    serve = sub.add_parser("serve", help="benchmark a running server")
    _add_workload_args(serve, d, target=True)
    _add_output_args(serve)
    serve.set_defaults(func=_cmd_serve)

    sweep = sub.add_parser("sweep", help="the same workload at several concurrencies or rates")
    _add_workload_args(sweep, d, target=True)
    _add_output_args(sweep)
    axis = sweep.add_mutually_exclusive_group(required=True)
    axis.add_argument("--concurrencies", help="comma-separated max concurrencies, e.g. 1,4,16")
    axis.add_argument("--request-rates", help="comma-separated request rates, e.g. 1,2,4,inf")
    sweep.set_defaults(func=_cmd_sweep)

    compare = sub.add_parser("compare", help="compare result JSON files against the first")
    compare.add_argument("files", nargs="+", help="result JSON files (the first is the baseline)")
    compare.add_argument("--names", help="comma-separated column names (default: file names)")
    compare.add_argument("--plot", help="also write a comparison PNG here")
    compare.set_defaults(func=_cmd_compare)

    dec = sub.add_parser(
        "decoders",
        help="start a server per decoder (on a free port of 127.0.0.1) and benchmark each; at "
        "temperature 0 the table also counts the answers equal to the first decoder's",
    )
    dec.add_argument("--decoders", required=True, help="comma-separated decoder names")
    dec.add_argument(
        "--decoder-config",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="options for one decoder, e.g. token_recycling='{\"tree_size\": 6}' (repeatable)",
    )
    dec.add_argument("--serve-model", help="passed to `slipstream serve --model`")
    dec.add_argument("--serve-args", default="", help="extra `slipstream serve` arguments")
    dec.add_argument(
        "--serve-command",
        help="replace the server command; a template with {python} {port} {decoder} "
        "{decoder_config}",
    )
    dec.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for /health")
    _add_workload_args(dec, d, target=False)
    _add_output_args(dec)
    dec.set_defaults(func=_cmd_decoders)


def _add_workload_args(p: argparse.ArgumentParser, d: Any, target: bool) -> None:
    from slipstream.loadtest.builtin import CATEGORIES

    g = p.add_argument_group("server")
    if target:
        g.add_argument("--base-url", default=d.base_url, help="server URL (default: %(default)s)")
    g.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    g.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default=d.endpoint,
        help="/v1/chat/completions or /v1/completions (default: %(default)s)",
    )
    g.add_argument("--api-key", help="bearer token, if the server asks for one")
    g = p.add_argument_group("workload")
    g.add_argument(
        "--dataset",
        choices=("random", "sharegpt", "jsonl", "builtin"),
        default=d.dataset,
        help="random: --random-input-len tokens of random text; sharegpt: a ShareGPT JSON "
        "file's first turns; jsonl: one request a line (a string, a messages list, or an "
        'object with "prompt" or "messages" and optional "max_tokens"); builtin: the '
        "six-category chat suite (default: %(default)s)",
    )
    g.add_argument("--dataset-path", help="the file for --dataset sharegpt or jsonl")
    g.add_argument(
        "--categories",
        help=f"builtin categories, comma-separated, of {', '.join(CATEGORIES)} (default: all)",
    )
    g.add_argument(
        "--random-input-len",
        type=int,
        default=d.random_input_len,
        help="prompt tokens, --dataset random (default: %(default)s)",
    )
    g.add_argument(
        "--random-output-len",
        type=int,
        default=d.random_output_len,
        help="output tokens, --dataset random (default: %(default)s)",
    )
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=d.random_range_ratio,
        help="lengths drawn within +- this fraction of the above (default: %(default)s)",
    )
    g.add_argument(
        "--num-prompts",
        type=int,
        default=d.num_prompts,
        help="requests to send; a dataset smaller than this is cycled (default: %(default)s)",
    )
    g.add_argument(
        "--seed", type=int, default=d.seed, help="workload sampling seed (default: %(default)s)"
    )
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly max tokens")
    g.add_argument("--max-tokens", type=int, help="output tokens per request (overrides dataset)")
    g.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help="sampling temperature of every request; 0 = greedy (default: %(default)s)",
    )
    g.add_argument(
        "--tokenizer",
        help="local HF tokenizer folder: it builds --dataset random and counts tokens where "
        "the server reports no usage; 'none' to do without (default: the default model's)",
    )
    g = p.add_argument_group("load")
    g.add_argument(
        "--request-rate",
        type=float,
        default=d.request_rate,
        help="requests/s; inf = all at once (default: %(default)s)",
    )
    g.add_argument(
        "--burstiness",
        type=float,
        default=d.burstiness,
        help="gamma shape of the arrival gaps; 1.0 = Poisson (default: %(default)s)",
    )
    g.add_argument(
        "--max-concurrency", type=int, help="requests in flight at most (default: no cap)"
    )
    g.add_argument(
        "--num-warmups",
        type=int,
        default=d.num_warmups,
        help="untimed requests first; the first also tests the server (default: %(default)s)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=d.timeout_s,
        help="seconds a request may take (default: %(default)s)",
    )
    g.add_argument(
        "--max-duration",
        type=float,
        default=d.max_duration_s,
        help="seconds the run may take; then it stops and reports (default: %(default)s)",
    )
    g = p.add_argument_group("report")
    g.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="NAME:MS",
        help="service-level objectives for goodput, of ttft, tpot and e2el, e.g. ttft:500",
    )
    g.add_argument(
        "--percentiles", default="50,90,99", help="latency percentiles (default: %(default)s)"
    )
    g.add_argument(
        "--label", default=d.label, help="the run's name in files and tables (default: %(default)s)"
    )
    g.add_argument("--save-detailed", action="store_true", help="keep generated texts in JSON")
    g.add_argument("--no-metrics", action="store_true", help="do not scrape /metrics")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--result-dir", default=_DEFAULT_RESULT_DIR, help="where results go (default: %(default)s)"
    )
    p.add_argument("--result-filename", help="JSON name (bench serve only; default vllm-style)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def config_from_args(args: argparse.Namespace) -> Any:
    """Build a BenchConfig from parsed arguments (ValueError on bad values)."""
    from slipstream.loadtest.config import BenchConfig, parse_goodput, parse_percentiles

    cats = tuple(c.strip() for c in args.categories.split(",")) if args.categories else None
    return BenchConfig(
        base_url=getattr(args, "base_url", BenchConfig.base_url),
        model=args.model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        dataset=args.dataset,
        dataset_path=args.dataset_path,
        categories=cats,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        num_prompts=args.num_prompts,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        goodput=parse_goodput(args.goodput),
        percentiles=parse_percentiles(args.percentiles),
        timeout_s=args.timeout,
        max_duration_s=args.max_duration,
        num_warmups=args.num_warmups,
        label=args.label,
        tokenizer=args.tokenizer,
        save_detailed=args.save_detailed,
        scrape_metrics=not args.no_metrics,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from slipstream.loadtest.progress import progress_display
    from slipstream.loadtest.report import format_summary
    from slipstream.loadtest.runner import run_benchmark

    config = _config_or_exit(args)
    if config is None:
        return 2
    with progress_display(config.label) as update:
        result = _guarded(lambda: run_benchmark(config, update))
    if result is None:
        return 1
    print(format_summary(result.summary))
    out_dir = Path(args.result_dir)
    path = result.save(out_dir / (args.result_filename or result.default_filename()))
    print(f"result: {path}")
    if not args.no_plot:
        from slipstream.loadtest.plots import plot_run

        print(f"plot:   {plot_run(result.summary, path.with_suffix('.png'))}")
    # 130 = the shell's code for Ctrl-C, so scripts can tell a partial report from a full one.
    if result.summary.get("stop_reason") == "interrupted":
        return 130
    return 1 if _all_failed(result.summary) else 0


def _all_failed(summary: dict[str, Any]) -> bool:
    """True (and a line on stderr) where requests were sent and none succeeded: the table's
    latencies are then zeros, and a script must not read the run as a result."""
    if summary["completed"] or not summary["failed"]:
        return False
    kinds = ", ".join(f"{n} x {kind}" for kind, n in sorted(summary["errors_by_type"].items()))
    hint = (
        " (the server wants an API key: --api-key)"
        if "HTTP 401" in summary["errors_by_type"]
        else ""
    )
    print(f"error: every request failed: {kinds}{hint}", file=sys.stderr)
    return True


def _cmd_sweep(args: argparse.Namespace) -> int:
    from slipstream.loadtest.compare import format_compare
    from slipstream.loadtest.sweep import SweepAxis, parse_values, run_sweep

    config = _config_or_exit(args)
    if config is None:
        return 2
    axis: SweepAxis = "concurrency" if args.concurrencies else "rate"
    flag = "--concurrencies" if args.concurrencies else "--request-rates"
    try:
        values = parse_values(
            args.concurrencies or args.request_rates, flag, whole=bool(args.concurrencies)
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = _guarded(lambda: run_sweep(config, axis, values, args.result_dir, _progress_for))
    if results is None:
        return 1
    summaries = [r.summary for r in results]
    print(format_compare(summaries, [r.config.label for r in results]))
    if not args.no_plot:
        from slipstream.loadtest.plots import plot_sweep

        path = plot_sweep(summaries, Path(args.result_dir) / f"{config.label}-sweep.png")
        print(f"plot: {path}")
    print(f"results: {args.result_dir}/")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from slipstream.loadtest.compare import format_compare, load_results

    try:
        results = load_results(args.files)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = args.names.split(",") if args.names else [Path(f).stem for f in args.files]
    if len(names) != len(results):
        print("error: --names needs one name per file", file=sys.stderr)
        return 2
    print(format_compare(results, names))
    if args.plot:
        from slipstream.loadtest.plots import plot_compare

        print(f"plot: {plot_compare(results, names, args.plot)}")
    return 0


def _cmd_decoders(args: argparse.Namespace) -> int:
    from slipstream.loadtest.compare import format_compare
    from slipstream.loadtest.decoders import (
        ServerStartError,
        ServeSpec,
        check_serve_command,
        run_decoders,
    )

    config = _config_or_exit(args)
    if config is None:
        return 2
    if config.temperature == 0:
        # Greedy: keep the answers, so the table can say whether each decoder gave the first
        # one's (a lossless decoder does, request by request, at any concurrency).
        config = dataclasses.replace(config, save_detailed=True)
    decoders = tuple(n.strip() for n in args.decoders.split(",") if n.strip())
    if not decoders:
        print(f"error: --decoders {args.decoders!r}: no decoder named", file=sys.stderr)
        return 2
    decoder_configs = {}
    for item in args.decoder_config:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"error: --decoder-config {item!r}: expected NAME=JSON", file=sys.stderr)
            return 2
        if name not in decoders:
            print(
                f"error: --decoder-config {item!r}: {name!r} is not in --decoders",
                file=sys.stderr,
            )
            return 2
        decoder_configs[name] = value
    try:
        check_serve_command(args.serve_command)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = ServeSpec(
        decoders=decoders,
        decoder_configs=decoder_configs,
        serve_model=args.serve_model,
        serve_args=tuple(shlex.split(args.serve_args)),
        serve_command=args.serve_command,
        startup_timeout_s=args.startup_timeout,
    )
    runs = _guarded(
        lambda: run_decoders(config, spec, args.result_dir, _progress_for), ServerStartError
    )
    if runs is None:
        return 1
    names = [name for name, _ in runs]
    summaries = [r.summary for _, r in runs]
    table = format_compare(summaries, names)
    print(table)
    out_dir = Path(args.result_dir)
    (out_dir / f"{config.label}-decoders.txt").write_text(table + "\n")
    if not args.no_plot:
        from slipstream.loadtest.plots import plot_compare

        print(f"plot: {plot_compare(summaries, names, out_dir / f'{config.label}-decoders.png')}")
    print(f"results: {out_dir}/")
    return 0


def _config_or_exit(args: argparse.Namespace) -> Any:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        _check_result_dir(Path(args.result_dir))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return config


def _check_result_dir(path: Path) -> None:
    """Made (or found) and writable before the run, not found wanting after it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--result-dir {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--result-dir {path}: not writable")


def _progress_for(label: str) -> Any:
    from slipstream.loadtest.progress import plain_lines

    # Sweeps and decoder runs draw plain lines: a bar per point would clutter the terminal.
    return plain_lines(label, sys.stderr)


def _guarded(fn: Callable[[], T], *extra: type[Exception]) -> T | None:
    """Run fn; print expected errors (bad dataset, server down) as one line, return None."""
    from slipstream.loadtest.datasets import DatasetError
    from slipstream.loadtest.runner import BenchError
    from slipstream.loadtest.tokenizer import TokenizerUnavailable

    expected: tuple[type[Exception], ...] = (
        BenchError,
        DatasetError,
        TokenizerUnavailable,
        ValueError,
        *extra,
    )
    try:
        return fn()
    except expected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    except KeyboardInterrupt:
        # Once requests are flowing Ctrl-C gives a partial report; before that, nothing to show.
        print("interrupted before any measurement", file=sys.stderr)
        return None
