"""`slipstream generate`: offline generation on the native engine, for quick use."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from slipstream.engine.args import add_engine_args, engine_config_from_args


def add_parser(subparsers: Any) -> None:
    """Register the `generate` subcommand."""
    p = subparsers.add_parser(
        "generate",
        help="Generate offline from prompts (no server).",
        description="Generate text offline with the native engine. Prompts come from "
        "--prompt (repeatable), --prompts-file (one per line) or a built-in demo prompt.",
    )
    p.add_argument("--prompt", action="append", default=[], help="A prompt (repeatable).")
    p.add_argument("--prompts-file", help="A text file with one prompt per line.")
    p.add_argument(
        "--raw",
        action="store_true",
        help="Send prompts as plain text instead of as a user chat message.",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=128,
        help="Output tokens per prompt at most. (default: %(default)s)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy. (default: %(default)s)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="Nucleus sampling: keep the likeliest tokens up to this probability mass "
        "(1 = all). (default: %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=-1,
        help="Sample among the k likeliest tokens only (-1 = all). (default: %(default)s)",
    )
    p.add_argument(
        "--sampling-seed",
        type=int,
        default=None,
        help="Every prompt's own sampling seed: its output repeats whatever else runs "
        "(--seed seeds the engine as a whole instead).",
    )
    p.add_argument("--json", action="store_true", help="Print one JSON object per prompt.")
    add_engine_args(p)
    p.set_defaults(func=run)


DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]


def run(args: argparse.Namespace) -> int:
    """Load the engine, generate, print the outputs and statistics."""
    from slipstream.engine.llm import LLM
    from slipstream.engine.sampling_params import SamplingParams

    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                from_file = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            return _error(f"cannot read --prompts-file: {exc}")
        if not from_file:
            return _error(f"--prompts-file {args.prompts_file} has no prompts (one a line)")
        prompts.extend(from_file)
    if not prompts:
        prompts = DEMO_PROMPTS
    try:
        config = engine_config_from_args(args)
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.sampling_seed,
        )
        # Loading checks what only the model can tell (--max-model-len against its context,
        # --batch-invariant against its device and dtype).
        llm = LLM.from_config(config)
    except (ValueError, FileNotFoundError) as exc:
        return _error(str(exc))
    try:
        with _progress(len(prompts)) as progress:
            if args.raw:
                outputs = llm.generate(prompts, params, progress)
            else:
                convs = [[{"role": "user", "content": p}] for p in prompts]
                outputs = llm.chat(convs, params, progress)
    except ValueError as exc:  # a prompt the engine refuses (longer than the context)
        return _error(str(exc))
    for prompt, out in zip(prompts, outputs, strict=True):
        completion = out.outputs[0]
        if args.json:
            record = {
                "prompt": prompt,
                "text": completion.text,
                "num_tokens": len(completion.token_ids),
                "finish_reason": completion.finish_reason,
            }
            print(json.dumps(record))
        else:
            print(f"### {prompt}\n{completion.text}\n[{completion.finish_reason}]\n")
    stats = llm.get_stats()
    print(
        f"steps {stats['num_steps']}, generated {stats['generation_tokens']} tokens, "
        f"forward tokens {stats['forward_tokens']}, engine time {stats['step_time_s']:.2f}s",
        file=sys.stderr,
    )
    return 0


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


class _progress:
    """A rich progress bar on a terminal when there are many prompts; nothing otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if self.total < 4 or not sys.stderr.isatty():
            return None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        self._task = self._bar.add_task("generating", total=self.total)
        return self._update

    def _update(self, done: int, total: int) -> None:
        self._bar.update(self._task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
