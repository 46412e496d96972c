"""Architecture hyper-parameters of a Llama-family model, parsed from an HF config.json dict."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Architectures llama.py implements (kept here, not read from the registry, so that parsing a
# config never imports the model code). tests/engine/test_models.py checks both agree.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 ("llama3") frequency-dependent RoPE scaling; the only rope type besides default."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArchConfig:
    """The numbers a Llama-family model needs; field names follow HF config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Bias on the q/k/v projections (Qwen2 always; Llama when attention_bias is set).
    attention_bias: bool = False
    # Bias on o_proj (Llama's attention_bias covers it; Qwen2 has none).
    o_proj_bias: bool = False
    # Bias on gate/up/down (Llama's mlp_bias).
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        """Width of the query projection."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (and of the value) projection."""
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelArchConfig:
        """Parse an HF config.json dict; ValueError names what is unsupported or missing."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or '(none given)'}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported; only silu (SwiGLU)")
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
            # NOTE: every position attends to the whole context. Exact while sequences stay
            # within the window (4096 for Mistral v0.1); longer ones differ from HF.
            logger.warning("sliding_window=%s is ignored: attention is full", cfg["sliding_window"])
        heads = _required(cfg, "num_attention_heads")
        hidden = _required(cfg, "hidden_size")
        theta, scaling = _parse_rope(cfg)
        is_qwen2 = arch == "Qwen2ForCausalLM"
        llama_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=_required(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_required(cfg, "intermediate_size"),
            num_hidden_layers=_required(cfg, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=is_qwen2 or llama_bias,
            o_proj_bias=llama_bias and not is_qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
        )


def _required(cfg: dict[str, Any], key: str) -> int:
    if cfg.get(key) is None:
        raise ValueError(f"config.json lacks required key {key!r}")
    return int(cfg[key])


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either layout: transformers>=5 `rope_parameters`, or the
    older top-level `rope_theta` + `rope_scaling` (whose type key is `rope_type` or `type`)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope type {kind!r} is not supported; supported: default, llama3")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
