"""Block top-k page selection: each sequence's k best KV pages per KV head (page_topk.cpp),
and its PyTorch reference.

A page's score is its summary row (Kinetics: the page's mean key; Quest: its per-channel
max | min keys, with the query split into positive | negative parts) dotted with the
sequence's pooled query, the best over the query vectors given per KV head (one when the
group's queries were averaged). Pages below `sink_pages` (always read anyway) and from
`region_end` on (the local window, always read) are not candidates.

Pinned pages (SnapKV's, chosen at the prompt's end) lead each row of the result; a chosen page
that is also pinned is dropped (-1) from the choice, so every page is read once.

With a Rerank, the page score only shortlists `shortlist` pages, which are ranked again by
their best exact key logit (any slot, any query head of the group): page summaries dilute
the one key a copy step needs (a digit among 16 tokens).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from slipstream.kernels._dispatch import use_triton
from slipstream.kernels.cpu.build import CppFunction
from slipstream.kernels.page_scores import index_tensor, page_scores_ref, page_scores_triton

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# q, seqs, kv heads, group, width, summary, blocks, tables + stride, region ends, sink pages,
# top-k, k max, pinned pages (or NULL) + their count, out, threads; rerank: query heads, their
# group, k cache (or NULL), block size, head dim, shortlist
_TOPK_ARGTYPES = [_P, _I64, _I64, _I64, _I64, _P, _I64, _P, _I64, _P, _I64, _P, _I64]
_TOPK_ARGTYPES += [_P, _I64, _P, ctypes.c_int, _P, _I64, _P, _I64, _I64, _I64]
# Instruction set -> the build. The AVX2 one has no rerank (the selection only).
_BUILDS = {
    isa: CppFunction("page_topk.cpp", "slipstream_page_topk", _TOPK_ARGTYPES, isa=isa)
    for isa in ("avx512_bf16", "avx2_fma")
}


@dataclass(frozen=True)
class Rerank:
    """The second, exact stage of the selection."""

    qh: torch.Tensor  # [R, H, G, D] fp32: every query head of each KV head's group
    k_cache: torch.Tensor  # [num_blocks, block_size, H, D]
    shortlist: int  # pages the page score keeps for reranking (> the pages selected)


def _candidates(isa: str | None, rerank: bool) -> list[str]:
    """The builds that could serve: `isa`'s or all (AVX512 first); a rerank, AVX512's only."""
    names = [isa] if isa is not None else list(_BUILDS)
    return [n for n in names if not rerank or n == "avx512_bf16"]


def _first_build(isa: str | None, rerank: bool) -> CppFunction | None:
    """The first candidate build that runs here, or None."""
    for name in _candidates(isa, rerank):
        if _BUILDS[name].unavailable_reason() is None:
            return _BUILDS[name]
    return None


def page_topk_unavailable_reason(isa: str | None = None, rerank: bool = False) -> str | None:
    """None when page_topk can run here (with `rerank`: the AVX512 build only), else why
    not. isa: one build ("avx512_bf16" or "avx2_fma"); None: either."""
    if _first_build(isa, rerank) is not None:
        return None
    names = _candidates(isa, rerank)
    if not names:
        return "a rerank needs the avx512_bf16 build"
    return "; ".join(f"{n}: {_BUILDS[n].unavailable_reason()}" for n in names)


def best_key_logits(
    qh: torch.Tensor,  # [n, H, G, D] fp32, every query head of each group
    k_cache: torch.Tensor,  # [num_blocks, block_size, H, D]
    tables: torch.Tensor,  # [n, >= P] block tables
    pages: torch.Tensor,  # [n, H, C] int64 logical pages (< P; a shortlist per KV head)
) -> torch.Tensor:  # [n, H, C] fp32
    """Each listed page's highest q . k over its keys and the group's query heads."""
    n, heads, c = pages.shape
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    # Rows of k_cache viewed as [num_blocks * block_size * H, D]: one contiguous D-vector
    # per (page, slot, head). A flat index_select + bmm runs ~1.8x faster on CPU than
    # advanced indexing + einsum (376 pages x 16 slots x 3 heads: 0.30 vs 0.57 ms).
    page_rows = tables.long() * (block_size * heads)  # [n, *] first row of each page
    first = page_rows.gather(1, pages.view(n, -1)).view(n, heads, c, 1)
    slot = torch.arange(block_size, device=qh.device).view(1, 1, 1, -1)
    head = torch.arange(heads, device=qh.device).view(1, -1, 1, 1)
    keys = k_cache.view(-1, head_dim).index_select(0, (first + slot * heads + head).view(-1))
    keys = keys.view(n * heads, c * block_size, head_dim)
    group = qh.shape[2]
    query = qh.to(keys.dtype).reshape(n * heads, group, head_dim).transpose(1, 2)
    logits = torch.bmm(keys, query)  # [n * H, C * block_size, G]
    return logits.view(n, heads, c, block_size * group).amax(-1).float()


def page_topk_ref(
    q: torch.Tensor,  # [R, H, G, W] fp32 pooled queries
    summary: torch.Tensor,  # [H, num_blocks, W] fp32 page summaries, head-major
    tables: torch.Tensor,  # [R, >= max(region_end)] int32 block tables
    region_end: list[int],  # per sequence: logical pages from here on are not candidates
    sink_pages: int,
    top_k: list[int],  # pages kept per sequence
    rerank: Rerank | None = None,
    pinned: torch.Tensor | None = None,  # [R, H, P] int64 logical pages, -1 padded
) -> torch.Tensor:  # [R, H, P + max(top_k)] int64 logical pages: pins, then best first, -1 pad
    """The page scores (one Triton launch on CUDA, else a gather and a batched product),
    a masked top-k (then, with `rerank`, the shortlist's exact key logits and a second
    top-k); `pinned` pages lead the rows, and chosen pages among them turn -1."""
    num_seqs, heads = q.shape[0], q.shape[1]
    num_scored = max(region_end, default=0)
    k_max = max(top_k, default=0)
    if pinned is not None:
        check_pinned(pinned, num_seqs, heads)
    if num_scored == 0 or k_max == 0:
        none = torch.full((num_seqs, heads, k_max), -1, dtype=torch.long, device=q.device)
        return none if pinned is None else torch.cat([pinned, none], -1)
    score_op = page_scores_triton if use_triton(q) else page_scores_ref
    scores = score_op(q, summary, tables, region_end, sink_pages)  # [R, H, num_scored]
    dev = q.device
    if rerank is not None:
        short = torch.topk(scores, min(rerank.shortlist, num_scored), dim=-1)
        exact = best_key_logits(rerank.qh, rerank.k_cache, tables, short.indices)
        exact = exact.masked_fill(short.values == float("-inf"), float("-inf"))
        top = torch.topk(exact, min(k_max, exact.shape[-1]), dim=-1)
        indices = short.indices.gather(-1, top.indices)
    else:
        top = torch.topk(scores, min(k_max, num_scored), dim=-1)
        indices = top.indices
    chosen = torch.where(top.values > float("-inf"), indices, -1)
    if min(top_k) != k_max:  # budget_fraction: fewer pages for shorter contexts
        rank = torch.arange(chosen.shape[-1], device=dev).view(1, 1, -1)
        chosen = chosen.masked_fill(rank >= torch.tensor(top_k, device=dev).view(-1, 1, 1), -1)
    if chosen.shape[-1] < k_max:
        pad = chosen.new_full((num_seqs, heads, k_max - chosen.shape[-1]), -1)
        chosen = torch.cat([chosen, pad], -1)
    if pinned is None:
        return chosen
    pinned_too = (chosen.unsqueeze(-1) == pinned.unsqueeze(-2)).any(-1) & (chosen >= 0)
    return torch.cat([pinned, chosen.masked_fill(pinned_too, -1)], -1)


def check_pinned(pinned: torch.Tensor, num_seqs: int, heads: int) -> None:
    """ValueError unless `pinned` is [num_seqs, heads, P] int64."""
    if pinned.dim() != 3 or pinned.shape[:2] != (num_seqs, heads) or pinned.dtype != torch.long:
        raise ValueError(
            f"pinned {tuple(pinned.shape)} {pinned.dtype} must be int64 [{num_seqs}, {heads}, *]"
        )


def page_topk(
    q: torch.Tensor,  # [R, H, G, W] fp32
    summary: torch.Tensor,  # [H, num_blocks, W] fp32, contiguous
    tables: torch.Tensor,  # [R, >= max(region_end)] int32
    region_end: list[int],
    sink_pages: int,
    top_k: list[int],
    rerank: Rerank | None = None,  # its k_cache bf16 and contiguous, head size % 32 == 0
    isa: str | None = None,  # the build ("avx512_bf16", "avx2_fma"); None: the first that runs
    pinned: torch.Tensor | None = None,  # [R, H, P] int64 logical pages, -1 padded
) -> torch.Tensor:  # [R, H, P + max(top_k)] int64
    """page_topk_ref's selection through the C++ kernel (CPU tensors). Ties go to the lower
    page here; torch.topk's order among equal scores is unspecified."""
    build = _first_build(isa, rerank is not None)
    if build is None:
        reason = page_topk_unavailable_reason(isa, rerank is not None)
        raise RuntimeError(f"page_topk is unavailable: {reason}")
    fn = build.get()
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
    cpu = torch.device("cpu")
    ends, ks = index_tensor(region_end, cpu), index_tensor(top_k, cpu)
    k_max = max(top_k, default=0)
    pins: tuple[int | None, int] = (None, 0)
    if pinned is not None:
        check_pinned(pinned, num_seqs, heads)
        pinned = pinned.contiguous()
        pins = (pinned.data_ptr(), pinned.shape[2])
    out = torch.empty(num_seqs, heads, pins[1] + k_max, dtype=torch.long)
    second: tuple[int | None, ...] = (None, 0, None, 0, 0, 0)
    if rerank is not None:
        kc, qh = rerank.k_cache, rerank.qh.float().contiguous()
        if kc.dtype != torch.bfloat16 or not kc.is_contiguous() or kc.shape[3] % 32:
            raise ValueError("rerank needs a contiguous bf16 k_cache with a head size % 32 == 0")
        if qh.shape[:2] != (num_seqs, heads) or qh.shape[3] != kc.shape[3] or kc.shape[2] != heads:
            raise ValueError(f"rerank queries {tuple(qh.shape)} do not fit the cache {kc.shape}")
        second = (qh.data_ptr(), qh.shape[2], kc.data_ptr(), kc.shape[1], kc.shape[3])
        second = (*second, rerank.shortlist)
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
        *pins,
        out.data_ptr(),
        torch.get_num_threads(),
        *second,
    )
    if status == 2:
        raise ValueError("this build of page_topk has no rerank (AVX512-BF16 only)")
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
    rerank: Rerank | None = None,
    pinned: torch.Tensor | None = None,  # [R, H, P] int64 logical pages, -1 padded
) -> torch.Tensor:  # [R, H, P + max(top_k)] int64
    """The C++ kernel for CPU tensors where it runs (a rerank: the AVX512 build, over a bf16
    cache with head size % 32 == 0), else page_topk_ref (on CUDA its scores come from one
    Triton launch)."""
    kernel = q.device.type == "cpu" and page_topk_unavailable_reason(rerank=bool(rerank)) is None
    if rerank is not None:
        kc = rerank.k_cache
        kernel = kernel and kc.dtype == torch.bfloat16 and kc.shape[3] % 32 == 0
    if kernel:
        return page_topk(q, summary, tables, region_end, sink_pages, top_k, rerank, pinned=pinned)
    return page_topk_ref(q, summary, tables, region_end, sink_pages, top_k, rerank, pinned)
