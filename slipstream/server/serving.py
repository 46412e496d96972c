"""What chat and text completions share: sampling params, limits, and one engine request."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import Request

from slipstream.backends.base import EngineError, GenerateRequest
from slipstream.engine.outputs import RequestOutput
from slipstream.engine.sampling_params import SamplingParams
from slipstream.server.errors import APIError, bad_request, from_engine_error, unavailable
from slipstream.server.metrics import RequestTracker
from slipstream.server.protocol import PromptTokensDetails, Usage, _SamplingRequest
from slipstream.server.state import ServerState

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response started."""


# Prompts are tokenized (and chat templates rendered) on this one thread, not the event
# loop: a 10 MB prompt's encode held the loop ~10 s on 2 cores, and /health, /metrics and
# every running stream waited. One worker, as vLLM has: requests never use the tokenizer
# at the same time.
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slipstream-tokenize")


async def off_the_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on the tokenizer thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_TOKENIZER_THREAD, functools.partial(fn, *args, **kwargs))


def check_text_fits(state: ServerState, num_bytes: int, param: str) -> None:
    """400 before tokenizing text that could not fit in the context whatever its tokens
    (see ServerState.max_token_bytes): a huge prompt is refused at once rather than after
    seconds of tokenizing."""
    max_len = state.model_info.max_model_len
    if num_bytes > max_len * state.max_token_bytes:
        raise bad_request(
            f"This model's maximum context length is {max_len} tokens. However, your "
            f"prompt has {num_bytes} bytes of text, more than {max_len} tokens can hold. "
            "Please shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def build_sampling_params(
    req: _SamplingRequest,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    logit_bias: dict[int, float] | None = None,
) -> SamplingParams:
    """OpenAI/vLLM request fields -> SamplingParams (logit_bias parsed by parse_logit_bias);
    a bad combination is a 400."""
    kwargs: dict[str, Any] = {
        "logit_bias": logit_bias or {},
        "n": req.n,
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "stop": req.stop_list(),
        "stop_token_ids": tuple(req.stop_token_ids or ()),
        "ignore_eos": req.ignore_eos,
        "seed": req.seed,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "skip_special_tokens": req.skip_special_tokens,
    }
    # Unset fields keep SamplingParams' defaults (OpenAI's defaults too).
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    if req.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens",
        )
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as exc:
        raise bad_request(str(exc)) from exc


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int) -> int:
    """max_tokens to generate; 400 (naming the numbers) if the context window is exceeded."""
    if requested is None:
        available = max_model_len - prompt_len
        if available < 1:
            raise _context_error(
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"your prompt has {prompt_len} tokens, which leaves no room for a completion. "
                "Please shorten the prompt."
            )
        return available
    if prompt_len + requested > max_model_len:
        raise _context_error(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} in the completion). Please reduce the prompt or max_tokens."
        )
    return requested


def _context_error(message: str) -> APIError:
    return bad_request(message, param="max_tokens", code="context_length_exceeded")


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """400 unless every id is a token of the model."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(
            f"{param} contains token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}",
            param=param,
        )


def parse_logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's {"token id": bias} -> {id: bias}; 400 for a key that is not a token id of
    the model (the protocol has checked the values' range)."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        out[token] = value
    check_token_ids(list(out), vocab_size, "logit_bias")
    return out


@dataclass(eq=False)  # identity: in-flight generations live in a set
class Generation:
    """One engine request in flight: its output stream, metrics tracker and cleanup."""

    state: ServerState
    request: GenerateRequest
    tracker: RequestTracker
    _iterator: AsyncIterator[RequestOutput]
    _pending: list[RequestOutput] = field(default_factory=list)
    last: RequestOutput | None = None
    finished: bool = False
    closed: bool = False
    _waiter: asyncio.Task[Any] | None = None  # the task waiting in _next, if any

    @classmethod
    async def start(cls, state: ServerState, request: GenerateRequest) -> Generation:
        """Submit and wait for the first output, so a full queue is a 429 before any byte."""
        arrival = request.arrival_time or time.monotonic()
        gen = cls(state, request, RequestTracker(state.metrics, arrival), _noop_iterator())
        state.generations.add(gen)
        try:
            gen._iterator = state.engine.generate(request)
            first = await gen._next()
        except StopAsyncIteration as exc:
            gen.tracker.done = True
            raise APIError(500, "The engine ended the request without any output.") from exc
        except EngineError as exc:
            # Rejected (queue full) or failed before running: nothing to record per request.
            gen.tracker.done = True
            await gen.close()
            raise from_engine_error(exc) from exc
        except ValueError as exc:
            # The engine's own validation refused the request (e.g. a limit of its own).
            gen.tracker.done = True
            await gen.close()
            raise bad_request(f"The engine rejected the request: {exc}") from exc
        except Exception:
            await gen.close("error")
            raise
        except BaseException:
            await gen.close("abort")
            raise
        gen._pending.append(first)
        return gen

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Every cumulative output, the first one included; records token metrics."""
        while not self.finished:
            if self._pending:
                output = self._pending.pop()
            else:
                try:
                    output = await self._next()
                except StopAsyncIteration:
                    raise APIError(
                        500, "The engine ended the request without finishing it."
                    ) from None
                except EngineError as exc:
                    raise from_engine_error(exc) from exc
            self.last = output
            self.tracker.on_output(output)
            if output.finished:
                self.finished = True
                self.tracker.on_finish(output)
            yield output

    async def _next(self) -> RequestOutput:
        """The engine's next output, or a 503 once the drain's time is up (interrupt)."""
        if self.state.interrupted:
            raise _shutting_down()
        self._waiter = asyncio.current_task()
        try:
            return await anext(self._iterator)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.state.interrupted and task is not None and task.uncancel() == 0:
                raise _shutting_down() from None
            raise
        finally:
            self._waiter = None

    def interrupt(self) -> None:
        """Wake a wait for the next output, which then raises a 503 (see _next)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()

    async def collect(self) -> RequestOutput:
        """Run to the end and return the final output."""
        async for _ in self.outputs():
            pass
        assert self.last is not None
        return self.last

    async def close(self, reason: str | None = None) -> None:
        """Abort if unfinished and release the engine's iterator (safe to call twice)."""
        if self.closed:
            return
        self.closed = True
        self.state.generations.discard(self)
        if not self.finished:
            self.tracker.on_finish(self.last, reason or "abort")
        # NOTE: shielded: this runs while the task is being cancelled (client disconnect),
        # and an unshielded await there would be cancelled before the engine hears of it.
        with anyio.CancelScope(shield=True):
            try:
                aclose = getattr(self._iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                if not self.finished:
                    await self.state.engine.abort(self.request.request_id)
            except Exception:
                logger.exception("failed to abort request %s", self.request.request_id)


async def _noop_iterator() -> AsyncIterator[RequestOutput]:
    return
    yield  # pragma: no cover


def _shutting_down() -> APIError:
    return unavailable("The server is shutting down; the request did not finish in time.")


def interrupt_generations(state: ServerState) -> None:
    """The drain's time is up: every request still waiting for the engine ends with a 503
    (a stream: an error event, then [DONE]) and is aborted. Left to uvicorn's cancellation
    at the deadline, clients got a plain-text 500 or a stream cut mid-transfer, and the log a
    traceback per request."""
    state.interrupted = True
    for gen in list(state.generations):
        gen.interrupt()


async def start_all(state: ServerState, requests: list[GenerateRequest]) -> list[Generation]:
    """Start several engine requests together (a completions request's prompts share the
    engine's steps, as concurrent requests would; one at a time, each waited for its first
    token: 6 prompts took 8 steps instead of 2); if one fails, close the others and raise
    the first failure in request order."""
    tasks = [asyncio.ensure_future(Generation.start(state, request)) for request in requests]
    try:
        # The first failure ends the wait: the others would start only to be aborted (a 429
        # for one prompt came after the admitted ones had run, and held their slots).
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:  # in request order
            if task.done() and (error := task.exception()) is not None:
                raise error
        return [task.result() for task in tasks]
    except BaseException:
        # A failure, or this request cancelled (its client gone): starts still waiting
        # abort their own requests when cancelled; the ones that had started are closed.
        for task in tasks:
            task.cancel()
        settled = await asyncio.gather(*tasks, return_exceptions=True)
        await close_all([g for g in settled if isinstance(g, Generation)], "abort")
        raise


def usage(prompt_tokens: int, outputs: Sequence[RequestOutput]) -> Usage:
    """Token counts over every completion of `outputs`."""
    completion = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in outputs)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


async def close_all(gens: Sequence[Generation], reason: str | None = None) -> None:
    """Close every generation."""
    for gen in gens:
        await gen.close(reason)


async def collect_all(gens: Sequence[Generation]) -> list[RequestOutput]:
    """Run several generations concurrently to their final outputs."""
    try:
        return list(await asyncio.gather(*(g.collect() for g in gens)))
    except Exception:
        await close_all(gens, "error")
        raise
    finally:
        await close_all(gens, "abort")


async def merge_outputs(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several generations' outputs as (generation index, output)."""
    if len(gens) == 1:
        async for output in gens[0].outputs():
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, gen: Generation) -> None:
        try:
            async for output in gen.outputs():
                await queue.put((index, output))
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_on_disconnect(
    request: Request,
    work: Awaitable[T],
    cleanup: Callable[[T], Awaitable[None]] | None = None,
) -> T:
    """Await `work`, cancelling it if the client disconnects first.

    If `work` finished anyway in the race with the disconnect, `cleanup` gets its result.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(task, return_exceptions=True)
            if cleanup is not None and not task.cancelled() and task.exception() is None:
                await cleanup(task.result())
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
