// Block top-k's page votes (SnapKV's observation, kept per KV page) on CPU: the attention
// each page of one sequence receives from a few voting queries, straight from the paged
// cache. Built for AVX2 + FMA, so that every CPU the other kernels run on takes it.
//
// Why: PyTorch's version (kernels/page_votes.py's page_votes_ref) gathers the sequence's keys
// into one tensor, then runs a product, a mask, a softmax, a sum, a max-pool and a page sum;
// at 8k keys that copy and those passes cost a few ms a layer on 2 Zen 3 cores, paid in every
// sparse layer of the decode step whose query votes (answer_votes). Here one call reads each
// key once per KV head.
//
// Semantics (the reference's, up to float32 rounding): for KV head h, query row r = (voter i,
// group head j) of q[i, h * G + j, :] sees the keys at positions 0..positions[i]; its softmax
// of scale * q . k over them is added to mass[h, t]. Then each key scores as the best mass of
// itself and the spread - 1 keys before it, and out[h, p] is the sum over page p's keys (keys
// past seq_len add nothing).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "avx2_fma.h"

namespace {

using slipstream_cpu::exp_ps;
using slipstream_cpu::sum_lanes;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> float32: the high halves
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

constexpr int64_t kMaxHeadDim = 512;

template <class T>
int run(const float* q, const int64_t* positions, int64_t num_voters, const T* k_cache,
        int64_t num_blocks, int64_t block_size, int64_t heads, int64_t group, int64_t head_dim,
        const int32_t* table, int64_t seq_len, float scale, int64_t spread, float* out,
        int num_threads) {
  if (head_dim % 8 || head_dim > kMaxHeadDim) return 2;
  const int64_t pages = (seq_len + block_size - 1) / block_size;
  for (int64_t p = 0; p < pages; ++p) {
    if (table[p] < 0 || table[p] >= num_blocks) return 1;
  }
  for (int64_t i = 0; i < num_voters; ++i) {
    if (positions[i] < 0 || positions[i] >= seq_len) return 1;
  }
  const int64_t rows = num_voters * group;  // per KV head
  // [heads, rows, seq_len]: the logits, then (in place) each row's unnormalised weights.
  std::vector<float> weight(heads * rows * seq_len);
  std::vector<float> inv_sum(heads * rows);

  // 1. Logits, one item per (KV head, page): the page's keys are read once for every row.
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t item = 0; item < heads * pages; ++item) {
    const int64_t h = item / pages, p = item % pages;
    const int64_t block = table[p];
    const int64_t first = p * block_size, slots = std::min(block_size, seq_len - first);
    for (int64_t s = 0; s < slots; ++s) {
      const T* key = k_cache + ((block * block_size + s) * heads + h) * head_dim;
      for (int64_t i = 0; i < num_voters; ++i) {
        for (int64_t j = 0; j < group; ++j) {
          const float* row = q + ((i * heads + h) * group + j) * head_dim;
          __m256 acc = _mm256_setzero_ps();
          for (int64_t d = 0; d < head_dim; d += 8) {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(row + d), load8(key + d), acc);
          }
          weight[((h * rows) + i * group + j) * seq_len + first + s] = sum_lanes(acc) * scale;
        }
      }
    }
  }

  // 2. Per row: exp(logit - max) over the keys it sees (0 past them), and 1 / their sum.
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t hr = 0; hr < heads * rows; ++hr) {
    float* w = weight.data() + hr * seq_len;
    const int64_t seen = positions[(hr % rows) / group] + 1;
    float top = w[0];
    for (int64_t t = 1; t < seen; ++t) top = std::max(top, w[t]);
    const __m256 top8 = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= seen; t += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(w + t), top8));
      _mm256_storeu_ps(w + t, e);
      total = _mm256_add_ps(total, e);
    }
    float tail = 0.0f;
    for (; t < seen; ++t) {
      alignas(32) float lanes[8] = {w[t] - top};
      _mm256_store_ps(lanes, exp_ps(_mm256_load_ps(lanes)));
      w[t] = lanes[0];
      tail += lanes[0];
    }
    std::fill(w + seen, w + seq_len, 0.0f);
    inv_sum[hr] = 1.0f / (sum_lanes(total) + tail);
  }

  // 3. Per KV head: mass per key (rows summed), the spread's running max, page sums.
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t h = 0; h < heads; ++h) {
    std::vector<float> mass(seq_len, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* w = weight.data() + (h * rows + r) * seq_len;
      const float inv = inv_sum[h * rows + r];
      for (int64_t t = 0; t < seq_len; ++t) mass[t] += w[t] * inv;
    }
    float* dst = out + h * pages;
    std::fill(dst, dst + pages, 0.0f);
    for (int64_t t = 0; t < seq_len; ++t) {
      float best = mass[t];
      for (int64_t back = 1; back < spread && back <= t; ++back) best = std::max(best, mass[t - back]);
      dst[t / block_size] += best;
    }
  }
  return 0;
}

}  // namespace

// out[h, p] (float32, [heads, ceil(seq_len / block_size)]) = the votes of page p at KV head h
// (see above). q: float32 [num_voters, heads * group, head_dim] contiguous; positions: int64
// [num_voters]; k_cache: contiguous [num_blocks, block_size, heads, head_dim], float32 (_f32)
// or bf16 bits (_bf16); table: int32, the sequence's first pages. Returns 0, 1 for a table
// entry or position out of range (nothing written), 2 for a head size not a multiple of 8 or
// over 512.
extern "C" int slipstream_page_votes_f32(const float* q, const int64_t* positions,
                                         int64_t num_voters, const float* k_cache,
                                         int64_t num_blocks, int64_t block_size, int64_t heads,
                                         int64_t group, int64_t head_dim, const int32_t* table,
                                         int64_t seq_len, float scale, int64_t spread, float* out,
                                         int num_threads) {
  return run(q, positions, num_voters, k_cache, num_blocks, block_size, heads, group, head_dim,
             table, seq_len, scale, spread, out, num_threads);
}

extern "C" int slipstream_page_votes_bf16(const float* q, const int64_t* positions,
                                          int64_t num_voters, const uint16_t* k_cache,
                                          int64_t num_blocks, int64_t block_size, int64_t heads,
                                          int64_t group, int64_t head_dim, const int32_t* table,
                                          int64_t seq_len, float scale, int64_t spread,
                                          float* out, int num_threads) {
  return run(q, positions, num_voters, k_cache, num_blocks, block_size, heads, group, head_dim,
             table, seq_len, scale, spread, out, num_threads);
}
