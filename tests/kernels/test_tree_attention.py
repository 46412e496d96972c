"""Tree attention: the cascade reference vs the plain paged-attention loop, and the Triton
kernel (interpreter on CPU) vs the reference, over odd shapes and page boundaries."""

from __future__ import annotations

import pytest
import torch

from slipstream.decoding.draft_tree import subtree, template
from slipstream.kernels.paged_attention import _paged_attention_loop
from slipstream.kernels.tree_attention import (
    tree_attention,
    tree_attention_ref,
    tree_attention_triton,
)
from tests.kernels.tolerances import TOL, assert_close_verbose

SCALE = 0.25


def _mask(parents: list[int]) -> torch.Tensor:  # [n, n] bool, ancestor-or-self
    n = len(parents)
    m = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] |= m[p]
    return m


def _batch(
    ctx_lens: list[int], trees: list[list[int]], heads: int, kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, device: str,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """A paged batch: each sequence = ctx cached keys + one tree of new tokens."""
    gen = torch.Generator().manual_seed(0)
    lens = [c + len(t) for c, t in zip(ctx_lens, trees, strict=True)]
    pages = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(pages) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # scattered pages
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    k = 0
    for b, n in enumerate(pages):
        tables[b, :n] = torch.tensor(perm[k : k + n])
        k += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    n_tok = sum(len(t) for t in trees)
    q = torch.randn(n_tok, heads, head_dim, generator=gen).to(dtype)
    max_q = max(len(t) for t in trees)
    mask = torch.zeros(n_tok, max_q, dtype=torch.bool)
    starts = [0]
    for t in trees:
        mask[starts[-1] : starts[-1] + len(t), : len(t)] = _mask(t)
        starts.append(starts[-1] + len(t))
    qsl = torch.tensor(starts, dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    return tuple(x.to(device) for x in (q, k_cache, v_cache, tables, qsl, sl, mask))


SMALL_TREE = subtree(template("2.2.2"), list(range(1, 14))).parents  # 14 tokens, 3 levels
CASES = [
    # ctx lengths, trees, (heads, kv_heads, head_dim), block size
    ([9], [[-1, 0, 0, 1]], (2, 1, 16), 4),
    ([0, 17, 5], [[-1, 0], SMALL_TREE, [-1, 0, 1, 1, 0]], (4, 2, 24), 5),
    ([31], [template("2.2.2").parents], (3, 1, 8), 16),  # the full 81-token tree
]


@pytest.mark.parametrize("ctx_lens, trees, heads, block_size", CASES)
def test_reference_matches_paged_loop(
    ctx_lens: list[int], trees: list[list[int]], heads: tuple[int, int, int], block_size: int
) -> None:
    args = _batch(ctx_lens, trees, *heads, block_size, torch.float32, "cpu")
    q, kc, vc, bt, qsl, sl, mask = args
    want = _paged_attention_loop(q, kc, vc, bt, qsl, sl, SCALE, mask)
    assert_close_verbose(
        tree_attention_ref(q, kc, vc, bt, qsl, sl, SCALE, mask), want, **TOL[torch.float32]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ctx_lens, trees, heads, block_size", CASES[:2])
def test_triton_matches_reference(
    device: str, dtype: torch.dtype, ctx_lens: list[int], trees: list[list[int]],
    heads: tuple[int, int, int], block_size: int,
) -> None:  # fmt: skip
    q, kc, vc, bt, qsl, sl, mask = _batch(ctx_lens, trees, *heads, block_size, dtype, device)
    want = tree_attention_ref(q, kc, vc, bt, qsl, sl, SCALE, mask)
    got = tree_attention_triton(q, kc, vc, bt, qsl, sl, SCALE, mask)
    assert_close_verbose(got, want, **TOL[dtype])


def test_dispatch_and_argument_checks() -> None:
    q, kc, vc, bt, qsl, sl, mask = _batch([3], [[-1, 0]], 2, 1, 16, 4, torch.float32, "cpu")
    out = tree_attention(q, kc, vc, bt, qsl, sl, SCALE, mask)
    assert out.shape == q.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="tree_mask"):
        tree_attention_triton(q, kc, vc, bt, qsl, sl, SCALE, mask.int())
