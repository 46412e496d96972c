"""The default bf16 CPU path: every product through skinny_linear, logits batch-invariant."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from slipstream.engine.models import load_model
from slipstream.kernels.cpu.decoder_layer import (
    LayerBuffers,
    decoder_layer_unavailable_reason,
    layer_after_attention,
)
from slipstream.kernels.cpu.layer_ops import layer_ops_unavailable_reason, rope_bf16, silu_mul_bf16
from slipstream.kernels.cpu.paged_decode_attention import (
    MAX_QUERY_ROWS,
    decode_attention_unavailable_reason,
)
from slipstream.kernels.cpu.skinny_linear import skinny_linear_ref, skinny_unavailable_reason
from slipstream.testing.tiny_model import make_tiny_model_dir
from tests.engine.test_models import BLOCK_SIZE, NUM_BLOCKS, make_meta, run_two_steps

pytestmark = pytest.mark.skipif(
    skinny_unavailable_reason() is not None, reason=f"{skinny_unavailable_reason()}"
)
CPU = torch.device("cpu")


def _models(tmp_path: Path, tied: bool = False, **overrides: Any) -> tuple[Any, Any, Any]:
    folder = make_tiny_model_dir(tmp_path / "m", tie_word_embeddings=tied, **overrides)
    plain, config = load_model(str(folder), torch.bfloat16, CPU)
    skinny, _ = load_model(str(folder), torch.bfloat16, CPU)
    assert skinny.pack_for_cpu() == "skinny_linear"  # type: ignore[attr-defined]
    return plain, skinny, config


@pytest.mark.parametrize("tied", [False, True])
def test_every_product_takes_skinny_linear(tmp_path: Path, tied: bool) -> None:
    plain, skinny, config = _models(tmp_path, tied)
    calls: list[int] = []
    for layer in skinny.layers:
        inner = layer.linear_skinny

        def counted(x: torch.Tensor, w: torch.Tensor, b: Any, inner: Any = inner) -> torch.Tensor:
            calls.append(x.shape[0])
            return inner(x, w, b)

        layer.linear_skinny = counted
    got = run_two_steps(skinny, config)
    products = 4 * config.num_hidden_layers
    # Both steps feed all sequences' tokens at once (prefill rows, then continuation rows).
    assert len(calls) == 2 * products and len(set(calls[:products])) == 1
    want = run_two_steps(plain, config)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        # float32 accumulation in another order, and no bf16 rounding of the logits.
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.02)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


@pytest.mark.skipif(
    layer_ops_unavailable_reason() is not None, reason=f"{layer_ops_unavailable_reason()}"
)
def test_64_wide_heads_take_the_layer_ops(tmp_path: Path) -> None:
    # The tiny model's 16-wide heads keep PyTorch's RoPE; 64-wide ones (the default model's)
    # take layer_ops.cpp for RoPE and SiLU * up, and the K/V store, with the same logits.
    plain, skinny, config = _models(tmp_path, hidden_size=128, num_attention_heads=2)
    assert all(layer.rope is rope_bf16 for layer in skinny.layers)
    assert all(layer.silu_mul is silu_mul_bf16 for layer in skinny.layers)
    assert not any(layer.rope is rope_bf16 for layer in plain.layers)
    for a, b in zip(run_two_steps(skinny, config), run_two_steps(plain, config), strict=True):
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.02)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_lm_head_logits_are_the_kernels_float32(tmp_path: Path) -> None:
    _, skinny, config = _models(tmp_path)
    hidden = torch.randn(5, config.hidden_size).to(torch.bfloat16)
    head = skinny.lm_head if skinny.lm_head is not None else skinny.embed_tokens
    want = skinny_linear_ref(hidden, head.data, None, torch.float32)
    assert torch.equal(skinny.compute_logits(hidden), want)


def _step_logits(
    model: Any, config: Any, prompt: list[int], fed: list[list[int]]
) -> list[torch.Tensor]:
    """Prefill `prompt` once per entry of `fed` (fresh cache), then feed that entry's
    tokens as one step after it: the step's logits, one tensor per entry."""
    shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    outs = []
    for tokens in fed:
        caches = [
            (torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
            for _ in range(config.num_hidden_layers)
        ]
        table = [[7, 3, 11, 5]]
        for ctx, ids in ((0, prompt), (len(prompt), tokens)):
            pos = torch.arange(ctx, ctx + len(ids))
            with torch.inference_mode():
                hidden = model(torch.tensor(ids), pos, caches, make_meta([ctx], [len(ids)], table))
                logits = model.compute_logits(hidden)
        outs.append(logits)
    return outs


def test_a_verified_token_gets_the_logits_of_one_row_decoding(tmp_path: Path) -> None:
    # What speculative decoding relies on: the root row of a 6-token draft step computes
    # the same bits as decoding that token alone, so greedy output matches in bf16 too.
    _, skinny, config = _models(tmp_path)
    prompt = [5, 17, 300, 42, 9, 77, 1, 64, 12]
    alone, drafted = _step_logits(skinny, config, prompt, [[33], [33, 8, 91, 4, 250, 6]])
    assert torch.equal(alone[0], drafted[0])
    # The third drafted row equals decoding the first three tokens as one step's last row.
    short = _step_logits(skinny, config, prompt, [[33, 8, 91]])[0]
    assert torch.equal(short[2], drafted[2])


def test_a_sequence_gets_the_same_logits_alone_or_in_a_batch(tmp_path: Path) -> None:
    _, skinny, config = _models(tmp_path)
    shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)

    def prefill(prompts: list[list[int]]) -> torch.Tensor:
        caches = [
            (torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
            for _ in range(config.num_hidden_layers)
        ]
        tables = [[1, 2, 3, 4], [9, 10, 11, 12], [20, 21, 22, 23]][: len(prompts)]
        ids = torch.tensor([t for p in prompts for t in p])
        pos = torch.tensor([i for p in prompts for i in range(len(p))])
        meta = make_meta([0] * len(prompts), [len(p) for p in prompts], tables)
        with torch.inference_mode():
            return skinny.compute_logits(skinny(ids, pos, caches, meta))

    a, b, c = [3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26], [43, 38]
    alone = prefill([a])
    batched = prefill([b, a, c])
    assert torch.equal(batched[len(b) : len(b) + len(a)], alone)


@pytest.mark.skipif(
    decoder_layer_unavailable_reason() is not None, reason=f"{decoder_layer_unavailable_reason()}"
)
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_the_fused_layer_calls_give_the_op_by_op_bits(tmp_path: Path, arch: str) -> None:
    # decoder_layer.cpp runs a layer's norms, projections, RoPE and SiLU * up in two calls;
    # the same kernels in the same order, so every logit keeps its bits (Qwen2 adds the
    # q|k|v bias, which the calls must pass through).
    folder = make_tiny_model_dir(tmp_path / "m", arch=arch, hidden_size=128, num_attention_heads=2)
    fused, config = load_model(str(folder), torch.bfloat16, CPU)
    ops, _ = load_model(str(folder), torch.bfloat16, CPU)
    assert fused.pack_for_cpu() == ops.pack_for_cpu() == "skinny_linear"  # type: ignore[operator]
    assert all(layer.fused_cpu for layer in fused.layers)
    for layer in ops.layers:
        layer.fused_cpu = False
    calls: list[int] = []
    for layer in ops.layers:  # the op-by-op model must really run its ops one by one
        inner = layer.linear_skinny

        def counted(x: torch.Tensor, w: torch.Tensor, b: Any, inner: Any = inner) -> torch.Tensor:
            calls.append(x.shape[0])
            return inner(x, w, b)

        layer.linear_skinny = counted
    for a, b in zip(run_two_steps(fused, config), run_two_steps(ops, config), strict=True):
        assert torch.equal(a, b)
    assert len(calls) == 2 * 4 * config.num_hidden_layers
    prompt, fed = [5, 17, 300, 42, 9, 77, 1, 64, 12], [[33], [33, 8, 91, 4, 250, 6]]
    fused_logits = _step_logits(fused, config, prompt, fed)
    for a, b in zip(fused_logits, _step_logits(ops, config, prompt, fed), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(
    decoder_layer_unavailable_reason() is not None, reason=f"{decoder_layer_unavailable_reason()}"
)
def test_the_fused_call_refuses_an_attention_output_it_would_misread(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", hidden_size=128, num_attention_heads=2)
    model, config = load_model(str(folder), torch.bfloat16, CPU)
    model.pack_for_cpu()  # type: ignore[operator]
    layer = model.layers[0]
    hidden, heads = config.hidden_size, config.num_attention_heads
    buffers = LayerBuffers.allocate(2, hidden, heads, config.num_key_value_heads, 64, layer.inter)
    h = torch.zeros(2, hidden)
    weights = (layer.o_bias, layer.post_norm, 1e-5, layer.skinny[2], None, layer.skinny[3], None)
    for bad in (
        torch.zeros(2, heads * 64),  # float32
        torch.zeros(2, heads * 64 + 2, dtype=torch.bfloat16)[:, :-2],  # strided rows
        torch.zeros(3, heads * 64, dtype=torch.bfloat16),  # a row too many
    ):
        with pytest.raises(ValueError, match="attention output"):
            layer_after_attention(h, bad, layer.skinny[1], *weights, buffers)


@pytest.mark.skipif(
    decode_attention_unavailable_reason() is not None,
    reason=f"{decode_attention_unavailable_reason()}",
)
def test_a_decode_row_beside_a_long_prefill_gets_the_logits_of_decoding_alone(
    tmp_path: Path,
) -> None:
    # Served, a decode shares its step with whatever prefill chunk arrived: its logits (and
    # so a greedy answer) must not depend on that. 64-wide heads: the C++ decode attention.
    _, skinny, config = _models(
        tmp_path, hidden_size=128, num_attention_heads=2, max_position_embeddings=1024
    )
    blocks = 200
    shape = (blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    # Sums over ~100 keys: the reference's rounding shows in the bf16 output (over 10 keys
    # the two paths happened to agree).
    prompt = [(11 * i + 5) % 500 for i in range(100)]
    other = [(7 * i + 3) % 500 for i in range(MAX_QUERY_ROWS + 20)]  # one long prefill chunk
    table = list(range(1, 1 + -(-(len(prompt) + 1) // BLOCK_SIZE)))
    other_table = list(range(table[-1] + 1, table[-1] + 1 + -(-len(other) // BLOCK_SIZE)))
    assert other_table[-1] < blocks

    def decode_logits(with_prefill: bool) -> torch.Tensor:
        caches = [
            (torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
            for _ in range(config.num_hidden_layers)
        ]
        n = len(prompt)
        with torch.inference_mode():
            skinny(torch.tensor(prompt), torch.arange(n), caches, make_meta([0], [n], [table]))
            if not with_prefill:
                meta = make_meta([n], [1], [table])
                hidden = skinny(torch.tensor([33]), torch.tensor([n]), caches, meta)
                return skinny.compute_logits(hidden)[0]
            meta = make_meta([n, 0], [1, len(other)], [table, other_table])
            ids = torch.tensor([33, *other])
            pos = torch.tensor([n, *range(len(other))])
            return skinny.compute_logits(skinny(ids, pos, caches, meta))[0]

    assert torch.equal(decode_logits(with_prefill=True), decode_logits(with_prefill=False))


@pytest.mark.skipif(
    decode_attention_unavailable_reason() is not None,
    reason=f"{decode_attention_unavailable_reason()}",
)
def test_a_prefill_gets_the_same_kv_wherever_the_chunks_are_cut(
    tmp_path: Path,
) -> None:
    # A prompt longer than the step's token budget is cut where the other requests leave
    # room. Chunks of up to MAX_QUERY_ROWS (512) rows take the C++ attention, as a one-row
    # decode would; longer ones (a budget over 512) take SDPA, whose bits follow the cut,
    # unless --batch-invariant sends them to the kernel too.
    from slipstream.engine.batch_invariant import CpuKernelAttentionBackend, make_batch_invariant

    folder = make_tiny_model_dir(
        tmp_path / "m", hidden_size=128, num_attention_heads=2, max_position_embeddings=1024
    )
    blocks = 200
    prompt = [(11 * i + 5) % 500 for i in range(700)]
    table = list(range(1, 1 + -(-(len(prompt) + 2) // BLOCK_SIZE)))

    def next_logits(model: Any, config: Any, cuts: list[int]) -> torch.Tensor:
        shape = (blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
        caches = [
            (torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
            for _ in range(config.num_hidden_layers)
        ]
        bounds = [0, *cuts, len(prompt)]
        with torch.inference_mode():
            for a, b in itertools.pairwise(bounds):
                ids, pos = torch.tensor(prompt[a:b]), torch.arange(a, b)
                model(ids, pos, caches, make_meta([a], [b - a], [table]))
            n = len(prompt)
            meta = make_meta([n], [1], [table])
            return model.compute_logits(model(torch.tensor([33]), torch.tensor([n]), caches, meta))

    default, config = load_model(str(folder), torch.bfloat16, CPU)
    default.pack_for_cpu()
    invariant, _ = load_model(str(folder), torch.bfloat16, CPU)
    assert make_batch_invariant(invariant, invariant.pack_for_cpu()).startswith("cpu kernels")
    assert all(isinstance(b, CpuKernelAttentionBackend) for b in invariant.attn_backends)
    small = ([496], [300], [250, 500], [472, 600])  # chunks of at most 512 rows
    got = [next_logits(default, config, c) for c in small]
    assert all(torch.equal(g, got[0]) for g in got[1:])
    large = ([600], [650], [])  # one chunk over 512 rows in each
    got += [next_logits(invariant, config, c) for c in (*small, *large)]
    assert all(torch.equal(g, got[0]) for g in got[1:])
    # Without the flag, chunks over 512 rows show the cut (else this would prove nothing).
    plain = [next_logits(default, config, c) for c in large]
    assert not all(torch.equal(p, plain[0]) for p in plain[1:])
