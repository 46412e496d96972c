"""ServerConfig: the engine's config plus what the HTTP layer needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slipstream.config import EngineConfig

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class ServerConfig:
    """Everything `slipstream serve` needs; the CLI reads its defaults from here."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    # None = no authentication; otherwise clients send `Authorization: Bearer <key>`.
    api_key: str | None = None
    # The name clients pass as `model`; None = the engine's own model name.
    served_model_name: str | None = None
    backend: str = "native"
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    # One log line per request (id, status, tokens in/out, latency).
    log_requests: bool = True
    # On SIGTERM, in-flight requests get this long to finish before they are cancelled.
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format {self.log_format!r} is not valid; choose text or json")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(
                f"log_level {self.log_level!r} is not valid; choose debug, info, warning or error"
            )
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset to disable auth)")
