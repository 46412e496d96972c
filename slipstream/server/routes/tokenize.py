"""POST /tokenize and /detokenize (vLLM's extension endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from slipstream.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from slipstream.server.routes.common import ERROR_RESPONSES, render_chat
from slipstream.server.serving import check_token_ids
from slipstream.server.state import ready_state

router = APIRouter(tags=["Tokenizer"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered by the chat template."""
    state = ready_state(request)
    state.check_model(body.model)
    if body.messages is not None:
        ids = render_chat(
            state, body.messages, body.add_generation_prompt, body.continue_final_message
        )
    else:
        assert body.prompt is not None
        ids = list(state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
    token_strs = None
    if body.return_token_strs:
        token_strs = [str(t) for t in state.tokenizer.convert_ids_to_tokens(ids)]
    return TokenizeResponse(
        count=len(ids),
        max_model_len=state.model_info.max_model_len,
        tokens=ids,
        token_strs=token_strs,
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids."""
    state = ready_state(request)
    state.check_model(body.model)
    check_token_ids(body.tokens, state.model_info.vocab_size, "tokens")
    return DetokenizeResponse(prompt=str(state.tokenizer.decode(body.tokens)))
