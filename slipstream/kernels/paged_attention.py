"""Attention of a step's new tokens over paged KV, with a causal or tree mask among them.

Semantics (per sequence b, its queries q[qs[b]:qs[b+1]], n_q of them, and L = seq_lens[b]
keys already stored in the cache, the new tokens' included, so ctx = L - n_q cached ones):
query i sees every key j < ctx, and new key ctx + j' when
    causal (tree_mask None): j' <= i
    tree:                    tree_mask[qs[b] + i, j']
This one op covers prefill, chunked prefill, decode (n_q = 1) and tree verification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.kernels._dispatch import use_triton


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Reference: one SDPA call per sequence over its gathered KV."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        num_q = end - start
        if num_q == 0:
            continue
        ctx = seq_len - num_q
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[b, :num_blocks].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        mask = torch.ones(num_q, seq_len, dtype=torch.bool, device=q.device)
        if tree_mask is None:
            mask[:, ctx:] = torch.ones(num_q, num_q, dtype=torch.bool, device=q.device).tril()
        else:
            mask[:, ctx:] = tree_mask[start:end, :num_q]
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0).to(q.dtype),
            v.transpose(0, 1).unsqueeze(0).to(q.dtype),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = o[0].transpose(0, 1)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    tree_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Public op: Triton on CUDA, the reference elsewhere."""
    if use_triton(q):
        from slipstream.kernels.paged_attention_triton import paged_attention_triton

        return paged_attention_triton(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, tree_mask
        )
    return paged_attention_ref(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, tree_mask
    )
