"""Page votes: the attention each KV page of one sequence receives from a few voting queries
(SnapKV, Li et al., arXiv 2404.14469, kept per page for block top-k's pinned pages).

    mass[h, t] = sum over voters i and group heads j of softmax_t'(scale * q[i, h G + j] . k[t'])
                 over the keys t' <= positions[i]
    spread[h, t] = max(mass[h, t - S + 1 .. t])   (what follows a looked-at key gets copied)
    votes[h, p] = sum of spread[h, t] over page p's keys t < seq_len

On CPU the C++ kernel (cpu/page_votes.cpp, float32 rounding apart) where it runs, else the
reference, which is also the CUDA path (a handful of torch ops, once per request and layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.kernels.cpu.page_votes import page_votes_cpu, page_votes_cpu_unavailable_reason


def page_votes_ref(
    q: torch.Tensor,  # [w, num_heads, head_dim] the voting queries
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    table: torch.Tensor,  # [>= pages of seq_len] int32 the sequence's block table
    seq_len: int,  # keys cached
    positions: torch.Tensor,  # [w] int64 each query's position (it sees the keys up to it)
    scale: float,
    spread: int,
) -> torch.Tensor:  # [num_kv_heads, ceil(seq_len / block_size)] fp32
    """The votes in torch: the sequence's keys gathered, one product, mask, softmax."""
    page = k_cache.shape[1]
    w, num_heads, head_dim = q.shape
    heads = k_cache.shape[2]
    group = num_heads // heads
    num_pages = -(-seq_len // page)
    keys = k_cache.index_select(0, table[:num_pages].long())  # [pages, page, H, D]
    keys = keys.reshape(num_pages * page, heads, head_dim)[:seq_len]  # [T, H, D]
    # [H, w * G, D]: row i * G + j is voter i, query head j of the group
    qg = q.float().view(w, heads, group, head_dim).transpose(0, 1)
    logits = torch.bmm(qg.reshape(heads, w * group, head_dim), keys.float().permute(1, 2, 0))
    # [H, w * G, T] fp32: 9 MB for 32 voters at 8k tokens on the default model (3 KV heads x
    # 3), ~0.5 GB at 128k for 8 KV heads x 4.
    logits = logits * scale
    position = positions.to(q.device).repeat_interleave(group)
    future = torch.arange(seq_len, device=q.device).view(1, -1) > position.view(-1, 1)
    logits.masked_fill_(future, float("-inf"))
    mass = logits.softmax(-1).sum(1)  # [H, T] attention each key receives
    mass = F.max_pool1d(F.pad(mass, (spread - 1, 0)).unsqueeze(1), spread, 1).squeeze(1)
    return F.pad(mass, (0, num_pages * page - seq_len)).view(heads, num_pages, page).sum(-1)


def page_votes(
    q: torch.Tensor,  # [w, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    table: torch.Tensor,  # [>= pages of seq_len] int32
    seq_len: int,
    positions: torch.Tensor,  # [w] int64, each < seq_len
    scale: float,
    spread: int,
) -> torch.Tensor:  # [num_kv_heads, ceil(seq_len / block_size)] fp32
    """Public op: the C++ kernel on CPU where it runs, else the reference."""
    if page_votes_cpu_unavailable_reason(q, k_cache) is None:
        return page_votes_cpu(q, k_cache, table, seq_len, positions, scale, spread)
    return page_votes_ref(q, k_cache, table, seq_len, positions, scale, spread)
