"""Batch-invariant paged attention: a query's output bits depend only on its own keys, visited
in position order, never on the step's other tokens or on where its keys sit in the cache.

paged_attention.py's semantics (see its docstring), computed so that verifying a draft
token gives exactly what decoding it alone would:
- a query at position p visits positions 0..p in tiles of BLOCK_N aligned to position 0,
  and in splits of SPLIT_KEYS positions merged in order; both depend on p alone. In tree
  verification a node's keys past the cached context are its ancestors, which sit at tree
  slots, not at consecutive ones: the tile reads position ctx + j from the slot of the
  node's j-th visible new token (`tail`), so the same keys meet the same arithmetic as in
  one-row decoding, where they sit at consecutive slots.
- one program per (token, KV head, split): no row of another token shares its reductions.
- the dot products are elementwise multiplies and fixed-shape sums (no tensor-core MMA,
  whose layout follows the tile's row count).
paged_attention_triton.py's kernel tiles keys by cache slot and shares tiles between a block's
queries, so a tree node's ancestors meet masked siblings in its tiles and its sums pair up
differently from sequential decoding: close, not equal.

Cost: no tensor cores and no key tile shared between queries; the engine takes this path
only with --batch-invariant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels.paged_attention import check_paged_attention_args, partials

# Fixed for every call (a query's arithmetic must not depend on the step).
SPLIT_KEYS = 512  # positions per split: a decode at 8k context runs 16 splits per KV head


def _block_n(head_dim_p: int) -> int:
    """Keys per tile, from the head size alone: a [GROUP_P, BLOCK_N, HEAD_DIM_P] product
    tile of 4 x 32 x 64 or 4 x 16 x 128 float32 is 32 values a thread at 4 warps."""
    return 32 if head_dim_p <= 64 else 16


# Per token: sequence, cached context, visible new tokens, their indices (see token_layout).
TokenLayout = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def token_layout(
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, the new tokens included
    tree_mask: torch.Tensor | None,  # [num_tokens, max_query_len] bool
    num_tokens: int,
) -> TokenLayout:
    """Per token: its sequence, its cached context ctx, how many new tokens it sees (its
    position is ctx + that - 1), and `tail` [num_tokens, max_query_len] int32, the indices
    of the new tokens it sees in increasing order (a tree node's ancestors, then itself).
    All on the device of seq_lens, without a host sync."""
    device = seq_lens.device
    starts = query_start_loc.long()
    num_q = starts[1:] - starts[:-1]  # [num_seqs]
    seq = torch.repeat_interleave(
        torch.arange(num_q.shape[0], device=device), num_q, output_size=num_tokens
    )
    local = torch.arange(num_tokens, device=device) - starts[seq]  # index among the new
    ctx = seq_lens.long()[seq] - num_q[seq]
    if tree_mask is None:  # a chain: token i sees new tokens 0..i (one shared row, stride 0)
        seen = local + 1
        tail = torch.arange(num_tokens, dtype=torch.int32, device=device)
        tail = tail.expand(num_tokens, num_tokens)
    else:
        width = tree_mask.shape[1]
        seen = tree_mask.sum(1)
        idx = torch.arange(width, device=device)
        # Visible columns first, in order; hidden ones after them (never read).
        tail = torch.where(tree_mask, idx, idx + width).sort(dim=1).values.to(torch.int32)
    return seq.to(torch.int32), ctx.to(torch.int32), seen.to(torch.int32), tail


# The integers that only address memory are not specialised either, so decoding, chains and
# trees all run one compiled kernel: the float code is the same by construction.
@triton.jit(do_not_specialize=["max_splits", "stride_tail_tok"])
def _invariant_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    part_acc_ptr,  # [num_tokens, num_heads, max_splits, HEAD_DIM_P] fp32
    part_ml_ptr,  # [num_tokens, num_heads, max_splits, 2] fp32: max (log2 domain), sum
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    token_seq_ptr,  # [num_tokens] int32
    token_ctx_ptr,  # [num_tokens] int32
    token_seen_ptr,  # [num_tokens] int32
    tail_ptr,  # [num_tokens, max_query_len] int32 (row stride 0 for chains)
    scale_log2,
    max_splits,
    stride_q_tok,
    stride_q_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_bt_seq,
    stride_tail_tok,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # power of two >= HEAD_DIM
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # power of two >= GROUP
    BLOCK_N: tl.constexpr,
    SPLIT_KEYS: tl.constexpr,
):
    """Program (token, KV head, split): GROUP query heads over positions
    [split * SPLIT_KEYS, ...) of the token's visible keys; the partial softmax goes out."""
    tok = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(token_ctx_ptr + tok).to(tl.int64)
    n_keys = ctx + tl.load(token_seen_ptr + tok).to(tl.int64)  # positions 0 .. n_keys - 1
    start = split * SPLIT_KEYS
    if start < n_keys:
        seq = tl.load(token_seq_ptr + tok).to(tl.int64)
        g = tl.arange(0, GROUP_P)
        g_ok = g < GROUP
        head = kv_head * GROUP + g
        d = tl.arange(0, HEAD_DIM_P)
        d_ok = d < HEAD_DIM
        q_off = tok * stride_q_tok + head[:, None] * stride_q_head + d[None, :]
        q = tl.load(q_ptr + q_off, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        q = q.to(tl.float32)  # [GROUP_P, HEAD_DIM_P]

        m_i = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_P], dtype=tl.float32)
        acc = tl.zeros([GROUP_P, HEAD_DIM_P], dtype=tl.float32)
        end = tl.minimum(n_keys, start + SPLIT_KEYS)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
            ok = pos < end
            # Index in the sequence's block table: past the cached context, the slot of the
            # token's (pos - ctx)-th visible new token.
            new = pos - ctx
            j = tl.load(tail_ptr + tok * stride_tail_tok + new, mask=ok & (new >= 0), other=0)
            logical = tl.where(new >= 0, ctx + j.to(tl.int64), pos)
            page_off = seq * stride_bt_seq + logical // PAGE_SIZE
            page = tl.load(block_tables_ptr + page_off, mask=ok, other=0).to(tl.int64)
            slot = logical % PAGE_SIZE
            kv_mask = ok[:, None] & d_ok[None, :]
            k_off = page * stride_k_block + slot * stride_k_slot + kv_head * stride_k_head
            k = tl.load(k_cache_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], 2) * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))  # [GROUP_P, BLOCK_N]
            # Every tile holds a visible key (n0 < end), so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_off = page * stride_v_block + slot * stride_v_slot + kv_head * stride_v_head
            v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        part = (tok * (GROUP * tl.num_programs(1)) + head) * max_splits + split  # [GROUP_P]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_P + d[None, :], acc, mask=g_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=g_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=g_ok)


@triton.jit(do_not_specialize=["max_splits"])
def _invariant_combine_kernel(
    part_acc_ptr,  # [num_tokens * num_heads, max_splits, HEAD_DIM_P] fp32
    part_ml_ptr,  # [num_tokens * num_heads, max_splits, 2] fp32
    token_ctx_ptr,  # [num_tokens] int32
    token_seen_ptr,  # [num_tokens] int32
    out_ptr,  # [num_tokens, num_heads, head_dim]
    num_heads,
    max_splits,
    stride_o_tok,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    SPLIT_KEYS: tl.constexpr,
):
    """Program (token * num_heads + head): merge its splits one after another, in order."""
    row = tl.program_id(0).to(tl.int64)
    tok = row // num_heads
    head = row % num_heads
    n_keys = tl.load(token_ctx_ptr + tok).to(tl.int64) + tl.load(token_seen_ptr + tok)
    d = tl.arange(0, HEAD_DIM_P)
    first = row * max_splits  # split 0 always holds a key: every query sees itself
    m = tl.load(part_ml_ptr + first * 2)
    total = tl.load(part_ml_ptr + first * 2 + 1)
    acc = tl.load(part_acc_ptr + first * HEAD_DIM_P + d)
    for split in range(1, tl.cdiv(n_keys, SPLIT_KEYS)):
        part = first + split
        m_s = tl.load(part_ml_ptr + part * 2)
        l_s = tl.load(part_ml_ptr + part * 2 + 1)
        acc_s = tl.load(part_acc_ptr + part * HEAD_DIM_P + d)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)
        total = total * alpha + l_s * beta
        acc = acc * alpha + acc_s * beta
        m = m_new
    o_off = tok * stride_o_tok + head * stride_o_head + d
    tl.store(out_ptr + o_off, (acc / total).to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def invariant_paged_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
    max_seq_len: int | None = None,  # bound on seq_lens (default: the block table's width)
    layout: TokenLayout | None = None,  # token_layout's result, when the caller keeps it
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """paged_attention's result, each query computed as if it were decoded alone.

    `layout` lets the engine build token_layout once a step instead of once a layer (about
    ten small launches each: ~300 a step for a 30-layer model on a host-bound GPU)."""
    check_paged_attention_args(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, tree_mask
    )
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if num_tokens == 0 or seq_lens.shape[0] == 0:
        return out
    if layout is None:
        layout = token_layout(query_start_loc, seq_lens, tree_mask, num_tokens)
    seq, ctx, seen, tail = layout
    bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    max_splits = max(1, triton.cdiv(bound, SPLIT_KEYS))
    head_dim_p = triton.next_power_of_2(head_dim)
    group = num_heads // num_kv_heads
    part_acc, part_ml = partials(q, max_splits, head_dim_p)  # written even for one split
    _invariant_attention_kernel[(num_tokens, num_kv_heads, max_splits)](
        q,
        k_cache,
        v_cache,
        part_acc,
        part_ml,
        block_tables,
        seq,
        ctx,
        seen,
        tail,
        scale * 1.4426950408889634,  # log2(e)
        max_splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        tail.stride(0),
        PAGE_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p,
        GROUP=group,
        GROUP_P=triton.next_power_of_2(group),
        BLOCK_N=_block_n(head_dim_p),
        SPLIT_KEYS=SPLIT_KEYS,
    )
    _invariant_combine_kernel[(num_tokens * num_heads,)](
        part_acc,
        part_ml,
        ctx,
        seen,
        out,
        num_heads,
        max_splits,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p,
        SPLIT_KEYS=SPLIT_KEYS,
    )
    return out
