"""Arrival schedules and dataset loaders."""

from __future__ import annotations

import itertools
import json
import random
import statistics
from pathlib import Path

import pytest

from slipstream.loadtest import BuiltinPrompt, load_builtin
from slipstream.loadtest.builtin import CATEGORIES
from slipstream.loadtest.config import BenchConfig, parse_goodput, parse_percentiles
from slipstream.loadtest.datasets import (
    DatasetError,
    load_jsonl,
    load_sharegpt,
    read_jsonl,
    sample_random,
)
from slipstream.loadtest.tokenizer import LazyTokenizer, TokenizerUnavailable
from slipstream.loadtest.workload import arrival_times, build_samples
from tests.loadtest.fakes import WordTokenizer, hf_tokenizer_folder


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_poisson_arrivals_have_the_requested_mean_rate() -> None:
    # 20k gaps: the sample mean's relative std is 1/sqrt(20000) = 0.7%, so 3% is > 4 sigma.
    gaps = _gaps(arrival_times(20_001, rate=50.0, burstiness=1.0, rng=random.Random(1)))
    assert 1.0 / statistics.fmean(gaps) == pytest.approx(50.0, rel=0.03)
    # Exponential gaps: coefficient of variation 1.
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_rate_and_sets_variability(burstiness: float) -> None:
    gaps = _gaps(arrival_times(20_001, rate=10.0, burstiness=burstiness, rng=random.Random(2)))
    assert 1.0 / statistics.fmean(gaps) == pytest.approx(10.0, rel=0.05)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(burstiness**-0.5, rel=0.08)


def test_infinite_rate_sends_everything_at_once_and_schedules_are_seeded() -> None:
    assert arrival_times(5, float("inf"), 1.0, random.Random(0)) == [0.0] * 5
    a = arrival_times(10, 3.0, 1.0, random.Random(7))
    assert a == arrival_times(10, 3.0, 1.0, random.Random(7)) and a[0] == 0.0


def test_random_prompts_have_sampled_lengths() -> None:
    samples = sample_random(WordTokenizer(), 200, 100, 20, 0.5, random.Random(0))
    in_lens = [s.prompt_len for s in samples]
    out_lens = [s.output_len for s in samples]
    assert all(50 <= n <= 150 for n in in_lens if n is not None)
    assert all(10 <= n <= 30 for n in out_lens if n is not None)
    assert len(set(in_lens)) > 20  # actually spread, not constant
    assert all(len(str(s.prompt).split()) == s.prompt_len for s in samples)
    fixed = sample_random(WordTokenizer(), 5, 64, 8, 0.0, random.Random(0))
    assert {s.prompt_len for s in fixed} == {64} and {s.output_len for s in fixed} == {8}


def test_random_dataset_without_tokenizer_is_a_clear_error() -> None:
    config = BenchConfig(dataset="random", tokenizer="none", num_prompts=2)
    with pytest.raises(TokenizerUnavailable, match="--tokenizer none"):
        build_samples(config, LazyTokenizer(config.tokenizer))


def test_builtin_suite_has_eight_prompts_per_category() -> None:
    prompts = load_builtin()
    assert len(prompts) == 48
    for cat in CATEGORIES:
        assert sum(p.category == cat for p in prompts) == 8
    assert all(isinstance(p, BuiltinPrompt) and p.messages[-1]["role"] == "user" for p in prompts)
    rag = load_builtin(["rag"])
    assert all("Passage:" in p.text and "Question:" in p.text for p in rag)
    assert {p.category for p in load_builtin(["translation", "qa"])} == {"translation", "qa"}
    with pytest.raises(ValueError, match="unknown builtin categories"):
        load_builtin(["poetry"])


def test_builtin_samples_for_each_endpoint() -> None:
    chat = BenchConfig(dataset="builtin", categories=("math",), num_prompts=10, tokenizer="none")
    samples = build_samples(chat, LazyTokenizer("none"))
    assert len(samples) == 10 and all(isinstance(s.prompt, list) for s in samples)
    comp = BenchConfig(dataset="builtin", endpoint="completions", num_prompts=3, tokenizer="none")
    assert all(isinstance(s.prompt, str) for s in build_samples(comp, LazyTokenizer("none")))


def test_jsonl_accepts_strings_messages_and_objects(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    rows = [
        "plain prompt",
        [{"role": "user", "content": "hi"}],
        {"prompt": "p", "max_tokens": 5},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = load_jsonl(str(path), 8, random.Random(0))
    assert len(samples) == 8  # cycled
    assert {s.output_len for s in samples} == {None, 5}
    in_order = read_jsonl(str(path))  # every row once, file order (benchmarks/spec_decode.py)
    assert [s.prompt for s in in_order] == [
        "plain prompt",
        [{"role": "user", "content": "hi"}],
        "p",
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "ok"}\n{not json}\n', r"w\.jsonl:2: invalid JSON"),
        ('{"text": "x"}\n', r"w\.jsonl:1: expected a 'prompt' string or a 'messages' list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}\n', r":1: message 0 must be"),
        ('{"prompt": "x", "max_tokens": -1}\n', r"'max_tokens' must be a positive integer"),
        ("42\n", r":1: expected a string, a messages list or an object"),
        ('""\n', r":1: empty prompt"),
        ("\n\n", r"the file has no requests"),
    ],
)
def test_jsonl_rejects_malformed_lines(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_jsonl(str(path), 1, random.Random(0))


def test_sharegpt_takes_first_turns_and_reply_length(tmp_path: Path) -> None:
    path = tmp_path / "sg.json"
    conv = [
        {"from": "human", "value": "w5 w6 w7 w8 w9"},
        {"from": "gpt", "value": "w1 w2 w3 w4 w5 w6"},
    ]
    data = [{"id": "a", "conversations": conv}, {"id": "b", "conversations": conv[:1]}]
    path.write_text(json.dumps(data))
    samples = load_sharegpt(str(path), WordTokenizer(), 3, random.Random(0))
    first = samples[0]
    assert (first.prompt, first.prompt_len, first.output_len) == ("w5 w6 w7 w8 w9", 5, 6)
    assert len(samples) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", r"sg\.json: invalid JSON at line 1"),
        ('{"conversations": []}', r"a ShareGPT file is a JSON list"),
        ('[{"id": 1}]', r"entry 0 has no 'conversations' list"),
        ('[{"conversations": [{"from": "human"}, {"value": "x"}]}]', r"entry 0 has a turn"),
        ('[{"conversations": [{"value": "only one"}]}]', r"no conversation with a prompt"),
    ],
)
def test_sharegpt_rejects_malformed_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "sg.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_sharegpt(str(path), None, 1, random.Random(0))


def test_missing_dataset_file_is_named() -> None:
    with pytest.raises(DatasetError, match=r"nope\.jsonl does not exist"):
        load_jsonl("nope.jsonl", 1, random.Random(0))


def test_config_parsers_and_validation() -> None:
    assert parse_goodput(["ttft:200", "tpot:50.5"]) == {"ttft": 200.0, "tpot": 50.5}
    assert parse_percentiles("50, 90,99.9") == (50.0, 90.0, 99.9)
    for bad in (["ttft"], ["itl:5"], ["e2el:-1"], ["tpot:x"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)
    with pytest.raises(ValueError, match="each must be in"):
        parse_percentiles("0,100")
    with pytest.raises(ValueError, match="needs --dataset-path"):
        BenchConfig(dataset="jsonl")
    with pytest.raises(ValueError, match="request_rate"):
        BenchConfig(request_rate=0)


def test_hf_tokenizer_folder_drives_random_prompts(tmp_path: Path) -> None:
    folder = hf_tokenizer_folder(tmp_path / "tok")
    config = BenchConfig(
        dataset="random",
        endpoint="completions",
        tokenizer=folder,
        num_prompts=20,
        random_input_len=40,
        random_output_len=8,
        random_range_ratio=0.25,
    )
    lazy = LazyTokenizer(config.tokenizer)
    samples = build_samples(config, lazy)
    tok = lazy.require()
    for s in samples:
        assert isinstance(s.prompt, str) and "<unk>" not in s.prompt and "<eos>" not in s.prompt
        assert len(tok.encode(s.prompt, add_special_tokens=False)) == s.prompt_len
        assert s.prompt_len is not None and 30 <= s.prompt_len <= 50
        assert s.output_len is not None and 6 <= s.output_len <= 10


def test_missing_tokenizer_folder_is_named(tmp_path: Path) -> None:
    lazy = LazyTokenizer(str(tmp_path / "absent"))
    assert lazy.get() is None
    assert lazy.error is not None and "absent does not exist" in lazy.error
