"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from slipstream.backends.base import GenerateRequest
from slipstream.engine.outputs import RequestOutput
from slipstream.server.errors import bad_request
from slipstream.server.logprobs import TokenText, chat_logprobs
from slipstream.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
)
from slipstream.server.routes.common import (
    ERROR_RESPONSES,
    arrival_time,
    client_closed,
    new_id,
    note_tokens,
    now_s,
    render_chat,
)
from slipstream.server.serving import (
    ClientDisconnected,
    Generation,
    build_sampling_params,
    cancel_on_disconnect,
    check_token_ids,
    collect_all,
    off_the_loop,
    parse_logit_bias,
    resolve_max_tokens,
    usage,
)
from slipstream.server.state import ServerState, ready_state
from slipstream.server.streaming import SSE_HEADERS, TextDelta, sse, with_error_tail

router = APIRouter(tags=["OpenAI"])


@dataclass(frozen=True)
class _Chat:
    """What the response builders need besides the engine outputs."""

    id: str
    created: int
    model: str
    prompt_len: int
    top_logprobs: int | None  # None = no logprobs
    token_text: TokenText

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """A chat.completion.chunk object."""
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat completion, streamed as server-sent events when `stream` is true."""
    state = ready_state(request)
    state.check_model(body.model)
    _reject_unsupported(body)
    prompt_ids = await off_the_loop(
        render_chat, state, body.messages, body.add_generation_prompt, body.continue_final_message
    )
    info = state.model_info
    check_token_ids(body.stop_token_ids or [], info.vocab_size, "stop_token_ids")
    bias = parse_logit_bias(body.logit_bias, info.vocab_size)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = resolve_max_tokens(requested, len(prompt_ids), info.max_model_len)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = build_sampling_params(body, max_tokens, top, logit_bias=bias)
    chat = _Chat(
        new_id("chatcmpl"), now_s(), state.model_name, len(prompt_ids), top,
        state.token_text,
    )  # fmt: skip
    note_tokens(request, len(prompt_ids), None)
    engine_request = GenerateRequest(chat.id, prompt_ids, params, None, arrival_time(request))
    try:
        gen = await cancel_on_disconnect(
            request, Generation.start(state, engine_request), lambda g: g.close("abort")
        )
        if body.stream:
            events = _stream(state, gen, chat, body, request)
            return StreamingResponse(
                with_error_tail(events), media_type="text/event-stream", headers=SSE_HEADERS
            )
        final = (await cancel_on_disconnect(request, collect_all([gen])))[0]
    except ClientDisconnected:
        return client_closed()
    response = _response(final, chat)
    note_tokens(request, None, response.usage.completion_tokens)
    return Response(response.model_dump_json(), media_type="application/json")


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    """Tools, structured output and audio: a clear 400 rather than a silently ignored field."""
    if body.tools:
        raise bad_request("tools (function calling) are not supported by this server", "tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice is not supported by this server", "tool_choice")
    if body.functions:
        raise bad_request("functions are not supported by this server", "functions")
    if body.function_call not in (None, "none", "auto"):
        raise bad_request("function_call is not supported by this server", "function_call")
    if body.response_format is not None:
        kind = body.response_format.get("type", "text")
        if kind != "text":
            raise bad_request(
                f"response_format type {kind!r} is not supported: this server has no "
                "structured output (json_object, json_schema); only 'text'",
                "response_format",
            )
    if body.modalities and set(body.modalities) != {"text"}:
        raise bad_request("output modalities other than text are not supported", "modalities")
    if body.audio is not None:
        raise bad_request("audio output is not supported", "audio")
    if body.prediction is not None:
        raise bad_request("predicted outputs are not supported", "prediction")


def _response(final: RequestOutput, chat: _Chat) -> ChatCompletionResponse:
    choices = []
    for c in sorted(final.outputs, key=lambda c: c.index):
        logprobs = None
        if chat.top_logprobs is not None:
            logprobs = chat_logprobs(c.logprobs or [], chat.top_logprobs, chat.token_text)
        choices.append(
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
        )
    return ChatCompletionResponse(
        id=chat.id,
        created=chat.created,
        model=chat.model,
        choices=choices,
        usage=usage(chat.prompt_len, [final]),
    )


async def _stream(
    state: ServerState,
    gen: Generation,
    chat: _Chat,
    body: ChatCompletionRequest,
    request: Request,
) -> AsyncGenerator[bytes, None]:
    """Role chunks, one chunk per choice per step with new text, usage, (then [DONE])."""
    options = body.stream_options
    include_usage = options is not None and options.include_usage
    continuous = options is not None and options.continuous_usage_stats
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    deltas = [TextDelta(body.stop_list()) for _ in range(body.n)]
    logprobs_sent = [0] * body.n
    done = [False] * body.n
    last: RequestOutput | None = None
    try:
        for i in range(body.n):
            role = {"index": i, "delta": {"role": "assistant", "content": ""}}
            yield sse(chat.chunk([{**role, "logprobs": None, "finish_reason": None}], **extra))
        async for output in gen.outputs():
            last = output
            if continuous:
                extra = {"usage": usage(chat.prompt_len, [output]).model_dump()}
            for c in output.outputs:
                if done[c.index]:
                    continue
                text = deltas[c.index].step(c.text, c.finished)
                logprobs = None
                if chat.top_logprobs is not None and c.logprobs:
                    new = c.logprobs[logprobs_sent[c.index] :]
                    logprobs_sent[c.index] = len(c.logprobs)
                    if new:
                        lp = chat_logprobs(new, chat.top_logprobs, chat.token_text)
                        logprobs = lp.model_dump()
                if not text and not c.finished and logprobs is None:
                    continue
                choice: dict[str, Any] = {
                    "index": c.index,
                    "delta": {"content": text} if text or not c.finished else {},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }
                if c.finished:
                    done[c.index] = True
                    choice["stop_reason"] = c.stop_reason
                yield sse(chat.chunk([choice], **extra))
        if include_usage and last is not None:
            final_usage = usage(chat.prompt_len, [last]).model_dump()
            yield sse(chat.chunk([], usage=final_usage))
    except Exception:
        await gen.close("error")
        raise
    finally:
        await gen.close("abort")
        if last is not None:
            note_tokens(request, None, sum(len(c.token_ids) for c in last.outputs))
