"""The builtin prompt suite: 48 prompts, six Spec-Bench-like categories, written for slipstream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

CATEGORIES = ("writing", "qa", "translation", "summarization", "math", "rag")
_DATA_FILE = "builtin.jsonl"


@dataclass(frozen=True)
class BuiltinPrompt:
    """One chat prompt of the suite and its category."""

    category: str
    messages: tuple[dict[str, str], ...]

    @property
    def text(self) -> str:
        """The prompt's message contents joined, for callers that need plain text."""
        return "\n\n".join(m["content"] for m in self.messages)


def load_builtin(categories: list[str] | None = None) -> list[BuiltinPrompt]:
    """The suite in file order, optionally only the given categories (unknown names are errors)."""
    if categories is not None:
        unknown = sorted(set(categories) - set(CATEGORIES))
        if unknown:
            raise ValueError(
                f"unknown builtin categories {unknown}; choose from {', '.join(CATEGORIES)}"
            )
    text = resources.files("slipstream.loadtest").joinpath("data", _DATA_FILE).read_text("utf-8")
    prompts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if categories is None or row["category"] in categories:
            prompts.append(BuiltinPrompt(row["category"], tuple(row["messages"])))
    return prompts
