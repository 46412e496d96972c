"""Decoder options are checked against their types when the decoder is named, so a wrong
JSON value is a clear error at start-up, not a misreading or a failure inside a step."""

from __future__ import annotations

from typing import Any

import pytest

from slipstream.config import DecoderSpec
from slipstream.decoding.registry import decoder_options


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("token_recycling", {"adaptive": "false"}, "'adaptive' .* must be bool"),
        ("token_recycling", {"top_k": 8.5}, "'top_k' .* must be int"),
        ("token_recycling", {"tree_size": 3.7}, "'tree_size' .* must be int or null"),
        ("token_recycling", {"matrix_path": 123}, "'matrix_path' .* must be str or null"),
        ("token_recycling", {"prompt_lookup_factor": float("nan")}, "must be float"),
        ("ngram", {"num_speculative_tokens": 2.5}, "must be int"),
        ("ngram", {"prompt_lookup_min": True}, "must be int"),
        ("sparse_attention", {"budget_fraction": "0.5"}, "must be float or null"),
        ("cautious", {"punctuation": 5}, "'punctuation' .* must be str"),
        (
            "token_recycling+sparse_attention",
            {"sparse_attention": {"refresh_interval": 2.5}},
            "'refresh_interval' of decoder 'sparse_attention'",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(
    name: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        decoder_options(DecoderSpec(name, options))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("token_recycling", {"adaptive": False, "tree_size": None, "min_predicted_gain": 0}),
        ("token_recycling", {"tree_size": 6, "prompt_lookup_factor": 2, "matrix_path": None}),
        ("sparse_attention", {"budget_fraction": 0.25, "top_k": None}),
        ("cautious", {"gate_entropy": float("inf"), "max_trial_tokens": 8}),
    ],
)
def test_values_of_the_right_type_pass(name: str, options: dict[str, Any]) -> None:
    """An int where a float belongs is a float; null where the option takes it; infinity
    (cautious' way to turn its gate off)."""
    parsed = decoder_options(DecoderSpec(name, options))
    for key, value in options.items():
        assert getattr(parsed, key) == value


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("token_recycling", {"top_k": 10**9}, "top_k must be in"),
        ("token_recycling", {"calibration_rounds": -1}, "calibration_rounds must be >= 0"),
        ("token_recycling", {"explore_every": -2}, "explore_every must be >= 0"),
        (
            "sparse_attention",
            {"method": "hip", "rerank_factor": 2},
            "rerank_factor is a block_topk",
        ),
        ("sparse_attention", {"method": "hip", "page_scoring": "bounds"}, "page_scoring is a"),
    ],
)
def test_values_out_of_range_or_for_another_method(
    name: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        decoder_options(DecoderSpec(name, options))
