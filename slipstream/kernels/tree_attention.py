"""Tree attention: a step's new tokens over the paged KV, plus a tree mask among themselves.

Semantics are paged_attention's with a tree mask (per sequence b with n_q new tokens and
L = seq_lens[b] keys, ctx = L - n_q cached): query i sees every cached key j < ctx and new
key ctx + j' iff tree_mask[qs[b] + i, j'] (the ancestor mask of a draft tree, diagonal set).

The computation is split the way a tree step's cost splits (a cascade): the cached prefix is
shared by all n_q tree tokens and needs no mask, the tree part is a tiny n_q x n_q masked
block. Both parts give a partial softmax (max, sum, weighted V), merged exactly by
log-sum-exp. The reference does the two parts as dense matmuls; the Triton kernel runs the
prefix loop with no mask loads, then one masked tile loop over the tree keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._dispatch import triton_interpreting, use_triton


def tree_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    tree_mask: torch.Tensor,  # [num_tokens, max_query_len] bool
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Reference (PyTorch): prefix part and tree part per sequence, merged by log-sum-exp."""
    _num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        n_q = e - s
        if n_q == 0:
            continue
        ctx = seq_len - n_q
        blocks = block_tables[b, : (seq_len + block_size - 1) // block_size].long()
        k = k_cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = v_cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k = k.float().repeat_interleave(group, 1).transpose(0, 1)  # [H, L, D]
        v = v.float().repeat_interleave(group, 1).transpose(0, 1)  # [H, L, D]
        qh = q[s:e].float().transpose(0, 1)  # [H, n_q, D]
        # Prefix: every tree token sees every cached key.
        sp = qh @ k[:, :ctx].transpose(1, 2) * scale  # [H, n_q, ctx]
        # Tree: masked n_q x n_q block (the diagonal is always visible, so rows are finite).
        st = qh @ k[:, ctx:].transpose(1, 2) * scale  # [H, n_q, n_q]
        st = st.masked_fill(~tree_mask[s:e, :n_q].to(torch.bool), float("-inf"))
        m = torch.maximum(sp.amax(-1), st.amax(-1)) if ctx else st.amax(-1)  # [H, n_q]
        pp = torch.exp(sp - m.unsqueeze(-1))
        pt = torch.exp(st - m.unsqueeze(-1))
        denom = pp.sum(-1) + pt.sum(-1)  # [H, n_q]
        o = (pp @ v[:, :ctx] + pt @ v[:, ctx:]) / denom.unsqueeze(-1)  # [H, n_q, D]
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out


@triton.jit
def _tree_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    query_start_loc_ptr,  # [num_seqs + 1]
    seq_lens_ptr,  # [num_seqs]
    tree_mask_ptr,  # [num_tokens, max_query_len] uint8
    scale_log2,  # softmax scale * log2(e)
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
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # power of two >= max(HEAD_DIM, 16)
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # power of two >= GROUP
    BLOCK_Q: tl.constexpr,  # tree tokens per program; rows = BLOCK_Q * GROUP_P
    BLOCK_N: tl.constexpr,  # keys per inner step
    UPCAST: tl.constexpr,  # fp32 dots (the interpreter's bf16 tl.dot is wrong)
):
    """Program (seq, kv_head, q_block): a prefix loop without masks, then the tree keys."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    num_q = tl.load(query_start_loc_ptr + seq + 1).to(tl.int64) - q_start
    if q_block * BLOCK_Q < num_q:
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
        ctx = seq_len - num_q
        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
        rows = tl.arange(0, BLOCK_M)
        tok = q_block * BLOCK_Q + rows // GROUP_P  # [BLOCK_M] index among the tree tokens
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
        # Phase 1 (prefix, keys < ctx) and phase 2 (tree keys ctx .. seq_len): same online
        # softmax; only phase 2 loads the mask.
        for phase in tl.static_range(2):
            lo = 0 if phase == 0 else ctx
            hi = ctx if phase == 0 else seq_len
            for n0 in range(lo, hi, BLOCK_N):
                pos = n0 + tl.arange(0, BLOCK_N)
                pos_ok = pos < hi
                page = tl.load(
                    block_tables_ptr + seq * stride_bt_seq + pos // PAGE_SIZE, mask=pos_ok, other=0
                ).to(tl.int64)
                slot = pos % PAGE_SIZE
                kv_mask = pos_ok[:, None] & d_ok[None, :]
                k_off = page * stride_k_block + slot * stride_k_slot + kv_head * stride_k_head
                k = tl.load(k_cache_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale_log2
                visible = pos_ok[None, :] & row_ok[:, None]
                if phase == 1:
                    tm_off = (q_start + tok)[:, None] * stride_tm_tok + (pos - ctx)[None, :]
                    tm = tl.load(tree_mask_ptr + tm_off, mask=visible, other=0)
                    visible = visible & (tm != 0)
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v_off = page * stride_v_block + slot * stride_v_slot + kv_head * stride_v_head
                v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
                acc = acc * alpha[:, None] + tl.dot(
                    p.to(q.dtype), v.to(q.dtype), input_precision="ieee"
                )
                m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_off = (q_start + tok)[:, None] * stride_o_tok + head[:, None] * stride_o_head
        tl.store(
            out_ptr + o_off + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


def tree_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    tree_mask: torch.Tensor,  # [num_tokens, max_query_len] bool
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Triton launcher: checks the arguments, then one program per (seq, kv head, q block)."""
    _check_args(q, k_cache, v_cache, tree_mask)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    block_q = max(1, 64 // group_p)  # 64-row tiles: an 81-token tree is 2 programs at group 1
    max_q = min(num_tokens, tree_mask.shape[1])
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_q, block_q))
    tm = tree_mask.view(torch.uint8)
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, tm,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), tm.stride(0),
        PAGE_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)),
        GROUP=group,
        GROUP_P=group_p,
        BLOCK_Q=block_q,
        BLOCK_N=64 if q.is_cuda else 16,  # small tiles keep the CPU interpreter quick
        UPCAST=q.dtype != torch.float32 and (triton_interpreting() or not q.is_cuda),
    )  # fmt: skip
    return out


def _check_args(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tree_mask: torch.Tensor
) -> None:
    """Raise ValueError naming the first argument whose shape, stride or dtype is wrong."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"q must be 3-d and k/v_cache 4-d and equal; got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if tree_mask.dtype != torch.bool or tree_mask.dim() != 2 or tree_mask.shape[0] != q.shape[0]:
        raise ValueError(
            f"tree_mask must be [num_tokens, max_q] bool, got {tree_mask.dtype} "
            f"{tuple(tree_mask.shape)}"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("tree_mask", tree_mask)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit last-dim stride; strides {t.stride()}")


def tree_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    tree_mask: torch.Tensor,  # [num_tokens, max_query_len] bool
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Public op: Triton on CUDA, the reference elsewhere (see kernels/_dispatch.py)."""
    op = tree_attention_triton if use_triton(q) else tree_attention_ref
    return op(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, tree_mask)
