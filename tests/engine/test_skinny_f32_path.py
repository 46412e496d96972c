"""The float32 CPU path's two fused layer calls (decoder_layer_f32.cpp): the op-by-op
path's bits, with the weights in place or as grouped bf16 copies; prefill-sized steps op
by op."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from slipstream.engine.models import load_model
from slipstream.kernels.cpu.decoder_layer import LayerBuffers
from slipstream.kernels.cpu.decoder_layer_f32 import (
    decoder_layer_f32_unavailable_reason,
    layer_after_attention_f32,
)
from slipstream.kernels.cpu.skinny_linear_f32 import CHUNKED_MAX_ROWS, MAX_ROWS, GroupedBf16Weight
from slipstream.testing.tiny_model import make_tiny_model_dir
from tests.engine.test_models import BLOCK_SIZE, NUM_BLOCKS, make_meta, run_two_steps

pytestmark = pytest.mark.skipif(
    decoder_layer_f32_unavailable_reason() is not None,
    reason=f"{decoder_layer_f32_unavailable_reason()}",
)
CPU = torch.device("cpu")


def _folder(tmp_path: Path, arch: str, bf16_checkpoint: bool) -> Path:
    folder = make_tiny_model_dir(tmp_path / "m", arch=arch, hidden_size=128, num_attention_heads=2)
    if bf16_checkpoint:  # as the default model ships: its float32 upcast is bf16-exact
        weights = load_file(str(folder / "model.safetensors"))
        save_file({k: v.bfloat16() for k, v in weights.items()}, str(folder / "model.safetensors"))
    return folder


def _step_logits(model: Any, config: Any, prompt: list[int], step: list[int]) -> torch.Tensor:
    """Prefill `prompt` into a fresh float32 cache, then feed `step` as one step: its logits."""
    shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    # 13 scattered blocks of BLOCK_SIZE (4) tokens: room for MAX_ROWS + 14 tokens.
    table = [[(5 * i + 3) % NUM_BLOCKS for i in range(13)]]
    for ctx, ids in ((0, prompt), (len(prompt), step)):
        pos = torch.arange(ctx, ctx + len(ids))
        with torch.inference_mode():
            hidden = model(torch.tensor(ids), pos, caches, make_meta([ctx], [len(ids)], table))
            logits = model.compute_logits(hidden)
    return logits


@pytest.mark.parametrize("bf16_checkpoint", [False, True])
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_the_fused_float32_layer_calls_give_the_op_by_op_bits(
    tmp_path: Path, arch: str, bf16_checkpoint: bool
) -> None:
    # Qwen2 adds the q|k|v bias, which the calls must pass through.
    folder = _folder(tmp_path, arch, bf16_checkpoint)
    fused, config = load_model(str(folder), torch.float32, CPU)
    ops, _ = load_model(str(folder), torch.float32, CPU)
    assert fused.pack_for_cpu() == ops.pack_for_cpu() == "skinny_linear_f32"  # type: ignore[operator]
    assert all(layer.fused_cpu for layer in fused.layers)
    grouped = isinstance(fused.layers[0].skinny[0], GroupedBf16Weight)
    assert grouped == bf16_checkpoint
    op_rows: list[int] = []
    for layer in ops.layers:  # the op-by-op model must really run its ops one by one
        layer.fused_cpu = False
        inner = layer.linear_skinny

        def counted(x: torch.Tensor, w: Any, b: Any, inner: Any = inner) -> torch.Tensor:
            op_rows.append(x.shape[0])
            return inner(x, w, b)

        layer.linear_skinny = counted
    fused_rows: list[int] = []
    for layer in fused.layers:
        before = layer.fused_before

        def counted_before(h: torch.Tensor, *rest: Any, before: Any = before) -> None:
            fused_rows.append(h.shape[0])
            before(h, *rest)

        layer.fused_before = counted_before
    # A 19-row prefill and a 6-row step: both fused.
    for a, b in zip(run_two_steps(fused, config), run_two_steps(ops, config), strict=True):
        assert torch.equal(a, b)
    assert len(op_rows) == 2 * 4 * config.num_hidden_layers
    assert sorted(set(fused_rows)) == [6, 19]
    # A prompt longer than MAX_ROWS goes op by op (products in two calls), then 1 and 6 tokens.
    prompt = [(7 * i + 3) % config.vocab_size for i in range(MAX_ROWS + 8)]
    fused_rows.clear()
    for step in ([33], [33, 8, 91, 4, 250, 6]):
        want = _step_logits(ops, config, prompt, step)
        assert torch.equal(_step_logits(fused, config, prompt, step), want)
    assert sorted(set(fused_rows)) == [1, 6]  # the long prefill never reached the calls


def test_the_fused_float32_call_refuses_an_attention_output_it_would_misread(
    tmp_path: Path,
) -> None:
    model, config = load_model(str(_folder(tmp_path, "LlamaForCausalLM", True)), torch.float32, CPU)
    model.pack_for_cpu()  # type: ignore[operator]
    layer = model.layers[0]
    hidden, heads = config.hidden_size, config.num_attention_heads
    buffers = LayerBuffers.allocate(
        2, hidden, heads, config.num_key_value_heads, 64, layer.inter, torch.float32
    )
    h = torch.zeros(2, hidden)
    weights = (layer.o_bias, layer.post_norm, 1e-5, layer.skinny[2], None, layer.skinny[3], None)
    for bad in (
        torch.zeros(2, heads * 64, dtype=torch.bfloat16),
        torch.zeros(2, heads * 64 + 2)[:, :-2],  # strided rows
        torch.zeros(3, heads * 64),  # a row too many
    ):
        with pytest.raises(ValueError, match="attention output"):
            layer_after_attention_f32(h, bad, layer.skinny[1], *weights, buffers)


@pytest.mark.parametrize("bf16_checkpoint", [False, True])
def test_a_decode_row_beside_a_long_prefill_gets_the_logits_of_decoding_alone(
    tmp_path: Path, bf16_checkpoint: bool
) -> None:
    # Served, a decode shares its step with whatever prefill chunk arrived. Over
    # CHUNKED_MAX_ROWS rows the products of the chunk go to MKL; the decode row's must not.
    folder = _folder(tmp_path, "LlamaForCausalLM", bf16_checkpoint)
    model, config = load_model(str(folder), torch.float32, CPU)
    assert model.pack_for_cpu() == "skinny_linear_f32"  # type: ignore[operator]
    blocks = 96
    shape = (blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    prompt = [(11 * i + 5) % config.vocab_size for i in range(100)]
    other = [(7 * i + 3) % config.vocab_size for i in range(CHUNKED_MAX_ROWS + 20)]
    table = list(range(1, 1 + -(-(len(prompt) + 1) // BLOCK_SIZE)))
    other_table = list(range(table[-1] + 1, table[-1] + 1 + -(-len(other) // BLOCK_SIZE)))
    assert other_table[-1] < blocks
    mkl_rows: list[int] = []
    real_linear = torch.nn.functional.linear

    def counted(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        mkl_rows.append(x.shape[0])
        return real_linear(x, *rest)

    def decode_logits(with_prefill: bool) -> torch.Tensor:
        caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
        n = len(prompt)
        with torch.inference_mode():
            model(torch.tensor(prompt), torch.arange(n), caches, make_meta([0], [n], [table]))
            if not with_prefill:
                meta = make_meta([n], [1], [table])
                return model.compute_logits(
                    model(torch.tensor([33]), torch.tensor([n]), caches, meta)
                )[0]
            meta = make_meta([n, 0], [1, len(other)], [table, other_table])
            ids = torch.tensor([33, *other])
            pos = torch.tensor([n, *range(len(other))])
            return model.compute_logits(model(ids, pos, caches, meta))[0]

    alone = decode_logits(with_prefill=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "linear", counted)
        beside = decode_logits(with_prefill=True)
    assert torch.equal(beside, alone)
    # MKL took the prefill chunk's rows only, in all 4 products of every layer.
    assert mkl_rows == [len(other)] * 4 * config.num_hidden_layers
