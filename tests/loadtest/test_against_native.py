"""`slipstream bench serve` end to end against a real `slipstream serve` (tiny model, loopback)."""

from __future__ import annotations

from slipstream.backends.native import NativeEngineClient
from slipstream.loadtest import BenchConfig, run_benchmark
from slipstream.testing.engines import tiny_engine_config
from tests.server.conftest import live_server


def test_bench_serve_against_native_server(tiny_model_dir: str) -> None:
    engine = NativeEngineClient(tiny_engine_config(tiny_model_dir, num_blocks=128, max_num_seqs=4))
    with live_server(engine, served_model_name="tiny") as srv:
        for endpoint in ("chat", "completions"):
            config = BenchConfig(
                base_url=srv.url,
                model="tiny",
                endpoint=endpoint,
                dataset="random",
                random_input_len=12,
                random_output_len=6,
                num_prompts=8,
                max_concurrency=4,
                ignore_eos=True,
                tokenizer=tiny_model_dir,
                num_warmups=0,
                timeout_s=60,
                max_duration_s=120,
            )
            summary = run_benchmark(config).summary
            assert summary["completed"] == 8 and summary["failed"] == 0
            # output tokens come from the server's usage: 8 requests x 6 tokens
            assert summary["total_output_tokens"] == 48
            assert summary["output_tokens_source"] == "server_usage"
            assert (
                summary["mean_ttft_ms"] > 0 and summary["mean_e2el_ms"] >= summary["mean_ttft_ms"]
            )
            assert summary["output_throughput"] > 0
