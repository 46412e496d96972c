"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over the paged KV cache.

Batch-1 decode on a CPU spends much of its time dispatching small ops (SmolLM2 has 30
layers), so each layer runs 13 compute ops besides attention: rms_norm, fused q|k|v linear,
roll + mul_ + addcmul_ (RoPE on q and k together), o_proj linear + in-place residual add_,
rms_norm, fused gate|up linear, silu + mul_, down linear + add_; plus 6 view ops (splits,
views, one reshape). cos/sin are gathered once per forward, not per layer.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.engine.attention import AttentionBackend, AttentionMetadata, PagedAttentionBackend
from slipstream.engine.models.config import ModelArchConfig, RopeScaling
from slipstream.engine.models.registry import MODELS
from slipstream.engine.vocab_topk import vocab_topk
from slipstream.kernels._dispatch import once_a_step
from slipstream.kernels.cpu.decoder_layer import (
    LayerBuffers,
    decoder_layer_unavailable_reason,
    layer_after_attention,
    layer_before_attention,
)
from slipstream.kernels.cpu.decoder_layer_f32 import (
    decoder_layer_f32_unavailable_reason,
    layer_after_attention_f32,
    layer_before_attention_f32,
)
from slipstream.kernels.cpu.layer_ops import (
    layer_ops_unavailable_reason,
    rope_bf16,
    rope_ref,
    silu_mul_bf16,
    silu_mul_ref,
)
from slipstream.kernels.cpu.layer_ops_f32 import (
    add_rms_norm_f32,
    layer_ops_f32_fit,
    layer_ops_f32_unavailable_reason,
    rope_f32,
    silu_mul_f32,
)
from slipstream.kernels.cpu.rms_norm import (
    add_rms_norm_bf16,
    add_rms_norm_ref,
    fused_norm_applies,
)
from slipstream.kernels.cpu.skinny_linear import (
    can_pack,
    pack_skinny_weight,
    skinny_linear,
    skinny_unavailable_reason,
)
from slipstream.kernels.cpu.skinny_linear_f32 import (
    CHUNKED_MAX_ROWS,
    MAX_ROWS,
    GroupedBf16Weight,
    RowSplit,
    can_run_f32,
    pack_grouped_bf16,
    skinny_f32_unavailable_reason,
    skinny_linear_f32,
)


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    # Uninitialised: load_weights replaces it, so random init would only waste time (~1 s for
    # 135M parameters on 2 cores) and the untouched allocation is never paged in.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _optional(
    enabled: bool, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> nn.Parameter | None:
    return _param(shape, dtype, device) if enabled else None


def llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3 scaling: slow frequencies divided by `factor`, fast ones kept, a blend between."""
    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than the original context / low_freq_factor are fully scaled; shorter
    # than context / high_freq_factor untouched (8192/1 and 8192/4 tokens for Llama 3.1).
    ratio = s.original_max_position_embeddings / wavelen
    smooth = ((ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq


def rope_cache(
    config: ModelArchConfig, max_positions: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:  # [max_positions, 2, 1, head_dim]: cos, then sin with its first half negated
    """cos/sin per position for rotate-half RoPE, computed in float32 as HF does."""
    dim = config.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponent)  # [head_dim / 2]
    if config.rope_scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, config.rope_scaling)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
    sin = angles.sin()
    # rotate_half(x) = cat(-x2, x1) = roll(x, half) * [-1.., +1..]: folding the sign into sin
    # makes RoPE one roll, one mul_ and one addcmul_.
    sin[:, : dim // 2].neg_()
    return torch.stack([angles.cos(), sin], dim=1).unsqueeze(2).to(device=device, dtype=dtype)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP, with fused q|k|v and gate|up projections."""

    def __init__(
        self, config: ModelArchConfig, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        c = config
        hidden, inter = c.hidden_size, c.intermediate_size
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.eps = c.rms_norm_eps
        self.scale = c.head_dim**-0.5
        self.qk_size = c.q_size + c.kv_size  # qkv's first columns: q | k; v follows
        self.q_k_split = [c.num_attention_heads, c.num_key_value_heads]
        self.inter = inter
        qkv = c.q_size + 2 * c.kv_size
        # Norm weights and the residual stream stay float32 in a bf16 model (see forward).
        self.input_norm = _param((hidden,), torch.float32, device)
        self.qkv_weight = _param((qkv, hidden), dtype, device)
        self.qkv_bias = _optional(c.attention_bias, (qkv,), dtype, device)
        self.o_weight = _param((hidden, c.q_size), dtype, device)
        self.o_bias = _optional(c.o_proj_bias, (hidden,), dtype, device)
        self.post_norm = _param((hidden,), torch.float32, device)
        self.dtype = dtype
        self.gate_up_weight = _param((2 * inter, hidden), dtype, device)
        self.gate_up_bias = _optional(c.mlp_bias, (2 * inter,), dtype, device)
        self.down_weight = _param((hidden, inter), dtype, device)
        self.down_bias = _optional(c.mlp_bias, (hidden,), dtype, device)
        # Which product runs a step's projections (see pack_for_cpu for why they differ):
        # - `linear_skinny` over `skinny` (skinny_linear.cpp's layout) when pack_skinny ran;
        # - else `linear` over `packed` (oneDNN-packed) for 2+ rows when pack_weights ran;
        # - else `linear_one_row` (one row) or `linear` over the parameters.
        self.linear: LinearFn = F.linear
        self.linear_one_row: LinearFn = F.linear
        self.linear_skinny: LinearFn = skinny_linear
        self.packed: tuple[torch.Tensor, ...] | None = None
        # The four projection weights as linear_skinny takes them (packed bf16 tensors, the
        # float32 parameters, or GroupedBf16Weight).
        self.skinny: tuple[Any, ...] | None = None
        # Residual add + norm + cast: the C++ kernel when pack_skinny says so.
        self.add_norm: NormFn = add_rms_norm_ref
        # RoPE of q and k, and SiLU(gate) * up: C++ (layer_ops.cpp) when pack_skinny says so.
        self.rope: RopeFn = rope_ref
        self.silu_mul: SiluMulFn = silu_mul_ref
        # Everything but attention as two C++ calls (decoder_layer.cpp, or
        # decoder_layer_f32.cpp) when pack_skinny / use_skinny_f32 put every op on the C++
        # kernels; the same bits as the op-by-op path, without its ~8 Python calls a layer.
        # Set to False to run the ops one by one (benchmarks). Steps of more than
        # fused_rows rows run op by op (float32: products in calls of 32 rows up to 128,
        # MKL above).
        self.fused_cpu = False
        self.fused_rows: int | None = None
        self.fused_before = layer_before_attention
        self.fused_after = layer_after_attention

    def projection_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.qkv_weight, self.o_weight, self.gate_up_weight, self.down_weight)

    def pack_weights(self) -> None:
        """Add oneDNN-packed copies of the four projection weights (see pack_for_cpu)."""
        self.packed = tuple(
            torch.ops.mkldnn._reorder_linear_weight(w.data, 1) for w in self.projection_weights()
        )
        self.linear = _packed_linear
        self.linear_one_row = one_row_linear

    def use_skinny_f32(
        self,
        layer_ops: bool = False,
        weights: tuple[torch.Tensor | GroupedBf16Weight, ...] | None = None,
    ) -> None:
        """Run the four float32 projections through skinny_linear_f32 (AVX2): over
        `weights` (their exact bf16 copies, see LlamaForCausalLM._use_skinny_f32) or else
        the parameters in place; with layer_ops, the norms, RoPE and SiLU * up through
        layer_ops_f32 too."""
        self.skinny = weights if weights is not None else self.projection_weights()
        self.linear_skinny = skinny_linear_f32
        if layer_ops:
            self.add_norm, self.rope, self.silu_mul = add_rms_norm_f32, rope_f32, silu_mul_f32
            self.fused_cpu = decoder_layer_f32_unavailable_reason() is None
            self.fused_rows = MAX_ROWS
            self.fused_before = layer_before_attention_f32
            self.fused_after = layer_after_attention_f32

    def layer_ops_f32_fit(self) -> bool:
        """Whether layer_ops_f32 takes this layer's shapes."""
        return layer_ops_f32_fit(self.head_dim, self.inter)

    def pack_skinny(self, fused_norm: bool, layer_ops: bool = False) -> None:
        """Add skinny_linear-packed copies of the four projection weights; with fused_norm,
        the norms run add_rms_norm_bf16 (C++) too, and with layer_ops RoPE and SiLU * up."""
        self.skinny = tuple(pack_skinny_weight(w.data) for w in self.projection_weights())
        if fused_norm:
            self.add_norm = add_rms_norm_bf16
        if layer_ops:
            self.rope, self.silu_mul = rope_bf16, silu_mul_bf16
        self.fused_cpu = fused_norm and layer_ops and decoder_layer_unavailable_reason() is None

    def layer_ops_fit(self) -> bool:
        """Whether rope_bf16 and silu_mul_bf16 take this layer's shapes (bf16 weights; the
        rope table is in the weights' dtype)."""
        return self.dtype == torch.bfloat16 and self.head_dim % 32 == 0 and self.inter % 16 == 0

    def forward(
        self,
        h: torch.Tensor,  # [T, hidden] float32 residual stream, updated in place
        delta: torch.Tensor | None,  # [T, hidden] the previous layer's MLP output, or None
        cos: torch.Tensor,  # [T, 1, head_dim]
        sin: torch.Tensor,  # [T, 1, head_dim], first half negated
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # h [T, hidden], this layer's MLP output
        """One transformer block: h += delta, attention, MLP; returns (h, MLP output).

        The MLP output is handed back unadded so the next layer's norm (or the final one)
        adds it in the same pass (add_rms_norm); h then holds every earlier update.

        The residual stream and the norms run in float32 even in a bf16 model; only the
        matmuls and attention use bf16. Summing 60 bf16 residual updates lost enough that
        the default model's first answer token flipped (mean |logit error| vs float32 0.147
        all-bf16; see tests/engine/test_models.py for the bound we hold now). Cost: two
        casts of a [T, hidden] row per layer.
        """
        n = h.shape[0]
        if self.fused_cpu and (self.fused_rows is None or n <= self.fused_rows):
            return self._forward_fused(h, delta, cos, sin, k_cache, v_cache, backend, meta)
        x = self.add_norm(h, delta, self.input_norm, self.eps, self.dtype)
        weights: tuple[torch.Tensor, ...]
        if self.skinny is not None:
            linear, weights = self.linear_skinny, self.skinny
            if linear is skinny_linear_f32 and n > CHUNKED_MAX_ROWS:
                # Over 128 rows: MKL for long prefill chunks only, the kernel for decode and
                # draft rows, so that their bits do not follow the step (RowSplit).
                split = once_a_step(
                    meta.scratch,
                    "f32_row_split",
                    lambda: RowSplit.of(
                        meta.query_start_loc_list or meta.query_start_loc.tolist(),
                        CHUNKED_MAX_ROWS,
                    ),
                )
                if split is not None:
                    linear = split.linear
        elif n == 1 or self.packed is None:
            linear = self.linear_one_row if n == 1 else self.linear
            weights = self.projection_weights()
        else:
            linear, weights = self.linear, self.packed
        qkv_w, o_w, gate_up_w, down_w = weights
        qkv = linear(x, qkv_w, self.qkv_bias)  # [T, (H + 2 * KV) * D]
        v = qkv[:, self.qk_size :]
        # RoPE: x * cos + rotate_half(x) * sin, [T, H + KV, D]
        rot = self.rope(qkv, self.num_heads + self.num_kv_heads, self.head_dim, cos, sin)
        # q, k, v are views: unit stride within a head, head stride head_dim, token stride
        # (H + KV) * D for q/k and (H + 2 * KV) * D for v.
        q, k = rot.split(self.q_k_split, dim=1)
        out = backend.forward(
            q, k, v.view(n, -1, self.head_dim), k_cache, v_cache, meta, self.scale
        )  # [T, H, D]
        attn = linear(out.reshape(n, -1), o_w, self.o_bias)
        x = self.add_norm(h, attn, self.post_norm, self.eps, self.dtype)
        gate_up = linear(x, gate_up_w, self.gate_up_bias)  # [T, 2 * inter]
        act = self.silu_mul(gate_up, self.inter)  # [T, inter]
        return h, linear(act, down_w, self.down_bias)

    def _forward_fused(
        self,
        h: torch.Tensor,  # [T, hidden] float32, contiguous
        delta: torch.Tensor | None,  # [T, hidden] bf16
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward's ops with everything but attention in two C++ calls (same bits)."""
        assert self.skinny is not None
        n = h.shape[0]
        buffers = meta.scratch.get("layer_buffers")
        # Once a step: every layer has the same shapes (the row check guards a caller that
        # reuses one metadata object for another forward).
        if buffers is None or buffers.x.shape[0] != n:
            buffers = LayerBuffers.allocate(
                n, h.shape[1], self.num_heads, self.num_kv_heads, self.head_dim, self.inter,
                self.dtype,
            )  # fmt: skip
            meta.scratch["layer_buffers"] = buffers
        qkv_w, o_w, gate_up_w, down_w = self.skinny
        self.fused_before(
            h, delta, self.input_norm, self.eps, qkv_w, self.qkv_bias, cos, sin, buffers
        )
        out = backend.forward(
            buffers.q, buffers.k, buffers.v, k_cache, v_cache, meta, self.scale
        )  # [T, H, D]
        attn = out.reshape(n, -1).contiguous()  # a no-op for the kernels' own outputs
        mlp_out = self.fused_after(
            h, attn, o_w, self.o_bias, self.post_norm, self.eps, gate_up_w,
            self.gate_up_bias, down_w, self.down_bias, buffers,
        )  # fmt: skip
        return h, mlp_out


class LlamaForCausalLM(nn.Module):
    """The model: embeddings, decoder layers with pluggable attention, final norm, LM head."""

    def __init__(
        self,
        config: ModelArchConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_positions: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = _param((c.vocab_size, c.hidden_size), dtype, device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(c, dtype, device) for _ in range(c.num_hidden_layers)
        )
        self.norm = _param((c.hidden_size,), torch.float32, device)
        self.dtype = dtype
        self.lm_head = _optional(
            not c.tie_word_embeddings, (c.vocab_size, c.hidden_size), dtype, device
        )
        positions = max_positions or c.max_position_embeddings
        self.cos_sin: torch.Tensor
        self.register_buffer("cos_sin", rope_cache(c, positions, dtype, device), persistent=False)
        self.attn_backends: list[AttentionBackend] = [
            PagedAttentionBackend() for _ in range(c.num_hidden_layers)
        ]
        self.lm_head_packed: torch.Tensor | None = None
        self.lm_head_skinny: torch.Tensor | None = None
        # The LM head through skinny_linear_f32 over this weight (see _use_skinny_f32).
        self.lm_head_f32: torch.Tensor | GroupedBf16Weight | None = None
        self.add_norm: NormFn = add_rms_norm_ref  # the final norm (see the layers')
        # float32 logits from (hidden, head weight) when set (engine/batch_invariant.py).
        self.logits_linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def pack_for_cpu(self) -> str | None:
        """Pre-pack bf16 weights for the CPU kernels that run them: which ("skinny_linear"
        or "onednn"), "skinny_linear_f32" for a float32 model whose products run that
        kernel (weights left in place), or None when nothing changed (GPU, turned off).

        With skinny_linear available (a C++ compiler and an AVX512-BF16 CPU), every product
        runs it, LM head included. The 120 projections of a step (benchmarks/
        cpu_kernels_cpp.py, two runs, 2 cores): 7.3-8.4 ms at 1 row and 9.6-10.5 at 9, where
        packed oneDNN takes 15-17 and 14-20 and ATen's GEMV 10-15 at 1 row; at 256 rows
        139-144 vs 147-159. A row's logits no longer depend on how many rows share the step.
        Its copies replace oneDNN's, so the memory cost stays one extra copy. Without it,
        oneDNN's packing:

        Measured on this 2-core AVX512-BF16 CPU (one thread, [1, 576] x [576, 3072]): plain
        F.linear 168-178 us, packed 74-77 us, bit-identical output; at 256 rows still ~5%
        faster. The LM head [49152, 576] drops from 6.6 ms to 3.9 ms. float32 is left alone
        (packed fp32 differs in rounding and is slower at 8 rows).

        One-row steps (batch-1 decode) skip the packed copies: one_row_linear's GEMV beats
        them there, and from 2 rows on packed oneDNN wins (one_row_linear's path takes 227
        us at 2 rows and 933 us at 9 where packed takes 167 and 199). The plain weights stay
        for that path and for the state dict: the packed copies add ~210 MB for the default
        model.
        """
        ref = self.embed_tokens
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        weights = [w for layer in self.layers for w in layer.projection_weights()]  # type: ignore[operator]
        if ref.device.type == "cpu" and ref.dtype == torch.float32:
            return self._use_skinny_f32([*weights, head])
        if ref.device.type != "cpu" or ref.dtype != torch.bfloat16:
            return None
        if os.environ.get("SLIPSTREAM_PACK_WEIGHTS", "1") == "0":
            return None
        if skinny_unavailable_reason() is None and all(can_pack(w) for w in [*weights, head]):
            fused_norm = fused_norm_applies(self.config.hidden_size)
            layer_ops = layer_ops_unavailable_reason() is None and all(
                layer.layer_ops_fit()  # type: ignore[operator]
                for layer in self.layers
            )
            for layer in self.layers:
                layer.pack_skinny(fused_norm, layer_ops)  # type: ignore[operator]
            if fused_norm:
                self.add_norm = add_rms_norm_bf16
            self.lm_head_skinny = pack_skinny_weight(head.data)
            return "skinny_linear"
        if onednn_bf16_packing_unavailable_reason() is not None:
            return None
        for layer in self.layers:
            layer.pack_weights()  # type: ignore[operator]
        self.lm_head_packed = torch.ops.mkldnn._reorder_linear_weight(head.data, 1)
        return "onednn"

    def _use_skinny_f32(self, weights: list[torch.Tensor]) -> str | None:
        """float32 on CPU: every product of up to 128 rows (the LM head at any size) through
        skinny_linear_f32 (AVX2 + FMA), in calls of up to 32 rows, where it builds;
        "skinny_linear_f32", else None.

        Why: MKL, which runs PyTorch's float32 products, took 92 ms for a one-token step of
        the default model on a 2-core AMD EPYC without AVX512 (projections 51 ms, LM head
        14 ms: weights read at ~8 GB/s of the ~20 GB/s the machine streams), and each added
        row cost about as much again (5 rows: 182 ms). The kernel streams each weight once
        for all rows; BENCHMARKS.md has the numbers.

        Where bf16 holds every weight exactly (a bf16 checkpoint such as the default model,
        upcast at load), the kernel reads bf16 copies instead (GroupedBf16Weight): the same
        bits from half the bytes (a one-token step's products and LM head ~34 -> ~17 ms
        here; the step 45 -> 28 ms). The float32 parameters stay for long prefills (MKL)
        and the embedding, so memory grows by half the float32 weights (+270 MB for the default
        model). SLIPSTREAM_F32_BF16_WEIGHTS=0 turns the copies off.

        `weights`: every layer's four projection weights in order, then the LM head.
        """
        if skinny_f32_unavailable_reason() is not None:
            return None
        if not all(can_run_f32(w) for w in weights):  # projections and LM head
            return None
        # What the kernel reads, in the order of `weights`: all copies, or none.
        read: list[torch.Tensor | GroupedBf16Weight] = list(weights)
        if os.environ.get("SLIPSTREAM_F32_BF16_WEIGHTS", "1") != "0":
            copies = [pack_grouped_bf16(w) for w in weights]
            if all(c is not None for c in copies):
                read = [c for c in copies if c is not None]
        # The norms, RoPE and SiLU * up as one C++ call each: 6.2 ms of PyTorch dispatch in
        # a 56 ms one-token step here (benchmarks/step_breakdown.py --dtype float32).
        layer_ops = layer_ops_f32_unavailable_reason() is None and all(
            layer.layer_ops_f32_fit()  # type: ignore[operator]
            for layer in self.layers
        )
        for i, layer in enumerate(self.layers):
            layer.use_skinny_f32(layer_ops, tuple(read[4 * i : 4 * i + 4]))  # type: ignore[operator]
        if layer_ops:
            self.add_norm = add_rms_norm_f32
        self.lm_head_f32 = read[-1]
        return "skinny_linear_f32"

    def set_attention_backend(self, layer_idx: int, backend: AttentionBackend) -> None:
        """Replace one layer's attention backend (sparse-attention decoders use this)."""
        self.attn_backends[layer_idx] = backend

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k_cache, v_cache)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        """Final-normed hidden states of every fed token; K/V are written into kv_caches."""
        h = F.embedding(input_ids, self.embed_tokens).float()  # [T, hidden] float32, ours
        cos, sin = self.cos_sin[positions].unbind(1)  # [T, 1, head_dim] each
        delta: torch.Tensor | None = None
        for layer, backend, (k_cache, v_cache) in zip(
            self.layers, self.attn_backends, kv_caches, strict=True
        ):
            h, delta = layer.forward(h, delta, cos, sin, k_cache, v_cache, backend, meta)
        eps = self.config.rms_norm_eps
        return self.add_norm(h, delta, self.norm, eps, self.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [R, vocab] float32
        """LM head over the rows the caller picked ([R, hidden])."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        if self.logits_linear is not None:
            return self.logits_linear(hidden, weight)
        if self.lm_head_skinny is not None:
            # float32 accumulators written unrounded: no bf16 ties to refine.
            return skinny_linear(hidden, self.lm_head_skinny, None, torch.float32)
        if self.lm_head_f32 is not None:
            # Any number of rows in calls of 32: MKL reads this [vocab, hidden] weight slowly
            # at every size (skinny_linear_f32.CHUNKED_MAX_ROWS has the numbers).
            return skinny_linear_f32(hidden, self.lm_head_f32, chunked_max_rows=None)
        if self.lm_head_packed is None:
            logits = F.linear(hidden, weight).float()
        elif hidden.shape[0] == 1:  # the same split as the layers' projections
            logits = one_row_linear(hidden, weight, None).float()
        else:
            logits = _packed_linear(hidden, self.lm_head_packed, None).float()
        if weight.dtype in (torch.bfloat16, torch.float16) and logits.numel():
            _refine_top_logits(logits, hidden, weight)
        return logits

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Take HF-named tensors (model.layers.N.self_attn.q_proj.weight ...) into this layout.

        Tensors are cast and moved to this model's dtype and device; q|k|v and gate|up are
        concatenated. ValueError lists missing or unexpected names.
        """
        ref = self.embed_tokens
        state, used = _fused_state(self.config, weights, ref.dtype, ref.device)
        ignored = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        unexpected = sorted(
            n for n in weights if n not in used and n not in ignored and "rotary_emb" not in n
        )
        if unexpected:
            raise ValueError(f"unexpected weights: {', '.join(unexpected[:8])}")
        self.load_state_dict(state, strict=True, assign=True)


# (x, weight, bias) -> x @ weight.T + bias; the weight is whatever form that product takes
# (a tensor, or skinny_linear_f32's GroupedBf16Weight).
LinearFn = Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]
# (h, delta, weight, eps, out_dtype) -> normed rows; h += delta in place.
NormFn = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor, float, torch.dtype], torch.Tensor
]
# (qkv, rotating heads, head_dim, cos, sin) -> [T, heads, head_dim] rotated q | k.
RopeFn = Callable[[torch.Tensor, int, int, torch.Tensor, torch.Tensor], torch.Tensor]
# (gate_up, intermediate size) -> SiLU(gate) * up.
SiluMulFn = Callable[[torch.Tensor, int], torch.Tensor]


@functools.cache
def onednn_bf16_packing_unavailable_reason() -> str | None:
    """None when oneDNN can pre-pack bf16 linear weights on this CPU, else why not.

    Its bf16 reorder needs AVX512 (BW, VL, DQ) or AVX-NE-CONVERT: on an AVX2-only CPU (AMD
    Zen 3, seen on a CI machine) it raises, so there the weights stay plain. Probed with a
    tiny reorder rather than read from the flags, so a build that lifts the limit is used.
    """
    if not torch.backends.mkldnn.is_available():
        return "PyTorch was built without oneDNN"
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return None


def _packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ weight.T + bias with a weight pre-packed by torch.ops.mkldnn._reorder_linear_weight."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# Held while one_row_linear has oneDNN switched off (the switch is process-wide).
_MKLDNN_SWITCH = threading.Lock()


def one_row_linear(
    x: torch.Tensor,  # [1, in]
    weight: torch.Tensor,  # [out, in], plain layout
    bias: torch.Tensor | None,
) -> torch.Tensor:  # [1, out]
    """x @ weight.T + bias through ATen's own GEMV, with oneDNN switched off for the call.

    A one-row bf16 product is a matrix-vector product and memory-bound. ATen's GEMV runs it
    at 131 us for [1, 576] x [576, 3072] where packed oneDNN takes 158 us; inside the model
    (121 products a step, other ops in between) the whole decode step went from 25.5 to
    19.1 ms at 300 tokens of context (2 cores, interleaved in one process). Both paths
    accumulate in float32, in different orders, so results may differ in the last bf16
    bit. The switch is process-wide, so calls hold a lock: two threads interleaving their
    save-and-restore could otherwise leave oneDNN off for good (then a 9-row product takes
    933 us instead of 199). A bf16 product another thread runs meanwhile outside this
    function may take ATen's path too: slower, rounded as here.
    """
    with _MKLDNN_SWITCH:
        previous = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            return F.linear(x, weight, bias)
        finally:
            torch._C._set_mkldnn_enabled(previous)


# Leading candidates recomputed in float32 per row (see _refine_top_logits).
_REFINE_TOP = 8


def _refine_top_logits(
    logits: torch.Tensor,  # [R, vocab] float32, rounded from a bf16/fp16 matmul output
    hidden: torch.Tensor,  # [R, hidden]
    weight: torch.Tensor,  # [vocab, hidden]
) -> None:
    """Recompute the top candidates' logits in float32, in place.

    A bf16 output keeps 8 significant bits: at |logit| ~ 20 neighbouring values are 0.125
    apart, so the leading candidates of SmolLM2 often tie and greedy decoding would pick by
    token index rather than by value (seen on the first token of a chat answer: 'L' won a
    tie against 'The'). The matmul accumulates in float32 anyway; only its output is
    rounded, so R x 8 float32 dot products restore the exact order where it matters.
    """
    top = vocab_topk(logits, _REFINE_TOP)[1]  # [R, 8]
    rows = weight[top].float()  # [R, 8, hidden]
    exact = torch.bmm(rows, hidden.float().unsqueeze(-1)).squeeze(-1)  # [R, 8]
    logits.scatter_(1, top, exact)


# Our parameter name -> HF names concatenated along dim 0 ({i} = layer index).
_LAYER_MAP: dict[str, tuple[str, ...]] = {
    "input_norm": ("input_layernorm.weight",),
    "qkv_weight": tuple(f"self_attn.{p}_proj.weight" for p in "qkv"),
    "qkv_bias": tuple(f"self_attn.{p}_proj.bias" for p in "qkv"),
    "o_weight": ("self_attn.o_proj.weight",),
    "o_bias": ("self_attn.o_proj.bias",),
    "post_norm": ("post_attention_layernorm.weight",),
    "gate_up_weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "gate_up_bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "down_weight": ("mlp.down_proj.weight",),
    "down_bias": ("mlp.down_proj.bias",),
}


def _fused_state(
    config: ModelArchConfig,
    weights: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Our state dict from HF-named tensors, and the HF names it consumed."""
    wanted: dict[str, tuple[str, ...]] = {
        "embed_tokens": ("model.embed_tokens.weight",),
        "norm": ("model.norm.weight",),
    }
    if not config.tie_word_embeddings:
        wanted["lm_head"] = ("lm_head.weight",)
    enabled = {
        "qkv_bias": config.attention_bias,
        "o_bias": config.o_proj_bias,
        "gate_up_bias": config.mlp_bias,
        "down_bias": config.mlp_bias,
    }
    for i in range(config.num_hidden_layers):
        for ours, theirs in _LAYER_MAP.items():
            if enabled.get(ours, True):
                wanted[f"layers.{i}.{ours}"] = tuple(f"model.layers.{i}.{t}" for t in theirs)
    missing = [n for names in wanted.values() for n in names if n not in weights]
    if missing:
        raise ValueError(f"missing weights ({len(missing)}): {', '.join(missing[:8])}")
    state = {
        ours: _concat(weights, theirs, torch.float32 if ours.endswith("norm") else dtype, device)
        for ours, theirs in wanted.items()
    }
    return state, {n for names in wanted.values() for n in names}


def _concat(
    weights: Mapping[str, torch.Tensor],
    names: tuple[str, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    if len(names) == 1:
        return weights[names[0]].to(device=device, dtype=dtype)
    parts = [weights[n] for n in names]
    out = torch.empty(
        (sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=dtype, device=device
    )
    row = 0
    for p in parts:  # one cast-and-copy pass per part, no float32 intermediate
        out[row : row + p.shape[0]].copy_(p)
        row += p.shape[0]
    return out


for _arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
    MODELS.register(_arch)(LlamaForCausalLM)
