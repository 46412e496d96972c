"""Paged attention in PyTorch: the reference the CPU engine runs, and a plain ground truth.

Semantics: kernels/paged_attention.py. `_paged_attention_loop` states them most plainly
(one masked SDPA per sequence); `paged_attention_ref` computes the same thing faster, with
as few SDPA calls as the batch allows. Triton kernels (paged_attention_triton.py) and the
C++ CPU kernel (cpu/paged_decode_attention.py) are tested against these.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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
