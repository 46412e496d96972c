"""Exact top-k and argmax over vocabulary-sized rows, in two passes instead of one sort.

torch.topk over a [R, 49152] float32 row costs ~37 us a row on this 2-core CPU and argmax
~25 us a row, while amax streams the row in ~2 us. So each row is cut into chunks of
`_CHUNK` logits; the chunk maxima (one amax pass) say which chunks can hold the winners, and
the exact top-k or argmax is taken over those chunks alone. Measured ([R, 49152] fp32,
k 8; benchmarks/step_breakdown.py): top-k 35 vs 110 us at R = 1, 110 vs 337 us at R = 9,
150 vs 663 us at R = 17; argmax 54 vs 276 us at R = 9 (no gain at R = 1).

Exact, not approximate: an element of a row's top k lies in one of the k chunks with the
largest maxima (otherwise k chunks each hold a larger element). The argmax keeps torch's
rule, the lowest index among equal maxima (and NaN counts as the largest, as in torch).
Used on the CPU only; on CUDA torch's kernels are already fast. On the CPU a float32
top-k goes to one C++ pass where the kernel builds (kernels/cpu/vocab_topk.cpp: 37 vs
146 us at R = 9), and a float32 argmax to NumPy, whose single pass is faster still (see
vocab_argmax); the two passes here serve the rest (bf16 rows, CPUs without AVX2).
"""

from __future__ import annotations

import numpy as np
import torch

from slipstream.kernels.cpu.vocab_topk import vocab_topk_cpu, vocab_topk_cpu_applies

# Logits per chunk: 49152 / 128 = 384 chunk maxima per row; 64..512 measured within 15%.
_CHUNK = 128


def _worth_chunking(values: torch.Tensor, k: int) -> bool:
    # Below ~16 chunks per candidate the second pass reads most of the row again.
    return (
        values.device.type == "cpu"
        and values.dim() == 2
        and values.stride(-1) == 1
        and values.shape[1] >= 16 * k * _CHUNK
    )


def _candidates(values: torch.Tensor, chunks: torch.Tensor, full: int) -> torch.Tensor:
    """[R, n] indices of the chosen full chunks' logits ([R, m] chunk ids), in ascending
    order per chunk, then every logit past the last full chunk (a partial tail is always a
    candidate: it is shorter than a chunk)."""
    rows, vocab = values.shape
    offsets = torch.arange(_CHUNK, device=values.device)
    idx = (chunks.unsqueeze(-1) * _CHUNK + offsets).view(rows, -1)  # [R, m * _CHUNK]
    if vocab > full * _CHUNK:
        tail = torch.arange(full * _CHUNK, vocab, device=values.device).expand(rows, -1)
        idx = torch.cat([idx, tail], dim=1)
    return idx


def _full_chunk_maxima(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[R, V] -> ([R, V // _CHUNK] maxima of the whole chunks, their count)."""
    rows, vocab = values.shape
    full = vocab // _CHUNK
    return values[:, : full * _CHUNK].view(rows, full, _CHUNK).amax(dim=-1), full


def vocab_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([R, k] values, [R, k] int64 indices) of each row's k largest, largest first: what
    `values.topk(k, dim=-1)` returns (the order among equal values may differ, as topk
    leaves it unspecified; the C++ pass puts the lower index first). values: [R, V]."""
    return _topk_dispatch(values, k)[0]


def vocab_topk_and_argmax(
    values: torch.Tensor, k: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(vocab_topk(values, k), vocab_argmax(values)) from the one top-k pass (k >= 1).

    The argmax is the top-k's first column where that already follows argmax's rule (the
    C++ pass: the lowest index among equal values first); otherwise the rows whose top two
    tie take vocab_argmax. (Right after a forward that streamed the weights every small op
    runs cold: the column clone and the tie check took ~130 us a step in the engine, ~15 us
    in a loop, 2 cores.)"""
    (top_vals, top_idx), lowest_first = _topk_dispatch(values, k)
    if lowest_first:
        return (top_vals, top_idx), top_idx[:, 0]
    targets = top_idx[:, 0].clone()
    if k > 1:
        ties = (top_vals[:, 0] == top_vals[:, 1]).nonzero().squeeze(1)
        if ties.numel():
            targets[ties] = vocab_argmax(values[ties])
    return (top_vals, top_idx), targets


def _topk_dispatch(values: torch.Tensor, k: int) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """(vocab_topk's answer, whether equal values come lowest index first)."""
    if vocab_topk_cpu_applies(values, k):
        found = vocab_topk_cpu(values, k)
        if found is not None:  # None: a row holds a NaN, which torch ranks largest
            return found, True
    return _torch_topk(values, k), False


def _torch_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk, in two passes over chunks where the rows are long enough."""
    if not _worth_chunking(values, k):
        return values.topk(k, dim=-1)
    maxima, full = _full_chunk_maxima(values)
    idx = _candidates(values, maxima.topk(k, dim=-1).indices, full)  # [R, k * _CHUNK (+ tail)]
    top_vals, pos = values.gather(1, idx).topk(k, dim=-1)
    return top_vals, idx.gather(1, pos)


def vocab_argmax(values: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R] int64: `values.argmax(dim=-1)`, lowest index among equal maxima."""
    if values.device.type == "cpu" and values.dim() == 2 and values.dtype == torch.float32:
        # NumPy's argmax: one pass with torch's rules (first index among equal maxima, NaN
        # as the maximum). [R, 49152] float32, 2 cores: 6.5 us at R = 1 against ~60 for the
        # chunked form below and ~80 for torch's argmax; 42 vs 77 us at R = 9.
        return torch.from_numpy(np.argmax(values.detach().numpy(), axis=-1))
    if not _worth_chunking(values, 1):
        return values.argmax(dim=-1)
    maxima, full = _full_chunk_maxima(values)
    # The first whole chunk holding the largest whole-chunk value, then the tail: the
    # candidates are in ascending index order, so argmax's first occurrence is the row's.
    idx = _candidates(values, maxima.argmax(dim=-1, keepdim=True), full)  # [R, _CHUNK (+ tail)]
    return idx.gather(1, values.gather(1, idx).argmax(dim=-1, keepdim=True)).squeeze(1)
