"""Workload datasets: random token prompts, ShareGPT, JSONL and the builtin suite."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from slipstream.loadtest.builtin import load_builtin
from slipstream.loadtest.tokenizer import Tokenizer

DatasetName = Literal["random", "sharegpt", "jsonl", "builtin"]
DATASETS: tuple[DatasetName, ...] = ("random", "sharegpt", "jsonl", "builtin")
Messages = list[dict[str, str]]
_ROLES = ("system", "user", "assistant", "tool", "developer")


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the place."""


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to send: plain text (completions) or chat messages, with known lengths."""

    prompt: str | Messages
    # Prompt tokens as counted by our tokenizer; None when no tokenizer counted them.
    prompt_len: int | None = None
    # Tokens to ask for (max_tokens); None = the run's --max-tokens.
    output_len: int | None = None
    category: str | None = None


def sample_random(
    tokenizer: Tokenizer,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: random.Random,
) -> list[SampleRequest]:
    """Prompts of random token ids decoded to text, lengths uniform in len·[1-r, 1+r].

    Follows `vllm bench serve --dataset-name random`: the ids are decoded, and since decoding
    then re-encoding does not always round-trip, the text is re-encoded and trimmed or padded
    until it has the sampled length (or the closest the tokenizer allows).
    """
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(tokenizer.vocab_size) if i not in special]
    samples = []
    for _ in range(num_prompts):
        n_in = _uniform_len(input_len, range_ratio, rng)
        n_out = _uniform_len(output_len, range_ratio, rng)
        ids = [rng.choice(vocab) for _ in range(n_in)]
        text, n_tokens = _fit_length(tokenizer, ids, n_in, vocab, rng)
        samples.append(SampleRequest(text, n_tokens, n_out, "random"))
    return samples


def load_sharegpt(
    path: str, tokenizer: Tokenizer | None, num_prompts: int, rng: random.Random
) -> list[SampleRequest]:
    """First human turn of each ShareGPT conversation; output length = the reply's tokens."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a ShareGPT file is a JSON list of conversations")
    samples = []
    for i, entry in enumerate(data):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise DatasetError(f"{path}: entry {i} has no 'conversations' list")
        if len(turns) < 2:
            continue  # nothing to measure the reply length against (vllm skips these too)
        prompt, reply = (_turn_value(path, i, t) for t in turns[:2])
        prompt_len = output_len = None
        if tokenizer is not None:
            prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
            output_len = len(tokenizer.encode(reply, add_special_tokens=False))
            if prompt_len < 4 or output_len < 4:
                continue  # vllm drops near-empty turns; they measure nothing
        samples.append(SampleRequest(prompt, prompt_len, output_len, "sharegpt"))
    if not samples:
        raise DatasetError(f"{path}: no conversation with a prompt and a reply")
    return _cycle(samples, num_prompts, rng)


def load_jsonl(path: str, num_prompts: int, rng: random.Random) -> list[SampleRequest]:
    """One request per line: a string, a messages list, or {"prompt"|"messages", ...};
    shuffled once and cycled to num_prompts."""
    return _cycle(read_jsonl(path), num_prompts, rng)


def read_jsonl(path: str) -> list[SampleRequest]:
    """Every request of a JSONL file (see load_jsonl), in file order."""
    text = _read_text(path)
    samples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        samples.append(_jsonl_row(f"{path}:{lineno}", row))
    if not samples:
        raise DatasetError(f"{path}: the file has no requests")
    return samples


def load_builtin_samples(
    categories: list[str] | None, num_prompts: int, rng: random.Random
) -> list[SampleRequest]:
    """The builtin suite as chat requests, cycled to num_prompts."""
    prompts = load_builtin(categories)
    samples = [SampleRequest(list(p.messages), None, None, p.category) for p in prompts]
    return _cycle(samples, num_prompts, rng)


def _uniform_len(length: int, ratio: float, rng: random.Random) -> int:
    return rng.randint(max(1, math.floor(length * (1 - ratio))), math.ceil(length * (1 + ratio)))


def _fit_length(
    tokenizer: Tokenizer, ids: list[int], target: int, vocab: list[int], rng: random.Random
) -> tuple[str, int]:
    text = tokenizer.decode(ids)
    # A few rounds suffice in practice: each round fixes most of the remaining difference.
    for _ in range(8):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == target:
            break
        ids = ids[:target] + [rng.choice(vocab) for _ in range(target - len(ids))]
        text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def _cycle(samples: list[SampleRequest], n: int, rng: random.Random) -> list[SampleRequest]:
    # Shuffled once, then repeated, so every prompt is used before any repeats.
    order = samples[:]
    rng.shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    try:
        return p.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _read_json(path: str) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from exc


def _turn_value(path: str, index: int, turn: Any) -> str:
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise DatasetError(f"{path}: entry {index} has a turn without a string 'value'")
    return str(turn["value"])


def _jsonl_row(where: str, row: Any) -> SampleRequest:
    if isinstance(row, str):
        return SampleRequest(_nonempty(where, row))
    if isinstance(row, list):
        return SampleRequest(_messages(where, row))
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a string, a messages list or an object")
    max_tokens = row.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise DatasetError(f"{where}: 'max_tokens' must be a positive integer")
    category = row.get("category")
    if "messages" in row:
        return SampleRequest(_messages(where, row["messages"]), None, max_tokens, category)
    if isinstance(row.get("prompt"), str):
        return SampleRequest(_nonempty(where, row["prompt"]), None, max_tokens, category)
    raise DatasetError(f"{where}: expected a 'prompt' string or a 'messages' list")


def _nonempty(where: str, text: str) -> str:
    if not text.strip():
        raise DatasetError(f"{where}: empty prompt")
    return text


def _messages(where: str, value: Any) -> Messages:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    for j, message in enumerate(value):
        ok = (
            isinstance(message, dict)
            and message.get("role") in _ROLES
            and isinstance(message.get("content"), str)
        )
        if not ok:
            raise DatasetError(
                f"{where}: message {j} must be {{'role': one of {list(_ROLES)}, 'content': string}}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]
