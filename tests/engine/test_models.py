"""Our Llama-family model against transformers on tiny random weights, through the paged KV path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from slipstream.engine.attention import AttentionMetadata, PagedAttentionBackend
from slipstream.engine.models import MODELS, SUPPORTED_ARCHITECTURES, ModelArchConfig, load_model
from slipstream.engine.models.config import RopeScaling
from slipstream.engine.models.llama import llama3_inv_freq
from slipstream.testing.tiny_model import LLAMA3_ROPE_SCALING, make_tiny_model_dir, tiny_config

BLOCK_SIZE = 4  # small, so prompts of 3..11 tokens span block boundaries
NUM_BLOCKS = 32
PROMPTS = [[5, 17, 300, 42, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [500, 250, 125]]
# Second step: one decode token, a 3-token chunk, a 2-token chunk.
CONTINUATIONS = [[77], [12, 13, 14], [400, 401]]
CPU = torch.device("cpu")


def make_meta(
    ctx_lens: list[int], new_lens: list[int], block_tables: list[list[int]]
) -> AttentionMetadata:
    """Metadata for sequences with ctx_lens cached tokens each feeding new_lens tokens."""
    starts = [0]
    slots: list[int] = []
    for ctx, new, table in zip(ctx_lens, new_lens, block_tables, strict=True):
        starts.append(starts[-1] + new)
        slots += [
            table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(ctx, ctx + new)
        ]
    seq_lens = [c + n for c, n in zip(ctx_lens, new_lens, strict=True)]
    width = max(len(t) for t in block_tables)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32
        ),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        tree_mask=None,
        max_query_len=max(new_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_list=starts,
        seq_lens_list=seq_lens,
    )


def run_two_steps(model: Any, config: ModelArchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched prefill of PROMPTS, then one batched step of CONTINUATIONS over the cache."""
    shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    # Scattered, non-monotonic physical blocks: sequence b owns blocks 30-b, 3b+1, 20-2b, 2+b...
    tables = [[30 - b, 3 * b + 1, 20 - 2 * b, 10 + b, 25 - b] for b in range(len(PROMPTS))]
    outs = []
    ctx = [0] * len(PROMPTS)
    for step in (PROMPTS, CONTINUATIONS):
        ids = torch.tensor([t for seq in step for t in seq])
        pos = torch.tensor(
            [c + i for c, seq in zip(ctx, step, strict=True) for i in range(len(seq))]
        )
        meta = make_meta(ctx, [len(s) for s in step], tables)
        with torch.inference_mode():
            outs.append(model.compute_logits(model(ids, pos, caches, meta)))
        ctx = [c + len(s) for c, s in zip(ctx, step, strict=True)]
    return outs[0], outs[1]


def reference_logits(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' logits for the same tokens, one full sequence at a time, no cache."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    prefill, cont = [], []
    with torch.inference_mode():
        for prompt, more in zip(PROMPTS, CONTINUATIONS, strict=True):
            logits = hf(input_ids=torch.tensor([prompt + more])).logits[0]
            prefill.append(logits[: len(prompt)])
            cont.append(logits[len(prompt) :])
    return torch.cat(prefill), torch.cat(cont)


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE_SCALING, "rope_theta": 5e5}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen2-tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralForCausalLM", {"num_key_value_heads": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path: Path, case: str) -> None:
    arch, overrides = CASES[case]
    folder = make_tiny_model_dir(tmp_path, arch, seed=3, with_tokenizer=False, **overrides)
    model, config = load_model(str(folder), torch.float32, CPU)
    ours_prefill, ours_cont = run_two_steps(model, config)
    ref_prefill, ref_cont = reference_logits(folder)
    assert ref_prefill.std() > 0.3  # weights are scaled so logits are O(1), not near zero
    assert (ours_prefill - ref_prefill).abs().max() <= 1e-4
    assert (ours_cont - ref_cont).abs().max() <= 1e-4


def test_tied_model_has_no_lm_head(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path, with_tokenizer=False, tie_word_embeddings=True)
    model, config = load_model(str(folder), torch.float32, CPU)
    assert config.tie_word_embeddings
    assert model.lm_head is None  # type: ignore[attr-defined]
    hidden = torch.randn(3, config.hidden_size)
    expected = hidden @ model.embed_tokens.T  # type: ignore[attr-defined]
    torch.testing.assert_close(model.compute_logits(hidden), expected)


def test_bfloat16_tracks_float32(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path, with_tokenizer=False)
    model32, config = load_model(str(folder), torch.float32, CPU)
    model16, _ = load_model(str(folder), torch.bfloat16, CPU)
    ref, _ = run_two_steps(model32, config)
    shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    caches = [
        (torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
        for _ in range(config.num_hidden_layers)
    ]
    ids = torch.tensor(PROMPTS[1])
    meta = make_meta([0], [len(ids)], [[3, 7, 1]])
    with torch.inference_mode():
        logits = model16.compute_logits(model16(ids, torch.arange(len(ids)), caches, meta))
    assert logits.dtype == torch.float32
    start = len(PROMPTS[0])
    expected = ref[start : start + len(ids)]
    # bfloat16 keeps 8 mantissa bits (0.4% per rounding); two layers of O(1) activations end
    # within a few percent of the O(1) logits, and the argmax almost always agrees.
    assert (logits - expected).abs().max() < 0.15
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


class CountingBackend(PagedAttentionBackend):
    """The default backend, counting calls."""

    def __init__(self) -> None:
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return super().forward(*args, **kwargs)


def test_set_attention_backend_replaces_one_layer(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path, with_tokenizer=False)
    model, config = load_model(str(folder), torch.float32, CPU)
    baseline, _ = run_two_steps(model, config)
    counting = CountingBackend()
    model.set_attention_backend(1, counting)
    logits, _ = run_two_steps(model, config)
    assert counting.calls == 2  # layer 1 only, once per step
    assert isinstance(model.attn_backends[0], PagedAttentionBackend)  # type: ignore[attr-defined]
    assert model.attn_backends[0] is not counting  # type: ignore[attr-defined]
    torch.testing.assert_close(logits, baseline)


def test_config_parses_both_rope_layouts() -> None:
    legacy = tiny_config(rope_scaling={"type": "llama3", **LLAMA3_ROPE_SCALING}, rope_theta=5e5)
    legacy["rope_scaling"].pop("rope_type")
    v5 = tiny_config()
    del v5["rope_theta"]
    v5["rope_parameters"] = {"rope_theta": 5e5, **LLAMA3_ROPE_SCALING}
    expected = RopeScaling(8.0, 1.0, 4.0, 32)
    for cfg in (legacy, v5):
        parsed = ModelArchConfig.from_hf_dict(cfg)
        assert parsed.rope_theta == 5e5
        assert parsed.rope_scaling == expected
    assert ModelArchConfig.from_hf_dict(tiny_config(rope_scaling=None)).rope_scaling is None


def test_config_defaults_and_token_ids() -> None:
    cfg = tiny_config(eos_token_id=[2, 7], head_dim=None, num_key_value_heads=None)
    parsed = ModelArchConfig.from_hf_dict(cfg)
    assert parsed.eos_token_ids == (2, 7)
    assert parsed.head_dim == 64 // 4
    assert parsed.num_key_value_heads == 4
    assert ModelArchConfig.from_hf_dict(tiny_config()).eos_token_ids == (2,)
    qwen = ModelArchConfig.from_hf_dict(tiny_config("Qwen2ForCausalLM"))
    assert qwen.attention_bias and not qwen.o_proj_bias


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        ModelArchConfig.from_hf_dict({**tiny_config(), "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelArchConfig.from_hf_dict(tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4}))
    with pytest.raises(ValueError, match="hidden_size"):
        ModelArchConfig.from_hf_dict({k: v for k, v in tiny_config().items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="multiple"):
        ModelArchConfig.from_hf_dict(tiny_config(num_key_value_heads=3))


def test_registry_covers_supported_architectures() -> None:
    assert MODELS.names() == sorted(SUPPORTED_ARCHITECTURES)


def test_llama3_inv_freq_bands() -> None:
    s = RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    )
    wavelen = torch.tensor([4.0, 16.0, 64.0, 1000.0])  # fast, blended, slow, slow
    inv = 2 * torch.pi / wavelen
    out = llama3_inv_freq(inv, s)
    assert out[0] == inv[0]  # shorter than 32 / 4 tokens: untouched
    torch.testing.assert_close(out[2:], inv[2:] / 8)  # longer than 32 / 1 tokens: divided
    smooth = (32 / 16 - 1) / (4 - 1)
    torch.testing.assert_close(out[1], (1 - smooth) * inv[1] / 8 + smooth * inv[1])
