"""HiP's hierarchical branch-and-prune search for the top key blocks of a query block.

HiP (Lee et al., "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention
Pruning", arXiv 2406.09827; ICLR 2025) relies on attention locality: nearby keys score alike,
so one representative block can stand for a whole chunk. Per (sequence, KV head), over the
key blocks [region_start, region_end) (units of block_k tokens):
  1. split the region into K = num_select equal chunks (the nodes);
  2. each round, halve every node (left gets the ceiling half), score each child by its
     centre key block: max over the block's keys and over the query block's rows (all new
     tokens x the GQA group's query heads) of q . k; keep the top K of the 2K children;
  3. after ceil(log2(ceil(n / K))) rounds every node is one key block: those are the mask.
Empty children score -inf, so a region of <= K blocks is returned whole. Output: key block
ids [num_seqs, num_kv_heads, K], ascending, -1 padded.

Scores skip the softmax scale (a positive factor does not change a top-k), which is how
HiP's kernels avoid the pre-scaling question. `hip_mask_ref` scores with a torch gather and
einsum in a host loop (`_search`, with torch.topk); `hip_mask_triton` runs the whole search,
every round, in one Triton program per (sequence, KV head).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from slipstream.kernels._dispatch import use_triton
from slipstream.kernels.cpu.hip_mask import hip_mask_search, hip_search_unavailable_reason

# (child_start, child_end) [B, H, 2K] relative to region_start -> scores [B, H, 2K] fp32
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _grouped_queries(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    num_kv_heads: int,
) -> torch.Tensor:  # [num_seqs, num_kv_heads, max_q * group, head_dim] fp32
    """Each sequence's query block, KV-head major; short blocks repeat their last query."""
    starts = query_start_loc.tolist()
    num_seqs = len(starts) - 1
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // num_kv_heads
    num_q = [max(1, starts[b + 1] - starts[b]) for b in range(num_seqs)]
    max_q = max(num_q)
    j = torch.arange(max_q, device=q.device)
    start = torch.tensor(starts[:-1], device=q.device).view(-1, 1)
    last = torch.tensor(num_q, device=q.device).view(-1, 1) - 1
    # Repeating a row leaves the max over rows unchanged, so no row mask is needed.
    tok = (start + torch.minimum(j, last)).clamp(max=max(q.shape[0] - 1, 0))  # [B, max_q]
    qg = q[tok].float().view(num_seqs, max_q, num_kv_heads, group, head_dim)
    return qg.permute(0, 2, 1, 3, 4).reshape(num_seqs, num_kv_heads, max_q * group, head_dim)


def _search(
    region_start: torch.Tensor,  # [num_seqs] int64
    region_end: torch.Tensor,  # [num_seqs] int64
    num_kv_heads: int,
    num_select: int,
    score: ScoreFn,
) -> torch.Tensor:  # [num_seqs, num_kv_heads, num_select] int64, -1 = none
    """The branch-and-prune loop, given a way to score children."""
    num_seqs = region_start.shape[0]
    dev = region_start.device
    size = (region_end - region_start).clamp(min=0)  # [B]
    i = torch.arange(num_select + 1, device=dev)
    bounds = torch.div(i.view(1, -1) * size.view(-1, 1), num_select, rounding_mode="floor")
    ns = bounds[:, :-1].unsqueeze(1).expand(num_seqs, num_kv_heads, num_select).contiguous()
    ne = bounds[:, 1:].unsqueeze(1).expand(num_seqs, num_kv_heads, num_select).contiguous()
    largest = max(1, -(-int(size.max().item()) // num_select)) if num_seqs else 1
    for _ in range(math.ceil(math.log2(largest))):
        # torch.div, not //: Tensor.__floordiv__ goes through a slow Python wrapper.
        mid = ns + torch.div(ne - ns + 1, 2, rounding_mode="floor")
        cs = torch.cat([ns, mid], -1)  # [B, H, 2K]
        ce = torch.cat([mid, ne], -1)
        s = score(cs, ce)
        s = torch.where(ce > cs, s, float("-inf"))
        keep = torch.topk(s, num_select, dim=-1, sorted=False).indices
        ns, ne = torch.gather(cs, -1, keep), torch.gather(ce, -1, keep)
    blocks = torch.where(ne > ns, ns + region_start.view(-1, 1, 1), -1)
    # Ascending with the -1 padding last (reads stay in cache order).
    key = torch.where(blocks >= 0, blocks, torch.iinfo(torch.int64).max)
    return torch.gather(blocks, -1, torch.argsort(key, dim=-1))


def _key_index(
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq]
    pos: torch.Tensor,  # [num_seqs, num_kv_heads, n] int64 token positions
    block_size: int,
    num_kv_heads: int,
) -> torch.Tensor:  # [num_seqs, num_kv_heads, n] rows of k_cache.view(-1, head_dim)
    """Row of each (position, kv head) in the flattened cache."""
    b, h, n = pos.shape
    page_idx = torch.div(pos, block_size, rounding_mode="floor").view(b, -1)
    pages = torch.gather(block_tables.long(), 1, page_idx).view(b, h, n)
    heads = torch.arange(num_kv_heads, device=pos.device).view(1, -1, 1)
    return (pages * block_size + torch.remainder(pos, block_size)) * num_kv_heads + heads


def hip_mask_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    region_start: torch.Tensor,  # [num_seqs] int64, in key blocks of block_k tokens
    region_end: torch.Tensor,  # [num_seqs] int64, exclusive
    num_select: int,  # K = k / b_k key blocks kept
    block_k: int,  # b_k, tokens per key block
) -> torch.Tensor:  # [num_seqs, num_kv_heads, num_select] int64, -1 = none
    """Reference: score children with a torch gather of their centre blocks and an einsum."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    qg = _grouped_queries(q, query_start_loc, num_kv_heads)  # [B, H, R, D]
    flat = k_cache.view(-1, head_dim)
    within = torch.arange(block_k, device=q.device)
    base = region_start.view(-1, 1, 1)

    def score(cs: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        # Empty children (scored -inf by _search) read block 0 instead of past the region.
        half = torch.div(ce - cs, 2, rounding_mode="floor")
        centre = torch.where(ce > cs, base + cs + half, 0)  # [B, H, 2K]
        pos = (centre.unsqueeze(-1) * block_k + within).flatten(2)  # [B, H, 2K * b_k]
        rows = _key_index(block_tables, pos, block_size, num_kv_heads)
        keys = flat.index_select(0, rows.flatten()).view(*rows.shape, head_dim).float()
        s = torch.matmul(qg, keys.transpose(-1, -2)).amax(2)  # [B, H, 2K * b_k]
        return s.view(*cs.shape, block_k).amax(-1)

    return _search(region_start.long(), region_end.long(), num_kv_heads, num_select, score)


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _hip_search_kernel(
    q_ptr,  # [num_seqs, num_kv_heads, num_rows, head_dim] fp32 grouped queries
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    region_start_ptr,  # [num_seqs] int64, key blocks
    region_end_ptr,  # [num_seqs] int64, exclusive
    child_ptr,  # [num_seqs, num_kv_heads, 4 * K_P] int64 scratch: child starts, then ends
    score_ptr,  # [num_seqs, num_kv_heads, 2 * K_P] fp32 scratch
    out_ptr,  # [num_seqs, num_kv_heads, K] int64
    num_rows,
    stride_q_seq,
    stride_q_head,
    stride_q_row,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_bt_seq,
    K: tl.constexpr,  # num_select
    K_P: tl.constexpr,  # power of two >= max(K, 8)
    PAGE_SIZE: tl.constexpr,  # cache block_size
    BLOCK_K: tl.constexpr,  # b_k, tokens per key block
    BLOCK_K_P: tl.constexpr,  # power of two >= BLOCK_K
    TILE_C: tl.constexpr,  # children scored per inner step; divides 2 * K_P
    ROWS_P: tl.constexpr,  # power of two >= max(num_rows, 16)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # power of two >= max(HEAD_DIM, 16)
):
    """Program (seq, kv head): the whole branch-and-prune search in one launch.

    The nodes live in registers ([K_P] starts and ends; entries >= K stay empty). Each
    round writes the 2K children to scratch, scores them TILE_C at a time by their centre
    key block, and keeps the best K with one sort of (score, child) packed into int64.
    The host loop this replaces took 2.8-3.4 ms at 32k-128k on an H200 (session 15): a
    score launch, a top-k and bookkeeping per round, plus a device sync for the round count.
    """
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    prog = seq * tl.num_programs(1) + kv_head
    base = tl.load(region_start_ptr + seq)
    size = tl.maximum(tl.load(region_end_ptr + seq) - base, 0)
    r = tl.arange(0, ROWS_P)
    r_ok = r < num_rows
    d = tl.arange(0, HEAD_DIM_P)
    d_ok = d < HEAD_DIM
    q_off = seq * stride_q_seq + kv_head * stride_q_head + r[:, None] * stride_q_row + d[None, :]
    q = tl.load(q_ptr + q_off, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    # Initial nodes: K equal chunks of the region (floor bounds), the rest empty.
    i = tl.arange(0, K_P).to(tl.int64)
    node_ok = i < K
    ns = tl.where(node_ok, i * size // K, 0)
    ne = tl.where(node_ok, (i + 1) * size // K, 0)
    # ceil(log2(largest node)) rounds; exact in fp32 below 2**24 key blocks.
    largest = tl.maximum(tl.cdiv(size, K), 1)
    rounds = tl.ceil(tl.log2(largest.to(tl.float32))).to(tl.int32)
    child_row = child_ptr + prog * (4 * K_P)
    score_row = score_ptr + prog * (2 * K_P)
    c = tl.arange(0, 2 * K_P)
    n = tl.arange(0, TILE_C * BLOCK_K_P)
    within = n % BLOCK_K_P
    for _ in range(0, rounds):
        mid = ns + (ne - ns + 1) // 2  # the left child takes the ceiling half
        tl.store(child_row + i, ns)
        tl.store(child_row + K_P + i, mid)
        tl.store(child_row + 2 * K_P + i, mid)
        tl.store(child_row + 3 * K_P + i, ne)
        tl.debug_barrier()
        for t0 in range(0, 2 * K_P, TILE_C):
            child = t0 + n // BLOCK_K_P
            cs_n = tl.load(child_row + child)
            ce_n = tl.load(child_row + 2 * K_P + child)
            key_ok = (ce_n > cs_n) & (within < BLOCK_K)
            # Keys of empty children read position 0 (always cached): scored -inf below.
            pos = tl.where(key_ok, (base + cs_n + (ce_n - cs_n) // 2) * BLOCK_K + within, 0)
            page = tl.load(block_tables_ptr + seq * stride_bt_seq + pos // PAGE_SIZE)
            k_off = page.to(tl.int64) * stride_k_block + (pos % PAGE_SIZE) * stride_k_slot
            k_off += kv_head * stride_k_head
            k = tl.load(k_cache_ptr + k_off[:, None] + tl.where(d_ok, d, 0)[None, :])
            k = tl.where(d_ok[None, :], k.to(tl.float32), 0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [ROWS_P, TILE_C * BLOCK_K_P]
            s = tl.where(r_ok[:, None] & key_ok[None, :], s, float("-inf"))
            s = tl.max(tl.reshape(tl.max(s, 0), (TILE_C, BLOCK_K_P)), 1)  # [TILE_C]
            tl.store(score_row + t0 + tl.arange(0, TILE_C), s)
        tl.debug_barrier()
        cs_all = tl.load(child_row + c)
        ce_all = tl.load(child_row + 2 * K_P + c)
        sc = tl.where(ce_all > cs_all, tl.load(score_row + c), float("-inf"))
        # Order-preserving int32 image of the float, above the child index: one int64 sort.
        bits = sc.to(tl.int32, bitcast=True)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        packed = tl.sort((bits.to(tl.int64) << 32) | c.to(tl.int64), descending=True)
        best = tl.split(tl.permute(tl.reshape(packed, (2, K_P)), (1, 0)))[0]  # ranks < K_P
        chosen = best & 0x7FFFFFFF
        ns = tl.where(node_ok, tl.load(child_row + chosen), 0)
        ne = tl.where(node_ok, tl.load(child_row + 2 * K_P + chosen), 0)
        tl.debug_barrier()  # every read of this round's scratch before the next round writes
    # Ascending key blocks, the empty nodes (-1) last.
    blocks = tl.where(ne > ns, base + ns, 9223372036854775807)
    blocks = tl.sort(blocks)
    blocks = tl.where(blocks == 9223372036854775807, -1, blocks)
    tl.store(out_ptr + prog * K + i, blocks, mask=node_ok)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def hip_mask_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    region_start: torch.Tensor,  # [num_seqs] int64, in key blocks of block_k tokens
    region_end: torch.Tensor,  # [num_seqs] int64, exclusive
    num_select: int,  # K = k / b_k key blocks kept
    block_k: int,  # b_k, tokens per key block
) -> torch.Tensor:  # [num_seqs, num_kv_heads, num_select] int64, -1 = none
    """Triton launcher: checks the arguments, then one program per (seq, KV head) runs the
    whole search (_hip_search_kernel)."""
    args = (q, k_cache, block_tables, query_start_loc, region_start, region_end)
    _check_args(*args, num_select, block_k)
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    qg = _grouped_queries(q, query_start_loc, num_kv_heads).contiguous()  # [B, H, R, D]
    num_seqs, _, num_rows, _ = qg.shape
    out = torch.empty(num_seqs, num_kv_heads, num_select, dtype=torch.long, device=q.device)
    if num_seqs == 0:
        return out
    k_p = max(8, triton.next_power_of_2(num_select))
    block_k_p = triton.next_power_of_2(block_k)
    # ~64 keys a tile on the GPU (16 in the interpreter), at least 16 for tl.dot.
    keys = 64 if q.is_cuda else 16
    tile_c = min(2 * k_p, max(keys // block_k_p, triton.cdiv(16, block_k_p), 1))
    children = torch.empty(num_seqs, num_kv_heads, 4 * k_p, dtype=torch.long, device=q.device)
    scores = torch.empty(num_seqs, num_kv_heads, 2 * k_p, dtype=torch.float32, device=q.device)
    _hip_search_kernel[(num_seqs, num_kv_heads)](
        qg,
        k_cache,
        block_tables,
        region_start.long().contiguous(),
        region_end.long().contiguous(),
        children,
        scores,
        out,
        num_rows,
        qg.stride(0),
        qg.stride(1),
        qg.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        K=num_select,
        K_P=k_p,
        PAGE_SIZE=block_size,
        BLOCK_K=block_k,
        BLOCK_K_P=block_k_p,
        TILE_C=tile_c,
        ROWS_P=max(16, triton.next_power_of_2(num_rows)),
        HEAD_DIM=head_dim,
        HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)),
    )
    return out


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    region_start: torch.Tensor,
    region_end: torch.Tensor,
    num_select: int,
    block_k: int,
) -> None:
    """Raise ValueError naming the first argument whose shape, stride or dtype is wrong."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be 3-d and k_cache 4-d; got {tuple(q.shape)}, {k_cache.shape}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}")
    if q.dtype not in _FLOAT_DTYPES or k_cache.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q/k_cache must be fp16/bf16/fp32, got {q.dtype}, {k_cache.dtype}")
    if k_cache.stride(-1) != 1:
        raise ValueError(f"k_cache needs a unit last-dim stride; strides {k_cache.stride()}")
    num_seqs = query_start_loc.shape[0] - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} must be [{num_seqs}, *]")
    if region_start.shape != (num_seqs,) or region_end.shape != (num_seqs,):
        raise ValueError(
            f"region_start {tuple(region_start.shape)} and region_end"
            f" {tuple(region_end.shape)} must be [{num_seqs}]"
        )
    for name, t in (
        ("block_tables", block_tables),
        ("query_start_loc", query_start_loc),
        ("region_start", region_start),
        ("region_end", region_end),
    ):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.numel() > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit last-dim stride; strides {t.stride()}")
    tensors = (q, k_cache, block_tables, query_start_loc, region_start, region_end)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if num_select < 1 or block_k < 1:
        raise ValueError(f"num_select and block_k must be >= 1, got {num_select}, {block_k}")


def hip_mask(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    region_start: torch.Tensor,  # [num_seqs] int64, in key blocks of block_k tokens
    region_end: torch.Tensor,  # [num_seqs] int64, exclusive
    num_select: int,  # K = k / b_k key blocks kept
    block_k: int,  # b_k, tokens per key block
) -> torch.Tensor:  # [num_seqs, num_kv_heads, num_select] int64, -1 = none
    """Public op: Triton on CUDA; on CPU the C++ search where it builds, else the reference
    (see kernels/_dispatch.py)."""
    # hip_mask_search's cache layouts: bf16 or fp32, contiguous (the engine's caches are).
    cpu_kernel = (
        q.device.type == "cpu"
        and k_cache.dtype in (torch.bfloat16, torch.float32)
        and k_cache.is_contiguous()
    )
    if not use_triton(q) and cpu_kernel and hip_search_unavailable_reason() is None:
        _check_args(
            q, k_cache, block_tables, query_start_loc, region_start, region_end, num_select, block_k
        )
        qg = _grouped_queries(q, query_start_loc, k_cache.shape[2])  # [B, H, R, D]
        return hip_mask_search(
            qg, k_cache, block_tables, region_start, region_end, num_select, block_k
        )
    op = hip_mask_triton if use_triton(q) else hip_mask_ref
    return op(
        q, k_cache, block_tables, query_start_loc, region_start, region_end, num_select, block_k
    )
