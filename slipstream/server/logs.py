"""Logging setup: text or JSON lines, and the one structured line per request."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured duplicate of the message
}

access_logger = logging.getLogger("slipstream.server.access")


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra=` fields attached to a record."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as JSON."""
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(record_fields(record))
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render the record with its extra fields as key=value pairs."""
        text = super().format(record)
        fields = record_fields(record)
        if fields:
            pairs = " ".join(f"{k}={v}" for k, v in fields.items())
            # The traceback (if any) stays last, after the fields of the first line.
            head, sep, tail = text.partition("\n")
            text = f"{head} {pairs}{sep}{tail}"
        return text


def configure_logging(log_format: str = "text", level: str = "info") -> None:
    """Send every log record (uvicorn's included) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate our per-request line.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def log_request(
    request_id: str,
    method: str,
    path: str,
    status: int,
    latency_s: float,
    prompt_tokens: int | None,
    completion_tokens: int | None,
) -> None:
    """The one structured line per HTTP request."""
    access_logger.info(
        "request",
        extra={
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "latency_s": round(latency_s, 4),
        },
    )
