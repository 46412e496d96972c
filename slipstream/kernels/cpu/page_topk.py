"""Block top-k page selection: each sequence's k best KV pages per KV head (page_topk.cpp),
and its PyTorch reference.

A page's score is its summary row (Kinetics: the page's mean key; Quest: its per-channel
max | min keys, with the query split into positive | negative parts) dotted with the
sequence's pooled query, the best over the query vectors given per KV head (one when the
group's queries were averaged). Pages below `sink_pages` (always read anyway) and from
`region_end` on (the local window, always read) are not candidates.
"""

from __future__ import annotations

import ctypes

import torch

from slipstream.kernels.cpu.build import CppFunction

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# q, seqs, kv heads, group, width, summary, blocks, tables + stride, region ends, sink pages,
# top-k, k max, out, threads
_TOPK = CppFunction(
    "page_topk.cpp",
    "slipstream_page_topk",
    [_P, _I64, _I64, _I64, _I64, _P, _I64, _P, _I64, _P, _I64, _P, _I64, _P, ctypes.c_int],
)


def page_topk_unavailable_reason() -> str | None:
    """None when page_topk can run here, else why not."""
    return _TOPK.unavailable_reason()


def page_topk_ref(
    q: torch.Tensor,  # [R, H, G, W] fp32 pooled queries
    summary: torch.Tensor,  # [H, num_blocks, W] fp32 page summaries, head-major
    tables: torch.Tensor,  # [R, >= max(region_end)] int32 block tables
    region_end: list[int],  # per sequence: logical pages from here on are not candidates
    sink_pages: int,
    top_k: list[int],  # pages kept per sequence
) -> torch.Tensor:  # [R, H, max(top_k)] int64 logical pages, best first, -1 padded
    """One gather of the scored pages' summaries, one batched product, a masked top-k."""
    num_seqs, heads, width = q.shape[0], q.shape[1], q.shape[3]
    num_scored = max(region_end, default=0)
    k_max = max(top_k, default=0)
    if num_scored == 0 or k_max == 0:
        return torch.full((num_seqs, heads, k_max), -1, dtype=torch.long, device=q.device)
    scored = tables[:, :num_scored].reshape(-1).long()
    rows = summary.index_select(1, scored).view(heads, num_seqs, num_scored, width)
    scores = torch.matmul(q.transpose(0, 1), rows.transpose(2, 3))  # [H, R, G, P]
    scores = scores.amax(2).transpose(0, 1)  # [R, H, P]
    dev = q.device
    pos = torch.arange(num_scored, device=dev).view(1, 1, -1)
    ends = torch.tensor(region_end, device=dev).view(-1, 1, 1)
    ineligible = (pos < sink_pages) | (pos >= ends)
    scores = scores.masked_fill(ineligible, float("-inf"))
    top = torch.topk(scores, min(k_max, num_scored), dim=-1)
    chosen = torch.where(top.values > float("-inf"), top.indices, -1)
    if min(top_k) != k_max:  # budget_fraction: fewer pages for shorter contexts
        rank = torch.arange(chosen.shape[-1], device=dev).view(1, 1, -1)
        chosen = chosen.masked_fill(rank >= torch.tensor(top_k, device=dev).view(-1, 1, 1), -1)
    if chosen.shape[-1] < k_max:
        pad = chosen.new_full((num_seqs, heads, k_max - chosen.shape[-1]), -1)
        chosen = torch.cat([chosen, pad], -1)
    return chosen


def page_topk(
    q: torch.Tensor,  # [R, H, G, W] fp32
    summary: torch.Tensor,  # [H, num_blocks, W] fp32, contiguous
    tables: torch.Tensor,  # [R, >= max(region_end)] int32
    region_end: list[int],
    sink_pages: int,
    top_k: list[int],
) -> torch.Tensor:  # [R, H, max(top_k)] int64
    """page_topk_ref's selection through the C++ kernel (CPU tensors). Ties go to the lower
    page here; torch.topk's order among equal scores is unspecified."""
    fn = _TOPK.get()
    num_seqs, heads, group, width = q.shape
    if summary.shape != (heads, summary.shape[1], width) or not summary.is_contiguous():
        raise ValueError(f"summary {tuple(summary.shape)} must be contiguous [{heads}, *, {width}]")
    if summary.dtype != torch.float32:
        raise ValueError(f"summary must be float32, got {summary.dtype}")
    if tables.dim() != 2 or tables.shape[0] != num_seqs:
        raise ValueError(f"tables {tuple(tables.shape)} must be [{num_seqs}, *]")
    if len(region_end) != num_seqs or len(top_k) != num_seqs:
        raise ValueError(f"region_end and top_k need one entry per sequence ({num_seqs})")
    if max(region_end, default=0) > tables.shape[1]:
        raise ValueError(f"region_end {max(region_end)} exceeds the tables' width")
    q = q.float().contiguous()
    tables = tables.to(torch.int32)
    if tables.stride(-1) != 1:
        tables = tables.contiguous()
    ends = torch.tensor(region_end, dtype=torch.int64)
    ks = torch.tensor(top_k, dtype=torch.int64)
    k_max = max(top_k, default=0)
    out = torch.empty(num_seqs, heads, k_max, dtype=torch.long)
    status = fn(
        q.data_ptr(),
        num_seqs,
        heads,
        group,
        width,
        summary.data_ptr(),
        summary.shape[1],
        tables.data_ptr(),
        tables.stride(0),
        ends.data_ptr(),
        sink_pages,
        ks.data_ptr(),
        k_max,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError("a block table entry lies outside the page summaries")
    return out


def select_top_pages(
    q: torch.Tensor,  # [R, H, G, W] fp32
    summary: torch.Tensor,  # [H, num_blocks, W] fp32
    tables: torch.Tensor,  # [R, >= max(region_end)] int32
    region_end: list[int],
    sink_pages: int,
    top_k: list[int],
) -> torch.Tensor:  # [R, H, max(top_k)] int64
    """The C++ kernel for CPU tensors where it runs, else the reference (CUDA included)."""
    if q.device.type == "cpu" and page_topk_unavailable_reason() is None:
        return page_topk(q, summary, tables, region_end, sink_pages, top_k)
    return page_topk_ref(q, summary, tables, region_end, sink_pages, top_k)
