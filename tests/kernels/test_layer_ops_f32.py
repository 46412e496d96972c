"""layer_ops_f32.cpp (float32 add + RMSNorm, RoPE, SiLU * up) against the PyTorch ops the
layer runs without it; each row's bits independent of the other rows."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels.cpu.layer_ops import rope_ref, silu_mul_ref
from slipstream.kernels.cpu.layer_ops_f32 import (
    add_rms_norm_f32,
    layer_ops_f32_fit,
    layer_ops_f32_unavailable_reason,
    rope_f32,
    silu_mul_f32,
)
from slipstream.kernels.cpu.rms_norm import add_rms_norm_ref
from tests.kernels.test_layer_ops import _cos_sin
from tests.kernels.tolerances import TOL, assert_close_verbose

pytestmark = pytest.mark.skipif(
    layer_ops_f32_unavailable_reason() is not None,
    reason=f"{layer_ops_f32_unavailable_reason()}",
)
F32 = torch.float32


@pytest.mark.parametrize("rows", [1, 9, 100])  # 100: the threaded path
@pytest.mark.parametrize("hidden", [576, 13])  # 13: a masked tail
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_the_torch_ops(rows: int, hidden: int, with_delta: bool) -> None:
    gen = torch.Generator().manual_seed(rows + hidden)
    h = 5 * torch.randn(rows, hidden, generator=gen)
    delta = torch.randn(rows, hidden, generator=gen) if with_delta else None
    weight = torch.rand(hidden, generator=gen) + 0.5
    h_ref = h.clone()
    got = add_rms_norm_f32(h, delta, weight, 1e-5)
    want = add_rms_norm_ref(h_ref, delta, weight, 1e-5, F32)
    assert got.dtype == F32 and got.shape == (rows, hidden)
    assert torch.equal(h, h_ref)  # the residual add, in place, is one float32 add either way
    assert_close_verbose(got, want, **TOL[F32])


def test_a_norm_row_does_not_depend_on_the_other_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(33, 576, generator=gen)
    delta = torch.randn(33, 576, generator=gen)
    weight = torch.rand(576, generator=gen)
    together = add_rms_norm_f32(h.clone(), delta, weight, 1e-6)
    for r in (0, 17, 32):
        alone = add_rms_norm_f32(h[r : r + 1].clone(), delta[r : r + 1], weight, 1e-6)
        assert torch.equal(alone[0], together[r])


@pytest.mark.parametrize("head_dim, heads, kv_heads", [(64, 9, 3), (128, 4, 2), (48, 2, 1)])
@pytest.mark.parametrize("positions", [[7], [0, 1, 2, 300, 8000]])
def test_rope_matches_the_torch_ops(
    head_dim: int, heads: int, kv_heads: int, positions: list[int]
) -> None:
    qkv = 3 * torch.randn(len(positions), (heads + 2 * kv_heads) * head_dim)
    cos, sin = _cos_sin(positions, head_dim, F32)
    got = rope_f32(qkv, heads + kv_heads, head_dim, cos, sin)
    want = rope_ref(qkv, heads + kv_heads, head_dim, cos, sin)
    assert got.shape == (len(positions), heads + kv_heads, head_dim)
    # One fused multiply-add where PyTorch rounds the product first: within an ulp or two.
    assert_close_verbose(got, want, **TOL[F32])


@pytest.mark.parametrize("tokens", [1, 9, 40])  # 40: the threaded path
def test_silu_mul_matches_the_torch_ops(tokens: int) -> None:
    gate_up = 4 * torch.randn(tokens, 2 * 1536)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp clamping, zeros
    got = silu_mul_f32(gate_up, 1536)
    want = silu_mul_ref(gate_up, 1536)
    assert got.shape == want.shape and got.dtype == F32
    assert torch.isfinite(got).all()
    # A polynomial exp where PyTorch's is Sleef's: a few float32 ulps.
    assert_close_verbose(got, want, atol=1e-6, rtol=1e-6)


def test_unsupported_sizes_raise_and_fit_says_so() -> None:
    cos, sin = _cos_sin([3], 40, F32)
    with pytest.raises(ValueError, match="multiple of 16"):
        rope_f32(torch.zeros(1, 4 * 40), 3, 40, cos, sin)
    with pytest.raises(ValueError, match="% 8"):
        silu_mul_f32(torch.zeros(1, 2 * 12), 12)
    assert layer_ops_f32_fit(64, 1536)
    assert not layer_ops_f32_fit(40, 1536) and not layer_ops_f32_fit(64, 12)
