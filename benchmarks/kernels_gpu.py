"""GPU timings of the Triton kernels vs torch, after a correctness check (needs CUDA).

    python benchmarks/kernels_gpu.py --out kernels_gpu.json

For each case it first checks paged_attention_triton against paged_attention_ref (exit 1 on
a mismatch, nothing timed), then times with triton.testing.do_bench (median ms):
  triton      paged_attention_triton on the paged cache
  torch_ref   paged_attention_ref (per-sequence page gather + SDPA), what runs without Triton
  sdpa_dense  F.scaled_dot_product_attention on K/V already contiguous (no paging cost):
              the bar a paged kernel aims to approach; not given for tree cases
and store_kv_triton vs store_kv_ref. Never part of pytest.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton.testing

from slipstream.kernels.paged_attention import paged_attention_ref, paged_attention_triton
from slipstream.kernels.store_kv import store_kv_ref, store_kv_triton

BLOCK_SIZE = 16
# (name, num_heads, num_kv_heads, head_dim, num_q per seq, seq_len per seq, tree)
CASES = [
    ("decode b=1 ctx=1024", 9, 3, 64, [1], [1024], False),
    ("decode b=1 ctx=4096", 9, 3, 64, [1], [4096], False),
    ("decode b=32 ctx=1024", 9, 3, 64, [1] * 32, [1024] * 32, False),
    ("decode b=32 ctx=4096", 9, 3, 64, [1] * 32, [4096] * 32, False),
    ("decode b=64 ctx=2048 llama", 32, 8, 128, [1] * 64, [2048] * 64, False),
    ("prefill 2048", 9, 3, 64, [2048], [2048], False),
    ("prefill 4 x 1024 llama", 32, 8, 128, [1024] * 4, [1024] * 4, False),
    ("tree b=8 x 16 ctx=1024", 9, 3, 64, [16] * 8, [1040] * 8, True),
]
ATOL = RTOL = 2e-2  # bf16, as tests/kernels/tolerances.py


def make_case(
    heads: int, kv_heads: int, dim: int, num_q: list[int], lens: list[int], tree: bool
) -> dict[str, torch.Tensor | None]:
    """A bf16 paged batch on cuda with shuffled pages, plus dense K/V for the SDPA baseline."""
    dev, dtype = "cuda", torch.bfloat16
    pages = [(n + BLOCK_SIZE - 1) // BLOCK_SIZE for n in lens]
    total = sum(pages)
    k_cache = torch.randn(total, BLOCK_SIZE, kv_heads, dim, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(total, device=dev).to(torch.int32)
    block_tables = torch.zeros(len(lens), max(pages), dtype=torch.int32, device=dev)
    used = 0
    for b, n in enumerate(pages):
        block_tables[b, :n] = order[used : used + n]
        used += n
    starts = torch.tensor([0, *num_q], device=dev).cumsum(0).to(torch.int32)
    q = torch.randn(int(starts[-1]), heads, dim, dtype=dtype, device=dev)
    tree_mask = None
    if tree:  # binary tree: node i's parent is (i - 1) // 2
        n = max(num_q)
        tree_mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            tree_mask[i] |= tree_mask[(i - 1) // 2]
        tree_mask = tree_mask.repeat(len(num_q), 1).to(dev)
    return {
        "q": q,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": block_tables,
        "query_start_loc": starts,
        "seq_lens": torch.tensor(lens, dtype=torch.int32, device=dev),
        "tree_mask": tree_mask,
    }


def dense_sdpa(case: dict[str, torch.Tensor | None], num_q: list[int], lens: list[int]):  # type: ignore[no-untyped-def]
    """A closure running SDPA on contiguous [B, kv_heads, L, D] K/V (uniform batches only)."""
    q, k_cache = case["q"], case["k_cache"]
    assert q is not None and k_cache is not None
    b, n, length = len(lens), num_q[0], lens[0]
    kv_heads, dim = k_cache.shape[2], k_cache.shape[3]
    k = torch.randn(b, kv_heads, length, dim, dtype=q.dtype, device=q.device)
    v = torch.randn_like(k)
    qd = q.view(b, n, q.shape[1], dim).transpose(1, 2).contiguous()
    causal = n > 1 and n == length
    return lambda: F.scaled_dot_product_attention(qd, k, v, is_causal=causal, enable_gqa=True)


def main() -> None:
    """Check, then time every case; write JSON to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    torch.manual_seed(0)
    rows = []
    for name, heads, kv_heads, dim, num_q, lens, tree in CASES:
        case = make_case(heads, kv_heads, dim, num_q, lens, tree)
        call = (*case.values(),)
        scale = dim**-0.5

        def run_triton(call=call, scale=scale):  # type: ignore[no-untyped-def]
            return paged_attention_triton(*call[:6], scale, call[6])

        def run_ref(call=call, scale=scale):  # type: ignore[no-untyped-def]
            return paged_attention_ref(*call[:6], scale, call[6])

        got, want = run_triton(), run_ref()
        err = (got.float() - want.float()).abs().max().item()
        if not torch.allclose(got.float(), want.float(), atol=ATOL, rtol=RTOL):
            print(f"FAIL {name}: max abs error {err:.3g}", file=sys.stderr)
            sys.exit(1)
        row = {
            "case": name,
            "max_abs_err": err,
            "triton_ms": triton.testing.do_bench(run_triton),
            # Before session 15's key splits: one program per (seq, KV head, q block).
            "triton_one_split_ms": triton.testing.do_bench(
                lambda call=call, scale=scale: paged_attention_triton(
                    *call[:6], scale, call[6], num_splits=1
                )
            ),
            "torch_ref_ms": triton.testing.do_bench(run_ref),
            "sdpa_dense_ms": None
            if tree
            else triton.testing.do_bench(dense_sdpa(case, num_q, lens)),
        }
        print(json.dumps(row))
        rows.append(row)
    for num_tokens in (1, 32, 4096):
        k = torch.randn(num_tokens, 8, 128, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        k_cache = torch.zeros(4096, BLOCK_SIZE, 8, 128, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(4096 * BLOCK_SIZE, device="cuda")[:num_tokens]
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        store_kv_ref(k, v, k_ref, v_ref, slots)
        store_kv_triton(k, v, k_cache, v_cache, slots)
        if not (torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)):
            print(f"FAIL store_kv tokens={num_tokens}", file=sys.stderr)
            sys.exit(1)
        row = {
            "case": f"store_kv tokens={num_tokens}",
            "triton_ms": triton.testing.do_bench(
                lambda: store_kv_triton(k, v, k_cache, v_cache, slots)  # noqa: B023
            ),
            "torch_ref_ms": triton.testing.do_bench(
                lambda: store_kv_ref(k, v, k_ref, v_ref, slots)  # noqa: B023
            ),
        }
        print(json.dumps(row))
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
