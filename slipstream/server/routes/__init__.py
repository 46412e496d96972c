"""HTTP routes, one module per concern."""

from __future__ import annotations

from fastapi import APIRouter

from slipstream.server.routes.chat import router as chat_router
from slipstream.server.routes.completions import router as completions_router
from slipstream.server.routes.models import router as models_router
from slipstream.server.routes.tokenize import router as tokenize_router


def build_router() -> APIRouter:
    """Every route of the server."""
    router = APIRouter()
    for sub in (chat_router, completions_router, models_router, tokenize_router):
        router.include_router(sub)
    return router
