"""The C++ decode attention kernels with chunk lists (block-sparse; bf16 and float32, each
where it builds) against the plain masked math and the dense kernel; when
sparse_paged_attention dispatches to them."""

from __future__ import annotations

import pytest
import torch

from slipstream.kernels import sparse_paged_attention as spa
from slipstream.kernels.cpu.paged_decode_attention import (
    decode_attention_unavailable_reason,
    paged_decode_attention,
)
from tests.kernels.test_paged_decode_attention import _kernel_dtypes
from tests.kernels.test_sparse_kernels import CASES, SCALE, _batch, _naive, _random_chunks, _tree
from tests.kernels.tolerances import TOL, assert_close_verbose

BF16 = torch.bfloat16


@pytest.fixture(params=_kernel_dtypes())
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """The dtype of queries and caches (each kernel's own)."""
    return request.param  # type: ignore[no-any-return]


def _cpp(
    batch: dict[str, torch.Tensor],
    chunks: torch.Tensor | None,
    chunk: int,
    tree: torch.Tensor | None,
) -> torch.Tensor:
    return paged_decode_attention(
        batch["q"],
        batch["k_cache"],
        batch["v_cache"],
        batch["block_tables"],
        batch["query_start_loc"],
        batch["seq_lens"],
        SCALE,
        tree,
        None,
        chunks,
        chunk,
    )


@pytest.mark.parametrize("lens, num_q, is_tree", CASES)
@pytest.mark.parametrize("chunk", [2, 3, 16])  # 3 does not tile the pages; 16 spans several
@pytest.mark.parametrize("block_size", [4, 16])
def test_matches_masked_dense_math(
    lens: list[int],
    num_q: list[int],
    is_tree: bool,
    chunk: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    batch = _batch(
        lens, num_q, heads=6, kv_heads=2, head_dim=64, block_size=block_size, dtype=dtype
    )
    chunks = _random_chunks(lens, num_q, 2, chunk)
    tree = _tree(num_q) if is_tree else None
    expected = _naive(batch, chunks, chunk, tree)
    assert_close_verbose(_cpp(batch, chunks, chunk, tree), expected, **TOL[dtype])


def test_long_context_with_few_chunks_and_int32_ids(dtype: torch.dtype) -> None:
    # 3000 cached keys, 20 pages of 16 per KV head (kv heads choosing different pages), the
    # padding first: the kernel sorts the ids, so order and dtype must not matter.
    lens, num_q = [3001, 1500], [1, 1]
    batch = _batch(lens, num_q, heads=9, kv_heads=3, head_dim=64, block_size=16, dtype=dtype)
    chunks = torch.full((2, 3, 22), -1, dtype=torch.int32)
    for b, seq_len in enumerate(lens):
        for g in range(3):
            chunks[b, g, 2:] = torch.randperm((seq_len - 1) // 16)[:20].int()
    expected = _naive(batch, chunks.long(), 16, None)
    assert_close_verbose(_cpp(batch, chunks, 16, None), expected, **TOL[dtype])


@pytest.mark.parametrize("lens, num_q, is_tree", CASES)
def test_every_chunk_listed_gives_the_dense_kernels_bits(
    lens: list[int], num_q: list[int], is_tree: bool, dtype: torch.dtype
) -> None:
    batch = _batch(lens, num_q, heads=4, kv_heads=2, head_dim=128, dtype=dtype)
    width = max(lens)
    # Shuffled ids: the kernel reads them in position order, as the dense kernel does.
    chunks = torch.stack([torch.randperm(width) for _ in range(2 * len(lens))])
    chunks = chunks.view(len(lens), 2, width)
    tree = _tree(num_q) if is_tree else None
    assert torch.equal(_cpp(batch, chunks, 1, tree), _cpp(batch, None, 0, tree))


def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(dtype: torch.dtype) -> None:
    lens, num_q = [40, 75, 23], [1, 3, 1]
    batch = _batch(lens, num_q, heads=6, kv_heads=2, head_dim=64, dtype=dtype)
    chunks = _random_chunks(lens, num_q, 2, 4)
    together = _cpp(batch, chunks, 4, None)
    alone = {
        **batch,
        "q": batch["q"][1:4],
        "block_tables": batch["block_tables"][1:2],
        "query_start_loc": torch.tensor([0, 3], dtype=torch.int32),
        "seq_lens": batch["seq_lens"][1:2],
    }
    assert torch.equal(_cpp(alone, chunks[1:2], 4, None), together[1:4])


def test_bad_chunk_arguments_raise(dtype: torch.dtype) -> None:
    batch = _batch([30], [1], heads=2, kv_heads=2, head_dim=64, dtype=dtype)
    with pytest.raises(ValueError, match="chunks"):
        _cpp(batch, torch.zeros(1, 3, 2, dtype=torch.long), 4, None)
    with pytest.raises(ValueError, match="chunk_size"):
        _cpp(batch, torch.zeros(1, 2, 2, dtype=torch.long), 0, None)


@pytest.mark.parametrize(
    "dtype, takes_kernel", [(BF16, True), (torch.float32, True), (torch.float16, False)]
)
def test_sparse_attention_dispatches_bf16_and_float32_steps_here(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, takes_kernel: bool
) -> None:
    calls: list[int] = []
    real = spa.paged_decode_attention

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    if takes_kernel and decode_attention_unavailable_reason(dtype) is not None:
        pytest.skip(f"{dtype}: {decode_attention_unavailable_reason(dtype)}")
    monkeypatch.setattr(spa, "paged_decode_attention", counting)
    lens, num_q = [50, 33], [1, 2]
    batch = _batch(lens, num_q, heads=6, kv_heads=2, head_dim=64, dtype=dtype)
    chunks = _random_chunks(lens, num_q, 2, 4)
    out = spa.sparse_paged_attention(
        *(batch[k] for k in ("q", "k_cache", "v_cache", "block_tables")),
        batch["query_start_loc"],
        batch["seq_lens"],
        chunks,
        4,
        SCALE,
    )
    assert len(calls) == (1 if takes_kernel else 0)
    assert_close_verbose(out, _naive(batch, chunks, 4, None), **TOL[dtype])
