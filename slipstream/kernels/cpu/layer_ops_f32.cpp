// The small per-layer operations of a float32 Llama block, one call each, on AVX2 + FMA
// CPUs: residual add + RMSNorm, rotary embedding of q and k, SiLU(gate) * up.
//
// Why: through PyTorch each is several ops, each a dispatch and an allocation; for one
// decode row of the default model (2-core Zen 3, benchmarks/step_breakdown.py --dtype
// float32) the 61 norms took 3.8 ms, the 30 RoPEs 1.1 ms and the 30 SiLU * up 1.3 ms of a
// 56 ms step, for a few kilobytes of data each.
//
// Each row is computed alone, in an order fixed by its length, so a row's bits do not
// depend on the other rows of the call (batch invariance). They may differ from PyTorch's
// in the last bits: the sum of squares runs in 8 lanes and one reduction, the exp is a
// polynomial (avx2_fma.h) where PyTorch's is Sleef's.
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>

#include "avx2_fma.h"

namespace {

using slipstream_cpu::exp_ps;
using slipstream_cpu::first_lanes;
using slipstream_cpu::sum_lanes;

// A row's length rarely needs a tail, but the norm takes any hidden size: masked loads
// read zeros past the end (adding +0 to the sum of squares), masked stores write nothing.
inline __m256 load(const float* p, int64_t left) {
  return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes(left));
}

inline void store(float* p, int64_t left, __m256 v) {
  if (left >= 8) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, first_lanes(left), v);
  }
}

void norm_row(float* h, const float* delta, const float* weight, float* out, int64_t n,
              float eps) {
  __m256 squares = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    __m256 x = load(h + i, n - i);
    if (delta != nullptr) {
      x = _mm256_add_ps(x, load(delta + i, n - i));
      store(h + i, n - i, x);
    }
    squares = _mm256_fmadd_ps(x, x, squares);
  }
  const float inv = 1.0f / std::sqrt(sum_lanes(squares) / static_cast<float>(n) + eps);
  const __m256 scale = _mm256_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 x = _mm256_mul_ps(load(h + i, n - i), scale);
    store(out + i, n - i, _mm256_mul_ps(x, load(weight + i, n - i)));
  }
}

}  // namespace

// h[r] += delta[r] (optional), in place; out[r] = h[r] * rsqrt(mean(h[r]^2) + eps) * weight.
extern "C" int slipstream_add_rms_norm_f32(float* h, const float* delta, const float* weight,
                                           float* out, int64_t rows, int64_t hidden, float eps,
                                           int num_threads) {
  if (hidden < 1) return 1;
  // A row is ~1 us of work: threads only pay off for prefill-sized inputs.
  if (rows < 64) num_threads = 1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    norm_row(h + r * hidden, delta == nullptr ? nullptr : delta + r * hidden, weight,
             out + r * hidden, hidden, eps);
  }
  return 0;
}

// out[t, h, :] = x * cos + rotate_half(x) * sin for the first `heads` heads of qkv's row t
// (q then k); sin has its first half negated, so rotate_half(x) = x rolled by D/2.
// Returns 1 for a head size that is not a multiple of 16.
extern "C" int slipstream_rope_f32(const float* qkv, int64_t qkv_stride, int64_t num_tokens,
                                   int64_t heads, int64_t head_dim, const float* cos,
                                   const float* sin, int64_t cs_stride, float* out) {
  if (head_dim % 16) return 1;
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* c = cos + t * cs_stride;
    const float* s = sin + t * cs_stride;
    for (int64_t h = 0; h < heads; ++h) {
      const float* x = qkv + t * qkv_stride + h * head_dim;
      float* o = out + (t * heads + h) * head_dim;
      for (int64_t d = 0; d < head_dim; d += 8) {
        const int64_t src = d < half ? d + half : d - half;  // rolled by D/2
        const __m256 rot = _mm256_mul_ps(_mm256_loadu_ps(x + src), _mm256_loadu_ps(s + d));
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(c + d), rot));
      }
    }
  }
  return 0;
}

// out[t, :] = silu(gate) * up, gate | up = gate_up[t, :inter] | [inter:], silu(g) =
// g / (1 + exp(-g)). Returns 1 for an intermediate size that is not a multiple of 8.
extern "C" int slipstream_silu_mul_f32(const float* gate_up, int64_t num_tokens, int64_t inter,
                                       float* out, int num_threads) {
  if (inter % 8) return 1;
  if (num_tokens < 16) num_threads = 1;
  const __m256 one = _mm256_set1_ps(1.0f);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* g = gate_up + t * 2 * inter;
    const float* u = g + inter;
    float* o = out + t * inter;
    for (int64_t i = 0; i < inter; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x));
      const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
    }
  }
  return 0;
}
