"""Build a model from an HF folder (config.json + safetensors) or a single GGUF file."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

# Importing llama registers the Llama-family architectures in MODELS.
from slipstream.engine.models import llama  # noqa: F401
from slipstream.engine.models.config import ModelArchConfig
from slipstream.engine.models.registry import MODELS, CausalLM

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """HF-named tensors of one or more .safetensors files, read lazily one at a time."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Any] = {}
        for file in files:
            handle = safe_open(str(file), framework="pt", device="cpu")
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                self._where[name] = handle

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._where  # the Mapping default would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of an HF folder as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected an HF model folder)")
    with path.open() as f:
        cfg: dict[str, Any] = json.load(f)
    return cfg


def safetensors_files(folder: Path) -> list[Path]:
    """model.safetensors, or every shard model.safetensors.index.json names."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{folder}: no weights (model.safetensors or model.safetensors.index.json)"
        )
    with index.open() as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing safetensors shards: {', '.join(missing)}")
    return [folder / s for s in shards]


def parse_config(hf_config: dict[str, Any], where: Path) -> ModelArchConfig:
    """ModelArchConfig whose errors name the model path."""
    try:
        return ModelArchConfig.from_hf_dict(hf_config)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def build_model(
    config: ModelArchConfig,
    weights: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    where: Path,
) -> CausalLM:
    """Instantiate the registered class for config.architecture and load HF-named weights."""
    model = MODELS[config.architecture](config, dtype=dtype, device=device)
    try:
        model.load_weights(weights)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: a shape mismatch
        raise ValueError(f"{where}: weights do not match config.json: {exc}") from exc
    return model


def load_model(
    path: str, dtype: torch.dtype, device: torch.device
) -> tuple[CausalLM, ModelArchConfig]:
    """Load an HF folder or a .gguf file into our model, in `dtype` on `device`."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; choose one of {SUPPORTED_DTYPES}")
    where = Path(path).expanduser()
    if not where.exists():
        raise FileNotFoundError(f"model path {where} does not exist")
    if where.is_file():
        if where.suffix != ".gguf":
            raise ValueError(f"{where}: a model file must be .gguf (or pass an HF folder)")
        from slipstream.engine.models.gguf_file import read_gguf

        hf_config, tensors = read_gguf(where)
        config = parse_config(hf_config, where)
        return build_model(config, tensors, dtype, device, where), config
    config = parse_config(read_hf_config(where), where)
    weights = SafetensorsWeights(safetensors_files(where))
    return build_model(config, weights, dtype, device, where), config
