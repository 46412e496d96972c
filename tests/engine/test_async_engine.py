"""AsyncLLMEngine: the loop on its own thread, or on a thread the server hands it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from slipstream.backends.base import EngineDeadError
from slipstream.engine.async_engine import AsyncLLMEngine
from slipstream.engine.outputs import StepStats
from slipstream.engine.sampling_params import SamplingParams
from slipstream.testing.engines import tiny_engine_config

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


async def _generate(engine: AsyncLLMEngine, request_id: str) -> list[int]:
    token_ids: list[int] = []
    async for out in engine.generate(request_id, [5, 6, 7, 8], GREEDY):
        token_ids = list(out.outputs[0].token_ids)
    return token_ids


def test_caller_thread_mode_steps_on_the_claimed_thread(tiny_model_dir: str) -> None:
    config = tiny_engine_config(tiny_model_dir, num_blocks=32)
    engine = AsyncLLMEngine(config)
    step_threads: set[str] = set()
    results: dict[str, list[int]] = {}

    def record(stats: StepStats) -> None:
        step_threads.add(threading.current_thread().name)

    async def client() -> None:
        await engine.start()
        engine.add_stats_listener(record)
        results["a"], results["b"] = await asyncio.gather(
            _generate(engine, "a"), _generate(engine, "b")
        )
        assert engine.is_running
        await engine.shutdown()
        assert not engine.is_running

    threading.current_thread().name = "claimed"
    try:
        engine.claim_caller_thread()
        http = threading.Thread(target=lambda: asyncio.run(client()), name="http")
        http.start()
        engine.run_on_current_thread(keep_waiting=http.is_alive)  # returns after shutdown()
        http.join(30)
    finally:
        threading.current_thread().name = "MainThread"
    assert not http.is_alive()
    assert step_threads == {"claimed"}
    # Same tokens as the default (own-thread) mode.
    reference = AsyncLLMEngine(config)

    async def own_thread() -> list[int]:
        await reference.start()
        try:
            return await _generate(reference, "c")
        finally:
            await reference.shutdown()

    expected = asyncio.run(own_thread())
    assert len(expected) == 6
    assert results == {"a": expected, "b": expected}


def test_caller_thread_returns_when_the_server_quits_before_start(tiny_model_dir: str) -> None:
    engine = AsyncLLMEngine(tiny_engine_config(tiny_model_dir, num_blocks=32))
    engine.claim_caller_thread()
    engine.run_on_current_thread(keep_waiting=lambda: False)
    assert engine.engine is None  # never loaded


def test_caller_thread_load_failure_reaches_start() -> None:
    config = tiny_engine_config("/nonexistent/model/folder", num_blocks=32)
    engine = AsyncLLMEngine(config)
    errors: list[BaseException] = []

    async def client() -> None:
        try:
            await engine.start()
        except Exception as exc:
            errors.append(exc)

    engine.claim_caller_thread()
    http = threading.Thread(target=lambda: asyncio.run(client()))
    http.start()
    engine.run_on_current_thread(keep_waiting=http.is_alive)
    http.join(30)
    assert len(errors) == 1 and not isinstance(errors[0], EngineDeadError)
    assert not engine.is_running


def test_run_on_current_thread_needs_a_claim(tiny_model_dir: str) -> None:
    engine = AsyncLLMEngine(tiny_engine_config(tiny_model_dir, num_blocks=32))
    with pytest.raises(RuntimeError, match="claim_caller_thread"):
        engine.run_on_current_thread(keep_waiting=lambda: False)


def test_max_queued_requests_counts_beyond_the_batch(tiny_model_dir: str) -> None:
    """--max-queued-requests bounds the sequences waiting beyond max_num_seqs: with a limit
    of 0 an idle engine takes as many as the batch holds (it refused every request), with
    a limit of 1 one more; a request's n choices count n, and finished ones free room."""
    from slipstream.backends.base import QueueFullError

    config = tiny_engine_config(
        tiny_model_dir, num_blocks=64, max_num_seqs=3, max_queued_requests=0
    )
    engine = AsyncLLMEngine(config)
    slow = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def first_output(request_id: str, params: SamplingParams) -> object:
        gen = engine.generate(request_id, [5, 6, 7], params)
        await anext(gen)
        return gen

    async def main() -> None:
        await engine.start()
        try:
            held = [await first_output(f"r{i}", slow) for i in range(3)]  # the batch is full
            with pytest.raises(QueueFullError, match="waiting queue is full"):
                await first_output("extra", slow)
            await held.pop().aclose()  # type: ignore[attr-defined]
            two = SamplingParams(n=2, max_tokens=40, temperature=0.5, ignore_eos=True)
            with pytest.raises(QueueFullError):
                await first_output("two", two)  # 2 + 2 > 3
            held.append(await first_output("one", slow))
            for gen in held:
                await gen.aclose()  # type: ignore[attr-defined]
            assert await _generate(engine, "after")  # room again
        finally:
            await engine.shutdown()

    asyncio.run(main())
