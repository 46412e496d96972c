"""Synthetic two-step arithmetic word problems, generated fresh (so no model has seen them).

RandomCalculation-style: the numbers, names and wording are drawn from a seeded RNG, so a
benchmark gets as many uncontaminated problems as it needs, reproducibly.

Example:
    make_problems(1, seed=0)[0]
    -> ArithProblem(question="Zoe has 4 stamps. Then she triples the number of stamps she
       has. Then she loses 8 stamps. How many stamps does Zoe have now?", answer=4)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = (
    "Maya", "Omar", "Lena", "Tom", "Aisha", "Ben", "Sara", "Kenji", "Lucia", "Ravi",
    "Nina", "Paul", "Zoe", "Ivan", "Emma", "Leo",
)  # fmt: skip
ITEMS = (
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells",
    "cards", "coins", "balloons", "oranges",
)  # fmt: skip
_PRONOUNS = {"Maya": "She", "Lena": "She", "Aisha": "She", "Sara": "She", "Lucia": "She"}
_PRONOUNS |= {"Nina": "She", "Zoe": "She", "Emma": "She"}

# The answer's format the prompt asks for, and the fallback (the last integer in the text).
_ANSWER = re.compile(r"answer\s*(?:is|:)?\s*\**\s*(-?\d[\d,]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*")

INSTRUCTION = "Solve the problem step by step. End with 'The answer is N.' where N is a number."


@dataclass(frozen=True)
class ArithProblem:
    """One word problem and its integer answer."""

    question: str
    answer: int

    def prompt(self) -> str:
        """The user message: the question plus the answer-format instruction."""
        return f"{self.question}\n{INSTRUCTION}"


def _step(rng: random.Random, value: int, name: str, he: str, item: str) -> tuple[str, int]:
    """One operation on `value`: its sentence and the new value (never negative)."""
    other = rng.choice([n for n in NAMES if n != name])
    kind = rng.choice(("add", "add", "sub", "sub", "mul"))
    if kind == "mul" and value <= 12:
        factor = rng.choice((2, 3))
        word = {2: "doubles", 3: "triples"}[factor]
        return f"Then {he.lower()} {word} the number of {item} {he.lower()} has.", value * factor
    if kind == "sub" and value >= 2:
        k = rng.randint(1, min(value - 1, 15))
        verb = rng.choice((f"gives {k} {item} to {other}", f"loses {k} {item}"))
        return f"Then {he.lower()} {verb}.", value - k
    k = rng.randint(2, 15)
    verb = rng.choice((f"buys {k} more {item}", f"gets {k} more {item} from {other}"))
    return f"Then {he.lower()} {verb}.", value + k


def make_problems(n: int, seed: int = 0, steps: int = 2) -> list[ArithProblem]:
    """`n` problems, each a starting amount and `steps` operations; the same seed, the same set."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        he = _PRONOUNS.get(name, "He")
        value = rng.randint(3, 20)
        sentences = [f"{name} has {value} {item}."]
        for _ in range(steps):
            sentence, value = _step(rng, value, name, he, item)
            sentences.append(sentence)
        sentences.append(f"How many {item} does {name} have now?")
        problems.append(ArithProblem(" ".join(sentences), value))
    return problems


def extract_answer(text: str) -> int | None:
    """The number after the last "answer is", else the last integer in the text."""
    matches = _ANSWER.findall(text) or _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return int(matches[-1].replace(",", ""))
    except ValueError:
        return None
