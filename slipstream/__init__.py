"""slipstream: an OpenAI-compatible LLM inference server with pluggable research decoders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from slipstream.engine.llm import LLM
    from slipstream.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import slipstream` stays cheap for the CLI and the load tester.
    if name == "LLM":
        from slipstream.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from slipstream.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
