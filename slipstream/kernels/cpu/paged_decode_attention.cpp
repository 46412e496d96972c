// Paged attention for steps that feed few tokens per sequence (decode, tree verification),
// bf16 cache and queries, float32 scores and softmax, on AVX512-BF16 CPUs.
//
// Why: the PyTorch reference gathers each sequence's pages and calls SDPA, ~87 us a layer
// for one decode row at 300 keys and ~230 us for a 9-row tree step (2 cores), nearly all
// of it per-call overhead: the arithmetic is ~0.1 MFLOP. Here one pass reads the keys in
// place through the block table.
//
// Semantics match slipstream/kernels/paged_attention.py: sequence b's query i (of n_q) sees
// every cached key j < ctx = seq_len - n_q, and new key ctx + j' when j' <= i (causal) or
// tree_mask[token, j'] (tree). With `chunks` (block-sparse, as
// slipstream/kernels/sparse_paged_attention.py) the cached keys a query of KV head g sees are
// only those in the chunks listed for (b, g): positions [c * chunk_size, (c + 1) *
// chunk_size) below ctx, -1 entries padding. They are read in ascending position order, so
// listing every chunk gives the dense result bit for bit.
//
// Work: a sequence's keys are cut into chunks of kChunk positions on a fixed grid; an item
// is (sequence, kv head, chunk) and computes, for every query vector that reads that kv
// head (the sequence's rows x the `group` heads), a partial softmax over the chunk: its
// max, its sum, and its weighted sum of values. Items spread over threads (dynamic), then
// each (token, head) output merges its chunks in order (flash-decoding). Scores come 16
// keys at a time (VDPBF16PS into 16 accumulators, one transposing reduction), padding short
// tiles with zeros, so every key's score takes the same instructions wherever it sits.
// The weighted value sum takes the probabilities in bf16, two keys an instruction
// (VDPBF16PS over interleaved value rows, as flash attention kernels round P to 16 bits
// before P V): half the multiply instructions of float32 FMAs. Measured (2 cores,
// benchmarks/attention_kernel_ab.py): a 9-row tree step at 1000 keys 4.80 -> 4.22 ms over 30
// layers, dense 8k 11.25 -> 10.52 ms; error against float64 attention at 300 keys 0.174% ->
// 0.190% of the output's norm, where rounding the exact output to bf16 alone gives 0.174%
// (benchmarks/attention_kernel_error.py).
// Each row reads its keys in the order it would have them if decoded alone after its
// ancestors (the cached keys, then the new keys it sees), and chunks cut that order. So
// nothing depends on other rows, other sequences or the thread count: a row gets the same
// bits alone, in any batch, and as any node of a draft tree as when it is decoded alone.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx512_bf16.h"

namespace {

using slipstream_cpu::exp_ps;
using slipstream_cpu::sum_lanes_of_16;
using slipstream_cpu::store_bf16x16;

struct Args {
  const uint16_t* q;         // [T, H, D] bf16, unit stride within a head
  int64_t q_token_stride;    // elements
  int64_t q_head_stride;     // elements
  const uint16_t* k_cache;   // [num_blocks, block_size, KV, D] bf16
  const uint16_t* v_cache;   // [num_blocks, block_size, KV, D] bf16
  const int32_t* block_tables;  // [S, block_table_stride]
  int64_t block_table_stride;
  const int32_t* query_start;   // [S + 1]
  const int32_t* seq_lens;      // [S]
  const uint8_t* tree_mask;     // [T, tree_mask_stride] bool, or null (causal)
  int64_t tree_mask_stride;
  uint16_t* out;  // [T, H, D] bf16, contiguous
  int64_t num_heads, num_kv_heads, head_dim, block_size;
  float scale;
  const int64_t* chunks;  // [S, KV, max_chunks] chunk ids, -1 = padding; null = dense
  int64_t chunks_seq_stride, chunks_head_stride, max_chunks, chunk_size;
};

constexpr int64_t kChunk = 128;  // keys per item: 300 keys -> 3 chunks per kv head
constexpr float kNegInf = -__builtin_inff();
// The partner of a row's lone last key in the weighted-value pairs (its probability is 0).
alignas(64) constexpr uint16_t kZeroRow[128] = {};

// Per-sequence layout of the work, shared by both phases.
struct SeqPlan {
  int64_t first_token, num_q, seq_len, ctx, num_chunks, partial_base;
};

template <int D>
struct Kernel {
  static constexpr int kPairs = D / 32;   // zmm of bf16 pairs in a head vector
  static constexpr int kChunks = D / 16;  // zmm of float32 in a head vector
  static constexpr int kPartial = D + 2;  // floats per partial: max, sum, weighted values
  static constexpr int kGroupPV = 24 / kChunks;  // query vectors per value pass (24 zmm)

  const Args& a;
  const std::vector<SeqPlan>& seqs;
  // Per token: the new keys it sees, as indices among its sequence's new tokens, ascending
  // (row-major, max_q per token), and how many.
  const std::vector<int32_t>& seen;
  const std::vector<int32_t>& num_seen;
  int64_t max_q;
  float* partials;
  int64_t group;
  // Block-sparse only (empty when dense): per (sequence, kv head), the cached key positions
  // it reads, ascending, at cached_pos[cached_base[s * KV + g] ...], cached_len[...] of them.
  const std::vector<int32_t>& cached_pos;
  const std::vector<int64_t>& cached_base;
  const std::vector<int64_t>& cached_len;

  // Cached keys that kv head `kv_head` of sequence `seq` reads (all ctx when dense).
  int64_t cached_keys(const SeqPlan& sp, int64_t seq, int64_t kv_head) const {
    return a.chunks == nullptr ? sp.ctx : cached_len[seq * a.num_kv_heads + kv_head];
  }

  // Actual position of the p-th cached key that (seq, kv_head) reads.
  int64_t cached_actual(int64_t seq, int64_t kv_head, int64_t p) const {
    return a.chunks == nullptr ? p : cached_pos[cached_base[seq * a.num_kv_heads + kv_head] + p];
  }

  // Cache row of actual key position `pos` of sequence `seq`, kv head `kv_head`.
  const uint16_t* row_of(const uint16_t* cache, int64_t seq, int64_t pos, int64_t kv_head) const {
    const int64_t block = a.block_tables[seq * a.block_table_stride + pos / a.block_size];
    const int64_t slot = block * a.block_size + pos % a.block_size;
    return cache + (slot * a.num_kv_heads + kv_head) * D;
  }

  // Asks for a head row's cache lines (64 bytes = 32 bf16 each) at cache level Hint
  // (_mm_prefetch wants a constant; the hints are an enum in GCC, ints in Clang).
  template <decltype(_MM_HINT_T0) Hint>
  static void prefetch_row(const uint16_t* row) {
    for (int c = 0; c < D; c += 32) _mm_prefetch(reinterpret_cast<const char*>(row + c), Hint);
  }

  // A row reads its keys in virtual order: the `cached` cached keys it reads, then the new
  // keys it sees. Actual position of virtual position p for `token`.
  int64_t actual(const SeqPlan& sp, int64_t seq, int64_t kv_head, int64_t cached, int64_t token,
                 int64_t p) const {
    return p < cached ? cached_actual(seq, kv_head, p)
                      : sp.ctx + seen[token * max_q + (p - cached)];
  }

  int64_t virtual_len(int64_t cached, int64_t token) const { return cached + num_seen[token]; }

  // One (sequence, kv head, chunk of virtual positions): partials of every query vector on
  // that kv head. A row's virtual positions are the positions its keys would have had if
  // it were decoded alone after its ancestors, so chunks, 16-lane sums and the order of
  // the value sum match that decode exactly.
  void item(int64_t seq, int64_t kv_head, int64_t chunk, float* scores, uint16_t* probs) const {
    const SeqPlan& sp = seqs[seq];
    const int64_t pos0 = chunk * kChunk;
    const int64_t num_vec = sp.num_q * group;
    const int64_t cached = cached_keys(sp, seq, kv_head);
    // Keys of this chunk among the cached ones are the same keys for every row.
    const int64_t shared = std::clamp<int64_t>(cached - pos0, 0, kChunk);
    const __m512 scale = _mm512_set1_ps(a.scale);
    int64_t longest = 0;
    for (int64_t r = 0; r < sp.num_q; ++r) {
      longest = std::max(longest, virtual_len(cached, sp.first_token + r) - pos0);
    }
    longest = std::min(longest, kChunk);
    // A sequence's pages lie anywhere in the pool, so the hardware prefetcher cannot run
    // ahead of the reads: ask for the chunk's cached keys and values (16 KB each at D = 64)
    // to come into L2 now, then, tile by tile, for the next tile's keys into L1 and again
    // for this tile's values (some of the 512 requests made up front get dropped: asking
    // again took dense 8k from 13.1 to 11.8 ms). Measured (2 cores, 30 layers at 8k context,
    // pages shuffled, cold caches): dense 21.3 -> 11.8 ms; 352 block-sparse keys a head
    // 2.04 -> 1.29 ms; HiP's 2-token chunks, 400 keys a head, 2.78 -> 1.44 ms.
    for (int64_t j = 0; j < shared; ++j) {
      const uint16_t* key = row_of(a.k_cache, seq, cached_actual(seq, kv_head, pos0 + j), kv_head);
      prefetch_row<_MM_HINT_T1>(key);
      prefetch_row<_MM_HINT_T1>(a.v_cache + (key - a.k_cache));
    }
    // scores[v][0 .. n_v): scaled q.k over the row's keys in this chunk.
    for (int64_t t0 = 0; t0 < longest; t0 += 16) {
      const uint16_t* keys[16];
      const bool tile_shared = t0 + 16 <= shared;
      if (tile_shared) {
        for (int i = 0; i < 16; ++i) {
          keys[i] = row_of(a.k_cache, seq, cached_actual(seq, kv_head, pos0 + t0 + i), kv_head);
        }
        for (int64_t j = t0 + 16; j < std::min<int64_t>(t0 + 32, shared); ++j) {
          prefetch_row<_MM_HINT_T0>(
              row_of(a.k_cache, seq, cached_actual(seq, kv_head, pos0 + j), kv_head));
        }
        for (int i = 0; i < 16; ++i) prefetch_row<_MM_HINT_T1>(a.v_cache + (keys[i] - a.k_cache));
      }
      for (int64_t v = 0; v < num_vec; ++v) {
        const int64_t token = sp.first_token + v / group;
        const int64_t n_v = std::min(kChunk, virtual_len(cached, token) - pos0);
        if (t0 >= n_v) continue;
        const int64_t kt = std::min<int64_t>(16, n_v - t0);
        if (!tile_shared) {
          for (int64_t i = 0; i < kt; ++i) {
            const int64_t pos = actual(sp, seq, kv_head, cached, token, pos0 + t0 + i);
            keys[i] = row_of(a.k_cache, seq, pos, kv_head);
          }
        }
        const int64_t head = kv_head * group + v % group;
        const uint16_t* qh = a.q + token * a.q_token_stride + head * a.q_head_stride;
        __m512bh qv[kPairs];
        for (int c = 0; c < kPairs; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qh + 32 * c);
        __m512 acc[16];
        for (int64_t i = 0; i < 16; ++i) {
          __m512 dot = _mm512_setzero_ps();
          if (i < kt) {
            for (int c = 0; c < kPairs; ++c) {
              dot = _mm512_dpbf16_ps(dot, qv[c], (__m512bh)_mm512_loadu_si512(keys[i] + 32 * c));
            }
          }
          acc[i] = dot;
        }
        _mm512_storeu_ps(scores + v * kChunk + t0, _mm512_mul_ps(sum_lanes_of_16(acc), scale));
      }
    }
    // Partial softmax per query vector, then its weighted values, kGroupPV vectors a pass.
    for (int64_t v0 = 0; v0 < num_vec; v0 += kGroupPV) {
      const int64_t nv = std::min<int64_t>(kGroupPV, num_vec - v0);
      int64_t n_of[kGroupPV];
      for (int64_t v = v0; v < v0 + nv; ++v) {
        const int64_t token = sp.first_token + v / group;
        const int64_t n = std::clamp<int64_t>(virtual_len(cached, token) - pos0, 0, kChunk);
        n_of[v - v0] = n;
        float* sv = scores + v * kChunk;
        float* out = partials + partial_offset(sp, kv_head, chunk, v);
        if (n == 0) {  // the row's keys end before this chunk
          out[0] = kNegInf;
          out[1] = 0.0f;
          continue;
        }
        __m512 mv16 = _mm512_set1_ps(kNegInf);
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 live = j + 16 <= n ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
          mv16 = _mm512_mask_max_ps(mv16, live, mv16, _mm512_maskz_loadu_ps(live, sv + j));
        }
        const float m = _mm512_reduce_max_ps(mv16);
        out[0] = m;
        const __m512 mv = _mm512_set1_ps(m);
        __m512 total = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 live = j + 16 <= n ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
          const __m512 x = _mm512_maskz_loadu_ps(live, sv + j);
          const __m512 e = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(x, mv)));
          store_bf16x16(probs + v * kChunk + j, e);  // zeros past n: a tail pair's second half
          total = _mm512_add_ps(total, e);
        }
        out[1] = _mm512_reduce_add_ps(total);
      }
      weighted_values_of(nv, sp, seq, kv_head, chunk, cached, shared, v0, n_of, probs);
    }
  }

  // Weighted values of query vectors v0 .. v0 + NV - 1 over this chunk's keys (see item),
  // into their partials. NV is a constant so that the NV x kChunks accumulators live in
  // registers: with a run-time count they lived on the stack, a load and a store around
  // every FMA. Each accumulator still adds its keys in the same order: same bits.
  template <int NV>
  void weighted_values(const SeqPlan& sp, int64_t seq, int64_t kv_head, int64_t chunk,
                       int64_t cached, int64_t shared, int64_t v0, const int64_t* n_of,
                       const uint16_t* probs) const {
    const int64_t pos0 = chunk * kChunk;
    __m512 acc[NV][kChunks];
    for (int v = 0; v < NV; ++v) {
      for (int c = 0; c < kChunks; ++c) acc[v][c] = _mm512_setzero_ps();
    }
    // Keys go in pairs of virtual positions (2m, 2m + 1) of the chunk, whichever loop takes
    // them, so a row adds the same pairs in the same order alone or in a tree.
    // Pairs of cached keys: one value load and interleave for the whole group.
    const int64_t shared_pairs = shared & ~int64_t{1};
    for (int64_t j = 0; j < shared_pairs; j += 2) {
      __m512bh vals[kChunks];
      interleave_values(
          row_of(a.v_cache, seq, cached_actual(seq, kv_head, pos0 + j), kv_head),
          row_of(a.v_cache, seq, cached_actual(seq, kv_head, pos0 + j + 1), kv_head), vals);
      for (int v = 0; v < NV; ++v) {
        const __m512bh p = prob_pair(probs + (v0 + v) * kChunk + j);
        for (int c = 0; c < kChunks; ++c) acc[v][c] = _mm512_dpbf16_ps(acc[v][c], p, vals[c]);
      }
    }
    // The rest: each row its own keys, in its virtual order (a lone last key pairs with
    // zeros: its partner's probability was stored as 0).
    for (int v = 0; v < NV; ++v) {
      const int64_t token = sp.first_token + (v0 + v) / group;
      for (int64_t j = shared_pairs; j < n_of[v]; j += 2) {
        const uint16_t* first =
            row_of(a.v_cache, seq, actual(sp, seq, kv_head, cached, token, pos0 + j), kv_head);
        const uint16_t* second =
            j + 1 < n_of[v]
                ? row_of(a.v_cache, seq, actual(sp, seq, kv_head, cached, token, pos0 + j + 1),
                         kv_head)
                : kZeroRow;
        __m512bh vals[kChunks];
        interleave_values(first, second, vals);
        const __m512bh p = prob_pair(probs + (v0 + v) * kChunk + j);
        for (int c = 0; c < kChunks; ++c) acc[v][c] = _mm512_dpbf16_ps(acc[v][c], p, vals[c]);
      }
    }
    // acc[v][2h] and acc[v][2h + 1] hold dims 32h + 8L + t and 32h + 8L + 4 + t in lane
    // 4L + t (unpacklo / unpackhi work within 128-bit lanes): back to dim order.
    const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20,
                                                 21, 22, 23);
    const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15,
                                                  28, 29, 30, 31);
    for (int v = 0; v < NV; ++v) {
      float* out = partials + partial_offset(sp, kv_head, chunk, v0 + v) + 2;
      for (int h = 0; h < kPairs; ++h) {
        const __m512 lo = acc[v][2 * h], hi = acc[v][2 * h + 1];
        _mm512_storeu_ps(out + 32 * h, _mm512_permutex2var_ps(lo, first_half, hi));
        _mm512_storeu_ps(out + 32 * h + 16, _mm512_permutex2var_ps(lo, second_half, hi));
      }
    }
  }

  // Two value rows interleaved for VDPBF16PS: vals[2h] lane 4L + t = (first, second) at dim
  // 32h + 8L + t, vals[2h + 1] the same at dim 32h + 8L + 4 + t.
  static void interleave_values(const uint16_t* first, const uint16_t* second, __m512bh* vals) {
    for (int h = 0; h < kPairs; ++h) {
      const __m512i x = _mm512_loadu_si512(first + 32 * h);
      const __m512i y = _mm512_loadu_si512(second + 32 * h);
      vals[2 * h] = (__m512bh)_mm512_unpacklo_epi16(x, y);
      vals[2 * h + 1] = (__m512bh)_mm512_unpackhi_epi16(x, y);
    }
  }

  // The bf16 probabilities of keys j and j + 1 (at p), in every 32-bit lane.
  static __m512bh prob_pair(const uint16_t* p) {
    uint32_t word;
    std::memcpy(&word, p, sizeof(word));
    return (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
  }

  // weighted_values<nv>, for a run-time nv in [1, kGroupPV].
  template <int NV = 1, class... Rest>
  void weighted_values_of(int64_t nv, const Rest&... rest) const {
    if constexpr (NV < kGroupPV) {
      if (nv > NV) {
        weighted_values_of<NV + 1>(nv, rest...);
        return;
      }
    }
    weighted_values<NV>(rest...);
  }

  int64_t partial_offset(const SeqPlan& sp, int64_t kv_head, int64_t chunk, int64_t v) const {
    const int64_t num_vec = sp.num_q * group;
    return sp.partial_base + ((kv_head * sp.num_chunks + chunk) * num_vec + v) * kPartial;
  }

  // Output of (token, head): its chunks' partials merged in chunk order.
  void merge(int64_t seq, int64_t token, int64_t head) const {
    const SeqPlan& sp = seqs[seq];
    const int64_t kv_head = head / group;
    const int64_t v = (token - sp.first_token) * group + head % group;
    float m = kNegInf;
    for (int64_t c = 0; c < sp.num_chunks; ++c) {
      const float mc = partials[partial_offset(sp, kv_head, c, v)];
      m = mc > m ? mc : m;
    }
    __m512 acc[kChunks];
    for (int c = 0; c < kChunks; ++c) acc[c] = _mm512_setzero_ps();
    float total = 0.0f;
    for (int64_t c = 0; c < sp.num_chunks; ++c) {
      const float* part = partials + partial_offset(sp, kv_head, c, v);
      if (part[0] == kNegInf) continue;  // a chunk past the row's keys
      const __m512 w = exp_ps(_mm512_set1_ps(part[0] - m));
      total += _mm512_cvtss_f32(w) * part[1];
      for (int i = 0; i < kChunks; ++i) {
        acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(part + 2 + 16 * i), acc[i]);
      }
    }
    const __m512 inv = _mm512_set1_ps(1.0f / total);
    uint16_t* out = a.out + (token * a.num_heads + head) * D;
    for (int i = 0; i < kChunks; ++i) store_bf16x16(out + 16 * i, _mm512_mul_ps(acc[i], inv));
  }
};

template <int D>
void run(const Args& a, int64_t num_seqs, int num_threads) {
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int64_t num_tokens = a.query_start[num_seqs];
  int64_t max_q = 1;
  for (int64_t s = 0; s < num_seqs; ++s) {
    max_q = std::max<int64_t>(max_q, a.query_start[s + 1] - a.query_start[s]);
  }
  // Which new keys each token sees (causal: 0..i; tree: its mask row).
  std::vector<int32_t> seen(num_tokens * max_q), num_seen(num_tokens);
  std::vector<int32_t> seq_of_token(num_tokens);
  std::vector<SeqPlan> seqs(num_seqs);
  std::vector<int64_t> item_seq, item_rest;  // (seq) and (kv head * chunks + chunk)
  std::vector<int32_t> cached_pos;
  std::vector<int64_t> cached_base, cached_len;
  int64_t partial_floats = 0, max_vec = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    SeqPlan& sp = seqs[s];
    sp.first_token = a.query_start[s];
    sp.num_q = a.query_start[s + 1] - sp.first_token;
    sp.seq_len = a.seq_lens[s];
    sp.ctx = sp.seq_len - sp.num_q;
    int64_t most_cached = sp.ctx;
    if (a.chunks != nullptr) {
      most_cached = 0;
      std::vector<int64_t> ids;
      for (int64_t g = 0; g < a.num_kv_heads; ++g) {
        const int64_t* row = a.chunks + s * a.chunks_seq_stride + g * a.chunks_head_stride;
        ids.assign(row, row + a.max_chunks);
        std::sort(ids.begin(), ids.end());
        cached_base.push_back(static_cast<int64_t>(cached_pos.size()));
        for (const int64_t c : ids) {
          if (c < 0) continue;
          const int64_t end = std::min((c + 1) * a.chunk_size, sp.ctx);
          for (int64_t p = c * a.chunk_size; p < end; ++p) {
            cached_pos.push_back(static_cast<int32_t>(p));
          }
        }
        cached_len.push_back(static_cast<int64_t>(cached_pos.size()) - cached_base.back());
        most_cached = std::max(most_cached, cached_len.back());
      }
    }
    int64_t longest = 0;
    for (int64_t i = 0; i < sp.num_q; ++i) {
      const int64_t t = sp.first_token + i;
      seq_of_token[t] = static_cast<int32_t>(s);
      int32_t n = 0;
      for (int64_t j = 0; j < sp.num_q; ++j) {
        const bool sees = a.tree_mask == nullptr ? j <= i : a.tree_mask[t * a.tree_mask_stride + j] != 0;
        if (sees) seen[t * max_q + n++] = static_cast<int32_t>(j);
      }
      num_seen[t] = n;
      longest = std::max<int64_t>(longest, most_cached + n);
    }
    sp.num_chunks = (longest + kChunk - 1) / kChunk;
    sp.partial_base = partial_floats;
    partial_floats += a.num_kv_heads * sp.num_chunks * sp.num_q * group * Kernel<D>::kPartial;
    max_vec = std::max(max_vec, sp.num_q * group);
    for (int64_t r = 0; r < a.num_kv_heads * sp.num_chunks; ++r) {
      item_seq.push_back(s);
      item_rest.push_back(r);
    }
  }
  const int64_t num_items = static_cast<int64_t>(item_seq.size());
  if (num_items == 0) return;
  std::vector<float> partials(partial_floats);
  const Kernel<D> k{a,     seqs,       seen,        num_seen,  max_q, partials.data(),
                    group, cached_pos, cached_base, cached_len};
  const int64_t num_outputs = num_tokens * a.num_heads;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scores(max_vec * kChunk);
    std::vector<uint16_t> probs(max_vec * kChunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) {
      const SeqPlan& sp = seqs[item_seq[i]];
      k.item(item_seq[i], item_rest[i] / sp.num_chunks, item_rest[i] % sp.num_chunks,
             scores.data(), probs.data());
    }
#pragma omp for schedule(static)
    for (int64_t o = 0; o < num_outputs; ++o) {
      const int64_t token = o / a.num_heads;
      k.merge(seq_of_token[token], token, o % a.num_heads);
    }
  }
}

}  // namespace

// Returns 0, or 1 for a head size other than 64 or 128 (the caller checks).
extern "C" int slipstream_paged_decode_attention(
    const void* q, int64_t q_token_stride, int64_t q_head_stride, const void* k_cache,
    const void* v_cache, const int32_t* block_tables, int64_t block_table_stride,
    const int32_t* query_start, const int32_t* seq_lens, int64_t num_seqs,
    const uint8_t* tree_mask, int64_t tree_mask_stride, void* out, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int num_threads,
    const int64_t* chunks, int64_t chunks_seq_stride, int64_t chunks_head_stride,
    int64_t max_chunks, int64_t chunk_size) {
  const Args a{static_cast<const uint16_t*>(q),
               q_token_stride,
               q_head_stride,
               static_cast<const uint16_t*>(k_cache),
               static_cast<const uint16_t*>(v_cache),
               block_tables,
               block_table_stride,
               query_start,
               seq_lens,
               tree_mask,
               tree_mask_stride,
               static_cast<uint16_t*>(out),
               num_heads,
               num_kv_heads,
               head_dim,
               block_size,
               scale,
               chunks,
               chunks_seq_stride,
               chunks_head_stride,
               max_chunks,
               chunk_size};
  if (head_dim == 64) {
    run<64>(a, num_seqs, num_threads);
  } else if (head_dim == 128) {
    run<128>(a, num_seqs, num_threads);
  } else {
    return 1;
  }
  return 0;
}
