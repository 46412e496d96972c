"""The one tolerance table for kernel tests, and a comparison that says where values differ."""

from __future__ import annotations

import torch

# NOTE: changing a tolerance is a reviewed change. bf16 keeps 8 mantissa bits (relative step
# 2**-8 = 3.9e-3); attention outputs go through two roundings (P cast to bf16, output cast),
# so 2e-2 leaves ~2.5x headroom. fp32 kernels accumulate in a different order than SDPA.
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def assert_close_verbose(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float
) -> None:
    """Like torch.testing.assert_close, but report how many elements differ and where."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol)
    if not bool(bad.any()):
        return
    where = bad.nonzero()[:5].tolist()
    lines = [
        f"  at {tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in where
    ]
    diff = (a - e).abs().nan_to_num(float("inf")).max().item()
    raise AssertionError(
        f"{int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol},"
        f" max abs diff {diff:.3g}); first ones:\n" + "\n".join(lines)
    )
