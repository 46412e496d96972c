"""Scrape /metrics and derive speculative-decoding acceptance from counter deltas."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

# slipstream may export with a colon (vLLM style) or underscore prefix; vLLM uses `vllm:`.
PREFIXES = ("slipstream:", "slipstream_", "vllm:")
_DRAFTS = "spec_decode_num_drafts"
_DRAFT_TOKENS = "spec_decode_num_draft_tokens"
_ACCEPTED = "spec_decode_num_accepted_tokens"
_PER_POS = "spec_decode_num_accepted_tokens_per_pos"

# sample key: (metric name without prefix and `_total`, position label or "") -> value
Samples = dict[tuple[str, str], float]


@dataclass(frozen=True)
class SpecDecodeStats:
    """Speculative-decoding counters over one run (deltas of the server's counters)."""

    num_drafts: float
    draft_tokens: float
    accepted_tokens: float
    per_position_accepted: list[float]

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_per_step(self) -> float:
        """Accepted draft tokens per draft step (bonus token not counted)."""
        return self.accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_length(self) -> float:
        """vLLM's mean acceptance length: 1 + accepted per step (counts the bonus token)."""
        return 1.0 + self.mean_accepted_per_step

    @property
    def per_position_rates(self) -> list[float]:
        """Fraction of draft steps whose k-th draft token was accepted."""
        return [a / self.num_drafts if self.num_drafts else 0.0 for a in self.per_position_accepted]

    def to_json(self) -> dict[str, float | list[float]]:
        """vllm bench serve's spec_decode_* keys plus our mean accepted tokens per step."""
        return {
            "spec_decode_acceptance_rate": self.acceptance_rate,
            "spec_decode_acceptance_length": self.acceptance_length,
            "spec_decode_mean_accepted_tokens_per_step": self.mean_accepted_per_step,
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_draft_tokens": self.draft_tokens,
            "spec_decode_accepted_tokens": self.accepted_tokens,
            "spec_decode_per_position_acceptance_rates": self.per_position_rates,
        }


def parse_spec_samples(text: str) -> Samples:
    """Sum the spec-decode counters in Prometheus text over all label sets but `position`."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = _strip(sample.name)
            if name is None or not name.startswith("spec_decode_"):
                continue
            if name.endswith("_created"):
                continue  # prometheus_client's creation timestamps, not counts
            name = name.removesuffix("_total")
            key = (name, sample.labels.get("position", "") if name == _PER_POS else "")
            samples[key] = samples.get(key, 0.0) + float(sample.value)
    return samples


def spec_decode_delta(before: Samples, after: Samples) -> SpecDecodeStats | None:
    """Counter deltas over the run, or None when the server exported or drafted nothing.

    A server running a non-speculative decoder may export the counters at zero; reporting an
    acceptance rate of 0 for it would read as "drafts all rejected", so that is None too.
    """
    if after.get((_DRAFTS, ""), 0.0) - before.get((_DRAFTS, ""), 0.0) <= 0:
        return None

    def delta(key: tuple[str, str]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    positions = sorted(int(pos) for name, pos in after if name == _PER_POS and pos.isdigit())
    per_pos = [delta((_PER_POS, str(p))) for p in range(positions[-1] + 1)] if positions else []
    return SpecDecodeStats(
        num_drafts=delta((_DRAFTS, "")),
        draft_tokens=delta((_DRAFT_TOKENS, "")),
        accepted_tokens=delta((_ACCEPTED, "")),
        per_position_accepted=per_pos,
    )


async def scrape(client: httpx.AsyncClient, metrics_url: str) -> Samples | None:
    """The spec-decode samples of GET metrics_url, or None when it cannot be read or parsed."""
    try:
        resp = await client.get(metrics_url, timeout=10.0)
        resp.raise_for_status()
        return parse_spec_samples(resp.text)
    except (httpx.HTTPError, ValueError) as exc:
        logger.info("no metrics from %s: %s", metrics_url, exc)
        return None


def _strip(name: str) -> str | None:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None
