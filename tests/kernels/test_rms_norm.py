"""rms_norm.cpp (residual add + RMSNorm + bf16 cast) against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels.cpu.rms_norm import (
    add_rms_norm_bf16,
    add_rms_norm_ref,
    fused_norm_applies,
    rms_norm_unavailable_reason,
)

pytestmark = pytest.mark.skipif(
    rms_norm_unavailable_reason() is not None, reason=f"{rms_norm_unavailable_reason()}"
)
EPS = 1e-5


def _inputs(rows: int, hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen) * 3
    delta = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
    weight = torch.rand(hidden, generator=gen) + 0.5
    return h, delta, weight


@pytest.mark.parametrize(("rows", "hidden"), [(1, 16), (1, 576), (9, 576), (70, 96), (0, 32)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_matches_the_reference(rows: int, hidden: int, with_delta: bool) -> None:
    h, delta, weight = _inputs(rows, hidden, seed=rows + hidden)
    d = delta if with_delta else None
    h_ref = h.clone()
    want = add_rms_norm_ref(h_ref, d, weight, EPS, torch.bfloat16)
    got = add_rms_norm_bf16(h, d, weight, EPS)
    # The residual add is one float32 add either way: exact.
    assert torch.equal(h, h_ref)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, hidden)
    # The sum of squares runs in another order: at most one bf16 step (2^-8 relative) off.
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2**-8)
    if rows:
        assert (got == want).float().mean() > 0.98


def test_a_row_does_not_depend_on_the_other_rows() -> None:
    h, delta, weight = _inputs(80, 64, seed=1)  # 80 rows: the threaded path
    together = add_rms_norm_bf16(h.clone(), delta, weight, EPS)
    alone = torch.cat(
        [add_rms_norm_bf16(h[i : i + 1].clone(), delta[i : i + 1], weight, EPS) for i in range(80)]
    )
    assert torch.equal(together, alone)


def test_applies_only_to_hidden_sizes_of_whole_vectors() -> None:
    assert fused_norm_applies(576)
    assert not fused_norm_applies(100)


def test_turned_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIPSTREAM_CPU_KERNELS", "0")
    assert rms_norm_unavailable_reason() == "turned off by SLIPSTREAM_CPU_KERNELS=0"
    assert not fused_norm_applies(576)
