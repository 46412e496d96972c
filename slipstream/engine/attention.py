"""Attention metadata for one forward pass, and the pluggable per-layer attention backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from slipstream.kernels.paged_attention import paged_attention
from slipstream.kernels.store_kv import store_kv


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and keys are; built once per step, shared by all layers."""

    # [num_seqs + 1] int32: sequence b's tokens are rows query_start_loc[b]:query_start_loc[b+1]
    query_start_loc: torch.Tensor
    # [num_seqs] int32: KV length per sequence once this step's tokens are stored
    seq_lens: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32: physical block ids (padding is 0)
    block_tables: torch.Tensor
    # [num_tokens] int64: cache slot of each new token (block * block_size + offset), -1 = skip
    slot_mapping: torch.Tensor
    # [num_tokens, max_query_len] bool: tree mask among each sequence's new tokens; None = causal
    tree_mask: torch.Tensor | None
    max_query_len: int
    max_seq_len: int
    # Sequence ids in batch order (backends that keep per-sequence state key on these).
    seq_ids: list[int] = field(default_factory=list)
    # Host copies, so CPU code paths need no device sync.
    query_start_loc_list: list[int] = field(default_factory=list)
    seq_lens_list: list[int] = field(default_factory=list)
    # Per sequence: this step feeds the last chunk of its prefill (two or more tokens of one
    # causal run, up to its last known token, which is then sampled). Empty = unknown (none).
    prefill_ends: list[bool] = field(default_factory=list)
    # Per sequence: this step feeds a root and its draft to verify (a tree, or a chain such
    # as ngram's), every token attending as decoding it alone would; not a prefill chunk,
    # though a chain's mask is causal too. Empty = unknown (none).
    drafted: list[bool] = field(default_factory=list)
    # Derived tensors a backend builds once per step and reuses in every layer.
    scratch: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        """Sequences in this step."""
        return len(self.seq_lens_list)


class AttentionBackend(Protocol):
    """One layer's attention: store this step's K/V in the paged cache, attend, return."""

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Attention output for this step's tokens."""
        ...


class PagedAttentionBackend:
    """Dense attention over the paged cache (the default for every layer)."""

    # The op that attends, with paged_attention's arguments and result; a subclass may name
    # another (batch_invariant.py's CPU backend: the C++ kernel itself).
    attend: ClassVar[Callable[..., torch.Tensor]] = staticmethod(paged_attention)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Store, then attend over everything the sequence has."""
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping, meta.scratch)
        return self.attend(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            meta.tree_mask,
            meta.scratch,
        )
