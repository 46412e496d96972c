"""Attention of a step's new tokens over paged KV, with a causal or tree mask among them.

Semantics (per sequence b, its queries q[qs[b]:qs[b+1]], n_q of them, and L = seq_lens[b]
keys already stored in the cache, the new tokens' included, so ctx = L - n_q cached ones):
query i sees every key j < ctx, and new key ctx + j' when
    causal (tree_mask None): j' <= i
    tree:                    tree_mask[qs[b] + i, j']
This one op covers prefill, chunked prefill, decode (n_q = 1) and tree verification.

This module picks who computes it, once a step: the Triton kernel on CUDA
(paged_attention_triton.py); on CPU the C++ kernel for sequences of few rows
(cpu/paged_decode_attention.py) and the PyTorch reference for the rest
(paged_attention_torch.py, which also holds `_paged_attention_loop`, the plainest statement
of these semantics).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from slipstream.kernels._dispatch import kernel_backend, once_a_step, use_triton
from slipstream.kernels.cpu.paged_decode_attention import (
    KERNEL_DTYPES,
    decode_attention_applies,
    max_query_rows,
    paged_decode_attention,
)
from slipstream.kernels.paged_attention_torch import (
    _host_lists,
    _paged_attention_loop,
    paged_attention_ref,
)
from slipstream.kernels.paged_attention_triton import (
    check_paged_attention_args,
    combine_splits,
    paged_attention_triton,
    partials,
    plan_launch,
    split_partials,
    store_rows,
)

__all__ = [
    "_paged_attention_loop",
    "check_paged_attention_args",
    "combine_splits",
    "paged_attention",
    "paged_attention_ref",
    "paged_attention_triton",
    "partials",
    "plan_launch",
    "split_partials",
    "store_rows",
    "use_cpu_decode_kernel",
]


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
