"""`slipstream bench`: workloads, arrivals, streaming client, report and plots.

The public names are imported lazily so that `slipstream --help` does not pay for httpx,
numpy or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slipstream.loadtest.builtin import BuiltinPrompt, load_builtin
    from slipstream.loadtest.config import BenchConfig
    from slipstream.loadtest.runner import BenchResult, arun_benchmark, run_benchmark

_EXPORTS = {
    "BenchConfig": "slipstream.loadtest.config",
    "BenchResult": "slipstream.loadtest.runner",
    "run_benchmark": "slipstream.loadtest.runner",
    "arun_benchmark": "slipstream.loadtest.runner",
    "BuiltinPrompt": "slipstream.loadtest.builtin",
    "load_builtin": "slipstream.loadtest.builtin",
}
__all__ = [
    "BenchConfig",
    "BenchResult",
    "BuiltinPrompt",
    "arun_benchmark",
    "load_builtin",
    "run_benchmark",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
