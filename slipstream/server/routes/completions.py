"""POST /v1/completions (legacy text completions; several prompts per request allowed)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from slipstream.backends.base import GenerateRequest
from slipstream.engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from slipstream.server.errors import bad_request
from slipstream.server.logprobs import TextOffsets, TokenText, completion_logprobs
from slipstream.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from slipstream.server.routes.common import (
    ERROR_RESPONSES,
    arrival_time,
    client_closed,
    new_id,
    note_tokens,
    now_s,
)
from slipstream.server.serving import (
    ClientDisconnected,
    Generation,
    build_sampling_params,
    cancel_on_disconnect,
    check_text_fits,
    check_token_ids,
    close_all,
    collect_all,
    merge_outputs,
    off_the_loop,
    parse_logit_bias,
    resolve_max_tokens,
    start_all,
    usage,
)
from slipstream.server.state import ServerState, ready_state
from slipstream.server.streaming import SSE_HEADERS, TextDelta, sse, with_error_tail

router = APIRouter(tags=["OpenAI"])
# OpenAI's limit on the prompt array; each prompt becomes one engine request.
MAX_PROMPTS = 2048


@dataclass(frozen=True)
class _Prompt:
    """One prompt of the request: its token ids and (for echo) its text."""

    token_ids: list[int]
    text: str | None


@dataclass(frozen=True)
class _Completion:
    """What the response builders need besides the engine outputs."""

    id: str
    created: int
    model: str
    prompts: list[_Prompt]
    n: int
    echo: bool
    logprobs: int | None
    token_text: TokenText
    # max_tokens 0 with echo: the prompt (and its logprobs) alone. The engine generates one
    # token, which the response leaves out (as vLLM does).
    echo_only: bool = False

    def prompt_text(self, index: int) -> str:
        """Prompt `index` as text (decoded if it was sent as token ids)."""
        prompt = self.prompts[index]
        if prompt.text is not None:
            return prompt.text
        return str(self.token_text.tokenizer.decode(prompt.token_ids))


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Text completion, streamed as server-sent events when `stream` is true."""
    state = ready_state(request)
    state.check_model(body.model)
    _reject_unsupported(body)
    prompts = await off_the_loop(_prompts, state, body)
    info = state.model_info
    check_token_ids(body.stop_token_ids or [], info.vocab_size, "stop_token_ids")
    bias = parse_logit_bias(body.logit_bias, info.vocab_size)
    echo_only = body.max_tokens == 0
    cmpl = _Completion(
        new_id("cmpl"), now_s(), state.model_name, prompts, body.n, body.echo, body.logprobs,
        state.token_text, echo_only,
    )  # fmt: skip
    requests = []
    for i, prompt in enumerate(prompts):
        if echo_only and len(prompt.token_ids) >= info.max_model_len:
            # The engine computes one position past the prompt (the token it drops).
            raise bad_request(
                f"echo with max_tokens 0 scores prompts of at most {info.max_model_len - 1} "
                f"tokens (max_model_len - 1); this one has {len(prompt.token_ids)}",
                "prompt",
                code="context_length_exceeded",
            )
        wanted = 1 if echo_only else body.max_tokens
        max_tokens = resolve_max_tokens(wanted, len(prompt.token_ids), info.max_model_len)
        prompt_logprobs = body.logprobs if body.echo else None
        params = build_sampling_params(
            body, max_tokens, body.logprobs, prompt_logprobs, logit_bias=bias
        )
        request_id = cmpl.id if len(prompts) == 1 else f"{cmpl.id}-{i}"
        arrival = arrival_time(request)
        requests.append(GenerateRequest(request_id, prompt.token_ids, params, prompt.text, arrival))
    num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
    note_tokens(request, num_prompt_tokens, None)
    try:
        gens = await cancel_on_disconnect(
            request, start_all(state, requests), lambda gs: close_all(gs, "abort")
        )
        if body.stream:
            events = _stream(gens, cmpl, body, request)
            return StreamingResponse(
                with_error_tail(events), media_type="text/event-stream", headers=SSE_HEADERS
            )
        finals = await cancel_on_disconnect(request, collect_all(gens))
    except ClientDisconnected:
        return client_closed()
    response = _response(finals, cmpl, num_prompt_tokens)
    note_tokens(request, None, response.usage.completion_tokens)
    return Response(response.model_dump_json(), media_type="application/json")


def _reject_unsupported(body: CompletionRequest) -> None:
    if body.max_tokens == 0 and not body.echo:
        raise bad_request(
            "max_tokens must be at least 1; 0 is allowed only with echo (the prompt's "
            "logprobs, nothing generated)",
            "max_tokens",
        )
    if body.max_tokens == 0 and body.min_tokens:
        raise bad_request(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens (0)", "min_tokens"
        )
    if body.suffix:
        raise bad_request("suffix (insertion) is not supported by this server", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported (it must equal n if given)", "best_of")


def _prompts(state: ServerState, body: CompletionRequest) -> list[_Prompt]:
    """`prompt` in any of its four shapes -> token ids (400 if empty or out of vocabulary)."""
    raw = body.prompt
    items: list[str | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif raw and isinstance(raw[0], int):
        items = [[t for t in raw if isinstance(t, int)]]  # one prompt as token ids
    else:
        items = [t for t in raw if not isinstance(t, int)]
    if not items:
        raise bad_request("prompt must not be empty", param="prompt")
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    vocab_size = state.model_info.vocab_size
    prompts = []
    for item in items:
        if isinstance(item, str):
            check_text_fits(state, len(item.encode("utf-8")), "prompt")
            ids = list(state.tokenizer.encode(item, add_special_tokens=body.add_special_tokens))
            prompt = _Prompt(ids, item)
        else:
            check_token_ids(item, vocab_size, "prompt")
            prompt = _Prompt(list(item), None)
        if not prompt.token_ids:
            raise bad_request("prompt must not be empty", param="prompt")
        prompts.append(prompt)
    return prompts


def _logprobs(
    cmpl: _Completion,
    prompt_index: int,
    output: RequestOutput,
    completion: CompletionOutput,
    offsets: TextOffsets,
    start: int = 0,
    with_prompt: bool = False,
) -> CompletionLogprobs | None:
    """Logprobs of completion tokens from `start` on (prompt tokens first for echo)."""
    if cmpl.logprobs is None:
        return None
    entries: list[TokenLogprobs | None] = []
    ids: list[int] = []
    if with_prompt:
        prompt_ids = cmpl.prompts[prompt_index].token_ids
        prompt_lps = output.prompt_logprobs or [None] * len(prompt_ids)
        entries.extend(prompt_lps)
        ids.extend(prompt_ids[: len(prompt_lps)])
    generated = (completion.logprobs or [])[start:]
    entries.extend(generated)
    ids.extend(completion.token_ids[start : start + len(generated)])
    return completion_logprobs(entries, cmpl.logprobs, cmpl.token_text, offsets, ids)


def _prompt_only(output: RequestOutput) -> RequestOutput:
    """The output without its generated tokens (echo with max_tokens 0)."""
    outputs = [
        replace(
            c,
            text="",
            token_ids=[],
            logprobs=None if c.logprobs is None else [],
            finish_reason="length" if c.finished else None,
            stop_reason=None,
        )
        for c in output.outputs
    ]
    return replace(output, outputs=outputs)


def _response(
    finals: list[RequestOutput], cmpl: _Completion, num_prompt_tokens: int
) -> CompletionResponse:
    if cmpl.echo_only:
        finals = [_prompt_only(final) for final in finals]
    choices = []
    for p, final in enumerate(finals):
        prefix = cmpl.prompt_text(p) if cmpl.echo else ""
        for c in sorted(final.outputs, key=lambda c: c.index):
            choices.append(
                CompletionChoice(
                    index=p * cmpl.n + c.index,
                    text=prefix + c.text,
                    logprobs=_logprobs(cmpl, p, final, c, TextOffsets(), with_prompt=cmpl.echo),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
    return CompletionResponse(
        id=cmpl.id,
        created=cmpl.created,
        model=cmpl.model,
        choices=choices,
        usage=usage(num_prompt_tokens, finals),
    )


async def _stream(
    gens: list[Generation], cmpl: _Completion, body: CompletionRequest, request: Request
) -> AsyncGenerator[bytes, None]:
    """One chunk per choice per step with new text, then usage if asked (then [DONE])."""
    options = body.stream_options
    include_usage = options is not None and options.include_usage
    continuous = options is not None and options.continuous_usage_stats
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    num_choices = len(gens) * cmpl.n
    deltas = [TextDelta(body.stop_list()) for _ in range(num_choices)]
    offsets = [TextOffsets() for _ in range(num_choices)]
    logprobs_sent = [0] * num_choices
    started = [False] * num_choices
    done = [False] * num_choices
    latest: dict[int, RequestOutput] = {}
    num_prompt_tokens = sum(len(p.token_ids) for p in cmpl.prompts)
    try:
        async for p, output in merge_outputs(gens):
            if cmpl.echo_only:
                output = _prompt_only(output)
            latest[p] = output
            if continuous:
                extra = {"usage": usage(num_prompt_tokens, list(latest.values())).model_dump()}
            for c in output.outputs:
                index = p * cmpl.n + c.index
                if done[index]:
                    continue
                echo = cmpl.echo and not started[index]
                prefix = cmpl.prompt_text(p) if echo else ""
                text = prefix + deltas[index].step(c.text, c.finished)
                new_logprobs = len(c.logprobs or []) - logprobs_sent[index]
                if not (text or c.finished or echo or new_logprobs > 0):
                    continue
                started[index] = True
                logprobs = _logprobs(
                    cmpl, p, output, c, offsets[index], logprobs_sent[index], with_prompt=echo
                )
                logprobs_sent[index] = len(c.logprobs or [])
                choice: dict[str, Any] = {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs.model_dump() if logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                }
                if c.finished:
                    done[index] = True
                    choice["stop_reason"] = c.stop_reason
                yield sse(_chunk(cmpl, [choice], **extra))
        if include_usage:
            final_usage = usage(num_prompt_tokens, list(latest.values())).model_dump()
            yield sse(_chunk(cmpl, [], usage=final_usage))
    except Exception:
        await close_all(gens, "error")
        raise
    finally:
        await close_all(gens, "abort")
        generated = sum(len(c.token_ids) for out in latest.values() for c in out.outputs)
        note_tokens(request, None, generated)


def _chunk(cmpl: _Completion, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": cmpl.id,
        "object": "text_completion",
        "created": cmpl.created,
        "model": cmpl.model,
        "choices": choices,
        **extra,
    }
