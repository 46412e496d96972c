"""GET /v1/models, /health, /version, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from slipstream import __version__
from slipstream.backends.base import EngineError
from slipstream.server.errors import APIError, from_engine_error
from slipstream.server.protocol import (
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    VersionResponse,
)
from slipstream.server.state import ServerState, get_state, ready_state

router = APIRouter()


def _card(state: ServerState, created: int) -> ModelCard:
    info = state.model_info
    return ModelCard(
        id=state.model_name,
        created=created,
        root=info.name,
        max_model_len=info.max_model_len,
        decoder=info.decoder,
    )


@router.get("/v1/models", response_model=ModelList, tags=["OpenAI"])
async def list_models(request: Request) -> ModelList:
    """The served model (one)."""
    state = ready_state(request)
    return ModelList(data=[_card(state, request.app.state.started_at)])


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses={404: {"model": ErrorResponse}},
    tags=["OpenAI"],
)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """One model by name; 404 if it is not served here."""
    state = ready_state(request)
    if model_id not in state.accepted_model_names():
        raise APIError(404, f"The model `{model_id}` does not exist.", code="model_not_found")
    return _card(state, request.app.state.started_at)


@router.get("/health", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
async def health(request: Request) -> Response:
    """200 while the engine serves; 503 while starting, shutting down, or if it died."""
    state = get_state(request)
    try:
        state.require_ready()
        await state.engine.check_health()
    except APIError as exc:
        return exc.response()
    except EngineError as exc:
        return from_engine_error(exc).response()
    return JSONResponse(HealthResponse().model_dump())


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    """The slipstream version."""
    return VersionResponse(version=__version__)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition (slipstream:* metrics)."""
    return Response(get_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
