"""Engine backends `slipstream serve --backend NAME` can build; adding one is one entry."""

from __future__ import annotations

from collections.abc import Callable

from slipstream.backends.base import EngineClient
from slipstream.config import EngineConfig
from slipstream.utils.registry import Registry

BackendFactory = Callable[[EngineConfig], EngineClient]
BACKENDS: Registry[BackendFactory] = Registry("backend")


class BackendUnavailableError(RuntimeError):
    """The backend is registered but cannot run here (not installed or not implemented)."""


@BACKENDS.register("native")
def native_backend(config: EngineConfig) -> EngineClient:
    """slipstream's own engine, embedded (the only backend with the research decoders)."""
    # Imported here: it pulls in torch, and `slipstream serve --help` should stay fast.
    from slipstream.backends.native import NativeEngineClient

    return NativeEngineClient(config)


@BACKENDS.register("vllm")
def vllm_backend(config: EngineConfig) -> EngineClient:
    """vLLM's async engine in-process (needs `pip install slipstream[vllm]`)."""
    try:
        from slipstream.backends.vllm import VllmEngineClient
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the vllm backend is not available in this installation ({exc}); use --backend native"
        ) from exc
    client: EngineClient = VllmEngineClient(config)
    return client
