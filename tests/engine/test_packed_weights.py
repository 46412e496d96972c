"""oneDNN-packed bf16 weights give bit-identical logits; top logits are exact in bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slipstream.engine.models import load_model
from slipstream.testing.tiny_model import make_tiny_model_dir
from tests.engine.test_models import run_two_steps


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_packed_bf16_weights_are_bit_identical(tmp_path: Path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m", tie_word_embeddings=False)
    plain, config = load_model(str(folder), torch.bfloat16, torch.device("cpu"))
    packed, _ = load_model(str(folder), torch.bfloat16, torch.device("cpu"))
    assert packed.pack_for_cpu()  # type: ignore[attr-defined]
    assert packed.layers[0].linear is not plain.layers[0].linear  # type: ignore[attr-defined]
    for a, b in zip(run_two_steps(plain, config), run_two_steps(packed, config), strict=True):
        assert torch.equal(a, b)


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
