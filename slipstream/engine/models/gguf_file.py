"""Read a llama.cpp GGUF file as an HF config dict plus HF-named float32 tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

# GGUF architecture -> (HF architecture, HF model_type). Mistral GGUFs say "llama".
_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}

# GGUF per-layer tensor stem -> HF module path under model.layers.N.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _reader(path: Path) -> Any:
    import gguf  # imported here: parsing the module costs ~0.3 s and HF folders never need it

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from exc


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; 7 significant digits undo that.
    return float(f"{value:.7g}")


def gguf_hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """An HF config.json dict from GGUF metadata (llama.* or qwen2.* keys)."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHS)}"
        )
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    names = {t.name for t in reader.tensors}
    if (scaling not in (None, "none")) or "rope_freqs.weight" in names:
        raise ValueError(f"{path}: GGUF rope scaling is not supported; load the HF folder instead")

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else embed.shape[-1])
    hf_arch, model_type = _ARCHS[arch]
    return {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (each head's two rotate-half halves interleaved).

    llama.cpp stores row (h, i, j) of [n_heads, head_dim/2, 2] at HF row (h, j, i) of
    [n_heads, 2, head_dim/2], so that its rope rotates adjacent pairs.
    """
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's conversion of HF Q/K rows (the inverse of unpermute_rope_rows)."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def gguf_layout_name(hf_name: str) -> str:
    """The GGUF tensor name of an HF parameter name (used to write test GGUFs)."""
    for gguf_name, name in _GLOBAL_NAMES.items():
        if name == hf_name:
            return gguf_name
    _, _, layer, *module, kind = hf_name.split(".")  # model.layers.N.<module path>.weight
    stem = next(k for k, v in _LAYER_NAMES.items() if v == ".".join(module))
    return f"blk.{layer}.{stem}.{kind}"


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")  # blk.N.stem.(weight|bias)
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """HF config dict and HF-named float32 tensors (dequantized, Q/K rows back in HF order)."""
    from gguf.quants import dequantize

    reader = _reader(path)
    config = gguf_hf_config(reader, path)
    permuted = config["model_type"] == "llama"  # llama.cpp permutes Q/K for llama only
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r}")
        # numpy order is [out, in] (GGUF lists shapes innermost first).
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        tensor = torch.from_numpy(array.reshape([int(d) for d in reversed(t.shape)]).copy())
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = unpermute_rope_rows(tensor, config["num_attention_heads"])
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = unpermute_rope_rows(tensor, config["num_key_value_heads"])
        tensors[name] = tensor
    return config, tensors
