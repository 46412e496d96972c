"""Engine backends `slipstream serve --backend NAME` can build; adding one is one entry."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable

from slipstream.backends.base import EngineClient
from slipstream.config import EngineConfig
from slipstream.utils.registry import Registry

# (engine config, the parsed `serve` flags or None) -> client; backends read their own flags.
BackendFactory = Callable[[EngineConfig, argparse.Namespace | None], EngineClient]
BACKENDS: Registry[BackendFactory] = Registry("backend")


class BackendUnavailableError(RuntimeError):
    """The backend is registered but cannot run here (not installed or not implemented)."""


@BACKENDS.register("native")
def native_backend(config: EngineConfig, args: argparse.Namespace | None = None) -> EngineClient:
    """slipstream's own engine, embedded (the only backend with the research decoders)."""
    # Imported here: it pulls in torch, and `slipstream serve --help` should stay fast.
    from slipstream.backends.native import NativeEngineClient

    return NativeEngineClient(config)


@BACKENDS.register("vllm")
def vllm_backend(config: EngineConfig, args: argparse.Namespace | None = None) -> EngineClient:
    """vLLM's async engine in-process (needs vLLM: `make vllm`, docs/vllm.md)."""
    if importlib.util.find_spec("vllm") is None:
        raise BackendUnavailableError(
            "vLLM is not installed in this Python environment: run `make vllm` and use "
            ".venv-vllm/bin/slipstream (docs/vllm.md), or use --backend native"
        )
    from slipstream.backends.vllm_backend import vllm_client_from_args

    client: EngineClient = vllm_client_from_args(config, args)
    return client
