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
from slipstream.server.serving import check_token_ids, off_the_loop
from slipstream.server.state import ready_state

router = APIRouter(tags=["Tokenizer"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered by the chat template."""
    state = ready_state(request)
    state.check_model(body.model)
    if body.messages is not None:
        ids = await off_the_loop(
            render_chat,
            state,
            body.messages,
            body.add_generation_prompt,
            body.continue_final_message,
            False,  # no context check: counting a long text's tokens is what /tokenize is for
        )
    else:
        assert body.prompt is not None
        encode = state.tokenizer.encode
        add_special = body.add_special_tokens
        ids = list(await off_the_loop(encode, body.prompt, add_special_tokens=add_special))
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
    return DetokenizeResponse(prompt=str(await off_the_loop(state.tokenizer.decode, body.tokens)))
