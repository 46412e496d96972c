"""Spec-decode counters from Prometheus text, under each supported prefix."""

from __future__ import annotations

import pytest

from slipstream.loadtest.metrics_scrape import parse_spec_samples, spec_decode_delta


def _text(prefix: str, drafts: int, draft_tokens: int, accepted: int, per_pos: list[int]) -> str:
    lines = []
    for name, value in (
        ("spec_decode_num_drafts", drafts),
        ("spec_decode_num_draft_tokens", draft_tokens),
        ("spec_decode_num_accepted_tokens", accepted),
    ):
        lines += [
            f"# TYPE {prefix}{name} counter",
            # Two label sets (e.g. two engines) are summed.
            f'{prefix}{name}_total{{engine="0"}} {value / 2}',
            f'{prefix}{name}_total{{engine="1"}} {value / 2}',
            f'{prefix}{name}_created{{engine="0"}} 1.7e9',
        ]
    lines.append(f"# TYPE {prefix}spec_decode_num_accepted_tokens_per_pos counter")
    for pos, value in enumerate(per_pos):
        lines.append(
            f'{prefix}spec_decode_num_accepted_tokens_per_pos_total{{position="{pos}"}} {value}'
        )
    lines += ["# TYPE other_metric gauge", "other_metric 3"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("prefix", ["slipstream:", "slipstream_", "vllm:"])
def test_acceptance_from_counter_deltas(prefix: str) -> None:
    before = parse_spec_samples(_text(prefix, 10, 30, 12, [6, 4, 2]))
    after = parse_spec_samples(_text(prefix, 110, 330, 162, [86, 54, 22]))
    stats = spec_decode_delta(before, after)
    assert stats is not None
    assert (stats.num_drafts, stats.draft_tokens, stats.accepted_tokens) == (100, 300, 150)
    assert stats.acceptance_rate == pytest.approx(0.5)
    assert stats.mean_accepted_per_step == pytest.approx(1.5)
    assert stats.acceptance_length == pytest.approx(2.5)
    assert stats.per_position_rates == pytest.approx([0.8, 0.5, 0.2])
    assert stats.to_json()["spec_decode_acceptance_length"] == pytest.approx(2.5)


def test_no_spec_counters_means_no_stats() -> None:
    plain = parse_spec_samples(
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1\n"
    )
    assert plain == {}
    assert spec_decode_delta(plain, plain) is None
    other = parse_spec_samples(_text("sglang:", 1, 1, 1, [1]))
    assert spec_decode_delta(other, other) is None


def test_no_draft_steps_during_the_run_means_no_stats() -> None:
    # e.g. the standard decoder behind a server that exports the counters at zero
    same = parse_spec_samples(_text("vllm:", 10, 30, 12, [6, 4, 2]))
    assert spec_decode_delta(same, same) is None
    assert spec_decode_delta({}, parse_spec_samples(_text("vllm:", 0, 0, 0, [0]))) is None
