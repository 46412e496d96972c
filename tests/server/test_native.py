"""The server in front of the real native engine: the tiny model, and the default model."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.server.conftest import live_server

pytestmark = pytest.mark.slow


def _native(config: object) -> object:
    native = pytest.importorskip("slipstream.backends.native")
    return native.NativeEngineClient(config)


def test_tiny_model_end_to_end(tiny_model_dir: str) -> None:
    from slipstream.testing.engines import tiny_engine_config

    engine = _native(tiny_engine_config(tiny_model_dir, num_blocks=128, max_num_seqs=8))
    with live_server(engine, served_model_name="tiny") as srv:  # type: ignore[arg-type]
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        chat = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert chat.usage is not None and chat.usage.completion_tokens == 8
        stream = client.completions.create(
            model="tiny",
            prompt="The river",
            max_tokens=6,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
        # echo + logprobs (how lm-eval-harness scores log-likelihoods): every prompt token
        # but the first has its logprob, as vLLM reports it.
        echo = client.completions.create(
            model="tiny", prompt="The river bank was wet", max_tokens=2, echo=True, logprobs=3
        )
        lp = echo.choices[0].logprobs
        assert echo.usage is not None and lp is not None and lp.token_logprobs is not None
        num_prompt = echo.usage.prompt_tokens
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == num_prompt + 2
        assert all(v is not None and v <= 0.0 for v in lp.token_logprobs[1:])
        assert lp.top_logprobs is not None and all(len(t or {}) <= 3 for t in lp.top_logprobs)
        assert all(len(t or {}) >= 1 for t in lp.top_logprobs[1:])
        free = engine.num_free_blocks()  # type: ignore[attr-defined]

        async def drop(i: int) -> None:
            body = {"prompt": f"x {i}", "max_tokens": 100, "stream": True, "ignore_eos": True}
            async with (
                httpx.AsyncClient(base_url=srv.url, timeout=30) as http,
                http.stream("POST", "/v1/completions", json=body) as resp,
            ):
                seen = 0
                async for line in resp.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 2:
                        break

        async def main() -> None:
            await asyncio.gather(*(drop(i) for i in range(8)))

        asyncio.run(main())
        deadline = time.monotonic() + 10
        while engine.num_free_blocks() != free and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.02)
        assert engine.num_free_blocks() == free  # type: ignore[attr-defined]
        metrics = httpx.get(srv.url + "/metrics").text
        labels = 'decoder="standard",finished_reason="abort",model_name="tiny"'
        assert f"slipstream:request_success_total{{{labels}}} 8.0" in metrics


@pytest.mark.real_model
def test_default_model_knows_the_capital_of_france() -> None:
    from slipstream.config import EngineConfig, ModelConfig

    # The default dtype: bfloat16 on CPUs with native bf16 (with a float32 residual stream).
    engine = _native(EngineConfig(model=ModelConfig(device="cpu")))
    # The first start converts the GGUF file into a cached HF folder (tens of seconds).
    with live_server(engine, ready_timeout=600) as srv:  # type: ignore[arg-type]
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)
        resp = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32,
            temperature=0,
        )
    assert "Paris" in (resp.choices[0].message.content or "")
