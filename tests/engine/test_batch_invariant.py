"""Where --batch-invariant runs: the CPU's C++ path as it is, Triton where it runs, and a
clear refusal elsewhere."""

from __future__ import annotations

import pytest

from slipstream.engine.args import add_engine_args, engine_config_from_args
from slipstream.engine.attention import PagedAttentionBackend
from slipstream.engine.engine import LLMEngine
from slipstream.kernels.cpu.skinny_linear import skinny_unavailable_reason
from slipstream.testing.engines import tiny_engine_config


def _engine(model_dir: str, dtype: str) -> LLMEngine:
    return LLMEngine(tiny_engine_config(model_dir, dtype=dtype, batch_invariant=True))


def test_refused_where_no_invariant_kernels_run(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLIPSTREAM_KERNELS", "torch")
    with pytest.raises(ValueError, match=r"--batch-invariant needs CUDA.*float32 on cpu"):
        _engine(tiny_model_dir, "float32")


@pytest.mark.skipif(skinny_unavailable_reason() is not None, reason="needs skinny_linear")
def test_bf16_cpu_keeps_its_already_invariant_kernels(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLIPSTREAM_KERNELS", "torch")
    model = _engine(tiny_model_dir, "bfloat16").loaded.model
    assert model.layers[0].skinny is not None
    # The plain backend itself (CpuKernelAttentionBackend is a subclass of it).
    assert all(type(b) is PagedAttentionBackend for b in model.attn_backends)


def test_flag_reaches_the_engine_config() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).model.batch_invariant is False
    args = parser.parse_args(["--batch-invariant"])
    assert engine_config_from_args(args).model.batch_invariant is True
    assert "bit for bit" in parser.format_help()


def test_generate_reports_a_refused_flag_as_an_error(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No traceback: one line on stderr and exit status 2, as for any bad flag."""
    from slipstream.cli import main

    monkeypatch.setenv("SLIPSTREAM_KERNELS", "torch")
    argv = ["generate", "--model", tiny_model_dir, "--dtype", "float32", "--prompt", "x"]
    assert main([*argv, "--batch-invariant"]) == 2
    assert capsys.readouterr().err.startswith("error: --batch-invariant needs CUDA")
    assert main([*argv, "--max-model-len", "100000"]) == 2
    assert "exceeds the model's max_position_embeddings" in capsys.readouterr().err
