"""The fallback CPU path, where skinny_linear is unavailable (turned off here): oneDNN-packed
bf16 weights, multi-row steps bit-identical to plain weights, one-row steps through ATen's
GEMV; top logits are exact in bf16. tests/engine/test_skinny_path.py covers the default."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import slipstream.engine.models.llama as llama
from slipstream.engine.models import load_model
from slipstream.testing.tiny_model import make_tiny_model_dir
from tests.engine.test_models import BLOCK_SIZE, NUM_BLOCKS, make_meta, run_two_steps


@pytest.fixture(autouse=True)
def _without_skinny_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIPSTREAM_CPU_KERNELS", "0")


NO_ONEDNN_PACKING = llama.onednn_bf16_packing_unavailable_reason()
needs_onednn_packing = pytest.mark.skipif(
    NO_ONEDNN_PACKING is not None, reason=f"oneDNN bf16 packing: {NO_ONEDNN_PACKING}"
)


@needs_onednn_packing
def test_packed_bf16_weights_are_bit_identical(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", tie_word_embeddings=False)
    plain, config = load_model(str(folder), torch.bfloat16, torch.device("cpu"))
    packed, _ = load_model(str(folder), torch.bfloat16, torch.device("cpu"))
    assert packed.pack_for_cpu() == "onednn"  # type: ignore[attr-defined]
    assert packed.layers[0].linear is not plain.layers[0].linear  # type: ignore[attr-defined]
    # Both steps feed several rows (a 19-token prefill, then 6 tokens), so the packed path.
    for a, b in zip(run_two_steps(plain, config), run_two_steps(packed, config), strict=True):
        assert torch.equal(a, b)


def decode_one_token(model: Any, config: Any, prompt: list[int]) -> list[torch.Tensor]:
    """Prefill `prompt`, then feed its last token again as a one-row step: both steps' logits."""
    shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    table = [[7, 3, 11, 5]]
    outs = []
    for ctx, ids in ((0, prompt), (len(prompt), prompt[-1:])):
        pos = torch.arange(ctx, ctx + len(ids))
        with torch.inference_mode():
            hidden = model(torch.tensor(ids), pos, caches, make_meta([ctx], [len(ids)], table))
            outs.append(model.compute_logits(hidden))
    return outs


@needs_onednn_packing
@pytest.mark.parametrize("tied", [False, True])
def test_one_row_steps_take_the_one_row_path(tmp_path: Path, tied: bool) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", tie_word_embeddings=tied)
    plain, config = load_model(str(folder), torch.bfloat16, torch.device("cpu"))
    packed, _ = load_model(str(folder), torch.bfloat16, torch.device("cpu"))
    assert packed.pack_for_cpu() == "onednn"  # type: ignore[attr-defined]
    calls: list[tuple[str, int]] = []

    def counted(path: str, fn: Any) -> Any:
        def wrapper(x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
            calls.append((path, x.shape[0]))
            return fn(x, weight, bias)

        return wrapper

    for layer in packed.layers:  # type: ignore[attr-defined]
        layer.linear = counted("packed", layer.linear)
        layer.linear_one_row = counted("one_row", layer.linear_one_row)
    prompt = [5, 17, 300, 42, 9, 77, 1]
    got_prefill, got_step = decode_one_token(packed, config, prompt)
    products = 4 * config.num_hidden_layers  # qkv, o, gate_up, down per layer
    assert calls == [("packed", 7)] * products + [("one_row", 1)] * products
    want_prefill, want_step = decode_one_token(plain, config, prompt)
    assert torch.equal(got_prefill, want_prefill)
    # ATen's GEMV and oneDNN may round the last bf16 bit differently.
    torch.testing.assert_close(got_step, want_step, atol=0.1, rtol=0.02)
    assert torch.equal(got_step.argmax(-1), want_step.argmax(-1))


def test_one_row_linear_runs_with_onednn_off(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
        seen.append(torch.backends.mkldnn.enabled)
        return torch.nn.functional.linear(x, weight, bias)

    monkeypatch.setattr(llama, "F", SimpleNamespace(linear=linear))
    x, weight = torch.randn(1, 6, dtype=torch.bfloat16), torch.randn(4, 6, dtype=torch.bfloat16)
    out = llama.one_row_linear(x, weight, None)
    assert seen == [False]
    assert torch.backends.mkldnn.enabled
    torch.testing.assert_close(out.float(), x.float() @ weight.float().T, atol=0.05, rtol=0.02)


def test_one_row_linear_restores_onednn_after_an_error() -> None:
    with pytest.raises(RuntimeError):
        llama.one_row_linear(torch.ones(1, 3), torch.ones(4, 5), None)  # shapes disagree
    assert torch.backends.mkldnn.enabled


def test_bf16_runs_unpacked_where_onednn_cannot_pack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An AVX2-only CPU: oneDNN's bf16 reorder raises there. The model must still load and
    # compute the same logits as a model that was never asked to pack.
    folder = make_tiny_model_dir(tmp_path / "m", tie_word_embeddings=False)
    plain, config = load_model(str(folder), torch.bfloat16, torch.device("cpu"))
    model, _ = load_model(str(folder), torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(
        llama, "onednn_bf16_packing_unavailable_reason", lambda: "no AVX512 on this CPU"
    )
    assert model.pack_for_cpu() is None  # type: ignore[attr-defined]
    assert all(layer.packed is None for layer in model.layers)  # type: ignore[attr-defined]
    for a, b in zip(run_two_steps(plain, config), run_two_steps(model, config), strict=True):
        assert torch.equal(a, b)


def test_onednn_packing_probe_names_a_reason_or_packs() -> None:
    reason = llama.onednn_bf16_packing_unavailable_reason()
    weight = torch.randn(32, 16, dtype=torch.bfloat16)
    if reason is None:
        torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # must not raise
    else:
        assert reason
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def test_float32_is_not_packed(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m")
    model, _ = load_model(str(folder), torch.float32, torch.device("cpu"))
    assert not model.pack_for_cpu()  # type: ignore[attr-defined]


def test_bf16_top_logits_are_recomputed_exactly(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m")
    model, config = load_model(str(folder), torch.bfloat16, torch.device("cpu"))
    hidden = torch.randn(3, config.hidden_size, dtype=torch.bfloat16)
    logits = model.compute_logits(hidden)
    head = model.lm_head if model.lm_head is not None else model.embed_tokens  # type: ignore[attr-defined]
    weight = head.float()
    exact = hidden.float() @ weight.T
    top = logits.topk(8, dim=-1).indices
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), atol=1e-4, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))


def test_one_row_linear_from_many_threads_leaves_onednn_on() -> None:
    x, weight = torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(96, 64, dtype=torch.bfloat16)
    want = llama.one_row_linear(x, weight, None)

    def run(_: int) -> bool:
        return all(torch.equal(llama.one_row_linear(x, weight, None), want) for _ in range(200))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(run, range(4)))
    assert torch.backends.mkldnn.enabled
