"""`bench decoders` orchestration, with the stub server started as a real subprocess."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from slipstream.loadtest.cli import add_parser
from slipstream.loadtest.decoders import (
    ServerStartError,
    ServeSpec,
    build_serve_command,
    free_port,
    running_server,
)

REPO = Path(__file__).resolve().parents[2]
STUB = "{python} -m tests.loadtest.stub_server --port {port} --decoder {decoder}"


def test_default_command_runs_slipstream_serve_on_loopback() -> None:
    spec = ServeSpec(
        decoders=("token_recycling",),
        decoder_configs={"token_recycling": '{"tree": "x"}'},
        serve_model="/models/m",
        serve_args=("--max-num-seqs", "4"),
    )
    argv = build_serve_command(spec, "token_recycling", 8123)
    assert argv[:4] == [sys.executable, "-m", "slipstream.cli", "serve"]
    joined = " ".join(argv[4:])
    assert joined == (
        '--host 127.0.0.1 --port 8123 --decoder token_recycling --decoder-config {"tree": "x"} '
        "--model /models/m --max-num-seqs 4"
    )
    custom = ServeSpec(decoders=("a",), serve_command=STUB + " --decoder-config {decoder_config}")
    assert build_serve_command(custom, "a", 5)[1:] == [
        "-m", "tests.loadtest.stub_server", "--port", "5", "--decoder", "a",
        "--decoder-config", "{}",
    ]  # fmt: skip


def test_decoders_command_benchmarks_each_server_and_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)  # so the child finds the `tests` package
    parser = argparse.ArgumentParser(prog="slipstream")
    add_parser(parser.add_subparsers(dest="command"))
    workload = "--dataset builtin --num-prompts 4 --tokenizer none --startup-timeout 60"
    args = parser.parse_args(
        [
            *f"bench decoders --decoders standard,token_recycling --label d {workload}".split(),
            *["--serve-command", STUB + " --decoder-config {decoder_config}"],
            *["--decoder-config", 'token_recycling={"tokens_per_chunk": 3}'],
            *["--result-dir", str(tmp_path)],
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    std, tr = (
        json.loads((tmp_path / f"d-{n}.json").read_text()) for n in ("standard", "token_recycling")
    )
    assert (std["decoder"], tr["decoder"]) == ("standard", "token_recycling")
    assert std["spec_decode_acceptance_rate"] == 0.0
    assert tr["spec_decode_mean_accepted_tokens_per_step"] == pytest.approx(2.0)
    assert tr["total_output_tokens"] == 3 * std["total_output_tokens"]
    assert "output_throughput" in out and (tmp_path / "d-decoders.png").exists()
    table = (tmp_path / "d-decoders.txt").read_text()
    assert "spec_decode_acceptance_length" in table
    # Greedy (the default): answers kept and compared; the stub's token_recycling streams
    # three tokens a chunk, so none of its answers is standard's.
    assert std["generated_indices"] == tr["generated_indices"] == [0, 1, 2, 3]
    assert table.splitlines()[-1].split() == ["answers", "as", "the", "first", "-", "0/4"]
    # Both servers are gone: their ports answer nothing.
    for log in ("serve-standard.log", "serve-token_recycling.log"):
        assert (tmp_path / log).exists()
    for data in (std, tr):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{data['base_url']}/health", timeout=1.0)


def test_server_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('boom: no model'); sys.exit(3)"]
    t0 = time.perf_counter()
    with (
        pytest.raises(ServerStartError, match=r"exited with code 3(.|\n)*boom: no model"),
        running_server(argv, "http://127.0.0.1:9/health", tmp_path / "s.log", timeout_s=30),
    ):
        pass
    assert time.perf_counter() - t0 < 10


def test_server_never_healthy_times_out_and_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    url = f"http://127.0.0.1:{free_port()}/health"
    t0 = time.perf_counter()
    with (
        pytest.raises(ServerStartError, match="not healthy after 1 s"),
        running_server([sys.executable, "-c", code], url, tmp_path / "s.log", timeout_s=1.0),
    ):
        pass
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
