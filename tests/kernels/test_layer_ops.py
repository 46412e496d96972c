"""layer_ops.cpp (bf16 RoPE, SiLU * up) and store_kv.cpp (the K/V store, any dtype) against
the PyTorch ops the layer runs without them, and where the engine takes them."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels import store_kv as sk
from slipstream.kernels.cpu.layer_ops import (
    layer_ops_unavailable_reason,
    rope_bf16,
    rope_ref,
    silu_mul_bf16,
    silu_mul_ref,
    store_kv_unavailable_reason,
)
from slipstream.kernels.store_kv import store_kv_ref

needs_bf16_ops = pytest.mark.skipif(
    layer_ops_unavailable_reason() is not None, reason=f"{layer_ops_unavailable_reason()}"
)
needs_store_kv = pytest.mark.skipif(
    store_kv_unavailable_reason() is not None, reason=f"{store_kv_unavailable_reason()}"
)
BF16 = torch.bfloat16


def _cos_sin(
    positions: list[int], head_dim: int, dtype: torch.dtype = BF16
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rope table rows (cos, sin with its first half negated), [T, 1, D] views
    of one [T, 2, 1, D] gather, as LlamaForCausalLM.forward passes them."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    ang = torch.outer(torch.tensor(positions, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], -1)
    sin = ang.sin()
    sin[:, : head_dim // 2] *= -1
    table = torch.stack([ang.cos(), sin], 1).unsqueeze(2).to(dtype)  # [T, 2, 1, D]
    cos_rows, sin_rows = table.unbind(1)
    return cos_rows, sin_rows


@needs_bf16_ops
@pytest.mark.parametrize("head_dim, heads, kv_heads", [(64, 9, 3), (128, 4, 2)])
@pytest.mark.parametrize("positions", [[7], [0, 1, 2, 300, 8000]])
def test_rope_is_bit_identical_to_the_torch_ops(
    head_dim: int, heads: int, kv_heads: int, positions: list[int]
) -> None:
    qkv = (3 * torch.randn(len(positions), (heads + 2 * kv_heads) * head_dim)).to(BF16)
    cos, sin = _cos_sin(positions, head_dim)
    got = rope_bf16(qkv, heads + kv_heads, head_dim, cos, sin)
    want = rope_ref(qkv, heads + kv_heads, head_dim, cos, sin)
    assert got.shape == (len(positions), heads + kv_heads, head_dim)
    assert torch.equal(got, want)
    # and it is RoPE: rotating a q and a k preserves their norms (up to bf16 rounding)
    x = qkv[:, : (heads + kv_heads) * head_dim].view_as(got).float()
    torch.testing.assert_close(got.float().norm(dim=-1), x.norm(dim=-1), rtol=0.02, atol=0.05)


@needs_bf16_ops
@pytest.mark.parametrize("tokens", [1, 9, 300])  # 300 x 1536 / 16 chunks: the threaded path
def test_silu_mul_matches_the_torch_ops(tokens: int) -> None:
    gate_up = (4 * torch.randn(tokens, 2 * 1536)).to(BF16)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp clamping, zeros
    got = silu_mul_bf16(gate_up, 1536)
    want = silu_mul_ref(gate_up, 1536)
    assert got.shape == want.shape and got.dtype == BF16
    # Its exp is not PyTorch's (Sleef): equal bits almost everywhere, never over 1 bf16 ulp.
    diff = (got.float() - want.float()).abs()
    ulp = want.float().abs().clamp(min=1e-30) * 2.0**-7
    assert bool((diff <= ulp).all())
    assert (got == want).float().mean() > 0.999


@needs_store_kv
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_store_kv_copies_the_rows_the_reference_copies(dtype: torch.dtype) -> None:
    # k and v as the layer hands them over: views into wider rows (q | k and q | k | v).
    tokens, heads, kv_heads, dim = 5, 6, 2, 64
    rot = torch.randn(tokens, heads + kv_heads, dim).to(dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    k = rot[:, heads:]
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    slots = torch.tensor([17, -1, 3, 40, 41])
    caches = [torch.zeros(4, 16, kv_heads, dim, dtype=dtype) for _ in range(4)]
    sk.store_kv(k, v, caches[0], caches[1], slots)  # the C++ copy on this CPU
    store_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].view(-1, kv_heads, dim)[17].equal(k[0])
    with pytest.raises(IndexError, match="past the cache"):
        sk.store_kv(k, v, caches[0], caches[1], torch.tensor([0, 1, 2, 3, 64]))


@needs_store_kv
def test_store_kv_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = sk.store_kv_cpu
    monkeypatch.setattr(sk, "store_kv_cpu", lambda *a: calls.append(1) or real(*a))
    k = torch.randn(2, 2, 64, dtype=BF16)
    kc, vc = torch.zeros(2, 16, 2, 64, dtype=BF16), torch.zeros(2, 16, 2, 64, dtype=BF16)
    sk.store_kv(k, k, kc, vc, torch.tensor([0, 1]))
    assert calls == [1]
    sk.store_kv(k.float(), k.float(), kc, vc, torch.tensor([2, 3]))  # dtypes differ: reference
    sk.store_kv(k, k, kc, vc, torch.tensor([4, 5], dtype=torch.int32))  # int32 slots: reference
    assert calls == [1]
    assert kc.view(-1, 2, 64)[2].equal(k[0]) and kc.view(-1, 2, 64)[5].equal(k[1])


@needs_bf16_ops
def test_unsupported_sizes_raise() -> None:
    cos, sin = _cos_sin([3], 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        rope_bf16(torch.zeros(1, 4 * 48, dtype=BF16), 3, 48, cos, sin)
    with pytest.raises(ValueError, match="% 16"):
        silu_mul_bf16(torch.zeros(1, 2 * 40, dtype=BF16), 40)
