"""Paged attention in Triton (CUDA): one kernel for prefill, decode and tree verification,
with key splits (flash-decoding) merged by a combine kernel, plus the launch plan and the
argument checks every paged kernel shares.

Semantics: kernels/paged_attention.py; tested against paged_attention_ref
(paged_attention_torch.py) under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from slipstream.kernels._dispatch import dot_settings


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    query_start_loc_ptr,  # [num_seqs + 1]
    seq_lens_ptr,  # [num_seqs]
    tree_mask_ptr,  # [num_tokens, max_query_len] uint8 (unused when not IS_TREE)
    part_acc_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM_P] fp32 (NUM_SPLITS > 1)
    part_ml_ptr,  # [num_tokens, num_heads, NUM_SPLITS, 2] fp32: running max (log2), sum
    scale_log2,  # softmax scale * log2(e): exp2 is cheaper than exp
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_bt_seq,
    stride_tm_tok,
    PAGE_SIZE: tl.constexpr,  # cache block_size (tokens per page), any value
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # power of two >= max(HEAD_DIM, 16)
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # power of two >= GROUP
    BLOCK_Q: tl.constexpr,  # new tokens per program; rows = BLOCK_Q * GROUP_P
    BLOCK_N: tl.constexpr,  # keys per inner step
    IS_TREE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 (tf32 would miss 1e-5), else "tf32"
    UPCAST: tl.constexpr,  # run the dots in fp32 (the interpreter's bf16 tl.dot is wrong)
    NUM_SPLITS: tl.constexpr,  # programs sharing one (seq, kv_head, q_block)'s keys
):
    """Program (seq, kv_head, q_block * NUM_SPLITS + split): BLOCK_Q tokens x GROUP heads
    against the split's share of the visible keys (all of them when NUM_SPLITS = 1; else
    the partials go to combine_splits, as flash-decoding does)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    num_q = tl.load(query_start_loc_ptr + seq + 1).to(tl.int64) - q_start
    if q_block * BLOCK_Q < num_q:
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
        ctx = seq_len - num_q

        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
        rows = tl.arange(0, BLOCK_M)
        tok = q_block * BLOCK_Q + rows // GROUP_P  # [BLOCK_M] index among the new tokens
        head = kv_head * GROUP + rows % GROUP_P
        row_ok = (tok < num_q) & (rows % GROUP_P < GROUP)
        d = tl.arange(0, HEAD_DIM_P)
        d_ok = d < HEAD_DIM
        q_off = (q_start + tok)[:, None] * stride_q_tok + head[:, None] * stride_q_head
        q = tl.load(q_ptr + q_off + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
        # Causal: this block's last token sees keys < ctx + its index + 1; a tree may see any.
        kv_end = seq_len
        if not IS_TREE:
            kv_end = tl.minimum(seq_len, ctx + (q_block + 1) * BLOCK_Q)
        share = tl.cdiv(tl.cdiv(kv_end, BLOCK_N), NUM_SPLITS) * BLOCK_N
        for n0 in range(split * share, tl.minimum(kv_end, (split + 1) * share), BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
            pos_ok = pos < kv_end
            bt_off = seq * stride_bt_seq + pos // PAGE_SIZE
            page = tl.load(block_tables_ptr + bt_off, mask=pos_ok, other=0).to(tl.int64)
            slot = pos % PAGE_SIZE
            k_off = page * stride_k_block + slot * stride_k_slot + kv_head * stride_k_head
            kv_mask = pos_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2

            new = pos - ctx  # [BLOCK_N] index among the new tokens (< 0: cached)
            if IS_TREE:
                tm_off = (q_start + tok)[:, None] * stride_tm_tok + new[None, :]
                tm_ok = row_ok[:, None] & (new >= 0)[None, :] & pos_ok[None, :]
                tm = tl.load(tree_mask_ptr + tm_off, mask=tm_ok, other=0)
                visible = (new < 0)[None, :] | (tm != 0)
            else:
                visible = new[None, :] <= tok[:, None]
            visible = visible & pos_ok[None, :]
            s = tl.where(visible, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            # NOTE: a row with nothing visible yet has m_new = -inf; shift by 0 instead,
            # or exp2(-inf - -inf) = NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_off = page * stride_v_block + slot * stride_v_slot + kv_head * stride_v_head
            v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = v.to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        store_rows(
            out_ptr, part_acc_ptr, part_ml_ptr, acc, m_i, l_i, q_start + tok, head, row_ok, d,
            d_ok, stride_o_tok, stride_o_head, GROUP * tl.num_programs(1), split, NUM_SPLITS,
            HEAD_DIM_P,
        )  # fmt: skip


@triton.jit
def store_rows(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_acc_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM_P] fp32 (NUM_SPLITS > 1)
    part_ml_ptr,  # [num_tokens, num_heads, NUM_SPLITS, 2] fp32
    acc,  # [BLOCK_M, HEAD_DIM_P] fp32, unnormalised
    m_i,  # [BLOCK_M] running max (log2 domain)
    l_i,  # [BLOCK_M] running sum
    token,  # [BLOCK_M] int64 row of q
    head,  # [BLOCK_M]
    row_ok,  # [BLOCK_M]
    d,  # [HEAD_DIM_P] arange
    d_ok,  # [HEAD_DIM_P]
    stride_o_tok,
    stride_o_head,
    num_heads,
    split,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
):
    """The rows' normalised output; or, split, this split's partial softmax for
    combine_splits (row (token, head) holds NUM_SPLITS contiguous entries)."""
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_off = token[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :]
        o_mask = row_ok[:, None] & d_ok[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        part = (token * num_heads + head) * NUM_SPLITS + split
        acc_off = part[:, None] * HEAD_DIM_P + d[None, :]
        tl.store(part_acc_ptr + acc_off, acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    part_acc_ptr,  # [num_tokens * num_heads, NUM_SPLITS, HEAD_DIM_P] fp32
    part_ml_ptr,  # [num_tokens * num_heads, NUM_SPLITS, 2] fp32
    out_ptr,  # [num_tokens, num_heads, head_dim]
    num_heads,
    stride_o_tok,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P: tl.constexpr,  # power of two >= NUM_SPLITS
):
    """Program (token * num_heads + head): merge the splits' partial softmaxes."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPLITS_P)
    sp_ok = sp < NUM_SPLITS
    d = tl.arange(0, HEAD_DIM_P)
    m = tl.load(part_ml_ptr + (row * NUM_SPLITS + sp) * 2, mask=sp_ok, other=float("-inf"))
    ls = tl.load(part_ml_ptr + (row * NUM_SPLITS + sp) * 2 + 1, mask=sp_ok, other=0.0)
    acc_off = (row * NUM_SPLITS + sp)[:, None] * HEAD_DIM_P + d[None, :]
    acc = tl.load(part_acc_ptr + acc_off, mask=sp_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_safe))  # [SPLITS_P]
    total = tl.sum(w * ls, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tok = row // num_heads
    head = row % num_heads
    o_off = tok * stride_o_tok + head * stride_o_head + d
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


_SM_COUNT: dict[int, int] = {}


def auto_splits(q: torch.Tensor, programs: int, key_tiles: int) -> int:
    """Splits so that ~2 programs run per SM, each with >= 2 key tiles; 1 off CUDA.

    H200, batch 4, 8 KV heads, ~1100 selected keys (17 tiles of 64): 32 programs alone
    took 0.085 ms for ~18 MB of K/V (session 15), a few microseconds of bandwidth."""
    if not q.is_cuda:
        return 1
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    wanted = triton.cdiv(2 * _SM_COUNT[index], max(1, programs))
    return max(1, min(wanted, key_tiles // 2, 32))


def partials(
    q: torch.Tensor, num_splits: int, head_dim_p: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for per-split partial softmaxes, row (token, head) owning num_splits entries:
    [num_tokens, num_heads, num_splits, head_dim_p] accumulators and [..., 2] (max, sum)."""
    num_tokens, num_heads = q.shape[0], q.shape[1]
    part_acc = q.new_empty((num_tokens, num_heads, num_splits, head_dim_p), dtype=torch.float32)
    part_ml = q.new_empty((num_tokens, num_heads, num_splits, 2), dtype=torch.float32)
    return part_acc, part_ml


def split_partials(
    q: torch.Tensor, num_splits: int, head_dim_p: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """partials' scratch, or q itself as an unused placeholder for one split."""
    return (q, q) if num_splits == 1 else partials(q, num_splits, head_dim_p)


def combine_splits(
    part_acc: torch.Tensor,  # [num_tokens, num_heads, num_splits, head_dim_p] fp32
    part_ml: torch.Tensor,  # [num_tokens, num_heads, num_splits, 2] fp32
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written
    head_dim: int,
) -> None:
    """Merge the splits' partial softmaxes into out: one program per (token, head)."""
    num_tokens, num_heads, num_splits, head_dim_p = part_acc.shape
    _combine_splits_kernel[(num_tokens * num_heads,)](
        part_acc,
        part_ml,
        out,
        num_heads,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p,
        NUM_SPLITS=num_splits,
        SPLITS_P=triton.next_power_of_2(num_splits),
    )


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def paged_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
    num_splits: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Triton launcher: checks the arguments, then num_splits programs per (seq, kv head,
    q block) over the keys, merged by combine_splits when more than one. num_splits=None:
    auto_splits' choice (1 in the interpreter)."""
    check_paged_attention_args(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, tree_mask
    )
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_tokens, head_dim = q.shape[0], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    # The longest sequence bounds the keys without a sync: the block table's width.
    lp = plan_launch(
        q, tree_mask, num_kv_heads, num_seqs, block_tables.shape[1] * block_size, num_splits
    )
    tm = lp.tree_mask
    _paged_attention_kernel[lp.grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        seq_lens,
        tm,
        lp.part_acc,
        lp.part_ml,
        scale * 1.4426950408889634,  # log2(e)
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        tm.stride(0) if tree_mask is not None else 0,
        PAGE_SIZE=block_size,
        HEAD_DIM=head_dim,
        **lp.kernel_constants,
    )
    if lp.num_splits > 1:
        combine_splits(lp.part_acc, lp.part_ml, out, head_dim)
    return out


@dataclass(frozen=True)
class LaunchPlan:
    """Tiles, grid and split scratch of one paged (or sparse paged) attention launch."""

    grid: tuple[int, int, int]
    tree_mask: torch.Tensor  # uint8 view of the tree mask, or q as an unused placeholder
    num_splits: int
    part_acc: torch.Tensor  # split partials (q as a placeholder when num_splits == 1)
    part_ml: torch.Tensor
    kernel_constants: dict[str, Any]  # the constexprs both kernels take alike


def plan_launch(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], num_tokens > 0
    tree_mask: torch.Tensor | None,
    num_kv_heads: int,
    num_seqs: int,
    max_keys: int,  # bound on the keys one (seq, kv head) walks, known without a sync
    num_splits: int | None,
) -> LaunchPlan:
    """Row tiles, key tiles, the split count (auto_splits' unless given) and its scratch."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    # The longest query run, without a device sync: the tree mask's width, else num_tokens
    # (programs past a sequence's end exit at once).
    max_query_len = num_tokens if tree_mask is None else min(num_tokens, tree_mask.shape[1])
    # tl.dot needs >= 16 rows: decode packs 16 // group_p tokens' worth of rows (mostly
    # masked when n_q = 1); longer runs use 64-row tiles.
    rows = 16 if max_query_len * group_p <= 16 else 64
    block_q = max(1, rows // group_p)
    block_n = 64 if q.is_cuda else 16  # small tiles keep the CPU interpreter quick
    q_blocks = triton.cdiv(max_query_len, block_q)
    key_tiles = triton.cdiv(max_keys, block_n)
    if num_splits is None:
        num_splits = auto_splits(q, num_seqs * num_kv_heads * q_blocks, key_tiles)
    num_splits = max(1, min(num_splits, key_tiles))
    upcast, precision = dot_settings(q.dtype)
    head_dim_p = max(16, triton.next_power_of_2(head_dim))
    part_acc, part_ml = split_partials(q, num_splits, head_dim_p)
    return LaunchPlan(
        grid=(num_seqs, num_kv_heads, q_blocks * num_splits),
        tree_mask=tree_mask.view(torch.uint8) if tree_mask is not None else q,
        num_splits=num_splits,
        part_acc=part_acc,
        part_ml=part_ml,
        kernel_constants={
            "HEAD_DIM_P": head_dim_p,
            "GROUP": group,
            "GROUP_P": group_p,
            "BLOCK_Q": block_q,
            "BLOCK_N": block_n,
            "IS_TREE": tree_mask is not None,
            "DOT_PRECISION": precision,
            "UPCAST": upcast,
            "NUM_SPLITS": num_splits,
        },
    )


def check_paged_attention_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tree_mask: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the first argument whose shape, stride or dtype is wrong."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"q must be 3-d and k_cache 4-d; got {tuple(q.shape)}, {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if q.dtype not in _FLOAT_DTYPES or k_cache.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q/k_cache dtypes must be fp16/bf16/fp32; got {q.dtype}, {k_cache.dtype}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} != k_cache dtype {k_cache.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit last-dim stride; strides {t.stride()}")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} must be [{num_seqs}, *]")
    if query_start_loc.shape != (num_seqs + 1,) or seq_lens.dim() != 1:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)} must be [{num_seqs + 1}]"
            f" and seq_lens 1-d, got {tuple(seq_lens.shape)}"
        )
    for name, t in (
        ("block_tables", block_tables),
        ("query_start_loc", query_start_loc),
        ("seq_lens", seq_lens),
    ):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit last-dim stride; strides {t.stride()}")
    if tree_mask is not None:
        if tree_mask.dtype != torch.bool or tree_mask.dim() != 2:
            raise ValueError(
                f"tree_mask must be 2-d bool, got {tree_mask.dtype} {tree_mask.dim()}-d"
            )
        if tree_mask.shape[0] != num_tokens or tree_mask.stride(-1) != 1:
            raise ValueError(
                f"tree_mask {tuple(tree_mask.shape)} strides {tree_mask.stride()} must be"
                f" [{num_tokens}, max_query_len] with a unit last-dim stride"
            )
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, query_start_loc, seq_lens)}
    if tree_mask is not None:
        devices.add(tree_mask.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
