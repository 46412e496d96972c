"""--batch-invariant: every op whose rounding could follow the batch runs a kernel whose
rows do not, so a verified draft token gets the logits that decoding it alone gives.

Where the engine stands without it:
- CPU, bf16 with skinny_linear (AVX512-BF16): decode and draft rows are invariant without
  the flag. skinny_linear.cpp, the C++ norm and the C++ decode attention were built for it
  (session 13: token recycling's answers equal standard's, 48/48); where a long prefill
  chunk shares a step, the decode and draft rows still take the C++ attention
  (paged_attention.py's _StepSplit: before, 3 of 32 builtin answers at 16 concurrent
  sequences differed from the same prompts decoded alone). Prefill chunks of up to 512
  rows take the C++ attention too (MAX_QUERY_ROWS), so at the default token budget a
  prompt gets the same KV wherever the load cuts it into chunks (before, with 128: 7 of 12
  answers to ~830-token prompts differed at 12 concurrent sequences). What the flag adds:
  chunks over 512 rows (a larger --max-num-batched-tokens) take it too
  (CpuKernelAttentionBackend).
- CUDA: cuBLAS, PyTorch's reductions and paged_attention_triton.py's shared key tiles all round
  by shape; on an H200 in bf16, token recycling matched standard greedy on 4-6 of 12
  prompts. With the flag: invariant_linear (projections and LM head, float32 logits),
  add_rms_norm_triton (residual add + norms) and invariant_paged_attention (dense
  attention). RoPE, SiLU * up and the embedding are elementwise or gathers: invariant
  as they are.
- CPU without skinny_linear (float32, or no AVX512-BF16): the float32 C++ path (AVX2;
  skinny_linear_f32.RowSplit over 128 rows, and the C++ attention for 64- and 128-wide
  heads) keeps decode and draft rows invariant on the default model (token recycling 32/32
  standard's answers at 16 concurrent sequences). The flag still asks for CUDA or the bf16
  kernels there: other shapes fall back to ATen, which picks kernels by shape.

Sparse attention layers keep their own backends (sparse attention is approximate anyway).
"""

from __future__ import annotations

from typing import Any

import torch

from slipstream.engine.attention import AttentionMetadata, PagedAttentionBackend
from slipstream.kernels._dispatch import use_triton
from slipstream.kernels.cpu.paged_decode_attention import (
    HEAD_DIMS,
    decode_attention_unavailable_reason,
    paged_decode_attention,
)
from slipstream.kernels.invariant_attention import invariant_paged_attention_triton, token_layout
from slipstream.kernels.invariant_linear import invariant_linear_triton
from slipstream.kernels.invariant_rms_norm import add_rms_norm_triton
from slipstream.kernels.store_kv import store_kv


class InvariantAttentionBackend:
    """Dense attention over the paged cache, each query as if decoded alone."""

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store, then attend over everything the sequence has."""
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping, meta.scratch)
        layout = meta.scratch.get("invariant_layout")
        if layout is None:  # once a step, shared by every layer
            layout = meta.scratch["invariant_layout"] = token_layout(
                meta.query_start_loc, meta.seq_lens, meta.tree_mask, q.shape[0]
            )
        return invariant_paged_attention_triton(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            meta.tree_mask,
            meta.max_seq_len,
            layout,
        )


class CpuKernelAttentionBackend(PagedAttentionBackend):
    """Every query row through the C++ decode attention, prefill chunks included.

    Why: by default a prefill chunk of more than MAX_QUERY_ROWS (512) rows takes the SDPA
    reference, whose bits follow the chunk's bounds. The default token budget (512 a step)
    never makes such a chunk; a larger --max-num-batched-tokens does, and then a prompt is
    cut where the other requests leave room, so its KV, and then its answer, could differ
    with the load (a 700-token prompt cut at 300 instead of 496 with the bound at 128:
    logits up to 0.01 apart on the tiny bf16 model). The kernel computes each row as a
    one-row decode would, wherever the cut falls. Cost (one layer, 9 heads over 3, 2
    cores): 2048 rows from scratch 42 -> 130 ms, after 4000 cached keys 169 -> 315 ms.
    """

    attend = staticmethod(paged_decode_attention)


def _float32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # float32 accumulators written unrounded: no bf16 ties for _refine_top_logits to break.
    return invariant_linear_triton(hidden, weight, None, torch.float32)


def make_batch_invariant(model: Any, packed_for: str | None) -> str:
    """Switch the model to batch-invariant kernels; returns which path it runs on.

    packed_for is what pack_for_cpu returned. ValueError where no invariant path exists.
    """
    if packed_for == "skinny_linear":
        head_dim = model.layers[0].head_dim
        if decode_attention_unavailable_reason(torch.bfloat16) is None and head_dim in HEAD_DIMS:
            for i in range(len(model.layers)):
                model.set_attention_backend(i, CpuKernelAttentionBackend())
            return "cpu kernels (prefill chunks' attention too)"
        return "cpu kernels (decode and draft rows; prefill chunks over 128 rows by SDPA)"
    weight = model.embed_tokens
    if not use_triton(weight):
        raise ValueError(
            "--batch-invariant needs CUDA (its Triton kernels) or bfloat16 on a CPU with "
            f"AVX512-BF16 (the C++ kernels); this model is {weight.dtype} on {weight.device}"
            + (f" (weights packed for {packed_for})" if packed_for else "")
        )
    for layer in model.layers:
        layer.packed = None  # oneDNN's copies (a forced-Triton CPU run) would bypass it
        layer.linear = layer.linear_one_row = invariant_linear_triton
        layer.add_norm = add_rms_norm_triton
    model.add_norm = add_rms_norm_triton
    model.logits_linear = _float32_logits
    for i in range(len(model.layers)):
        model.set_attention_backend(i, InvariantAttentionBackend())
    return "triton kernels (linear, add + RMSNorm, paged attention)"
