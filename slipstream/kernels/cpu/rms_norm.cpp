// Residual add + RMSNorm + cast to bf16 in one pass, for the float32 residual stream.
//
// Why: each layer normalises twice; in PyTorch that is rms_norm (itself ~5 small ops), a
// cast to bf16 and, before it, the residual add: ~25 us a call on one decode row of the
// default model (2 cores), 1.3 ms of a 15 ms step for the 61 norms. One call here costs
// the ctypes crossing (~2 us) and a few hundred cycles.
//
// h[r] += delta[r] (bf16, optional), in place; out[r] = bf16(h[r] * rsqrt(mean(h[r]^2) +
// eps) * weight). The sum of squares runs in 16 float32 lanes then one reduction, so it
// may differ from PyTorch's in the last float32 bit; each row is computed alone.

#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>

#include "avx512_bf16.h"

namespace {

using slipstream_cpu::load_bf16x16;
using slipstream_cpu::store_bf16x16;

void one_row(float* h, const uint16_t* delta, const float* weight, uint16_t* out, int64_t n,
             float eps) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __m512 x = _mm512_loadu_ps(h + i);
    if (delta != nullptr) {
      x = _mm512_add_ps(x, load_bf16x16(delta + i));
      _mm512_storeu_ps(h + i, x);
    }
    squares = _mm512_fmadd_ps(x, x, squares);
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(n) + eps);
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(h + i), scale);
    store_bf16x16(out + i, _mm512_mul_ps(x, _mm512_loadu_ps(weight + i)));
  }
}

}  // namespace

// Returns 0, or 1 when the hidden size is not a multiple of 16 (the caller checks).
extern "C" int slipstream_add_rms_norm(float* h, const void* delta, const float* weight,
                                       void* out, int64_t rows, int64_t hidden, float eps,
                                       int num_threads) {
  if (hidden % 16 != 0) return 1;
  const auto* d = static_cast<const uint16_t*>(delta);
  auto* o = static_cast<uint16_t*>(out);
  // A row is ~1 us of work: threads only pay off for prefill-sized inputs.
  if (rows < 64) num_threads = 1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    one_row(h + r * hidden, d == nullptr ? nullptr : d + r * hidden, weight, o + r * hidden,
            hidden, eps);
  }
  return 0;
}
