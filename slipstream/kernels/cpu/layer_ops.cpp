// The small per-layer operations of a bf16 Llama block that PyTorch runs as several ops
// each: rotary embedding of q and k and SiLU(gate) * up (the K/V store into the paged
// cache, which any dtype takes, is store_kv.cpp).
//
// Why: for one decode row they are ~18, ~12 and ~9 us a layer through PyTorch (5-7 ops, each
// a dispatch and an allocation; 2 cores), ~1.2 ms of a ~13 ms step at 30 layers, for a few
// kilobytes of data. One call each here.
//
// Rounding follows PyTorch's bf16 ops, so the results match the reference bit for bit where
// the reference rounds the same way: RoPE rounds rotate_half(x) * sin to bf16 (mul_) and
// then x * cos + that (addcmul_, float32 inside); SiLU rounds silu(gate) to bf16 before the
// product with up (its exp is a polynomial here, Sleef's in PyTorch: within 1 bf16 ulp).
#include <immintrin.h>
#include <omp.h>

#include <cstdint>

#include "avx512_bf16.h"

namespace {

using slipstream_cpu::exp_ps;
using slipstream_cpu::load_bf16x16;
using slipstream_cpu::store_bf16x16;

// float32 -> bf16 -> float32 (round to nearest even), as a bf16 tensor op's result.
inline __m512 round_bf16(__m512 x) {
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

}  // namespace

// out[t, h, :] = x * cos + rotate_half(x) * sin for the first `heads` heads of qkv's row t
// (q then k); sin has its first half negated, so rotate_half(x) = x rolled by D/2.
// Returns 1 for a head size that is not a multiple of 32.
extern "C" int slipstream_rope(const uint16_t* qkv, int64_t qkv_stride, int64_t num_tokens,
                               int64_t heads, int64_t head_dim, const uint16_t* cos,
                               const uint16_t* sin, int64_t cs_stride, uint16_t* out) {
  if (head_dim % 32) return 1;
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const uint16_t* c = cos + t * cs_stride;
    const uint16_t* s = sin + t * cs_stride;
    for (int64_t h = 0; h < heads; ++h) {
      const uint16_t* x = qkv + t * qkv_stride + h * head_dim;
      uint16_t* o = out + (t * heads + h) * head_dim;
      for (int64_t d = 0; d < head_dim; d += 16) {
        const int64_t src = d < half ? d + half : d - half;  // rolled by D/2
        const __m512 rot = round_bf16(_mm512_mul_ps(load_bf16x16(x + src), load_bf16x16(s + d)));
        const __m512 xc = _mm512_mul_ps(load_bf16x16(x + d), load_bf16x16(c + d));
        store_bf16x16(o + d, _mm512_add_ps(rot, xc));
      }
    }
  }
  return 0;
}

// out[t, :] = bf16(bf16(silu(gate)) * up), gate | up = gate_up[t, :inter] | [inter:].
// Returns 1 for an intermediate size that is not a multiple of 16.
extern "C" int slipstream_silu_mul(const uint16_t* gate_up, int64_t num_tokens, int64_t inter,
                                   uint16_t* out, int num_threads) {
  if (inter % 16) return 1;
  const int64_t n = num_tokens * (inter / 16);
  // Threads only for prefill-sized inputs: a decode row (1536 values) is done in ~0.3 us.
#pragma omp parallel for schedule(static) num_threads(num_threads) if (n > 4096)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = i / (inter / 16), d = (i % (inter / 16)) * 16;
    const uint16_t* row = gate_up + t * 2 * inter;
    const __m512 g = load_bf16x16(row + d);
    const __m512 silu = _mm512_div_ps(
        g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store_bf16x16(out + t * inter + d, _mm512_mul_ps(round_bf16(silu), load_bf16x16(row + inter + d)));
  }
  return 0;
}
