"""The engine on its Triton kernels end to end (the CUDA path, run here in Triton's
interpreter): paged and tree attention, the K/V store, the sparse kernels, HiP's one-launch
search and block top-k's page scores, as a GPU runs them. The kernel tests check each op;
this checks the engine's calls into them (session 15's first GPU run found its bugs there)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from slipstream.engine.engine import LLMEngine
from slipstream.engine.sampling_params import SamplingParams
from slipstream.testing.engines import run_to_completion, tiny_engine_config

SMALL = {"top_k": 16, "window": 8, "sink": 4, "dense_layers": 0}


@pytest.fixture
def triton_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIPSTREAM_KERNELS", "triton")
    monkeypatch.setenv("SLIPSTREAM_CPU_KERNELS", "0")


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    spans = [[rng.randrange(3, 500) for _ in range(n)] for n in (11, 17)]
    return [span * 6 + [7] for span in spans]  # ~70-100 tokens, repeated: drafts accept


def _tokens(model_dir: str, decoder: str, options: dict[str, Any]) -> list[list[int]]:
    engine = LLMEngine(tiny_engine_config(model_dir, decoder, options))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = run_to_completion(engine, _prompts(), params)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.usefixtures("triton_path")
def test_speculative_decoders_on_triton_give_standard_tokens(tiny_model_dir: str) -> None:
    want = _tokens(tiny_model_dir, "standard", {})
    assert _tokens(tiny_model_dir, "token_recycling", {}) == want
    assert _tokens(tiny_model_dir, "ngram", {}) == want


@pytest.mark.usefixtures("triton_path")
@pytest.mark.parametrize("method", ["hip", "block_topk"])
def test_sparse_attention_on_triton_prunes_like_the_reference(
    tiny_model_dir: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruned steps through the Triton kernels pick the tokens the PyTorch references do
    (float32: both sides choose the same blocks and sum the same keys)."""
    options = {"method": method, **SMALL}
    got = _tokens(tiny_model_dir, "sparse_attention", options)
    monkeypatch.setenv("SLIPSTREAM_KERNELS", "torch")
    assert got == _tokens(tiny_model_dir, "sparse_attention", options)


@pytest.mark.usefixtures("triton_path")
def test_batch_invariant_bf16_speculation_gives_standard_tokens(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--batch-invariant on the Triton path (as on CUDA), bf16: the invariant kernels run,
    and token recycling and ngram return standard's greedy tokens."""
    from slipstream.engine.batch_invariant import InvariantAttentionBackend
    from slipstream.kernels.invariant_linear import invariant_linear_triton

    monkeypatch.setenv("SLIPSTREAM_PACK_WEIGHTS", "0")  # no CPU packing: the CUDA layout

    rng = random.Random(5)
    # Short (the interpreter runs one program per token and KV head), repeated: drafts accept.
    prompts = [[rng.randrange(3, 500) for _ in range(n)] * 3 + [7] for n in (5, 7)]

    def tokens(decoder: str) -> tuple[list[list[int]], int]:
        config = tiny_engine_config(tiny_model_dir, decoder, dtype="bfloat16", batch_invariant=True)
        engine = LLMEngine(config)
        llama = engine.loaded.model
        assert all(isinstance(b, InvariantAttentionBackend) for b in llama.attn_backends)
        assert llama.layers[0].linear is invariant_linear_triton
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        outs = run_to_completion(engine, prompts, params)
        return [list(o.outputs[0].token_ids) for o in outs], engine.totals.spec_num_draft_tokens

    want, _ = tokens("standard")
    for decoder in ("token_recycling", "ngram"):
        got, drafted = tokens(decoder)
        assert drafted > 0 and got == want, decoder
