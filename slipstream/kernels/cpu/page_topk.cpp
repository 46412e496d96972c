// Block top-k page selection (Kinetics / Quest) on CPU: score every eligible KV page of a
// sequence against its pooled query, per KV head, and keep the k best.
//
// Why: in PyTorch the selection is a gather of the page summaries, a batched product, a
// mask, a top-k and a where, ~190 us a layer at 8k context on 2 cores (500 pages x 3 heads
// x 64 dims: ~0.1 MFLOP, so nearly all of it per-op overhead); one call here does it in a
// few microseconds plus the call.
//
// Semantics match slipstream/kernels/cpu/page_topk.py's page_topk_ref: sequence r's score
// for logical page p at KV head h is max over the G query vectors q[r, h, g, :] of
// q . summary[h, tables[r, p], :]; pages sink_pages <= p < region_end[r] are eligible; the
// top_k[r] best (highest score first, the lower page first on ties) go to out[r, h, P :],
// the rest of the row is -1.
//
// Pinned pages (pinned given, [R, H, P] int64, -1 padded): pages a sequence's KV head reads
// whatever the step (SnapKV's pins). They are copied to out[r, h, : P]; a chosen page that is
// also pinned becomes -1 there, so the row names each page once and the read stays within
// P + top_k[r] pages (pins are part of the budget, and the choice is made as without them).
// Merging the pins into the choice in PyTorch afterwards (cat, sort, dedupe) took ~180 us a
// layer, 5.2 of a refresh step's 16.5 extra ms at 8k on 2 cores.
//
// Rerank (k_cache given): the page score only shortlists the `shortlist` best pages; those
// are ranked again by their best exact key logit, max over the page's slots and the G_e
// query heads qh[r, h, :, :] (cast to bf16, as the reference casts them to the cache's
// dtype) of q . k, and the top_k[r] best of the shortlist are kept.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

// Built twice (build.py's instruction sets): AVX512-BF16, with the rerank, and AVX2 + FMA
// for CPUs without AVX512 (AMD Zen 1-3), without it: there a rerank returns status 2 and the
// caller takes the PyTorch reference. The selection alone on AVX2 replaces ~0.6 ms of
// PyTorch a layer at 8k context (the reference's gather, product, mask, top-k and where on
// 2 Zen 3 cores), paid at every refresh of every sparse layer: 29 x 0.6 = 17 ms a refresh.
#ifdef __AVX512BF16__
#define SLIPSTREAM_PAGE_TOPK_RERANK 1
#include "avx512_bf16.h"
#else
#define SLIPSTREAM_PAGE_TOPK_RERANK 0
#include "avx2_fma.h"
#endif

namespace {

#if SLIPSTREAM_PAGE_TOPK_RERANK
using slipstream_cpu::sum_lanes_of_16;

float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  }
  if (i < n) {
    const __mmask16 live = (__mmask16)((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, a + i), _mm512_maskz_loadu_ps(live, b + i),
                          acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#else
float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  }
  if (i < n) {  // lanes past n read as zero
    const __m256i live = slipstream_cpu::first_lanes(n - i);
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, live), _mm256_maskload_ps(b + i, live), acc);
  }
  return slipstream_cpu::sum_lanes(acc);
}
#endif

#if SLIPSTREAM_PAGE_TOPK_RERANK
struct Rerank {
  const float* qh;  // [R, H, G_e, D] fp32 query heads
  int64_t group;    // G_e
  const uint16_t* k_cache;  // [num_blocks, block_size, H, D] bf16
  int64_t block_size, head_dim, shortlist;
};

// Best q . k over the slots of physical page `block` and the query heads (bf16 pairs).
float best_key_logit(const Rerank& rr, int64_t num_kv_heads, int64_t h, int64_t block,
                     const std::vector<__m512bh>& qb) {
  const int64_t pairs = rr.head_dim / 32;
  float best = -__builtin_inff();
  for (int64_t t0 = 0; t0 < rr.block_size; t0 += 16) {
    const int64_t kt = std::min<int64_t>(16, rr.block_size - t0);
    for (int64_t g = 0; g < rr.group; ++g) {
      __m512 acc[16];
      for (int64_t i = 0; i < 16; ++i) {
        __m512 dot = _mm512_setzero_ps();
        if (i < kt) {
          const uint16_t* key =
              rr.k_cache + ((block * rr.block_size + t0 + i) * num_kv_heads + h) * rr.head_dim;
          for (int64_t c = 0; c < pairs; ++c) {
            dot = _mm512_dpbf16_ps(dot, qb[g * pairs + c],
                                   (__m512bh)_mm512_loadu_si512(key + 32 * c));
          }
        }
        acc[i] = dot;
      }
      const __mmask16 live = kt == 16 ? 0xFFFF : (__mmask16)((1u << kt) - 1);
      const __m512 sums = sum_lanes_of_16(acc);
      best = std::max(best, _mm512_mask_reduce_max_ps(live, sums));
    }
  }
  return best;
}
#endif

}  // namespace

// Returns 0, 1 when a table entry is outside the summaries (the caller passes valid ones), or
// 2 for a rerank (k_cache given) in the AVX2 build.
extern "C" int slipstream_page_topk(const float* q, int64_t num_seqs, int64_t num_kv_heads,
                                    int64_t group, int64_t width, const float* summary,
                                    int64_t num_blocks, const int32_t* tables,
                                    int64_t table_stride, const int64_t* region_end,
                                    int64_t sink_pages, const int64_t* top_k, int64_t k_max,
                                    const int64_t* pinned, int64_t num_pinned, int64_t* out,
                                    int num_threads, const float* qh, int64_t qh_group,
                                    const void* k_cache, int64_t block_size, int64_t head_dim,
                                    int64_t shortlist) {
#if SLIPSTREAM_PAGE_TOPK_RERANK
  const Rerank rr{qh, qh_group, static_cast<const uint16_t*>(k_cache), block_size, head_dim,
                  shortlist};
#else
  if (k_cache != nullptr) return 2;
  (void)qh, (void)qh_group, (void)block_size, (void)head_dim, (void)shortlist;
#endif
  int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : bad)
  for (int64_t item = 0; item < num_seqs * num_kv_heads; ++item) {
    const int64_t r = item / num_kv_heads, h = item % num_kv_heads;
    int64_t* dst = out + item * (num_pinned + k_max);
    const int64_t* pins = pinned == nullptr ? nullptr : pinned + item * num_pinned;
    std::copy(pins, pins + num_pinned, dst);  // num_pinned is 0 without pins
    dst += num_pinned;
    std::fill(dst, dst + k_max, int64_t{-1});
    const int64_t first = sink_pages, end = region_end[r];
    if (end <= first) continue;
    std::vector<uint8_t> is_pinned(end - first, 0);
    for (int64_t i = 0; i < num_pinned; ++i) {
      if (pins[i] >= first && pins[i] < end) is_pinned[pins[i] - first] = 1;
    }
    std::vector<std::pair<float, int64_t>> scored;
    scored.reserve(end - first);
    const float* qh = q + item * group * width;
    for (int64_t p = first; p < end; ++p) {
      const int64_t block = tables[r * table_stride + p];
      if (block < 0 || block >= num_blocks) {
        bad = 1;
        continue;
      }
      const float* row = summary + (h * num_blocks + block) * width;
      float best = dot(qh, row, width);
      for (int64_t g = 1; g < group; ++g) best = std::max(best, dot(qh + g * width, row, width));
      scored.emplace_back(best, p);
    }
    const auto better = [](const std::pair<float, int64_t>& x, const std::pair<float, int64_t>& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    };
#if SLIPSTREAM_PAGE_TOPK_RERANK
    if (rr.k_cache != nullptr) {
      // Shortlist by page score, then score the shortlist by its best exact key logit.
      const int64_t n_short = std::min<int64_t>(rr.shortlist, scored.size());
      std::partial_sort(scored.begin(), scored.begin() + n_short, scored.end(), better);
      scored.resize(n_short);
      const int64_t pairs = rr.head_dim / 32;
      std::vector<__m512bh> qb(rr.group * pairs);
      const float* qe = rr.qh + item * rr.group * rr.head_dim;
      for (int64_t g = 0; g < rr.group; ++g) {
        for (int64_t c = 0; c < pairs; ++c) {
          const float* src = qe + g * rr.head_dim + 32 * c;
          // cvtne2ps_pbh(hi, lo): lanes 0-15 from lo, 16-31 from hi.
          qb[g * pairs + c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
        }
      }
      for (auto& entry : scored) {
        const int64_t block = tables[r * table_stride + entry.second];
        entry.first = best_key_logit(rr, num_kv_heads, h, block, qb);
      }
    }
#endif
    const int64_t k = std::min<int64_t>({top_k[r], k_max, static_cast<int64_t>(scored.size())});
    std::partial_sort(scored.begin(), scored.begin() + k, scored.end(), better);
    for (int64_t i = 0; i < k; ++i) {
      const int64_t page = scored[i].second;
      dst[i] = is_pinned[page - first] ? -1 : page;
    }
  }
  return bad;
}
