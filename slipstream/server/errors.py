"""OpenAI's error envelope and the exception handlers that produce it."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slipstream.backends.base import EngineDeadError, EngineError, QueueFullError

logger = logging.getLogger(__name__)

# OpenAI's error types by status; clients switch on `type`, so keep these stable.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}
# Seconds a client should wait after a 429 (queue full) or 503 (starting, draining).
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error answered to the client in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        """The body: {"error": {"message", "type", "param", "code"}}."""
        return error_envelope(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        """A JSONResponse carrying the envelope, status and headers."""
        return JSONResponse(self.envelope(), status_code=self.status, headers=self.headers)


def error_envelope(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def unavailable(message: str) -> APIError:
    """A 503 with Retry-After (starting, draining or a dead engine)."""
    return APIError(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


def from_engine_error(exc: EngineError) -> APIError:
    """Map an engine exception onto the HTTP status a client can act on."""
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            f"The server is overloaded ({exc or 'the waiting queue is full'}); retry later.",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, EngineDeadError):
        return unavailable(f"The engine has stopped: {exc}")
    return APIError(500, f"The engine failed while serving the request: {exc}")


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter from pydantic's error list."""
    errors = list(exc.errors())
    if not errors:
        return "Invalid request.", None
    # Our own validators explain themselves better than a union's "should be a string".
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"Malformed JSON in the request body: {detail}".strip(), None
    if isinstance(first.get("input"), bytes | str) and first.get("loc") == ("body",):
        return "The request body must be a JSON object.", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_tag(part)]
    param = ".".join(loc) or None
    message = str(first.get("msg", "Invalid value")).removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    if "input" in first and first.get("type") != "missing":
        message += f" (got {_short_repr(first['input'])})"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more error(s)"
    return message, param


def _is_tag(part: Any) -> bool:
    """pydantic puts union members in loc ("str", "list[ContentPart]"); clients know fields."""
    return isinstance(part, str) and (
        "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none")
    )


def _short_repr(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure in OpenAI's envelope."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(exc)
        return bad_request(message, param=param).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
            return APIError(404, message, code="unknown_url").response()
        headers = dict(exc.headers or {})
        return APIError(exc.status_code, str(exc.detail), headers=headers).response()

    async def on_engine_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EngineError)
        return from_engine_error(exc).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(EngineError, on_engine_error)
