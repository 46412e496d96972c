// HiP's branch-and-prune mask search (slipstream/kernels/hip_mask.py) on CPU, the whole
// search of one (sequence, kv head) in one pass.
//
// Why: the PyTorch search runs ~12 tensor ops per round and 5 rounds at 8k context per
// layer, ~1.4 ms a layer (2 cores), ~40 ms per refresh over 27 sparse layers; the
// arithmetic is ~0.5 MFLOP a layer (256 children x 2 keys x 3 query vectors x 64 dims x 5
// rounds). Here: ~0.15 ms a layer with the keys in cache, ~0.45 ms in the engine, where the
// centre keys of each round are DRAM misses scattered over the context.
//
// Semantics match hip_mask_ref: over key blocks [region_start, region_end) of block_k
// tokens, K = num_select equal nodes (floor(i * size / K) bounds); each round halves every
// node (the left child takes the ceiling half) and keeps the K children whose centre key
// block scores highest, the score being the max over the block's keys and the query
// vectors of q . k; empty children score -inf. Rounds: ceil(log2(ceil(size / K))), per
// sequence (extra rounds, as a batch-wide count gives the reference, change nothing once
// every node is one block). Output: the surviving blocks ascending, -1 padded, in
// out[seq, kv_head, :K]. Among equal scores the lower child index wins here; torch.topk's
// choice among ties is unspecified.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "avx512_bf16.h"

namespace {

using slipstream_cpu::load_bf16x16;

struct Args {
  const float* q;  // [S, KV, R, D] fp32 grouped queries
  int64_t rows, head_dim, num_kv_heads;
  const void* k_cache;  // [num_blocks, block_size, KV, D], bf16 or fp32
  bool key_bf16;
  int64_t block_size;
  int64_t block_shift;  // log2(block_size) when a power of two, else -1
  const int32_t* block_tables;
  int64_t table_stride;
  const int64_t* region_start;
  const int64_t* region_end;
  int64_t num_select, block_k;
  int64_t* out;
};

__m512 load_key16(const Args& a, const void* row, int64_t d, __mmask16 live) {
  if (a.key_bf16) {
    const uint16_t* p = static_cast<const uint16_t*>(row) + d;
    if (live == 0xFFFF) return load_bf16x16(p);
    const __m256i v = _mm256_maskz_loadu_epi16(live, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
  return _mm512_maskz_loadu_ps(live, static_cast<const float*>(row) + d);
}

// Cache row of key position `pos` of (seq, kv_head).
const char* key_row(const Args& a, int64_t seq, int64_t kv_head, int64_t pos) {
  const int64_t elem = a.key_bf16 ? 2 : 4;
  // A shift, not a 64-bit division (~15-40 cycles), for the usual power-of-two pages.
  const int64_t page_idx = a.block_shift >= 0 ? pos >> a.block_shift : pos / a.block_size;
  const int64_t page = a.block_tables[seq * a.table_stride + page_idx];
  const int64_t slot = page * a.block_size + (pos - page_idx * a.block_size);
  return static_cast<const char*>(a.k_cache) + ((slot * a.num_kv_heads + kv_head) * a.head_dim) * elem;
}

// q . k over D dims, D a multiple of 16 known at compile time (unrolled, no masks).
template <bool kBf16, int D>
inline float dot_fixed(const float* q, const char* row) {
  __m512 acc = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 16) {
    const __m512 k = kBf16 ? load_bf16x16(reinterpret_cast<const uint16_t*>(row) + d)
                           : _mm512_loadu_ps(reinterpret_cast<const float*>(row) + d);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), k, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Any head size: masked tail.
inline float dot_any(const Args& a, const float* q, const char* row) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < a.head_dim; d += 16) {
    const __mmask16 live =
        d + 16 <= a.head_dim ? 0xFFFF : (__mmask16)((1u << (a.head_dim - d)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, q + d), load_key16(a, row, d, live), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Best q . k over the keys of key block `block` and the rows of (seq, kv_head). kD: the
// head size when it is 64 or 128 (the common case, unrolled), else 0.
template <bool kBf16, int kD>
float block_score(const Args& a, int64_t seq, int64_t kv_head, int64_t block) {
  float best = -std::numeric_limits<float>::infinity();
  const float* qs = a.q + (seq * a.num_kv_heads + kv_head) * a.rows * a.head_dim;
  for (int64_t w = 0; w < a.block_k; ++w) {
    const char* row = key_row(a, seq, kv_head, block * a.block_k + w);
    for (int64_t r = 0; r < a.rows; ++r) {
      const float* qr = qs + r * a.head_dim;
      const float s = kD ? dot_fixed<kBf16, kD>(qr, row) : dot_any(a, qr, row);
      best = std::max(best, s);
    }
  }
  return best;
}

template <bool kBf16, int kD>
void search(const Args& a, int64_t seq, int64_t kv_head) {
  const int64_t k = a.num_select, start = a.region_start[seq];
  const int64_t size = std::max<int64_t>(0, a.region_end[seq] - start);
  std::vector<int64_t> ns(k), ne(k), cs(2 * k), ce(2 * k), order(2 * k);
  std::vector<float> score(2 * k);
  for (int64_t i = 0; i < k; ++i) {
    ns[i] = i * size / k;
    ne[i] = (i + 1) * size / k;
  }
  const int64_t largest = std::max<int64_t>(1, (size + k - 1) / k);
  int64_t rounds = 0;
  while ((int64_t{1} << rounds) < largest) ++rounds;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t round = 0; round < rounds; ++round) {
    for (int64_t i = 0; i < k; ++i) {
      const int64_t mid = ns[i] + (ne[i] - ns[i] + 1) / 2;
      cs[i] = ns[i];
      ce[i] = mid;
      cs[k + i] = mid;
      ce[k + i] = ne[i];
    }
    for (int64_t j = 0; j < 2 * k; ++j) {
      score[j] = ce[j] > cs[j]
                     ? block_score<kBf16, kD>(a, seq, kv_head, start + cs[j] + (ce[j] - cs[j]) / 2)
                     : neg_inf;
    }
    std::iota(order.begin(), order.end(), int64_t{0});
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(),
                     [&](int64_t x, int64_t y) {
                       return score[x] > score[y] || (score[x] == score[y] && x < y);
                     });
    for (int64_t i = 0; i < k; ++i) {
      ns[i] = cs[order[i]];
      ne[i] = ce[order[i]];
    }
  }
  int64_t* dst = a.out + (seq * a.num_kv_heads + kv_head) * k;
  int64_t n = 0;
  for (int64_t i = 0; i < k; ++i) {
    if (ne[i] > ns[i]) dst[n++] = ns[i] + start;
  }
  std::sort(dst, dst + n);
  std::fill(dst + n, dst + k, int64_t{-1});
}

}  // namespace

extern "C" int slipstream_hip_mask(const float* q, int64_t num_seqs, int64_t num_kv_heads,
                                   int64_t rows, int64_t head_dim, const void* k_cache,
                                   int key_bf16, int64_t block_size, const int32_t* block_tables,
                                   int64_t table_stride, const int64_t* region_start,
                                   const int64_t* region_end, int64_t num_select,
                                   int64_t block_k, int64_t* out, int num_threads) {
  int64_t shift = -1;
  for (int64_t b = 0; b < 63; ++b) {
    if ((int64_t{1} << b) == block_size) shift = b;
  }
  const Args a{q,          rows,         head_dim,     num_kv_heads, k_cache,
               key_bf16 != 0, block_size, shift,      block_tables, table_stride,
               region_start, region_end, num_select, block_k,      out};
  using Search = void (*)(const Args&, int64_t, int64_t);
  Search fn = nullptr;
  if (head_dim == 64) {
    fn = a.key_bf16 ? search<true, 64> : search<false, 64>;
  } else if (head_dim == 128) {
    fn = a.key_bf16 ? search<true, 128> : search<false, 128>;
  } else {
    fn = a.key_bf16 ? search<true, 0> : search<false, 0>;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t item = 0; item < num_seqs * num_kv_heads; ++item) {
    fn(a, item / num_kv_heads, item % num_kv_heads);
  }
  return 0;
}
