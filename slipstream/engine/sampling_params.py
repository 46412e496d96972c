"""Per-request sampling parameters (vLLM's names and defaults)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

# Above this many alternatives per token the OpenAI API refuses too (top_logprobs <= 20).
MAX_LOGPROBS = 20
# OpenAI's range for a logit_bias value: -100 bans a token in practice, +100 forces it.
MAX_LOGIT_BIAS = 100.0


_INTS = ("n", "top_k", "min_tokens")
_OPTIONAL_INTS = ("max_tokens", "seed", "logprobs", "prompt_logprobs")
_FLOATS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
# torch.Generator.manual_seed accepts exactly this range.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context window
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Number of top alternatives to return per generated token; None = no logprobs.
    logprobs: int | None = None
    # Logprobs for the prompt tokens (completions echo); None = none.
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    # Added to these tokens' logits before penalties and sampling (OpenAI's logit_bias):
    # (token id, bias) pairs, sorted; a {token id: bias} dict is accepted.
    logit_bias: tuple[tuple[int, float], ...] = ()
    skip_special_tokens: bool = True
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == 0:
            object.__setattr__(self, "top_k", -1)
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        self._validate()

    def _check_types(self) -> None:
        """TypeError naming a field whose value is of the wrong kind (checked before the
        ranges: 3.5 tokens or "0.5" degrees of temperature fail later, and less clearly)."""
        for name in _INTS + _OPTIONAL_INTS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_INTS:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
        for name in _FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise TypeError(f"stop must be strings, got {self.stop!r}")
        ids = self.stop_token_ids
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"stop_token_ids must be ints, got {ids!r}")

    def _validate(self) -> None:
        self._check_types()
        checks: list[tuple[bool, str]] = [
            (
                self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
                f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}",
            ),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1 (disabled) or >= 1, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be >= 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
            ),
            (
                all(t >= 0 and abs(b) <= MAX_LOGIT_BIAS for t, b in self.logit_bias),
                f"logit_bias needs token ids >= 0 and values in [-{MAX_LOGIT_BIAS:g}, "
                f"{MAX_LOGIT_BIAS:g}], got {dict(self.logit_bias)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_greedy(self) -> bool:
        """Greedy decoding: argmax, no randomness."""
        return self.temperature < 1e-5
