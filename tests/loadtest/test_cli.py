"""`slipstream bench serve|sweep|compare` through argparse, against the stub server."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from slipstream.loadtest.cli import add_parser
from slipstream.loadtest.progress import progress_display
from tests.loadtest.stub_server import StubBehaviour, run_stub

FAST = StubBehaviour(ttft_s=0.01, interval_s=0.002, num_chunks=5)


def _main(argv: list[str]) -> int:
    # The bench parser alone, as slipstream.cli mounts it, without the other subcommands.
    parser = argparse.ArgumentParser(prog="slipstream")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def _workload(url: str) -> list[str]:
    return ["--base-url", url, "--dataset", "builtin", "--num-prompts", "6", "--tokenizer", "none"]


def test_serve_writes_table_json_and_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with run_stub(FAST) as (url, _):
        flags = "--max-concurrency 2 --label t --goodput ttft:500 e2el:2000 --percentiles 50,90,99"
        out_flags = f"--result-dir {tmp_path} --result-filename run.json"
        code = _main(["bench", "serve", *_workload(url), *flags.split(), *out_flags.split()])
    out = capsys.readouterr()
    assert code == 0
    assert "Serving Benchmark Result" in out.out and "Request goodput" in out.out
    assert "6/6 requests done" in out.err  # plain progress lines when not on a terminal
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["completed"] == 6 and data["label"] == "t" and data["max_concurrency"] == 2
    assert data["goodput_slos_ms"] == {"ttft": 500.0, "e2el": 2000.0}
    png = (tmp_path / "run.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_sweep_writes_one_json_per_point_and_a_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with run_stub(FAST) as (url, state):
        flags = f"--concurrencies 1,3 --result-dir {tmp_path} --label sw"
        code = _main(["bench", "sweep", *_workload(url), *flags.split()])
    assert code == 0
    points = [json.loads((tmp_path / f"sw-c{c}.json").read_text()) for c in (1, 3)]
    assert [p["max_concurrency"] for p in points] == [1, 3]
    assert [p["completed"] for p in points] == [6, 6]
    assert points[0]["max_concurrent_requests"] == 1 and state.max_in_flight == 3
    assert (tmp_path / "sw-sweep.png").stat().st_size > 10_000
    assert "sw-c3" in capsys.readouterr().out


def test_compare_shows_ratios_against_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"completed": 10, "failed": 0, "output_throughput": 100.0, "median_tpot_ms": 20.0}
    other = base | {"output_throughput": 150.0, "median_tpot_ms": 10.0}
    for name, data in (("a", base), ("b", other)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    plot = tmp_path / "cmp.png"
    code = _main(f"bench compare {tmp_path}/a.json {tmp_path}/b.json --plot {plot}".split())
    out = capsys.readouterr().out
    assert code == 0 and plot.exists()
    line = next(x for x in out.splitlines() if x.startswith("output_throughput"))
    assert "100.00" in line and "150.00 (x1.50)" in line
    assert "10.00 (x0.50)" in next(x for x in out.splitlines() if x.startswith("median_tpot"))


def test_bad_inputs_give_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert _main(["bench", "compare", str(bad)]) == 2
    serve = ["bench", "serve", "--dataset", "jsonl", "--dataset-path", str(bad), "--model", "m"]
    assert _main(serve) == 1
    assert _main(["bench", "serve", "--goodput", "ttft"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: invalid JSON" in err and "--goodput 'ttft'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bench", "serve", "--max-duration", "inf"], "max duration must be a number"),
        (["bench", "serve", "--timeout", "nan"], "timeout must be a number"),
        (["bench", "sweep", "--concurrencies", "1,inf"], "--concurrencies '1,inf': values must"),
        (["bench", "sweep", "--concurrencies", "2.5"], "whole numbers"),
        (["bench", "sweep", "--request-rates", "x"], "--request-rates 'x'"),
        (["bench", "decoders", "--decoders", ",,"], "no decoder named"),
        (
            ["bench", "decoders", "--decoders", "standard", "--decoder-config", "ngram={}"],
            "'ngram' is not in --decoders",
        ),
        (
            ["bench", "decoders", "--decoders", "standard", "--serve-command", "x {model}"],
            "unknown field {model}",
        ),
    ],
)
def test_bad_values_are_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    """Refused up front, not after the run (a result JSON cannot hold inf) or by a traceback."""
    assert _main([*argv, "--result-dir", str(tmp_path), "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_a_result_dir_that_cannot_be_written_is_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    for result_dir in (a_file, a_file / "below"):
        assert _main(["bench", "serve", "--model", "m", "--result-dir", str(result_dir)]) == 2
        assert "--result-dir" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_rich_bar_on_a_terminal_and_lines_otherwise() -> None:
    term, pipe = _Terminal(), io.StringIO()
    for stream in (term, pipe):
        with progress_display("run", stream) as update:
            for done in range(1, 21):
                update(done, 20)
    assert "20/20" in term.getvalue() and "requests done" not in term.getvalue()
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1] == "run: 20/20 requests done"


def test_a_run_where_every_request_failed_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table still prints, but the exit status says the run is no result (it exited 0
    with zero latencies when every request got a 401 or a 500)."""
    path = tmp_path / "w.jsonl"
    path.write_text('"FAIL500 one"\n"FAIL500 two"\n')
    with run_stub(FAST) as (url, _):
        argv = ["bench", "serve", "--base-url", url, "--dataset", "jsonl"]
        argv += ["--dataset-path", str(path), "--tokenizer", "none", "--no-plot"]
        argv += ["--num-prompts", "2", "--num-warmups", "0"]  # no test request first
        code = _main([*argv, "--result-dir", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 1
    assert "Serving Benchmark Result" in out.out
    assert "error: every request failed: 2 x HTTP 500" in out.err
