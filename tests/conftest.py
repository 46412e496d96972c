"""Shared test setup: Triton's interpreter on CPU, seeding, device markers."""

from __future__ import annotations

import os
import random

# NOTE: must be set before any module defining a @triton.jit kernel is imported, or the
# kernels cannot run on CPU ("0 active drivers").
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests where there is no CUDA device (they are counted as skipped)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """cuda when available, else cpu (Triton kernels then run in the interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random-weight Llama HF folder with the tiny tokenizer (built once per session)."""
    from slipstream.testing.tiny_model import make_tiny_model_dir

    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama")))
