"""Block-sparse attention of a step's new tokens over selected chunks of paged KV.

Used by the sparse-attention decoder for both HiP (Lee et al., arXiv 2406.09827: block-sparse
attention over the mask's key blocks + sink + sliding window) and Kinetics block top-k
(Sadhukhan et al., arXiv 2506.05333: top-k pages + sink + local window + current page).

Semantics (per sequence b with n_q new tokens, L = seq_lens[b] keys stored, ctx = L - n_q
cached ones; chunk c covers positions [c * chunk_size, (c + 1) * chunk_size)): query i of
head h, KV head g = h // group, sees
    cached key p < ctx  iff  p // chunk_size is in chunks[b, g, :]   (-1 entries are padding)
    new key ctx + j'    iff  j' <= i (causal, tree_mask None) or tree_mask[qs[b] + i, j']
Chunks of one row must be distinct. With every chunk below ctx listed this is exactly
kernels/paged_attention.py. The chunk size divides nothing in particular: HiP uses b_k = 2
tokens, block top-k one page (16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slipstream.kernels._dispatch import use_triton
from slipstream.kernels.cpu.paged_decode_attention import paged_decode_attention
from slipstream.kernels.paged_attention import (
    check_paged_attention_args,
    combine_splits,
    plan_launch,
    store_rows,
    use_cpu_decode_kernel,
)

# ----------------------------------------------------------------------------- reference


def sparse_paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    chunks: torch.Tensor,  # [num_seqs, num_kv_heads, max_chunks] int32/int64, -1 = padding
    chunk_size: int,
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
    step_cache: dict[str, Any] | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Reference: gather the selected keys of all sequences into one padded box, one SDPA.

    step_cache: a dict shared by the calls of one engine step (every layer passes the same
    block tables, lengths and chunk size): the decode path keeps its per-step index maps
    there instead of rebuilding them in every layer.
    """
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    out = torch.empty_like(q)
    seqs = [b for b in range(len(lens)) if starts[b + 1] > starts[b]]
    if not seqs:
        return out
    num_q_list = [starts[b + 1] - starts[b] for b in seqs]
    if tree_mask is None and max(num_q_list) == 1:
        key = f"sparse_decode:{chunk_size}"
        maps = None if step_cache is None else step_cache.get(key)
        if maps is None:
            maps = _DecodeMaps.build(block_tables, chunk_size, starts, lens, k_cache.shape)
            if step_cache is not None:
                step_cache[key] = maps
        return _decode(q, k_cache, v_cache, chunks, maps, scale)
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    dev = q.device
    nb = len(seqs)
    all_seqs = nb == len(lens)
    seq_idx = torch.tensor(seqs, device=dev)
    tables = (block_tables if all_seqs else block_tables[seq_idx]).long()  # [B, max_blocks]
    sel = (chunks if all_seqs else chunks[seq_idx]).long()  # [B, H, S]
    max_q = max(num_q_list)
    num_q = torch.tensor(num_q_list, device=dev).view(nb, 1)  # [B, 1]
    ctx = torch.tensor([lens[b] - n for b, n in zip(seqs, num_q_list, strict=True)], device=dev)
    ctx = ctx.view(nb, 1)  # [B, 1]
    heads = torch.arange(num_kv_heads, device=dev).view(1, -1, 1)  # [1, H, 1]

    # Selected cached keys: positions [B, H, S * C]; invalid ones read position 0, which is
    # always written (finite): an unwritten slot may hold NaN and 0 * NaN poisons SDPA.
    within = torch.arange(chunk_size, device=dev)
    pos = (sel.unsqueeze(-1) * chunk_size + within).flatten(2)  # [B, H, S * C]
    valid = (sel >= 0).repeat_interleave(chunk_size, -1) & (pos < ctx.unsqueeze(-1))
    pos = torch.where(valid, pos, 0)
    # New keys: positions ctx + j', padding repeats the last new key.
    j = torch.arange(max_q, device=dev)
    new_pos = ctx + torch.minimum(j, num_q - 1)  # [B, max_q]
    pos = torch.cat([pos, new_pos.unsqueeze(1).expand(nb, num_kv_heads, max_q)], 2)
    pages = torch.gather(tables, 1, (pos // block_size).flatten(1)).view(pos.shape)
    flat = ((pages * block_size + pos % block_size) * num_kv_heads + heads).flatten()
    k = k_cache.view(-1, head_dim).index_select(0, flat).view(*pos.shape, head_dim).to(q.dtype)
    v = v_cache.view(-1, head_dim).index_select(0, flat).view(*pos.shape, head_dim).to(q.dtype)

    # Queries in the grouped layout [B, H, max_q * G, D]; padded rows repeat the last query.
    start = torch.tensor([starts[b] for b in seqs], device=dev).view(nb, 1)
    tok = start + torch.minimum(j, num_q - 1)  # [B, max_q]
    qg = q[tok].view(nb, max_q, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
    qg = qg.reshape(nb, num_kv_heads, max_q * group, head_dim)

    if tree_mask is None:
        new_mask = j.view(1, 1, -1) <= j.view(1, -1, 1)  # [1, max_q, max_q]
    else:
        new_mask = tree_mask[tok][:, :, :max_q].to(torch.bool)  # [B, max_q, max_q]
    new_mask = new_mask & (j < num_q).unsqueeze(1)  # [B, max_q, max_q]
    new_mask = new_mask.repeat_interleave(group, 1).unsqueeze(1)  # [B, 1, max_q * G, max_q]
    rows = max_q * group
    mask = torch.cat(
        [
            valid.unsqueeze(2).expand(nb, num_kv_heads, rows, valid.shape[-1]),
            new_mask.expand(nb, num_kv_heads, rows, max_q),
        ],
        -1,
    )
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    o = o.reshape(nb, num_kv_heads, max_q, group, head_dim).permute(0, 2, 1, 3, 4)
    o = o.reshape(nb, max_q, num_heads, head_dim)
    if max_q == 1:
        if all_seqs and q.shape[0] == nb:
            return o.reshape(q.shape)
        out[tok[:, 0]] = o[:, 0]
        return out
    keep = j < num_q  # [B, max_q]
    out[tok[keep]] = o[keep]
    return out


@dataclass(frozen=True)
class _DecodeMaps:
    """Per-step index maps of the decode path (every sequence has at most one new token).

    Built once per step (block tables and lengths are the same in every layer), so each
    layer only gathers through them: ~10 tensor ops per layer instead of ~22 (on 2 CPU
    cores each small op costs ~5 us; at 30 layers the difference is ~3 ms per step). A
    chunk is split into pieces of g = gcd(chunk, block_size) keys, which never straddle a
    page: one piece when chunks tile pages (HiP's b_k, block top-k's page), more otherwise.
    """

    seqs: list[int]  # batch positions with a new token
    q_rows: list[int]  # their rows of q
    # [nb, C + 1, chunk / g] int64: flat row (head 0) of each piece's first key in k_cache
    # viewed as [num_blocks * block_size * num_kv_heads, head_dim]; entry C serves -1 padding
    chunk_row: torch.Tensor
    chunk_live: torch.Tensor  # [nb, C + 1, chunk] bool: key is cached (< ctx); row C False
    offsets: torch.Tensor  # [1, H, 1, 1, g] int64: row offset of a piece's key j, KV head h
    new_rows: torch.Tensor  # [nb, H, 1] int64 flat rows of each sequence's new key

    @staticmethod
    def build(
        block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
        chunk: int,
        starts: list[int],  # query_start_loc as a list
        lens: list[int],  # seq_lens as a list
        cache_shape: torch.Size,  # [num_blocks, block_size, num_kv_heads, head_dim]
    ) -> _DecodeMaps:
        """Maps for the sequences of this step that decode one token."""
        block_size, heads = cache_shape[1], cache_shape[2]
        dev = block_tables.device
        seqs = [b for b in range(len(lens)) if starts[b + 1] > starts[b]]
        tables = block_tables
        if len(seqs) != len(lens):
            tables = block_tables.index_select(0, torch.tensor(seqs, device=dev))
        ctx = torch.tensor([lens[b] - 1 for b in seqs], device=dev).view(-1, 1)  # [nb, 1]
        num_chunks = -(-max(1, int(ctx.max())) // chunk)
        piece = math.gcd(chunk, block_size)
        first = torch.arange(num_chunks * chunk // piece, device=dev) * piece  # [C * P]
        # Pieces past a table's last page are masked (not < ctx); clamp to read a real one.
        page_idx = (first // block_size).clamp(max=tables.shape[1] - 1)
        row = (tables.long()[:, page_idx] * block_size + first % block_size) * heads
        row = row.view(len(seqs), num_chunks, -1)  # [nb, C, chunk / g]
        pad = torch.zeros_like(row[:, :1])  # -1 chunks read row 0 (written, finite), masked
        pos = torch.arange(num_chunks * chunk, device=dev).view(1, num_chunks, chunk)
        live = pos < ctx.view(-1, 1, 1)  # [nb, C, chunk]
        j = torch.arange(piece, device=dev).view(1, 1, 1, 1, -1)
        h = torch.arange(heads, device=dev).view(1, -1, 1, 1, 1)
        new_page = tables.long().gather(1, ctx // block_size)  # [nb, 1]
        new_rows = (new_page * block_size + ctx % block_size) * heads  # [nb, 1]
        return _DecodeMaps(
            seqs=seqs,
            q_rows=[starts[b] for b in seqs],
            chunk_row=torch.cat([row, pad], 1),
            chunk_live=torch.cat([live, torch.zeros_like(live[:, :1])], 1),
            offsets=j * heads + h,
            new_rows=new_rows.view(-1, 1, 1) + h.view(1, -1, 1),
        )


def _decode(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    chunks: torch.Tensor,  # [num_seqs, num_kv_heads, max_chunks], -1 = padding
    maps: _DecodeMaps,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """At most one new token per sequence: the selected keys, gathered through the step's
    maps, and the new key, then one SDPA."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    nb, kv_heads = len(maps.seqs), k_cache.shape[2]
    sel = chunks
    if nb != chunks.shape[0]:
        sel = chunks.index_select(0, torch.tensor(maps.seqs, device=q.device))
    num_chunks = maps.chunk_row.shape[1] - 1
    # -1 -> C (the padding entry); chunks past the context also land on masked slots.
    safe = sel.long().clamp(max=num_chunks).remainder(num_chunks + 1).view(nb, -1)  # [nb, H*S]
    pieces = maps.chunk_row.shape[2]
    base = maps.chunk_row.gather(1, safe.unsqueeze(-1).expand(nb, safe.shape[1], pieces))
    base = base.view(nb, kv_heads, -1, pieces, 1)  # [nb, H, S, chunk / g, 1]
    rows = (base + maps.offsets).view(nb, kv_heads, -1)  # [nb, H, S * chunk]
    width = maps.chunk_live.shape[2]
    live = maps.chunk_live.gather(1, safe.unsqueeze(-1).expand(nb, safe.shape[1], width))
    rows = torch.cat([rows, maps.new_rows], -1)  # [nb, H, N]
    valid = torch.cat([live.view(nb, kv_heads, -1), maps.chunk_live.new_ones(nb, kv_heads, 1)], -1)
    k = k_cache.view(-1, head_dim).index_select(0, rows.view(-1)).view(*rows.shape, head_dim)
    v = v_cache.view(-1, head_dim).index_select(0, rows.view(-1)).view(*rows.shape, head_dim)
    every_row = q.shape[0] == nb  # then row b of q is sequence b's token
    qg = (q if every_row else q[maps.q_rows]).view(nb, kv_heads, num_heads // kv_heads, head_dim)
    # The mask broadcasts over the group's query rows: [B, H, 1, N].
    o = F.scaled_dot_product_attention(
        qg, k.to(q.dtype), v.to(q.dtype), attn_mask=valid.unsqueeze(2), scale=scale
    )
    if every_row:
        return o.reshape(q.shape)
    out = torch.empty_like(q)
    out[maps.q_rows] = o.reshape(nb, num_heads, head_dim)
    return out


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _sparse_paged_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    query_start_loc_ptr,  # [num_seqs + 1]
    seq_lens_ptr,  # [num_seqs]
    chunks_ptr,  # [num_seqs, num_kv_heads, max_chunks]
    tree_mask_ptr,  # [num_tokens, max_query_len] uint8 (unused when not IS_TREE)
    part_acc_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM_P] fp32 (NUM_SPLITS > 1)
    part_ml_ptr,  # [num_tokens, num_heads, NUM_SPLITS, 2] fp32: running max (log2), sum
    scale_log2,  # softmax scale * log2(e)
    num_chunks,  # max_chunks
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
    stride_c_seq,
    stride_c_head,
    stride_tm_tok,
    PAGE_SIZE: tl.constexpr,  # cache block_size
    CHUNK: tl.constexpr,  # tokens per selected chunk
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # power of two >= max(HEAD_DIM, 16)
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # power of two >= GROUP
    BLOCK_Q: tl.constexpr,  # new tokens per program; rows = BLOCK_Q * GROUP_P
    BLOCK_N: tl.constexpr,  # keys per inner step
    IS_TREE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32, else "tf32"
    UPCAST: tl.constexpr,  # fp32 dots (the interpreter's bf16 tl.dot is wrong)
    NUM_SPLITS: tl.constexpr,  # programs sharing one (seq, kv_head, q_block)'s chunk list
):
    """Program (seq, kv_head, q_block * NUM_SPLITS + split): its share of the selected
    cached chunks, then (last split only) the new tokens.

    With NUM_SPLITS > 1 each program leaves its unnormalised partial (running max, sum,
    weighted values) for combine_splits: at batch 4 x 8 KV heads a decode step is
    otherwise 32 programs on a 132-SM H200, each walking ~1100 keys alone."""
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
        tok = q_block * BLOCK_Q + rows // GROUP_P
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
        chunk_row = chunks_ptr + seq * stride_c_seq + kv_head * stride_c_head

        # Phase 1: BLOCK_N keys at a time from this split's share of the flattened list.
        total = num_chunks * CHUNK
        share = tl.cdiv(tl.cdiv(total, BLOCK_N), NUM_SPLITS) * BLOCK_N
        for j0 in range(split * share, tl.minimum(total, (split + 1) * share), BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            c = j // CHUNK
            chunk = tl.load(chunk_row + c, mask=c < num_chunks, other=-1).to(tl.int64)
            pos = chunk * CHUNK + j % CHUNK
            ok = (chunk >= 0) & (pos < ctx)
            bt_off = seq * stride_bt_seq + pos // PAGE_SIZE
            page = tl.load(block_tables_ptr + bt_off, mask=ok, other=0).to(tl.int64)
            slot = pos % PAGE_SIZE
            kv_mask = ok[:, None] & d_ok[None, :]
            k_off = page * stride_k_block + slot * stride_k_slot + kv_head * stride_k_head
            k = tl.load(k_cache_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # NOTE: a row with nothing visible yet has m_new = -inf; shift by 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_off = page * stride_v_block + slot * stride_v_slot + kv_head * stride_v_head
            v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = v.to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # Phase 2: the new tokens, causal or tree-masked (by the last split alone).
        new_end = num_q
        if not IS_TREE:
            new_end = tl.minimum(num_q, (q_block + 1) * BLOCK_Q)
        new_end = tl.where(split == NUM_SPLITS - 1, new_end, 0)
        for n0 in range(0, new_end, BLOCK_N):
            new = n0 + tl.arange(0, BLOCK_N)
            ok = new < new_end
            pos = ctx + new
            bt_off = seq * stride_bt_seq + pos // PAGE_SIZE
            page = tl.load(block_tables_ptr + bt_off, mask=ok, other=0).to(tl.int64)
            slot = pos % PAGE_SIZE
            kv_mask = ok[:, None] & d_ok[None, :]
            k_off = page * stride_k_block + slot * stride_k_slot + kv_head * stride_k_head
            k = tl.load(k_cache_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
            if IS_TREE:
                tm_off = (q_start + tok)[:, None] * stride_tm_tok + new[None, :]
                tm_ok = row_ok[:, None] & ok[None, :]
                tm = tl.load(tree_mask_ptr + tm_off, mask=tm_ok, other=0)
                visible = tm != 0
            else:
                visible = new[None, :] <= tok[:, None]
            visible = visible & ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
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


_INDEX_DTYPES = (torch.int32, torch.int64)


def sparse_paged_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    chunks: torch.Tensor,  # [num_seqs, num_kv_heads, max_chunks] int32/int64, -1 = padding
    chunk_size: int,
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
    num_splits: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Triton launcher: checks the arguments, then num_splits programs per (seq, kv head,
    q block), merged by a second kernel when more than one. num_splits=None: enough to give
    every SM two programs on CUDA (see auto_splits), 1 in the interpreter."""
    _check_args(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, chunks, tree_mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_tokens, head_dim = q.shape[0], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    max_keys = chunks.shape[2] * chunk_size
    lp = plan_launch(q, tree_mask, num_kv_heads, num_seqs, max_keys, num_splits)
    tm = lp.tree_mask
    _sparse_paged_attention_kernel[lp.grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        seq_lens,
        chunks,
        tm,
        lp.part_acc,
        lp.part_ml,
        scale * 1.4426950408889634,  # log2(e)
        chunks.shape[2],
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
        chunks.stride(0),
        chunks.stride(1),
        tm.stride(0) if tree_mask is not None else 0,
        PAGE_SIZE=block_size,
        CHUNK=chunk_size,
        HEAD_DIM=head_dim,
        **lp.kernel_constants,
    )
    if lp.num_splits > 1:
        combine_splits(lp.part_acc, lp.part_ml, out, head_dim)
    return out


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    chunks: torch.Tensor,
    tree_mask: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the first argument whose shape, stride or dtype is wrong.

    Everything but `chunks` is the dense paged kernel's contract, so its checker is reused.
    """
    check_paged_attention_args(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, tree_mask
    )
    num_seqs, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    if chunks.dim() != 3 or chunks.shape[:2] != (num_seqs, num_kv_heads):
        raise ValueError(f"chunks {tuple(chunks.shape)} must be [{num_seqs}, {num_kv_heads}, *]")
    if chunks.dtype not in _INDEX_DTYPES:
        raise ValueError(f"chunks must be int32 or int64, got {chunks.dtype}")
    if chunks.numel() > 1 and chunks.stride(-1) != 1:
        raise ValueError(f"chunks needs a unit last-dim stride; strides {chunks.stride()}")
    if chunks.device != q.device:
        raise ValueError(f"all tensors must be on one device, got {q.device} and {chunks.device}")


# ----------------------------------------------------------------------------- dispatch


def sparse_paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    chunks: torch.Tensor,  # [num_seqs, num_kv_heads, max_chunks] int32/int64, -1 = padding
    chunk_size: int,
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
    step_cache: dict[str, Any] | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Public op: Triton on CUDA; on CPU the C++ paged kernel with the chunk lists for bf16
    steps of few rows per sequence, else the reference (see kernels/_dispatch.py).
    step_cache: see sparse_paged_attention_ref (the Triton kernel needs none); the C++
    kernel keeps its converted step metadata there too."""
    args = (q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, chunks, chunk_size)
    if not use_triton(q, step_cache):
        # 8k context, 3 KV heads, ~400 selected keys a head: ~0.17 ms a layer through the
        # reference's gathers and SDPA, ~0.06 ms here (2 cores, in the engine).
        if use_cpu_decode_kernel(q, k_cache, query_start_loc, seq_lens, step_cache):
            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                block_tables,
                query_start_loc,
                seq_lens,
                scale,
                tree_mask,
                step_cache,
                chunks,
                chunk_size,
            )
        return sparse_paged_attention_ref(*args, scale, tree_mask, step_cache)
    return sparse_paged_attention_triton(*args, scale, tree_mask)
