"""Serve an engine through run_server (what `slipstream serve` runs), for signal tests.

Usage: python -m tests.server.serve_fake SOCKET_FD STEP_DELAY_S SHUTDOWN_TIMEOUT_S [MODEL_DIR]
    [LOAD_DELAY_S]
With MODEL_DIR the native engine serves that (tiny) model, its loop on the main thread;
without it, the fake engine. Either way each engine step takes at least STEP_DELAY_S (the
tiny model alone decodes a whole context in well under a second). LOAD_DELAY_S makes the
native engine's model load take that long first (a sleep in its constructor).
"""

from __future__ import annotations

import socket
import sys
import time
from typing import Any

from slipstream.backends.base import EngineClient
from slipstream.backends.native import NativeEngineClient
from slipstream.server.app import create_app, run_server
from slipstream.server.config import ServerConfig
from slipstream.server.logs import configure_logging
from slipstream.testing.engines import tiny_engine_config
from tests.server.fake_engine import FakeConfig, FakeEngine


def main() -> int:
    """Serve on the inherited listening socket until SIGTERM."""
    fd, step_delay, shutdown_timeout = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    sock = socket.socket(fileno=fd)
    config = ServerConfig(port=0, log_format="json", shutdown_timeout_s=shutdown_timeout)
    configure_logging(config.log_format, config.log_level)
    engine: EngineClient
    if len(sys.argv) > 5:
        from slipstream.engine import async_engine

        load_delay = float(sys.argv[5])

        class SlowLoad(async_engine.LLMEngine):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                time.sleep(load_delay)
                super().__init__(*args, **kwargs)

        async_engine.LLMEngine = SlowLoad  # type: ignore[misc]
    if len(sys.argv) > 4:
        engine = NativeEngineClient(tiny_engine_config(sys.argv[4], num_blocks=64, max_num_seqs=4))
        engine.add_stats_listener(lambda _: time.sleep(step_delay))  # after each step
    else:
        engine = FakeEngine(FakeConfig(step_delay_s=step_delay))
    return run_server(create_app(engine, config), config, sock)


if __name__ == "__main__":
    sys.exit(main())
