"""A tiny random-weight Llama-family model as an HF folder (and as a GGUF), for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Architecture -> HF model_type.
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 512,  # the tiny tokenizer's default size
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: two query heads per KV head
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,  # the tiny tokenizer keeps SmolLM2's special ids
    "eos_token_id": 2,
    "pad_token_id": 2,
    "torch_dtype": "float32",
}

# A Llama 3 rope scaling whose original context (32) is short enough that a 16-dim head has
# frequencies in all three bands: kept, blended and divided by the factor.
LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def tiny_config(arch: str = "LlamaForCausalLM", **overrides: Any) -> dict[str, Any]:
    """The tiny HF config.json dict for `arch`, with overrides applied."""
    if arch not in MODEL_TYPES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {list(MODEL_TYPES)}")
    cfg = {"architectures": [arch], "model_type": MODEL_TYPES[arch], **TINY_CONFIG}
    if arch == "MistralForCausalLM":
        cfg["sliding_window"] = None
    cfg.update(overrides)
    return cfg


def tiny_weights(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named float32 weights scaled so activations and logits stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    qwen2 = cfg["model_type"] == "qwen2"

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    def linear(out: int, inp: int) -> torch.Tensor:
        return normal(out, inp, std=inp**-0.5)  # keeps unit-scale inputs at unit scale

    w = {"model.embed_tokens.weight": normal(cfg["vocab_size"], hidden, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + normal(hidden, std=0.1)
        w[p + "self_attn.q_proj.weight"] = linear(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv_heads * head_dim, hidden)
        if qwen2:
            w[p + "self_attn.q_proj.bias"] = normal(heads * head_dim, std=0.1)
            w[p + "self_attn.k_proj.bias"] = normal(kv_heads * head_dim, std=0.1)
            w[p + "self_attn.v_proj.bias"] = normal(kv_heads * head_dim, std=0.1)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, heads * head_dim)
        w[p + "post_attention_layernorm.weight"] = 1 + normal(hidden, std=0.1)
        w[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    w["model.norm.weight"] = 1 + normal(hidden, std=0.1)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = linear(cfg["vocab_size"], hidden)
    return w


def make_tiny_model_dir(
    path: Path,
    arch: str = "LlamaForCausalLM",
    seed: int = 0,
    with_tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Write config.json, model.safetensors (and tokenizer files) of a tiny model to `path`."""
    from safetensors.torch import save_file

    cfg = tiny_config(arch, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tiny_weights(cfg, seed), str(path / "model.safetensors"))
    if with_tokenizer:
        from slipstream.testing.tiny_tokenizer import build_tiny_tokenizer

        build_tiny_tokenizer(cfg["vocab_size"]).save_pretrained(str(path))
    return path


def make_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """Write the HF folder's weights as a float32 GGUF, laid out as llama.cpp converts it."""
    import gguf
    from safetensors.torch import load_file

    from slipstream.engine.models.gguf_file import gguf_layout_name, permute_rope_rows

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = "qwen2" if cfg["model_type"] == "qwen2" else "llama"
    writer = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        if arch == "llama" and ".q_proj." in name:
            tensor = permute_rope_rows(tensor, heads)
        elif arch == "llama" and ".k_proj." in name:
            tensor = permute_rope_rows(tensor, kv_heads)
        writer.add_tensor(gguf_layout_name(name), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
