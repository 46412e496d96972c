"""Block top-k's page scores: every candidate page's summary dotted with the pooled query.

scores[r, h, p] = max over the G query vectors of q[r, h, g] . summary[h, tables[r, p]],
-inf for pages that are not candidates (p < sink_pages or p >= region_end[r]). The
reference is a gather, a batched product and a mask (about ten launches and a host-to-device
copy on CUDA); the Triton kernel does it in one launch, tiles of pages in parallel. Top-k
over the scores stays torch.topk (cpu/page_topk.py's page_topk_ref).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def page_scores_ref(
    q: torch.Tensor,  # [R, H, G, W] fp32 pooled queries
    summary: torch.Tensor,  # [H, num_blocks, W] fp32 page summaries, head-major
    tables: torch.Tensor,  # [R, >= max(region_end)] int32 block tables
    region_end: list[int],  # per sequence: logical pages from here on are not candidates
    sink_pages: int,
) -> torch.Tensor:  # [R, H, max(region_end)] fp32
    """One gather of the scored pages' summaries, one batched product, a mask."""
    num_seqs, heads, width = q.shape[0], q.shape[1], q.shape[3]
    num_scored = max(region_end, default=0)
    scored = tables[:, :num_scored].reshape(-1).long()
    rows = summary.index_select(1, scored).view(heads, num_seqs, num_scored, width)
    scores = torch.matmul(q.transpose(0, 1), rows.transpose(2, 3))  # [H, R, G, P]
    scores = scores.amax(2).transpose(0, 1)  # [R, H, P]
    pos = torch.arange(num_scored, device=q.device).view(1, 1, -1)
    ends = index_tensor(region_end, q.device).view(-1, 1, 1)
    return scores.masked_fill((pos < sink_pages) | (pos >= ends), float("-inf"))


@triton.jit
def _page_scores_kernel(
    q_ptr,  # [R, H, G, W] fp32
    summary_ptr,  # [H, num_blocks, W] fp32
    tables_ptr,  # [R, max_blocks] int32
    region_end_ptr,  # [R] int64
    out_ptr,  # [R, H, P] fp32
    num_pages,  # P = max(region_end)
    sink_pages,
    stride_q_seq,
    stride_q_head,
    stride_q_row,
    stride_s_head,
    stride_s_block,
    stride_t_seq,
    stride_o_seq,
    stride_o_head,
    G: tl.constexpr,  # query vectors per KV head
    WIDTH: tl.constexpr,
    WIDTH_P: tl.constexpr,  # power of two >= WIDTH
    BLOCK_P: tl.constexpr,  # pages per program
):
    """Program (seq, kv head, page tile): BLOCK_P pages' best q . summary over G queries."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = p < num_pages
    end = tl.load(region_end_ptr + seq)
    ok = (p >= sink_pages) & (p < end)
    w = tl.arange(0, WIDTH_P)
    w_ok = w < WIDTH
    # Non-candidates read page 0's row (a valid block) instead of a masked gather.
    block = tl.load(tables_ptr + seq * stride_t_seq + tl.where(ok, p, 0)).to(tl.int64)
    s_off = head * stride_s_head + block[:, None] * stride_s_block + tl.where(w_ok, w, 0)[None, :]
    rows = tl.where(w_ok[None, :], tl.load(summary_ptr + s_off), 0.0)  # [BLOCK_P, WIDTH_P]
    best = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    for g in range(G):
        q_off = seq * stride_q_seq + head * stride_q_head + g * stride_q_row
        qv = tl.load(q_ptr + q_off + w, mask=w_ok, other=0.0)  # [WIDTH_P]
        best = tl.maximum(best, tl.sum(rows * qv[None, :], 1))
    out = tl.where(ok, best, float("-inf"))
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + p, out, mask=in_range)


def page_scores_triton(
    q: torch.Tensor,  # [R, H, G, W] fp32
    summary: torch.Tensor,  # [H, num_blocks, W] fp32
    tables: torch.Tensor,  # [R, >= max(region_end)] int32
    region_end: list[int],
    sink_pages: int,
) -> torch.Tensor:  # [R, H, max(region_end)] fp32
    """Triton launcher: checks the arguments, then one program per (seq, KV head, tile)."""
    num_seqs, heads, group, width = q.shape
    if q.dtype != torch.float32 or summary.dtype != torch.float32:
        raise ValueError(f"q and summary must be float32, got {q.dtype}, {summary.dtype}")
    if summary.dim() != 3 or summary.shape[0] != heads or summary.shape[2] != width:
        raise ValueError(f"summary {tuple(summary.shape)} must be [{heads}, *, {width}]")
    if q.stride(-1) != 1 or summary.stride(-1) != 1:
        raise ValueError("q and summary need a unit last-dim stride")
    if tables.dim() != 2 or tables.shape[0] != num_seqs or tables.stride(-1) != 1:
        raise ValueError(f"tables {tuple(tables.shape)} must be [{num_seqs}, *], unit stride")
    if len(region_end) != num_seqs:
        raise ValueError(f"region_end has {len(region_end)} entries for {num_seqs} sequences")
    num_pages = max(region_end, default=0)
    if num_pages > tables.shape[1]:
        raise ValueError(f"region_end {num_pages} is past the tables' {tables.shape[1]} pages")
    out = torch.empty(num_seqs, heads, num_pages, dtype=torch.float32, device=q.device)
    if num_pages == 0 or num_seqs == 0:
        return out
    ends = index_tensor(region_end, q.device)
    block_p = 64 if q.is_cuda else 16
    grid = (num_seqs, heads, triton.cdiv(num_pages, block_p))
    _page_scores_kernel[grid](
        q,
        summary,
        tables,
        ends,
        out,
        num_pages,
        sink_pages,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        summary.stride(0),
        summary.stride(1),
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        G=group,
        WIDTH=width,
        WIDTH_P=triton.next_power_of_2(width),
        BLOCK_P=block_p,
    )
    return out


# Small int64 lists as tensors, kept per (device, values): region ends and budgets change
# once a page in decoding (every 16 steps), torch.tensor costs ~5 us a call (a few per
# layer), and on CUDA a cached tensor also lets the step be captured in a CUDA graph (a
# host-to-device copy cannot be). Bounded: cleared at 256 entries.
_INDEX_TENSORS: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """values as an int64 tensor on device, shared by every caller asking for the same
    values there (read it, never write it)."""
    key = (device, tuple(values))
    found = _INDEX_TENSORS.get(key)
    if found is None:
        if len(_INDEX_TENSORS) >= 256:
            _INDEX_TENSORS.clear()
        found = _INDEX_TENSORS[key] = torch.tensor(values, dtype=torch.int64, device=device)
    return found
