"""Scatter new K/V rows into the paged cache at their slots (-1 = skip)."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from slipstream.kernels._dispatch import once_a_step, use_triton
from slipstream.kernels.cpu.layer_ops import store_kv_cpu, store_kv_cpu_applies


def store_kv_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; slot = block * block_size + offset
    plan: dict[str, Any] | None = None,
) -> None:
    """Reference: plain indexing. Defines the semantics; runs anywhere.

    `plan` is a per-step dict shared by all layers (AttentionMetadata.scratch): facts about
    slot_mapping found in the first layer are reused by the other 29 instead of one host
    sync each.
    """
    if slot_mapping.numel() == 0:
        return
    if once_a_step(plan, "store_kv_all_valid", lambda: bool(slot_mapping.min().item() >= 0)):
        # Nothing to skip: index_copy_ takes 7 us vs 28 us for the masked form (1 token, bf16),
        # and the engine calls this once per layer per step.
        slots = slot_mapping.long()  # a no-op for the engine's int64
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))
        return
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens]
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    PAGE_SIZE: tl.constexpr,  # cache block_size
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_P: tl.constexpr,  # power of two >= NUM_KV_HEADS
    HEAD_DIM_P: tl.constexpr,  # power of two >= HEAD_DIM
):
    """Program tok: copy token tok's [num_kv_heads, head_dim] K and V rows to its slot."""
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot >= 0:  # -1: nothing to store
        h = tl.arange(0, HEADS_P)[:, None]
        d = tl.arange(0, HEAD_DIM_P)[None, :]
        mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
        block = slot // PAGE_SIZE
        offset = slot % PAGE_SIZE
        k = tl.load(k_ptr + tok * stride_k_tok + h * stride_k_head + d, mask=mask)
        v = tl.load(v_ptr + tok * stride_v_tok + h * stride_v_head + d, mask=mask)
        kc_off = block * stride_kc_block + offset * stride_kc_slot + h * stride_kc_head + d
        vc_off = block * stride_vc_block + offset * stride_vc_slot + h * stride_vc_head + d
        tl.store(k_cache_ptr + kc_off, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + vc_off, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def store_kv_triton(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32 or int64; -1 = skip
) -> None:
    """Triton launcher: checks the arguments, then one program per token."""
    _check_args(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        PAGE_SIZE=k_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_P=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_P=triton.next_power_of_2(head_dim),
    )


def _check_args(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Raise ValueError naming the first argument whose shape, stride or dtype is wrong."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"k and v must be [num_tokens, num_kv_heads, head_dim] alike; got "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must be 4-d alike; got {tuple(k_cache.shape)},"
            f" {tuple(v_cache.shape)}"
        )
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(
            f"cache [num_kv_heads, head_dim] {tuple(k_cache.shape[2:])} != k's {tuple(k.shape[1:])}"
        )
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{k.shape[0]}]")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit last-dim stride; strides {t.stride()}")
    if slot_mapping.dim() == 1 and slot_mapping.numel() > 1 and slot_mapping.stride(0) != 1:
        raise ValueError(f"slot_mapping must be contiguous; stride {slot_mapping.stride()}")
    devices = {t.device for t in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = skip
    plan: dict[str, Any] | None = None,
) -> None:
    """Public op: Triton on CUDA; on CPU the C++ copy (store_kv.cpp) where it applies
    (~3 us a layer for a decode row against ~12 for the reference's ops), else the
    reference (see kernels/_dispatch.py)."""
    if use_triton(k, plan):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
        return
    # Every layer of a step stores the same kinds of tensors: decide once a step (the
    # check reads os.environ; ~8 us a layer, 30 layers).
    if once_a_step(
        plan, "store_kv_cpu", lambda: store_kv_cpu_applies(k, v, k_cache, v_cache, slot_mapping)
    ):
        store_kv_cpu(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping, plan)
