"""Workload shape: which requests to send (from a dataset) and when (the arrival schedule)."""

from __future__ import annotations

import math
import random

from slipstream.loadtest.config import BenchConfig
from slipstream.loadtest.datasets import (
    Messages,
    SampleRequest,
    load_builtin_samples,
    load_jsonl,
    load_sharegpt,
    sample_random,
)
from slipstream.loadtest.tokenizer import LazyTokenizer

DEFAULT_MAX_TOKENS = 256


def arrival_times(num: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times in seconds from the start: gaps ~ Gamma(k=burstiness, mean 1/rate); inf = all 0.

    burstiness 1.0 is a Poisson process; below 1 is burstier, above 1 more regular (the
    coefficient of variation of the gaps is 1/sqrt(burstiness)). Unlike vllm, the times are not
    rescaled to end at exactly num/rate: the process stays a true renewal process.
    """
    if math.isinf(rate):
        return [0.0] * num
    # The first request goes at t=0 so a run never starts by idling.
    times, t = [0.0], 0.0
    for _ in range(num - 1):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        times.append(t)
    return times[:num]


def build_samples(config: BenchConfig, tokenizer: LazyTokenizer) -> list[SampleRequest]:
    """The run's requests in send order, shaped for the configured endpoint."""
    rng = random.Random(config.seed)
    n = config.num_prompts
    if config.dataset == "random":
        samples = sample_random(
            tokenizer.require(),
            n,
            config.random_input_len,
            config.random_output_len,
            config.random_range_ratio,
            rng,
        )
    elif config.dataset == "sharegpt":
        assert config.dataset_path is not None  # checked by BenchConfig
        samples = load_sharegpt(config.dataset_path, tokenizer.get(), n, rng)
    elif config.dataset == "jsonl":
        assert config.dataset_path is not None
        samples = load_jsonl(config.dataset_path, n, rng)
    else:
        cats = list(config.categories) if config.categories else None
        samples = load_builtin_samples(cats, n, rng)
    return [_for_endpoint(s, config.endpoint, tokenizer) for s in samples]


def _for_endpoint(sample: SampleRequest, endpoint: str, tokenizer: LazyTokenizer) -> SampleRequest:
    if endpoint == "chat" and isinstance(sample.prompt, str):
        messages: Messages = [{"role": "user", "content": sample.prompt}]
        return SampleRequest(messages, sample.prompt_len, sample.output_len, sample.category)
    if endpoint == "completions" and not isinstance(sample.prompt, str):
        return SampleRequest(
            _render_messages(sample.prompt, tokenizer), None, sample.output_len, sample.category
        )
    return sample


def _render_messages(messages: Messages, tokenizer: LazyTokenizer) -> str:
    # The model's own chat template when we have it, so /v1/completions sees what chat would.
    tok = tokenizer.get()
    apply = getattr(tok, "apply_chat_template", None)
    if apply is not None and getattr(tok, "chat_template", None):
        return str(apply(messages, tokenize=False, add_generation_prompt=True))
    return "\n\n".join(m["content"] for m in messages)
