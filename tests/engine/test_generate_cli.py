"""`slipstream generate` on the tiny model: bad input is one line on stderr, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from slipstream.cli import main


@pytest.fixture
def argv(tiny_model_dir: str) -> list[str]:
    return ["generate", "--model", tiny_model_dir, "--dtype", "float32", "--max-tokens", "3"]


def test_prompts_file_errors(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--prompts-file", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --prompts-file" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main([*argv, "--prompts-file", str(empty)]) == 2  # not the demo prompts instead
    assert "has no prompts" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The engine refuses the prompt: one line, not a traceback."""
    code = main([*argv, "--raw", "--num-kv-blocks", "2", "--block-size", "4", "--prompt", "x" * 40])
    err = capsys.readouterr().err
    assert code == 2 and "context window" in err and "Traceback" not in err


def test_a_prompts_file_is_read(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n\ntwo\n")
    assert main([*argv, "--raw", "--json", "--prompts-file", str(prompts)]) == 0
    out = capsys.readouterr().out
    assert [line.count('"prompt"') for line in out.splitlines()] == [1, 1]
