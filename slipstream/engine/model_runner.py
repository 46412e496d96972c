"""Builds one step's tensors, runs the model, returns the logits asked for. No policy here."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch

from slipstream.config import CacheConfig
from slipstream.decoding.base import StepInputs, StepLogits
from slipstream.engine.attention import AttentionMetadata
from slipstream.engine.batch import Batch

logger = logging.getLogger(__name__)


def kv_bytes_per_block(arch: Any, block_size: int, dtype: torch.dtype) -> int:
    """K and V for one block across all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_hidden_layers * block_size * arch.num_key_value_heads * arch.head_dim * elem


def num_kv_blocks(arch: Any, cache: CacheConfig, dtype: torch.dtype) -> int:
    """Blocks that fit the configured KV memory (or the explicit block count)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = kv_bytes_per_block(arch, cache.block_size, dtype)
    return max(1, int(cache.kv_cache_memory_gib * 2**30) // per_block)


class ModelRunner:
    """Owns the model and the paged KV cache tensors."""

    def __init__(
        self, model: Any, arch: Any, cache: CacheConfig, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.model = model
        self.arch = arch
        self.block_size = cache.block_size
        self.device = device
        self.dtype = dtype
        self.num_blocks = num_kv_blocks(arch, cache, dtype)
        shape = (self.num_blocks, self.block_size, arch.num_key_value_heads, arch.head_dim)
        # [layers, 2, num_blocks, block_size, kv_heads, head_dim]: K then V of every layer in
        # one tensor, so that a compaction or a block copy is one indexing op for all layers
        # (30 ops a step took ~0.13 ms after a tree step on 2 CPU cores).
        self.kv_all = torch.zeros((arch.num_hidden_layers, 2, *shape), dtype=dtype, device=device)
        # One [2, num_blocks, block_size, kv_heads, head_dim] view per layer (contiguous).
        self.kv_caches = list(self.kv_all.unbind(0))
        # The per-layer (K, V) views, made once: slicing 60 views every step cost ~85 us (a
        # batch-1 decode step is ~10 ms on 2 CPU cores).
        self._layer_caches = [(kv[0], kv[1]) for kv in self.kv_caches]
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * kv_bytes_per_block(arch, self.block_size, dtype) / 2**30,
        )

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k_cache, v_cache) views per layer."""
        return self._layer_caches

    @torch.inference_mode()
    def forward(self, batch: Batch, inputs: StepInputs) -> StepLogits:
        """Run one forward over every sequence's fed tokens."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logit_rows: list[int] = []
        offsets = [0]
        prefill_ends: list[bool] = []
        for item, seq_inputs in zip(batch.items, inputs.seqs, strict=True):
            seq = item.seq
            base = seq.num_computed_tokens
            num_fed = len(seq_inputs.token_ids)
            start = query_start[-1]
            # A draft step feeds tokens beyond num_tokens; a prefill chunk ends at it.
            prefill_ends.append(
                num_fed >= 2 and seq_inputs.parents is None and base + num_fed == seq.num_tokens
            )
            token_ids.extend(seq_inputs.token_ids)
            positions.extend(seq_inputs.positions)
            slots.extend(self._slots(seq.block_table, base, num_fed))
            query_start.append(start + num_fed)
            seq_lens.append(base + num_fed)
            logit_rows.extend(start + j for j in seq_inputs.logits_indices)
            offsets.append(len(logit_rows))
        meta = self._metadata(batch, inputs, query_start, seq_lens, slots, prefill_ends)
        hidden = self.model(
            torch.tensor(token_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            self.layer_caches(),
            meta,
        )
        if not logit_rows:
            values = torch.empty((0, self.arch.vocab_size), dtype=torch.float32)
        elif len(logit_rows) == hidden.shape[0]:
            values = self.model.compute_logits(hidden)
        else:
            rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
            values = self.model.compute_logits(hidden.index_select(0, rows))
        return StepLogits(values=values, offsets=offsets)

    def _slots(self, block_table: list[int], start: int, count: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, start + count)]

    def _metadata(
        self,
        batch: Batch,
        inputs: StepInputs,
        query_start: list[int],
        seq_lens: list[int],
        slots: list[int],
        prefill_ends: list[bool],
    ) -> AttentionMetadata:
        max_blocks = max((len(item.seq.block_table) for item in batch.items), default=0)
        tables = [
            item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table))
            for item in batch.items
        ]
        max_query_len = max(b - a for a, b in itertools.pairwise(query_start))
        return AttentionMetadata(
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            tree_mask=self._tree_mask(inputs, query_start, max_query_len),
            max_query_len=max_query_len,
            max_seq_len=max(seq_lens),
            seq_ids=[item.seq.seq_id for item in batch.items],
            query_start_loc_list=query_start,
            seq_lens_list=seq_lens,
            prefill_ends=prefill_ends,
            drafted=[s.parents is not None for s in inputs.seqs],
        )

    def _tree_mask(
        self, inputs: StepInputs, query_start: list[int], max_query_len: int
    ) -> torch.Tensor | None:
        """[num_tokens, max_query_len] bool; None when every sequence is a causal chain."""
        if all(s.parents is None for s in inputs.seqs):
            return None
        mask = torch.zeros(query_start[-1], max_query_len, dtype=torch.bool)
        for seq_inputs, start in zip(inputs.seqs, query_start, strict=False):
            n = len(seq_inputs.token_ids)
            if seq_inputs.parents is None:
                mask[start : start + n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            elif seq_inputs.tree_mask is not None:
                mask[start : start + n, :n] = seq_inputs.tree_mask
            else:
                mask[start : start + n, :n] = ancestor_mask(seq_inputs.parents)
        return mask.to(self.device)

    def copy_slots(self, moves: list[tuple[int, int]]) -> None:
        """Move KV from src slot to dst slot in every layer (compaction after verification)."""
        if not moves:
            return
        src = torch.tensor([m[0] for m in moves], dtype=torch.long, device=self.device)
        dst = torch.tensor([m[1] for m in moves], dtype=torch.long, device=self.device)
        flat = self.kv_all.view(*self.kv_all.shape[:2], -1, *self.kv_all.shape[4:])
        flat[:, :, dst] = flat[:, :, src]  # [layers, 2, slots, kv_heads, head_dim]

    def copy_blocks(self, moves: list[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-fork of a partially filled last block)."""
        if not moves:
            return
        src = torch.tensor([m[0] for m in moves], dtype=torch.long, device=self.device)
        dst = torch.tensor([m[1] for m in moves], dtype=torch.long, device=self.device)
        self.kv_all[:, :, dst] = self.kv_all[:, :, src]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: token i sees j iff j is i or an ancestor of i.

    Example: parents [-1, 0, 0, 1] -> row 3 sees {0, 1, 3}; row 2 sees {0, 2}.
    """
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= i:
            raise ValueError(f"tree parent {parent} of token {i} must come before it")
        mask[i, i] = True
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask
