"""`slipstream serve` flags: defaults from the config dataclasses, bad values fail at start."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

import pytest

from slipstream.cli import build_parser
from slipstream.config import EngineConfig
from slipstream.server import cli as server_cli
from slipstream.server.backend_registry import BACKENDS
from slipstream.server.config import ServerConfig
from tests.server.fake_engine import FakeEngine


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--model", "--host", "--port", "--served-model-name", "--decoder", "--decoder-config",
        "--dtype", "--device", "--max-num-seqs", "--max-num-batched-tokens",
        "--kv-cache-memory", "--max-queued-requests", "--api-key", "--backend",
        "--log-format", "SLIPSTREAM_API_KEY",
    ):  # fmt: skip
        assert flag in out, flag


def test_defaults_come_from_the_dataclasses() -> None:
    config = server_cli.config_from_args(_args())
    assert config == ServerConfig(engine=EngineConfig(), api_key=None)


def test_flags_reach_the_config() -> None:
    config = server_cli.config_from_args(
        _args(
            "--model", "/m", "--host", "0.0.0.0", "--port", "9000", "--served-model-name", "m",
            "--dtype", "float32", "--device", "cpu", "--max-num-seqs", "4",
            "--max-num-batched-tokens", "64", "--kv-cache-memory", "0.5",
            "--max-queued-requests", "3", "--api-key", "k", "--log-format", "json",
            "--decoder", "standard", "--decoder-config", "{}", "--shutdown-timeout", "2",
        )
    )  # fmt: skip
    assert (config.host, config.port, config.served_model_name) == ("0.0.0.0", 9000, "m")
    assert (config.api_key, config.log_format, config.shutdown_timeout_s) == ("k", "json", 2.0)
    engine = config.engine
    assert (engine.model.model, engine.model.dtype, engine.model.device) == ("/m", "float32", "cpu")
    assert engine.scheduler.max_num_seqs == 4 and engine.scheduler.max_num_batched_tokens == 64
    assert engine.scheduler.max_queued_requests == 3
    assert engine.cache.kv_cache_memory_gib == 0.5
    assert engine.decoder.name == "standard"


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIPSTREAM_API_KEY", "from-env")
    assert server_cli.config_from_args(_args()).api_key == "from-env"
    assert server_cli.config_from_args(_args("--api-key", "flag")).api_key == "flag"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--decoder", "warp_drive"], "valid decoders: "),
        (["--decoder-config", "{not json"], "not valid JSON"),
        (["--decoder-config", '{"nope": 1}'], "unknown option(s) nope"),
        (["--max-queued-requests", "-1"], "max_queued_requests"),
        (["--max-num-seqs", "0"], "max_num_seqs"),
        (["--decoder", "token_recycling", "--decoder-config", '{"top_k": 8.5}'], "must be int"),
        (["--kv-cache-memory", "nan"], "kv_cache_memory_gib"),
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size is for --backend vllm"),
        (["--gpu-memory-utilization", "0.5"], "--gpu-memory-utilization is for --backend"),
        (["--vllm-arg", "block_size=64"], "--vllm-arg is for --backend vllm"),
        (["--port", "70000"], "port"),
        (["--backend", "vllm"], "vllm"),
    ],
)
def test_bad_values_fail_at_start(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "--backend" and importlib.util.find_spec("vllm"):
        pytest.skip("vLLM is installed; this checks the message when it is not")
    assert server_cli.serve(_args(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("slipstream serve: error:") and needle in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--log-format", "xml"], "'text', 'json'"),
        (["--backend", "tgi"], "'native', 'vllm'"),
        (["--dtype", "int3"], "'float32'"),
    ],
)
def test_bad_choices_list_the_valid_ones(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _args(*argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_serve_builds_the_backend_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_backend(config: EngineConfig, args: argparse.Namespace | None = None) -> FakeEngine:
        seen["engine_config"] = config
        return FakeEngine()

    def fake_run(app: Any, config: ServerConfig) -> int:
        seen["app"], seen["config"] = app, config
        return 0

    monkeypatch.setitem(BACKENDS._items, "native", fake_backend)
    monkeypatch.setattr("slipstream.server.app.run_server", fake_run)
    monkeypatch.setattr("slipstream.server.logs.configure_logging", lambda *a: None)
    assert server_cli.serve(_args("--max-num-seqs", "7", "--port", "0")) == 0
    assert seen["engine_config"].scheduler.max_num_seqs == 7
    assert seen["config"].port == 0
    assert seen["app"].state.server.engine is not None
