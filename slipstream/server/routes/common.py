"""Helpers the generation routes share: ids, chat rendering, response plumbing."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import Response

# NOTE: imported at load time, not per request: it pulls in transformers (and torch), which
# would stall the event loop for seconds on the first chat request.
from slipstream.engine.tokenizer import ChatTemplateError, apply_chat_template, check_chat_flags
from slipstream.server.errors import APIError, bad_request
from slipstream.server.middleware import CLIENT_CLOSED
from slipstream.server.protocol import ChatMessage, ErrorResponse
from slipstream.server.serving import check_text_fits
from slipstream.server.state import ServerState, get_request_log

# OpenAPI: every generation route may answer these in the error envelope.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 429, 500, 503)
}


def new_id(prefix: str) -> str:
    """A response id like OpenAI's (chatcmpl-..., cmpl-...)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    """`created`: Unix seconds."""
    return int(time.time())


def arrival_time(request: Request) -> float:
    """When the middleware first saw this request (time.monotonic())."""
    log = get_request_log(request)
    return log.arrival_time if log is not None else time.monotonic()


def note_tokens(request: Request, prompt: int | None, completion: int | None) -> None:
    """Leave token counts for the access-log line."""
    log = get_request_log(request)
    if log is not None:
        log.prompt_tokens = prompt if prompt is not None else log.prompt_tokens
        log.completion_tokens = completion if completion is not None else log.completion_tokens


def client_closed() -> Response:
    """What a request whose client has gone away "answers" (only the log sees it)."""
    return Response(status_code=CLIENT_CLOSED)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Validated messages -> the dicts a chat template expects (text content only)."""
    out = []
    for i, message in enumerate(messages):
        if message.role in ("tool", "function") or message.tool_calls:
            raise bad_request(
                "tool and function messages are not supported (this server has no tool calling)",
                param=f"messages.{i}",
            )
        # Most templates know no "developer" role; OpenAI treats it as the new "system".
        role = "system" if message.role == "developer" else message.role
        out.append({"role": role, "content": message.text()})
    return out


def render_chat(
    state: ServerState,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool = False,
    check_fits: bool = True,
) -> list[int]:
    """Messages -> prompt token ids through the model's chat template (400 if it refuses,
    or, with `check_fits`, if the messages' text could not fit in the context)."""
    try:
        check_chat_flags(add_generation_prompt, continue_final_message)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), param="continue_final_message") from exc
    conversation = chat_messages(messages)
    if check_fits:
        size = sum(len(str(m["content"]).encode("utf-8")) for m in conversation)
        check_text_fits(state, size, "messages")
    try:
        return apply_chat_template(
            state.tokenizer,
            conversation,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
    except APIError:
        raise
    except (ValueError, jinja2.TemplateError) as exc:
        raise bad_request(f"Cannot apply the chat template: {exc}", param="messages") from exc
