"""CNTP (cautious sampling) vs greedy and temperature sampling: accuracy, cost, throughput.

Accuracy: synthetic two-step arithmetic word problems (slipstream.testing.arith_problems,
generated fresh, so uncontaminated) on the default model, answered with
    greedy                     one run (deterministic)
    temperature sampling       T 0.7, top-p 0.9, one run per seed
    CNTP                       the same T / top-p / seeds, decoder "cautious"
Each request carries its own seed (seed * 100003 + problem index), so sampling and CNTP see
the same random streams. Reported per method: accuracy per seed, mean, standard deviation
and range over seeds; forward tokens per answer and per output token (cost); for CNTP the
gates fired per answer, trials per gate and committed segment length.

Throughput: `slipstream bench decoders` starts `slipstream serve` per decoder (standard, and
cautious with the first --cntp-config) and runs the builtin workload at T 0.7 (bench has no
top-p flag) at each concurrency (default 1 and 8); skipped with a message when the serving
or bench modules are missing or a server does not start.

Usage:
    python benchmarks/cautious.py                              # 200 problems x 5 seeds
    python benchmarks/cautious.py --problems 16 --seeds 1 --no-serve   # a quick check
    python benchmarks/cautious.py --cntp-config '{}' --cntp-config '{"max_trials": 3}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slipstream import LLM, SamplingParams
from slipstream.testing.arith_problems import ArithProblem, extract_answer, make_problems


@dataclass
class RunResult:
    """One method at one seed over all problems."""

    method: str
    seed: int | None
    accuracy: float
    output_tokens: int
    output_forward_tokens: int
    wall_s: float
    decoder: dict[str, float] = field(default_factory=dict)


def _params(args: argparse.Namespace, method: str, seed: int | None, index: int) -> SamplingParams:
    if method == "greedy":
        return SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    assert seed is not None
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=seed * 100003 + index,
    )


def run_method(
    llm: LLM, problems: list[ArithProblem], args: argparse.Namespace, method: str, seed: int | None
) -> RunResult:
    """Answer every problem once with `method`; accuracy and cost from the engine's counters."""
    before = llm.get_stats()
    conversations = [[{"role": "user", "content": p.prompt()}] for p in problems]
    params = [_params(args, method, seed, i) for i in range(len(problems))]
    start = time.perf_counter()
    outs = llm.chat(conversations, params)
    wall = time.perf_counter() - start
    after = llm.get_stats()
    correct = sum(
        extract_answer(o.outputs[0].text) == p.answer for o, p in zip(outs, problems, strict=True)
    )
    forward = (after["forward_tokens"] - before["forward_tokens"]) - (
        after["prompt_tokens"] - before["prompt_tokens"]
    )
    decoder = {
        k: after["decoder"].get(k, 0.0) - before["decoder"].get(k, 0.0)
        for k in ("gates_fired", "trials_spawned", "gates_committed", "committed_tokens")
    }
    print(
        f"  {method:<12} seed {seed}: accuracy {correct}/{len(problems)}, {wall:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return RunResult(
        method=method,
        seed=seed,
        accuracy=correct / len(problems),
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
        output_forward_tokens=forward,
        wall_s=wall,
        decoder=decoder if method.startswith("cntp") else {},
    )


def summarize(runs: list[RunResult], num_problems: int) -> dict[str, Any]:
    """Mean, spread and cost of one method's runs."""
    accs = [r.accuracy for r in runs]
    out_tok = sum(r.output_tokens for r in runs)
    fwd = sum(r.output_forward_tokens for r in runs)
    answers = num_problems * len(runs)
    summary: dict[str, Any] = {
        "runs": len(runs),
        "accuracy_per_seed": accs,
        "accuracy_mean": statistics.fmean(accs),
        "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "accuracy_range": [min(accs), max(accs)],
        "output_tokens_per_answer": out_tok / answers,
        "forward_tokens_per_answer": fwd / answers,
        "forward_tokens_per_output_token": fwd / out_tok if out_tok else 0.0,
        "wall_s": sum(r.wall_s for r in runs),
    }
    if runs[0].decoder:
        gates = sum(r.decoder["gates_fired"] for r in runs)
        committed = sum(r.decoder["gates_committed"] for r in runs)
        summary["gates_per_answer"] = gates / answers
        summary["trials_per_gate"] = (
            sum(r.decoder["trials_spawned"] for r in runs) / gates if gates else 0.0
        )
        summary["committed_segment_len"] = (
            sum(r.decoder["committed_tokens"] for r in runs) / committed if committed else 0.0
        )
    return summary


def cntp_name(config: dict[str, Any]) -> str:
    """The method name of one CNTP configuration: "cntp" for the official defaults."""
    return "cntp" + (f" {json.dumps(config, separators=(',', ':'))}" if config else "")


def accuracy_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy, temperature sampling and each CNTP config on the same problems and seeds."""
    problems = make_problems(args.problems, seed=args.problem_seed, steps=args.steps)
    seeds = list(range(args.seeds))
    common = {"dtype": args.dtype, "max_num_seqs": args.max_num_seqs}
    standard = LLM(decoder="standard", **common)
    runs = {"greedy": [run_method(standard, problems, args, "greedy", None)]}
    runs["temperature"] = [run_method(standard, problems, args, "temperature", s) for s in seeds]
    del standard
    for config in args.cntp_config:
        name = cntp_name(config)
        cautious = LLM(decoder="cautious", decoder_config=config, **common)
        runs[name] = [run_method(cautious, problems, args, name, s) for s in seeds]
        del cautious
    results: dict[str, Any] = {m: summarize(r, len(problems)) for m, r in runs.items()}
    base = results["temperature"]
    for config in args.cntp_config:
        name = cntp_name(config)
        # Paired by seed: both methods see the same problems and per-request seeds.
        diffs = [
            c.accuracy - t.accuracy for c, t in zip(runs[name], runs["temperature"], strict=True)
        ]
        results[name]["vs_temperature"] = {
            "accuracy_diff_per_seed": diffs,
            "accuracy_diff_mean": statistics.fmean(diffs),
            "accuracy_diff_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "forward_cost_ratio": results[name]["forward_tokens_per_output_token"]
            / base["forward_tokens_per_output_token"],
        }
    return results


def throughput_benchmark(args: argparse.Namespace) -> dict[str, Any] | str:
    """Served output throughput, standard vs cautious, at each concurrency."""
    try:
        from slipstream.loadtest.config import BenchConfig
        from slipstream.loadtest.decoders import ServeSpec, run_decoders
    except ImportError as exc:
        return f"skipped: slipstream bench is not importable ({exc})"
    spec = ServeSpec(
        decoders=("standard", "cautious"),
        decoder_configs={"cautious": json.dumps(args.cntp_config[0])},
        serve_args=("--dtype", args.dtype),
    )
    table: dict[str, Any] = {}
    for concurrency in args.concurrencies:
        config = BenchConfig(
            dataset="builtin",
            num_prompts=args.serve_prompts,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            max_concurrency=concurrency,
            label=f"cautious-c{concurrency}",
        )
        try:
            runs = run_decoders(config, spec, args.result_dir)
        except Exception as exc:  # a server that cannot start must not lose the accuracy run
            return f"skipped: {type(exc).__name__}: {exc}"
        table[f"concurrency_{concurrency}"] = {
            name: {
                k: result.summary.get(k)
                for k in ("output_throughput", "request_throughput", "mean_ttft_ms", "mean_tpot_ms")
            }
            for name, result in runs
        }
    return table


def _print_accuracy(results: dict[str, Any]) -> None:
    print(f"{'method':<34} {'acc':>6} {'std':>6} {'range':>13} {'fwd/ans':>8} {'fwd/tok':>7}")
    for method, r in results.items():
        lo, hi = r["accuracy_range"]
        print(
            f"{method:<34} {r['accuracy_mean']:>6.3f} {r['accuracy_std']:>6.3f} "
            f"{lo:>6.3f}-{hi:<6.3f} {r['forward_tokens_per_answer']:>8.1f} "
            f"{r['forward_tokens_per_output_token']:>7.2f}"
        )
    for method, r in results.items():
        if "vs_temperature" not in r:
            continue
        v = r["vs_temperature"]
        print(
            f"{method}: {r['gates_per_answer']:.1f} gates/answer, {r['trials_per_gate']:.1f} "
            f"trials/gate, segment {r['committed_segment_len']:.1f} tokens; accuracy "
            f"{v['accuracy_diff_mean']:+.3f} (paired std {v['accuracy_diff_std']:.3f}) vs "
            f"temperature at {v['forward_cost_ratio']:.2f}x its forward tokens per output token"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the accuracy benchmark, then (unless --no-serve) the served throughput."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--problem-seed", type=int, default=2507)
    p.add_argument(
        "--steps", type=int, default=2, help="operations per problem (1 = easier problems)"
    )
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument(
        "--cntp-config",
        type=json.loads,
        action="append",
        help="cautious options as JSON, repeatable (default: {} = the official settings); "
        "the served run uses the first",
    )
    p.add_argument("--no-accuracy", action="store_true", help="only the served throughput")
    p.add_argument("--no-serve", action="store_true", help="skip the served-throughput part")
    p.add_argument("--concurrencies", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--serve-prompts", type=int, default=32)
    p.add_argument("--result-dir", default="bench-results/cautious")
    p.add_argument("--out", help="write all numbers as JSON here")
    args = p.parse_args(argv)
    args.cntp_config = args.cntp_config or [{}]
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "out"}}
    if not args.no_accuracy:
        report["accuracy"] = accuracy_benchmark(args)
        _print_accuracy(report["accuracy"])
    if not args.no_serve:
        report["throughput"] = throughput_benchmark(args)
        print(json.dumps(report["throughput"], indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
