"""One ASGI middleware for every request: request id, auth, lifecycle gate, logs, HTTP metrics.

A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware, which buffers through
an extra task and breaks client-disconnect detection on streaming responses.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slipstream.server.auth import bearer_token, is_public, key_matches
from slipstream.server.errors import APIError
from slipstream.server.logs import log_request
from slipstream.server.state import Phase, RequestLog, ServerState

logger = logging.getLogger(__name__)

# A client's X-Request-Id is echoed only if it is short and printable (it goes into logs).
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
# nginx's "client closed request": logged when the client left before any response.
CLIENT_CLOSED = 499


def _treat_body_as_json(scope: Scope) -> None:
    """Every POST route takes JSON; `curl -d` labels it a form, so read any body as JSON."""
    if scope["method"] != "POST":
        return
    raw = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    kept = [v for k, v in scope["headers"] if k == b"content-type" and b"json" in v.lower()]
    scope["headers"] = [*raw, (b"content-type", kept[0] if kept else b"application/json")]


def request_id_from(header: str | None) -> str:
    """The client's X-Request-Id if acceptable, else a fresh one."""
    if header and _REQUEST_ID_RE.match(header):
        return header
    return uuid.uuid4().hex


class ServerMiddleware:
    """Wraps the app: X-Request-Id, API key, 503 gate, per-request log line, HTTP metrics."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        _treat_body_as_json(scope)
        headers = Headers(scope=scope)
        log = RequestLog(request_id_from(headers.get("x-request-id")), arrival_time=start)
        scope.setdefault("state", {})["request_log"] = log
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                raw = list(message.get("headers", []))
                raw.append((b"x-request-id", log.request_id.encode("latin-1")))
                message = {**message, "headers": raw}
            await send(message)

        try:
            rejection = self._rejection(scope, headers)
            if rejection is not None:
                await rejection.response()(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            # One request's failure must not take the server down: answer 500 if we still can.
            logger.exception("unhandled error", extra={"request_id": log.request_id})
            if status is None:
                error = APIError(500, "Internal server error while serving the request.")
                await error.response()(scope, receive, send_with_id)
        finally:
            self._finish(scope, log, status, time.monotonic() - start)

    def _rejection(self, scope: Scope, headers: Headers) -> APIError | None:
        """401 for a bad API key, 503 outside the READY phase; None to serve."""
        path = scope["path"]
        if is_public(path):
            return None
        expected = self.state.config.api_key
        if expected is not None:
            token = bearer_token(headers.get("authorization"))
            if not key_matches(token, expected):
                message = (
                    "Missing API key: send it as 'Authorization: Bearer <key>'."
                    if token is None
                    else "Incorrect API key provided."
                )
                return APIError(
                    401,
                    message,
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if self.state.phase is not Phase.READY:
            try:
                self.state.require_ready()
            except APIError as exc:
                return exc
        return None

    def _finish(self, scope: Scope, log: RequestLog, status: int | None, latency: float) -> None:
        final = status if status is not None else CLIENT_CLOSED
        try:
            self.state.metrics.observe_http(
                _method_label(scope["method"]), _route_label(scope), final, latency
            )
            if self.state.config.log_requests:
                log_request(
                    log.request_id,
                    scope["method"],
                    scope["path"],
                    final,
                    latency,
                    log.prompt_tokens,
                    log.completion_tokens,
                )
        except Exception:  # pragma: no cover - logging must never fail a request
            logger.exception("failed to record request metrics")


# HTTP methods get their own label value; any other method a client invents shares "other"
# (each new value was a new series: 200 made-up methods grew /metrics from 54 to 496 kB,
# with or without an API key).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _method_label(method: str) -> str:
    return method if method in _METHODS else "other"


def _route_label(scope: Scope) -> str:
    """The matched route's template; the docs' own paths (served outside the API router);
    else "unmatched", so client-chosen paths add no series."""
    route = getattr(scope.get("route"), "path", None)
    if route:
        return str(route)
    path = scope.get("path", "")
    return path if is_public(path) else "unmatched"
