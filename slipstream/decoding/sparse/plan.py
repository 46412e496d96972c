"""Which sequences of a step are pruned, which stay dense, and their re-packed metadata.

Built once per step by the first sparse layer and kept in AttentionMetadata.scratch, so the
other layers reuse it. Prefill chunks (a causal run of > 1 tokens) stay dense; a single new
token (decode) or a tree of them (verification, e.g. token recycling) is pruned when the
selector says the context exceeds its budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slipstream.engine.attention import AttentionMetadata


@dataclass
class SubBatch:
    """Some of a step's sequences, re-packed as the attention ops expect."""

    index: list[int]  # positions in the step's batch
    # [num_rows] int64 rows of q that belong to these sequences; None = all rows, in order
    rows: torch.Tensor | None
    query_start_loc: torch.Tensor  # [n + 1] int32
    seq_lens: torch.Tensor  # [n] int32
    block_tables: torch.Tensor  # [n, max_blocks_per_seq] int32
    tree_mask: torch.Tensor | None  # [num_rows, max_query_len] bool
    seq_ids: list[int]
    ctx: list[int]  # cached keys per sequence (seq_len - new tokens)
    num_q: list[int]  # new tokens per sequence

    @property
    def size(self) -> int:
        """Sequences in this sub-batch."""
        return len(self.index)


@dataclass
class StepPlan:
    """One step's split into pruned and dense sequences, plus selector-specific data."""

    sparse: SubBatch | None
    dense: SubBatch | None
    # KV tokens of the decode-like sequences (pruned or not): the denominator of the
    # fraction of KV read; decode-like = one new token or a tree of them.
    decode_kv_tokens: int
    # Whether some sequence ends its prefill this step (AttentionMetadata.prefill_ends).
    prefill_ends: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def sub_batch(meta: AttentionMetadata, index: list[int]) -> SubBatch:
    """The sequences `index` of meta, with their own query_start_loc and rows of q."""
    starts = meta.query_start_loc_list
    lens = meta.seq_lens_list
    num_q = [starts[b + 1] - starts[b] for b in index]
    ctx = [lens[b] - n for b, n in zip(index, num_q, strict=True)]
    seq_ids = [meta.seq_ids[b] for b in index] if meta.seq_ids else list(index)
    dev = meta.seq_lens.device
    if index == list(range(meta.num_seqs)):
        return SubBatch(
            index,
            None,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            meta.tree_mask,
            seq_ids,
            ctx,
            num_q,
        )
    rows_list = [r for b in index for r in range(starts[b], starts[b + 1])]
    rows = torch.tensor(rows_list, dtype=torch.long, device=dev)
    qsl = [0]
    for n in num_q:
        qsl.append(qsl[-1] + n)
    idx = torch.tensor(index, dtype=torch.long, device=dev)
    return SubBatch(
        index,
        rows,
        torch.tensor(qsl, dtype=torch.int32, device=dev),
        meta.seq_lens.index_select(0, idx),
        meta.block_tables.index_select(0, idx),
        None if meta.tree_mask is None else meta.tree_mask.index_select(0, rows),
        seq_ids,
        ctx,
        num_q,
    )


def is_decode_like(meta: AttentionMetadata, b: int) -> bool:
    """One new token, or a draft to verify: meta.drafted says so (a chain's causal mask is a
    prefill chunk's too; before the flag, ngram's chains were attended densely), and without
    it, several tokens whose mask is a tree rather than a causal chain."""
    start, end = meta.query_start_loc_list[b], meta.query_start_loc_list[b + 1]
    n = end - start
    if n == 1:
        return True
    if n and meta.drafted:
        return meta.drafted[b]
    if n == 0 or meta.tree_mask is None:
        return False
    rows = meta.tree_mask[start:end, :n]
    return not bool(
        torch.equal(rows, torch.ones(n, n, dtype=torch.bool, device=rows.device).tril())
    )


def build_plan(meta: AttentionMetadata, prunes: Callable[[int], bool]) -> StepPlan:
    """Split the step: decode-like sequences whose context `prunes` go sparse, the rest dense."""
    sparse: list[int] = []
    dense: list[int] = []
    decode_kv = 0
    for b in range(meta.num_seqs):
        n = meta.query_start_loc_list[b + 1] - meta.query_start_loc_list[b]
        if n == 0:
            continue
        if is_decode_like(meta, b):
            decode_kv += meta.seq_lens_list[b]
            if prunes(meta.seq_lens_list[b] - n):
                sparse.append(b)
                continue
        dense.append(b)
    return StepPlan(
        sparse=sub_batch(meta, sparse) if sparse else None,
        dense=sub_batch(meta, dense) if dense and sparse else None,
        decode_kv_tokens=decode_kv,
        prefill_ends=any(meta.prefill_ends),
    )
