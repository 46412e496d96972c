"""`slipstream` command: serve, generate, bench. Each subcommand lives with its package."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with `add_parser(subparsers) -> None` (sets `func` on its parser).
# Modules import torch lazily inside their `func`, so `--help` stays fast.
SUBCOMMANDS = {
    "serve": "slipstream.server.cli",
    "generate": "slipstream.engine.generate_cli",
    "bench": "slipstream.loadtest.cli",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="slipstream",
        description="OpenAI-compatible LLM inference server with pluggable decoders.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `slipstream` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
