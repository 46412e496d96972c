"""Attention of a step's new tokens over paged KV, with a causal or tree mask among them.

Semantics (per sequence b, its queries q[qs[b]:qs[b+1]], n_q of them, and L = seq_lens[b]
keys already stored in the cache, the new tokens' included, so ctx = L - n_q cached ones):
query i sees every key j < ctx, and new key ctx + j' when
    causal (tree_mask None): j' <= i
    tree:                    tree_mask[qs[b] + i, j']
This one op covers prefill, chunked prefill, decode (n_q = 1) and tree verification.

`_paged_attention_loop` states these semantics most plainly (one masked SDPA per sequence);
`paged_attention_ref` computes the same thing faster on CPU, where the engine runs it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slipstream.kernels._dispatch import dot_settings, kernel_backend, once_a_step, use_triton
from slipstream.kernels.cpu.paged_decode_attention import (
    KERNEL_DTYPES,
    decode_attention_applies,
    max_query_rows,
    paged_decode_attention,
)

# The padded batch path computes B * max_q * max_len scores; above this multiple of the
# real work a per-sequence loop wins (one 4096-key sequence among 31 of 128 keys pads 16x).
_MAX_PAD_RATIO = 2.0
# Keys (B * max_len) per padded box. Bigger boxes lose: fresh multi-MB K/V copies page-fault
# on every call (fp32, 32 x 1024 keys: 12 ms user + 4-20 ms sys vs 23 ms for a plain loop).
_MAX_PAD_KEYS = 4096
# A causal chunk of at least this many new tokens after cached ones (chunked prefill, a
# prefix-cache hit) attends in two unmasked parts merged by their log-sum-exp (see
# _attend_chunk) instead of one SDPA call with an explicit mask: at 8k the mask is
# [2048 x 3, 8192] floats a layer, and SDPA's masked path ran 0.65-0.72 s a layer for a
# 2048-token chunk over 8k keys against 0.40 s for the two parts (float32, 2 cores).
_SPLIT_CHUNK_ROWS = 256
# PyTorch's CPU flash-attention kernel, which also returns each row's log-sum-exp (an
# internal op of torch; where a build lacks it, chunks keep the masked call).
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _paged_attention_loop(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Ground truth: one masked SDPA call per sequence over its gathered KV (slow, plain)."""
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


# ----------------------------------------------------------------------------- reference


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
    plan: dict[str, Any] | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Reference (PyTorch, any device): as few SDPA calls as the batch allows.

    `plan` is a per-step dict shared by every layer (AttentionMetadata.scratch). Index
    tensors and masks depend only on the step's metadata, so the first layer builds them
    and the other layers reuse them: at 32 decode sequences that is ~20 small ops per
    layer saved, 30 layers a step.
    """
    if plan is None:
        plan = {}
    starts, lens = _host_lists(plan, query_start_loc, seq_lens)
    seqs = [b for b in range(len(lens)) if starts[b + 1] > starts[b]]
    if len(seqs) == 1 and q.shape[0] == starts[seqs[0] + 1] - starts[seqs[0]]:
        # Batch-1 decode and single prefills: no output copy, no padding.
        b = seqs[0]
        mask_cache = plan.setdefault(f"pa_one{b}", {})
        return _attend_one(
            q, k_cache, v_cache, block_tables[b], lens[b], scale, tree_mask, mask_cache
        )
    out = torch.empty_like(q)
    for chunk in _chunks(seqs, starts, lens):
        if len(chunk) > 1:
            box = plan.setdefault(f"pa_box{chunk}", {})
            _attend_padded(
                out, q, k_cache, v_cache, block_tables, starts, lens, chunk, scale, tree_mask, box
            )
            continue
        b = chunk[0]
        s, e = starts[b], starts[b + 1]
        tm = None if tree_mask is None else tree_mask[s:e]
        mask_cache = plan.setdefault(f"pa_one{b}", {})
        out[s:e] = _attend_one(
            q[s:e], k_cache, v_cache, block_tables[b], lens[b], scale, tm, mask_cache
        )
    return out


def _host_lists(
    plan: dict[str, Any], query_start_loc: torch.Tensor, seq_lens: torch.Tensor
) -> tuple[list[int], list[int]]:
    """The step's query starts and sequence lengths as lists, read once into `plan`."""
    if "pa_starts" not in plan:
        plan["pa_starts"] = query_start_loc.tolist()
        plan["pa_lens"] = seq_lens.tolist()
    return plan["pa_starts"], plan["pa_lens"]


def _chunks(seqs: list[int], starts: list[int], lens: list[int]) -> list[list[int]]:
    """Split sequences into runs worth padding to one [B, max_q, max_len] box.

    A run grows while its box stays within _MAX_PAD_RATIO of the real work and within
    _MAX_PAD_KEYS keys; a run of one goes through _attend_one.
    Example: decode lens [100, 120, 4000] -> [[0, 1], [2]] (padding 100 keys to 4000 is 40x).
    """
    chunks: list[list[int]] = []
    run: list[int] = []
    max_q = max_len = real = 0
    for b in seqs:
        n, length = starts[b + 1] - starts[b], lens[b]
        q_box, len_box = max(max_q, n), max(max_len, length)
        box = (len(run) + 1) * q_box * len_box
        fits = (len(run) + 1) * len_box <= _MAX_PAD_KEYS
        if run and fits and box <= _MAX_PAD_RATIO * (real + n * length):
            run.append(b)
            max_q, max_len, real = q_box, len_box, real + n * length
        else:
            if run:
                chunks.append(run)
            run, max_q, max_len, real = [b], n, length, n * length
    if run:
        chunks.append(run)
    return chunks


def _attend_one(
    q: torch.Tensor,  # [num_q, num_heads, head_dim], one sequence's queries
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks_per_seq] int32
    seq_len: int,
    scale: float,
    tree_mask: torch.Tensor | None,  # [num_q, >= num_q] bool
    cache: dict[str, Any] | None = None,  # per-step scratch for this sequence, shared by layers
) -> torch.Tensor:  # [num_q, num_heads, head_dim]
    """One sequence: gather its pages, then one SDPA call (mask only where one is needed).

    The mask depends on the step's metadata only, so with `cache` the first layer builds it
    and the others reuse it: ~13 us per layer for a 5-13 token tree step (0.4 ms a step, 30
    layers; 2 cores).
    """
    num_q, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    ctx = seq_len - num_q
    blocks = block_table[: (seq_len + block_size - 1) // block_size]
    # index_select on whole pages: 4 us vs 25 us for k_cache[blocks] (fp32, 8 pages of 16).
    k = k_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:seq_len]
    v = v_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:seq_len]
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    k = k.transpose(0, 1).unsqueeze(0)  # [1, num_kv_heads, seq_len, head_dim]
    v = v.transpose(0, 1).unsqueeze(0)
    if num_q == 1 and tree_mask is None:
        # Decode: every key is visible, so no mask; each op here costs ~1-2 us at 128 keys.
        qg = q.view(1, num_kv_heads, group, head_dim)
        # reshape: on CUDA the output of the fused kernels need not be contiguous.
        return F.scaled_dot_product_attention(qg, k, v, scale=scale).reshape(q.shape)
    if tree_mask is None and ctx == 0 and num_q > 1:
        # Plain prefill: is_causal with GQA is ~10% faster than an explicit mask (128 tokens).
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k, v, is_causal=True, scale=scale, enable_gqa=True
        )
        return o[0].transpose(0, 1)
    if (
        tree_mask is None
        and num_q >= _SPLIT_CHUNK_ROWS
        and q.device.type == "cpu"
        and _FLASH_WITH_LSE is not None
    ):
        return _attend_chunk(q, k, v, ctx, scale)
    qg = _grouped_queries(q, num_kv_heads)
    mask = None if cache is None else cache.get("mask")
    if mask is None:
        allowed = _new_token_mask(num_q, seq_len, tree_mask, q.device).repeat_interleave(group, 0)
        # Additive in q's dtype: SDPA on CPU turns a bool mask into this on every call; built
        # once a step it saves ~13 us a layer (bf16, 27 query rows x 300 keys, 90 vs 103 us).
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        mask.masked_fill_(~allowed, float("-inf"))
        if cache is not None:
            cache["mask"] = mask
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return o.reshape(num_kv_heads, num_q, group, head_dim).transpose(0, 1).reshape(q.shape)


def _grouped_queries(
    q: torch.Tensor,  # [num_q, num_heads, head_dim]
    num_kv_heads: int,
) -> torch.Tensor:  # [1, num_kv_heads, num_q * group, head_dim]
    """The grouped layout: a KV head's `group` query heads become extra query rows (row r is
    query r // group, head g * group + r % group), so no GQA expansion of the keys; bf16
    decode at 1024 keys takes 0.14 ms this way vs ~1 ms with enable_gqa."""
    num_q, num_heads, head_dim = q.shape
    qg = q.view(num_q, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)
    return qg.reshape(1, num_kv_heads, num_q * (num_heads // num_kv_heads), head_dim)


def _attend_chunk(
    q: torch.Tensor,  # [num_q, num_heads, head_dim], a causal chunk's queries
    k: torch.Tensor,  # [1, num_kv_heads, ctx + num_q, head_dim], cached keys then the chunk's
    v: torch.Tensor,  # [1, num_kv_heads, ctx + num_q, head_dim]
    ctx: int,  # > 0 (a chunk with no cached keys takes SDPA's is_causal)
    scale: float,
) -> torch.Tensor:  # [num_q, num_heads, head_dim]
    """A causal chunk after `ctx` cached keys, in two parts: every query over the cached
    keys (no mask), and over the chunk's own keys (causal, square), merged by the parts'
    log-sum-exp: softmax over the union = the parts' outputs weighted by exp(lse - lse_all)."""
    assert _FLASH_WITH_LSE is not None
    num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, num_q, D]
    # The chunk's own keys per query head: a copy of num_q keys (the cached ones need none).
    k_new = k[:, :, ctx:].repeat_interleave(group, 1)
    v_new = v[:, :, ctx:].repeat_interleave(group, 1)
    out_new, lse_new = _FLASH_WITH_LSE(qh, k_new, v_new, 0.0, True, scale=scale)
    # Cached keys: the grouped layout, no expansion.
    qg = _grouped_queries(q, num_kv_heads)
    out_old, lse_old = _FLASH_WITH_LSE(qg, k[:, :, :ctx], v[:, :, :ctx], 0.0, False, scale=scale)
    # Back to [1, H, num_q, ...].
    out_old = out_old.view(num_kv_heads, num_q, group, head_dim).transpose(1, 2)
    out_old = out_old.reshape(1, num_heads, num_q, head_dim)
    lse_old = lse_old.view(num_kv_heads, num_q, group).transpose(1, 2).reshape(1, num_heads, num_q)
    top = torch.maximum(lse_old, lse_new)
    w_old = torch.exp(lse_old - top).unsqueeze(-1)  # [1, H, num_q, 1] float32
    w_new = torch.exp(lse_new - top).unsqueeze(-1)
    merged = (out_old.float() * w_old + out_new.float() * w_new) / (w_old + w_new)
    return merged[0].transpose(0, 1).to(q.dtype)


def _new_token_mask(
    num_q: int,
    seq_len: int,
    tree_mask: torch.Tensor | None,  # [num_q, >= num_q] bool
    device: torch.device,
) -> torch.Tensor:  # [num_q, seq_len] bool
    """Which keys each new token sees: all cached ones, then causal or tree among the new."""
    ctx = seq_len - num_q
    if tree_mask is None:
        rows = torch.arange(num_q, device=device).unsqueeze(1)
        return torch.arange(seq_len, device=device) <= rows + ctx
    cached = torch.ones(num_q, ctx, dtype=torch.bool, device=device)
    return torch.cat([cached, tree_mask[:, :num_q].to(torch.bool)], dim=1)


def _attend_padded(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written for `seqs`' tokens
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    starts: list[int],
    lens: list[int],
    seqs: list[int],
    scale: float,
    tree_mask: torch.Tensor | None,  # [num_tokens, max_query_len] bool
    box: dict[str, Any],  # cache of this box's index tensors and mask, shared across layers
) -> None:
    """Many sequences at once: pad queries and keys to a [B, max_q, max_len] box, one SDPA."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = len(seqs)
    if "rows" not in box:
        box.update(_box_plan(q, k_cache, block_tables, starts, lens, seqs, tree_mask))
    rows, tok, mask, valid = box["rows"], box["tok"], box["mask"], box["valid"]
    max_q, max_len = box["max_q"], box["max_len"]
    shape = (num_seqs, num_kv_heads, max_len, head_dim)
    k = k_cache.view(-1, head_dim).index_select(0, rows).view(shape).to(q.dtype)
    v = v_cache.view(-1, head_dim).index_select(0, rows).view(shape).to(q.dtype)
    qg = q[tok].view(num_seqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
    qg = qg.reshape(num_seqs, num_kv_heads, max_q * group, head_dim)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    o = o.reshape(num_seqs, num_kv_heads, max_q, group, head_dim).permute(0, 2, 1, 3, 4)
    o = o.reshape(num_seqs, max_q, num_heads, head_dim)
    out[tok[valid]] = o[valid]


def _box_plan(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    starts: list[int],
    lens: list[int],
    seqs: list[int],
    tree_mask: torch.Tensor | None,  # [num_tokens, max_query_len] bool
) -> dict[str, Any]:
    """Index tensors and mask of one padded box (they depend on metadata only)."""
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    dev = q.device
    num_seqs = len(seqs)
    seq_idx = torch.tensor(seqs, device=dev)
    start = torch.tensor([starts[b] for b in seqs], device=dev).unsqueeze(1)  # [B, 1]
    num_q = torch.tensor([starts[b + 1] - starts[b] for b in seqs], device=dev).unsqueeze(1)
    seq_len = torch.tensor([lens[b] for b in seqs], device=dev).unsqueeze(1)  # [B, 1]
    max_q = max(starts[b + 1] - starts[b] for b in seqs)
    max_len = max(lens[b] for b in seqs)

    # Key j of row b reads slot min(j, len-1): padding repeats the last real key, which is
    # written (finite); a page's unwritten tail may hold NaN and 0 * NaN poisons the output.
    pos = torch.minimum(torch.arange(max_len, device=dev), seq_len - 1)  # [B, max_len]
    pages = torch.gather(block_tables[seq_idx], 1, pos // block_size).long()
    slots = pages * block_size + pos % block_size  # [B, max_len]
    # Gather head-major rows of head_dim so K/V come out contiguous [B, kv_heads, len, dim]:
    # SDPA on the strided [B, len, kv_heads, dim] view costs 2.4 ms vs 1.0 ms (fp32, 8 x 1024).
    heads = torch.arange(num_kv_heads, device=dev).view(1, -1, 1)
    rows = (slots.unsqueeze(1) * num_kv_heads + heads).flatten()  # [B * kv_heads * max_len]

    # Query i of row b is token start + min(i, num_q - 1); padded rows are dropped at the end.
    i = torch.arange(max_q, device=dev)  # [max_q]
    tok = start + torch.minimum(i, num_q - 1)  # [B, max_q]

    j = torch.arange(max_len, device=dev).view(1, 1, -1)  # [1, 1, max_len]
    ctx = (seq_len - num_q).unsqueeze(2)  # [B, 1, 1]
    in_seq = j < seq_len.unsqueeze(2)  # [B, 1, max_len]
    if tree_mask is None:
        mask = (j <= ctx + i.view(1, -1, 1)) & in_seq  # [B, max_q, max_len]
    else:
        rel = (j - ctx).clamp(0, tree_mask.shape[1] - 1).expand(num_seqs, max_q, max_len)
        tree = torch.gather(tree_mask[tok].to(torch.bool), 2, rel)
        mask = ((j < ctx) | tree) & in_seq
    # NOTE: padded query rows must see some key, or SDPA returns NaN rows (dropped anyway).
    mask |= (i.view(1, -1, 1) >= num_q.unsqueeze(2)) & (j == 0)
    mask = mask.repeat_interleave(group, 1).unsqueeze(1)  # [B, 1, max_q * group, max_len]
    valid = i < num_q  # [B, max_q]; for real rows tok = start + i
    return {
        "rows": rows,
        "tok": tok,
        "mask": mask,
        "valid": valid,
        "max_q": max_q,
        "max_len": max_len,
    }


# ----------------------------------------------------------------------------- Triton


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


# ----------------------------------------------------------------------------- dispatch


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
    plan: dict[str, Any] | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Public op: Triton on CUDA; on CPU the C++ kernel for the sequences of few rows
    (decode, tree verification; see _StepSplit where a long prefill chunk shares the step),
    the reference for the rest (see kernels/_dispatch.py)."""
    if use_triton(q, plan):
        return paged_attention_triton(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, tree_mask
        )
    if use_cpu_decode_kernel(q, k_cache, query_start_loc, seq_lens, plan):
        return paged_decode_attention(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, tree_mask, plan
        )
    split = once_a_step(
        plan,
        "pa_split",
        lambda: _split_step(q, k_cache, block_tables, query_start_loc, seq_lens, tree_mask, plan),
    )
    if split is not None:
        return split.attend(q, k_cache, v_cache, scale)
    return paged_attention_ref(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, tree_mask, plan
    )


@dataclass(frozen=True)
class _SeqSubset:
    """Some of a step's sequences as a step of their own: their rows of q, and metadata."""

    rows: torch.Tensor  # [n] int64, the subset's tokens in the step
    block_tables: torch.Tensor  # [s, max_blocks] int32
    query_start_loc: torch.Tensor  # [s + 1] int32
    seq_lens: torch.Tensor  # [s] int32
    tree_mask: torch.Tensor | None  # [n, longest of the subset] bool
    plan: dict[str, Any]  # the subset's own per-step cache (host lists, converted metadata)


@dataclass(frozen=True)
class _StepSplit:
    """A CPU step where some sequences feed few rows (decode, draft trees) and others a long
    prefill chunk: the few-row sequences take paged_decode_attention as they would in a step
    of their own, the long chunks the reference.

    Why: taking the reference for the whole step gave a decode row other bits whenever a
    prefill shared its step (the reference rounds by shape), so a served request's greedy
    answer depended on when other requests arrived: standard at 16 concurrent sequences
    answered 3 of 32 builtin prompts otherwise than alone (bf16, 2 cores), and token
    recycling, whose steps fall differently, differed from standard on 4.
    """

    few: _SeqSubset
    many: _SeqSubset

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        out = torch.empty_like(q)
        f, m = self.few, self.many
        few_out = paged_decode_attention(
            q.index_select(0, f.rows), k_cache, v_cache, f.block_tables, f.query_start_loc,
            f.seq_lens, scale, f.tree_mask, f.plan,
        )  # fmt: skip
        out.index_copy_(0, f.rows, few_out)
        many_out = paged_attention_ref(
            q.index_select(0, m.rows), k_cache, v_cache, m.block_tables, m.query_start_loc,
            m.seq_lens, scale, m.tree_mask, m.plan,
        )  # fmt: skip
        out.index_copy_(0, m.rows, many_out)
        return out


def _split_step(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    plan: dict[str, Any] | None,
) -> _StepSplit | None:
    """The step cut into few-row and long sequences, where the CPU kernel takes the first
    and both kinds are present; else None."""
    if q.device.type != "cpu" or q.dtype not in KERNEL_DTYPES or kernel_backend() != "auto":
        return None
    few_max = max_query_rows(q.dtype)
    if not decode_attention_applies(q, k_cache, few_max):
        return None
    starts, _ = _host_lists({} if plan is None else plan, query_start_loc, seq_lens)
    counts = [e - s for s, e in itertools.pairwise(starts)]
    few = [b for b, n in enumerate(counts) if 0 < n <= few_max]
    many = [b for b, n in enumerate(counts) if n > few_max]
    if not few or not many:
        return None

    def subset(seqs: list[int]) -> _SeqSubset:
        rows = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in seqs])
        sizes = [counts[b] for b in seqs]
        index = torch.tensor(seqs)
        return _SeqSubset(
            rows=rows,
            block_tables=block_tables.index_select(0, index),
            query_start_loc=torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32),
            seq_lens=seq_lens.index_select(0, index),
            tree_mask=None if tree_mask is None else tree_mask[rows, : max(sizes)],
            plan={},
        )

    return _StepSplit(subset(few), subset(many))


def use_cpu_decode_kernel(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    plan: dict[str, Any] | None,
) -> bool:
    """Whether this step runs paged_decode_attention; decided once a step with `plan`."""
    if plan is None:
        plan = {}

    def decide() -> bool:
        # The device and dtype first: on CUDA, reading query_start_loc would sync.
        if q.device.type != "cpu" or q.dtype not in KERNEL_DTYPES or kernel_backend() != "auto":
            return False
        starts, _ = _host_lists(plan, query_start_loc, seq_lens)
        longest = max((e - s for s, e in itertools.pairwise(starts)), default=0)
        return bool(decode_attention_applies(q, k_cache, longest))

    return once_a_step(plan, "pa_cpu_kernel", decide)
