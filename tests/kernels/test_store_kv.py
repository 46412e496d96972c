"""store_kv: Triton (interpreter on CPU) vs the reference, exact; the reference vs a loop."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels.store_kv import store_kv, store_kv_ref, store_kv_triton

BLOCK_SIZE = 16


def make_inputs(
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    cache_dtype: torch.dtype | None = None,
    skip: tuple[int, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """k, v, two NaN-free caches and distinct random slots (-1 at the `skip` positions)."""
    num_blocks = num_tokens // BLOCK_SIZE + 3
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=cache_dtype or dtype, device=device)
    v_cache = torch.randn(shape, dtype=cache_dtype or dtype, device=device)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:num_tokens]
    slots[list(skip)] = -1
    return k, v, k_cache, v_cache, slots


def run_both(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Apply ref and triton to copies of the caches and check they end up identical."""
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    k_out, v_out = k_cache.clone(), v_cache.clone()
    store_kv_triton(k, v, k_out, v_out, slots)
    assert torch.equal(k_out, k_ref)
    assert torch.equal(v_out, v_ref)


@pytest.mark.parametrize(
    "num_tokens, num_kv_heads, head_dim", [(1, 1, 16), (7, 3, 64), (33, 4, 40), (16, 2, 128)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_ref_exactly(
    num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str
) -> None:
    """Odd sizes, a full block, head dims not a power of two; -1 slots skipped."""
    skip = (0, num_tokens - 1) if num_tokens > 2 else ()
    run_both(*make_inputs(num_tokens, num_kv_heads, head_dim, dtype, device, skip=skip))


def test_triton_takes_int32_slots(device: str) -> None:
    """int32 slot ids (the launcher accepts both index widths) store the same rows."""
    k, v, k_cache, v_cache, slots = make_inputs(9, 3, 64, torch.bfloat16, device, skip=(4,))
    run_both(k, v, k_cache, v_cache, slots.to(torch.int32))


@pytest.mark.gpu
def test_triton_casts_to_cache_dtype() -> None:
    """fp32 K/V into a bf16 cache round to nearest even, as torch does.

    GPU only: Triton 3.9's interpreter truncates fp32 -> bf16, one ulp off torch.
    """
    run_both(*make_inputs(9, 3, 64, torch.float32, "cuda", torch.bfloat16, skip=(2,)))


def test_triton_reads_strided_inputs(device: str) -> None:
    """K and V as column slices of one fused qkv projection (token stride != heads * dim)."""
    qkv = torch.randn(5, 9 + 3 + 3, 32, device=device)
    k, v = qkv[:, 9:12], qkv[:, 12:]
    _, _, k_cache, v_cache, slots = make_inputs(5, 3, 32, torch.float32, device, skip=(2,))
    run_both(k, v, k_cache, v_cache, slots)


def test_all_skipped_and_empty_batches_leave_cache_alone(device: str) -> None:
    """Every slot -1, or no tokens at all: the cache is unchanged, nothing raises."""
    k, v, k_cache, v_cache, slots = make_inputs(4, 2, 16, torch.float32, device, skip=(0, 1, 2, 3))
    before = k_cache.clone()
    store_kv_triton(k, v, k_cache, v_cache, slots)
    store_kv_ref(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, before)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    store_kv_triton(k[:0], v[:0], k_cache, v_cache, empty)
    store_kv_ref(k[:0], v[:0], k_cache, v_cache, empty)
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("skip", [(), (1, 4)])
def test_reference_matches_python_loop(skip: tuple[int, ...]) -> None:
    """The reference's fast path (no -1) and masked path both equal a per-token loop."""
    k, v, k_cache, v_cache, slots = make_inputs(6, 2, 16, torch.bfloat16, "cpu", skip=skip)
    k_loop, v_loop = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_loop[slot // BLOCK_SIZE, slot % BLOCK_SIZE] = k[t]
            v_loop[slot // BLOCK_SIZE, slot % BLOCK_SIZE] = v[t]
    store_kv_ref(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_loop)
    assert torch.equal(v_cache, v_loop)


def test_dispatch_follows_backend_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLIPSTREAM_KERNELS=triton and =torch both store the same rows."""
    k, v, k_cache, v_cache, slots = make_inputs(5, 2, 16, torch.float32, "cpu", skip=(3,))
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SLIPSTREAM_KERNELS", backend)
        k_out, v_out = k_cache.clone(), v_cache.clone()
        store_kv(k, v, k_out, v_out, slots)
        results.append((k_out, v_out))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(
    "field, bad, message",
    [
        ("k", lambda t: t[:, :1], "alike"),
        ("v_cache", lambda t: t[:-1], "4-d alike"),
        ("k_cache", lambda t: t[..., :8], "head_dim"),
        ("k_cache", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3), "stride"),
        ("slot_mapping", lambda t: t[:2], "slot_mapping"),
        ("slot_mapping", lambda t: t.float(), "int32 or int64"),
        ("v", lambda t: t.to(torch.int32), "fp16, bf16 or fp32"),
        ("k", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), "stride"),
    ],
)
def test_triton_launcher_rejects_bad_arguments(field: str, bad, message: str) -> None:  # type: ignore[no-untyped-def]
    """Wrong shapes, strides or dtypes raise ValueError naming the problem, before launch."""
    names = ["k", "v", "k_cache", "v_cache", "slot_mapping"]
    kwargs = dict(zip(names, make_inputs(4, 2, 16, torch.float32, "cpu"), strict=True))
    if field == "k_cache":
        kwargs["v_cache"] = bad(kwargs["v_cache"])
    kwargs[field] = bad(kwargs[field])
    with pytest.raises(ValueError, match=message):
        store_kv_triton(**kwargs)


@pytest.mark.gpu
def test_triton_matches_ref_on_gpu() -> None:
    """A realistic prefill-sized scatter on the GPU, bf16, with skipped slots."""
    run_both(*make_inputs(4096, 3, 64, torch.bfloat16, "cuda", skip=(0, 100, 4095)))
