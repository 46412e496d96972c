"""hip_mask.cpp (HiP's mask search on CPU) against the plain-Python search and the
reference; hip_mask's CPU dispatch."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels import hip_mask as hm
from slipstream.kernels.cpu.hip_mask import hip_search_unavailable_reason
from tests.kernels.test_sparse_kernels import _batch, _block_scores, _hip_args, _search_plain

pytestmark = pytest.mark.skipif(
    hip_search_unavailable_reason() is not None, reason=f"{hip_search_unavailable_reason()}"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_q, head_dim, block_k", [([1, 1], 16, 2), ([3, 1], 20, 3)])
def test_matches_plain_search_and_reference(
    num_q: list[int], head_dim: int, block_k: int, dtype: torch.dtype
) -> None:
    lens = [130, 95]
    batch = _batch(lens, num_q, heads=4, kv_heads=2, head_dim=head_dim, block_size=8, dtype=dtype)
    start, end = torch.tensor([2, 1]), torch.tensor([40, 29])
    args = _hip_args(batch, start, end, 5, block_k)
    got = hm.hip_mask(*args)  # the C++ search on this CPU
    assert torch.equal(got, hm.hip_mask_ref(*args))
    for b in range(2):
        scores = _block_scores(batch, b, block_k)
        for h in range(2):
            want = _search_plain(scores[h].tolist(), int(start[b]), int(end[b]), 5)
            assert got[b, h].tolist() == want


def test_small_and_empty_regions() -> None:
    batch = _batch([40, 40], [1, 1], block_size=8)
    got = hm.hip_mask(*_hip_args(batch, torch.tensor([3, 9]), torch.tensor([7, 9]), 6, 2))
    assert got[0, 0].tolist() == [3, 4, 5, 6, -1, -1]  # 4 blocks <= 6: returned whole
    assert got[1, 1].tolist() == [-1] * 6  # nothing to search


def test_cpu_dispatch_takes_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hm.hip_mask_search

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hm, "hip_mask_search", counting)
    batch = _batch([60], [1], block_size=8)
    args = (batch["q"], batch["k_cache"], batch["block_tables"], batch["query_start_loc"])
    hm.hip_mask(*args, torch.tensor([0]), torch.tensor([25]), 4, 2)
    assert calls == [1]
    with pytest.raises(ValueError, match="num_select"):
        hm.hip_mask(*args, torch.tensor([0]), torch.tensor([25]), 0, 2)
    with pytest.raises(ValueError, match="region_start"):
        hm.hip_mask(*args, torch.tensor([0, 1]), torch.tensor([25]), 4, 2)
    # float16 caches, and caches that are not contiguous, keep the reference
    strided = batch["k_cache"].repeat(1, 1, 1, 2)[..., : batch["k_cache"].shape[-1]]
    assert not strided.is_contiguous() and strided.stride(-1) == 1
    for other in ((batch["q"].half(), batch["k_cache"].half()), (batch["q"], strided)):
        kept = (*other, *args[2:])
        got = hm.hip_mask(*kept, torch.tensor([0]), torch.tensor([25]), 4, 2)
        assert calls == [1] and torch.equal(
            got, hm.hip_mask_ref(*kept, torch.tensor([0]), torch.tensor([25]), 4, 2)
        )
