// Paged attention for steps that feed few tokens per sequence (decode, tree verification),
// float32 queries and caches, on AVX2 + FMA CPUs: the float32 counterpart of
// paged_decode_attention.cpp (AVX512-BF16), with the same C signature and semantics.
//
// Why: float32 is the engine's dtype on CPUs without native bf16 (AMD Zen 1-3, Intel before
// Cooper Lake), and there every layer's attention went through the PyTorch reference
// (gather the sequence's pages, then SDPA): 8.1 ms of a 56 ms one-token step of the default
// model at 300 cached keys on a 2-core Zen 3 (benchmarks/step_breakdown.py), ~270 us a
// layer, nearly all of it per-call overhead (the arithmetic is ~0.3 MFLOP).
//
// Semantics match slipstream/kernels/paged_attention.py: sequence b's query i (of n_q) sees
// every cached key j < ctx = seq_len - n_q, and new key ctx + j' when j' <= i (causal) or
// tree_mask[token, j'] (tree). With `chunks` (block-sparse, as
// slipstream/kernels/sparse_paged_attention.py), the cached keys that KV head g of sequence
// b reads are those of the chunks listed for (b, g): positions [c * chunk_size,
// (c + 1) * chunk_size) below ctx, -1 entries padding, read in ascending position order, so
// listing every chunk gives the dense result bit for bit.
//
// Order of the sums: each (token, KV head) reads its keys in "virtual" order, the cached
// keys it reads and then the new keys it sees, ascending: the order its keys would have if
// it were decoded alone after its ancestors. Virtual positions are cut into splits of
// kSplit on a fixed grid; a split gives, for each query head of the KV head's group, a
// partial softmax (max, sum, weighted values), and the splits merge in order. Scores come
// 8 keys at a time, each key's 8 partial dot lanes summed by the same tree whatever its
// place in the tile. Nothing depends on the other rows, sequences or threads: a row gets
// the same bits alone, in any batch, and as any node of a draft tree as when it is decoded
// alone.
//
// Shared key reads: a step's rows of one sequence see the same cached keys, so the splits
// that hold cached keys only are the same for all of them. Such a split is one work item
// for up to kSharedRows rows, reading each tile of keys and values once for all of them
// (each row's arithmetic unchanged, so its bits too). One item a row (before), a 9-row tree
// re-read its K/V 9 times, from L2 at best: 30 layers of a 9-row tree took 5.8 -> 4.8 ms
// at 300 cached keys, 14.8 -> 11.1 at 1000 and 147 -> 81 at 8192; one-row steps within
// noise (benchmarks/attention_kernel_ab.py --dtype float32).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "avx2_fma.h"

namespace {

using slipstream_cpu::exp_ps;
using slipstream_cpu::first_lanes;
using slipstream_cpu::sum_lanes;

struct Args {
  const float* q;            // [T, H, D], unit stride within a head
  int64_t q_token_stride;    // elements
  int64_t q_head_stride;     // elements
  const float* k_cache;      // [num_blocks, block_size, KV, D]
  const float* v_cache;      // [num_blocks, block_size, KV, D]
  const int32_t* block_tables;  // [S, block_table_stride]
  int64_t block_table_stride;
  const int32_t* query_start;   // [S + 1]
  const int32_t* seq_lens;      // [S]
  const uint8_t* tree_mask;     // [T, tree_mask_stride] bool, or null (causal)
  int64_t tree_mask_stride;
  float* out;  // [T, H, D], contiguous
  int64_t num_heads, num_kv_heads, head_dim, block_size;
  float scale;
  const int64_t* chunks;  // [S, KV, max_chunks] chunk ids, -1 = padding; null = dense
  int64_t chunks_seq_stride, chunks_head_stride, max_chunks, chunk_size;
};

// Keys per split: 128 x 256-byte rows (D = 64) = 32 KB of values, what one core's L1 holds
// while every head of the group takes its weighted sum over them.
constexpr int64_t kSplit = 128;
// Rows of a shared item (see Kernel::shared_item): a tree's rows, or a chunk of a longer
// step's, read each key tile once; their scores take kSharedRows x group x kSplit floats.
constexpr int64_t kSharedRows = 16;
constexpr int64_t kValueTile = 32;  // values a shared item weighs for all rows at a time
constexpr int kLanes = 8;
constexpr float kNegInf = -__builtin_inff();

// Lane l of the result: the 8 lanes of a[l] summed as ((0 + 1) + (2 + 3)) + ((4 + 5) +
// (6 + 7)), the same tree for every l.
inline __m256 sum_lanes_of_8(const __m256* a) {
  const __m256 t01 = _mm256_hadd_ps(a[0], a[1]);  // a0: 01 23, a1: 01 23 | a0: 45 67, ...
  const __m256 t23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t45 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 t67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t01, t23);  // a0..a3: 0123 | a0..a3: 4567
  const __m256 u1 = _mm256_hadd_ps(t45, t67);  // a4..a7: 0123 | a4..a7: 4567
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline float hmax(__m256 v) {
  const __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 p = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(p, _mm_shuffle_ps(p, p, 1)));
}

// One (token, KV head): where its keys are, and where its splits' partials go.
struct Row {
  int64_t seq, token, kv_head;
  int64_t cached;       // cached keys it reads (ctx when dense)
  const int32_t* cached_pos;  // their positions when block-sparse, else null (0 .. ctx - 1)
  const int32_t* seen;  // the new keys it sees, as indices among the sequence's new tokens
  int64_t num_seen;
  int64_t ctx;
  int64_t first_item;   // its splits are items first_item .. first_item + splits - 1
  int64_t splits;
};

template <int D>
struct Kernel {
  static constexpr int kVecs = D / kLanes;  // ymm per head vector
  static constexpr int kPartial = D + 2;    // floats per (item, head): max, sum, values

  const Args& a;
  int64_t group;
  float* partials;  // [items, group, kPartial]

  const float* row_of(const float* cache, int64_t seq, int64_t pos, int64_t kv_head) const {
    const int64_t block = a.block_tables[seq * a.block_table_stride + pos / a.block_size];
    const int64_t slot = block * a.block_size + pos % a.block_size;
    return cache + (slot * a.num_kv_heads + kv_head) * D;
  }

  int64_t position(const Row& r, int64_t p) const {  // actual position of virtual p
    if (p < r.cached) return r.cached_pos == nullptr ? p : r.cached_pos[p];
    return r.ctx + r.seen[p - r.cached];
  }

  // Pointers to the keys and values of virtual positions p0 .. p0 + n - 1 of row r; asks for
  // the values ahead.
  void gather(const Row& r, int64_t p0, int64_t n, const float** keys, const float** values) const {
    for (int64_t j = 0; j < n; ++j) {
      keys[j] = row_of(a.k_cache, r.seq, position(r, p0 + j), r.kv_head);
      values[j] = a.v_cache + (keys[j] - a.k_cache);
      // Pages lie anywhere in the pool, out of the hardware prefetcher's sight: ask for the
      // split's keys and values now, so that their misses overlap rather than come one tile
      // of keys at a time. The keys too: block-sparse 8k decode (48 scattered pages a KV
      // head, 30 layers' caches) took 224 -> 195 us a layer, dense reads within noise.
      for (int c = 0; c < D; c += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(keys[j] + c), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(values[j] + c), _MM_HINT_T1);
      }
    }
  }

  // Query head h of row r's group, in registers.
  void load_query(const Row& r, int64_t h, __m256* qv) const {
    const float* qh = a.q + r.token * a.q_token_stride + (r.kv_head * group + h) * a.q_head_stride;
    for (int c = 0; c < kVecs; ++c) qv[c] = _mm256_loadu_ps(qh + kLanes * c);
  }

  // Scaled scores of query qv against keys[0 .. count) (count <= 8) into sh[0 .. 8).
  void score_tile(const __m256* qv, const float* const* keys, int64_t count, float* sh) const {
    __m256 acc[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      __m256 dot = _mm256_setzero_ps();
      if (i < count) {
        for (int c = 0; c < kVecs; ++c) {
          dot = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(keys[i] + kLanes * c), dot);
        }
      }
      acc[i] = dot;
    }
    _mm256_storeu_ps(sh, _mm256_mul_ps(sum_lanes_of_8(acc), _mm256_set1_ps(a.scale)));
  }

  // sh[0 .. n) scores -> their exponentials less the max (in place); out[0] = max, out[1] =
  // the exponentials' sum.
  static void softmax_partial(float* sh, int64_t n, float* out) {
    __m256 mv = _mm256_set1_ps(kNegInf);
    for (int64_t j = 0; j < n; j += kLanes) {
      const __m256 live = _mm256_castsi256_ps(first_lanes(n - j));
      mv = _mm256_max_ps(mv, _mm256_blendv_ps(mv, _mm256_loadu_ps(sh + j), live));
    }
    const float m = hmax(mv);
    const __m256 mb = _mm256_set1_ps(m);
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += kLanes) {
      const __m256 live = _mm256_castsi256_ps(first_lanes(n - j));
      const __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sh + j), mb)), live);
      _mm256_storeu_ps(sh + j, e);  // the tile's spare lanes (past n) hold zeros
      total = _mm256_add_ps(total, e);
    }
    out[0] = m;
    out[1] = sum_lanes(total);
  }

  // out[2 ..] (+)= sum over j in [j0, j1) of sh[j] * values[j], in increasing j; `first`:
  // start from zero rather than from what out holds.
  static void weighted_values(const float* sh, const float* const* values, int64_t j0,
                              int64_t j1, bool first, float* out) {
    __m256 acc[kVecs];
    for (int c = 0; c < kVecs; ++c) {
      acc[c] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + 2 + kLanes * c);
    }
    for (int64_t j = j0; j < j1; ++j) {
      const __m256 p = _mm256_broadcast_ss(sh + j);
      for (int c = 0; c < kVecs; ++c) {
        acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(values[j] + kLanes * c), acc[c]);
      }
    }
    for (int c = 0; c < kVecs; ++c) _mm256_storeu_ps(out + 2 + kLanes * c, acc[c]);
  }

  float* partial(const Row& r, int64_t split, int64_t h) const {
    return partials + ((r.first_item + split) * group + h) * kPartial;
  }

  // Partials of split `split` of row r, for every query head of its group.
  void item(const Row& r, int64_t split, float* scores) const {
    const int64_t p0 = split * kSplit;
    const int64_t n = std::min(kSplit, r.cached + r.num_seen - p0);
    const float* keys[kSplit];
    const float* values[kSplit];
    gather(r, p0, n, keys, values);
    for (int64_t h = 0; h < group; ++h) {
      __m256 qv[kVecs];
      load_query(r, h, qv);
      for (int64_t t0 = 0; t0 < n; t0 += kLanes) {
        score_tile(qv, keys + t0, n - t0, scores + h * kSplit + t0);
      }
    }
    for (int64_t h = 0; h < group; ++h) {
      float* sh = scores + h * kSplit;
      float* out = partial(r, split, h);
      softmax_partial(sh, n, out);
      weighted_values(sh, values, 0, n, true, out);
    }
  }

  // The same for rows rs[0 .. nr) of one (sequence, KV head) at a split of cached keys only
  // (kSplit of them, the same for every row): each tile of keys and values is read from
  // memory once for all rows instead of once a row. Each (row, head) runs item()'s
  // arithmetic in item()'s order, so the bits are item()'s.
  void shared_item(const Row* rs, int64_t nr, int64_t split, float* scores) const {
    const float* keys[kSplit];
    const float* values[kSplit];
    gather(rs[0], split * kSplit, kSplit, keys, values);
    for (int64_t t0 = 0; t0 < kSplit; t0 += kLanes) {
      for (int64_t i = 0; i < nr; ++i) {
        for (int64_t h = 0; h < group; ++h) {
          __m256 qv[kVecs];
          load_query(rs[i], h, qv);
          score_tile(qv, keys + t0, kLanes, scores + (i * group + h) * kSplit + t0);
        }
      }
    }
    for (int64_t i = 0; i < nr; ++i) {
      for (int64_t h = 0; h < group; ++h) {
        softmax_partial(scores + (i * group + h) * kSplit, kSplit, partial(rs[i], split, h));
      }
    }
    for (int64_t j0 = 0; j0 < kSplit; j0 += kValueTile) {
      for (int64_t i = 0; i < nr; ++i) {
        for (int64_t h = 0; h < group; ++h) {
          weighted_values(scores + (i * group + h) * kSplit, values, j0, j0 + kValueTile, j0 == 0,
                          partial(rs[i], split, h));
        }
      }
    }
  }

  // Output of (row r, head h of its group): its splits merged in order.
  void merge(const Row& r, int64_t h) const {
    float* out = a.out + (r.token * a.num_heads + r.kv_head * group + h) * D;
    float m = kNegInf;
    for (int64_t s = 0; s < r.splits; ++s) {
      m = std::max(m, partial(r, s, h)[0]);
    }
    __m256 acc[kVecs];
    for (int c = 0; c < kVecs; ++c) acc[c] = _mm256_setzero_ps();
    float total = 0.0f;
    for (int64_t s = 0; s < r.splits; ++s) {
      const float* part = partial(r, s, h);
      const __m256 w = exp_ps(_mm256_set1_ps(part[0] - m));
      total += _mm256_cvtss_f32(w) * part[1];
      for (int c = 0; c < kVecs; ++c) {
        acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(part + 2 + kLanes * c), acc[c]);
      }
    }
    // A row with no keys at all (an empty tree-mask row) gets zeros, not 0 / 0.
    const __m256 inv = _mm256_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
    for (int c = 0; c < kVecs; ++c) _mm256_storeu_ps(out + kLanes * c, _mm256_mul_ps(acc[c], inv));
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
  // Which new keys each token sees (causal: 0 .. i; tree: its mask row), ascending.
  std::vector<int32_t> seen(num_tokens * max_q);
  // Block-sparse: per (sequence, KV head), the cached positions it reads, ascending.
  std::vector<std::vector<int32_t>> cached_pos(a.chunks == nullptr ? 0 : num_seqs * a.num_kv_heads);
  std::vector<Row> rows;  // by sequence, then KV head, then token
  rows.reserve(num_tokens * a.num_kv_heads);
  // Work items: {first row, rows, split}. rows > 0: a shared item over rows first .. first +
  // rows - 1 (one sequence and KV head) at a split of cached keys only; rows = 0: row
  // first's split alone (its last splits, where its own new keys come in).
  struct Work {
    int64_t row, num_rows, split;
  };
  std::vector<Work> work;
  int64_t total_items = 0;  // partial slots: a row's splits are first_item .. + splits - 1
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t first = a.query_start[s], num_q = a.query_start[s + 1] - first;
    const int64_t ctx = a.seq_lens[s] - num_q;
    if (a.chunks != nullptr) {
      for (int64_t g = 0; g < a.num_kv_heads; ++g) {
        const int64_t* ids = a.chunks + s * a.chunks_seq_stride + g * a.chunks_head_stride;
        std::vector<int64_t> sorted(ids, ids + a.max_chunks);
        std::sort(sorted.begin(), sorted.end());
        std::vector<int32_t>& pos = cached_pos[s * a.num_kv_heads + g];
        for (const int64_t c : sorted) {
          if (c < 0) continue;
          for (int64_t p = c * a.chunk_size; p < std::min((c + 1) * a.chunk_size, ctx); ++p) {
            pos.push_back(static_cast<int32_t>(p));
          }
        }
      }
    }
    std::vector<int64_t> count(num_q);
    for (int64_t i = 0; i < num_q; ++i) {
      const int64_t t = first + i;
      for (int64_t j = 0; j < num_q; ++j) {
        const bool sees =
            a.tree_mask == nullptr ? j <= i : a.tree_mask[t * a.tree_mask_stride + j] != 0;
        if (sees) seen[t * max_q + count[i]++] = static_cast<int32_t>(j);
      }
    }
    for (int64_t g = 0; g < a.num_kv_heads; ++g) {
      const int64_t row0 = static_cast<int64_t>(rows.size());
      for (int64_t i = 0; i < num_q; ++i) {
        const int64_t t = first + i;
        Row r{s, t, g, ctx, nullptr, seen.data() + t * max_q, count[i], ctx, 0, 0};
        if (a.chunks != nullptr) {
          const std::vector<int32_t>& pos = cached_pos[s * a.num_kv_heads + g];
          r.cached = static_cast<int64_t>(pos.size());
          r.cached_pos = pos.data();
        }
        r.first_item = total_items;
        r.splits = (r.cached + count[i] + kSplit - 1) / kSplit;
        total_items += r.splits;
        rows.push_back(r);
      }
      // Splits below full_splits hold cached keys only, the same for every row of (s, g):
      // shared items when there are rows to share them (one-row steps run item(): shared
      // items there measured 7-9% slower in a first version of them).
      const int64_t full_splits = num_q > 1 ? rows[row0].cached / kSplit : 0;
      for (int64_t sp = 0; sp < full_splits; ++sp) {
        for (int64_t i = 0; i < num_q; i += kSharedRows) {
          work.push_back({row0 + i, std::min(kSharedRows, num_q - i), sp});
        }
      }
      for (int64_t i = 0; i < num_q; ++i) {
        for (int64_t sp = full_splits; sp < rows[row0 + i].splits; ++sp) {
          work.push_back({row0 + i, 0, sp});
        }
      }
    }
  }
  std::vector<float> partials(total_items * group * Kernel<D>::kPartial);
  const Kernel<D> k{a, group, partials.data()};
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  const int64_t num_work = static_cast<int64_t>(work.size());
  // Scores of the widest item: a shared item's rows, or one row (a one-row step's 1.5 KB,
  // not the 24 KB of 16 rows, allocated per thread per call).
  const int64_t score_rows = max_q > 1 ? std::min(kSharedRows, max_q) : 1;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scores(score_rows * group * kSplit);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_work; ++i) {
      const Work& w = work[i];
      if (w.num_rows > 0) {
        k.shared_item(rows.data() + w.row, w.num_rows, w.split, scores.data());
      } else {
        k.item(rows[w.row], w.split, scores.data());
      }
    }
#pragma omp for schedule(static)
    for (int64_t o = 0; o < num_rows * group; ++o) k.merge(rows[o / group], o % group);
  }
}

}  // namespace

// Returns 0, or 1 for a head size other than 64 or 128 (the caller checks).
extern "C" int slipstream_paged_decode_attention_f32(
    const void* q, int64_t q_token_stride, int64_t q_head_stride, const void* k_cache,
    const void* v_cache, const int32_t* block_tables, int64_t block_table_stride,
    const int32_t* query_start, const int32_t* seq_lens, int64_t num_seqs,
    const uint8_t* tree_mask, int64_t tree_mask_stride, void* out, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int num_threads,
    const int64_t* chunks, int64_t chunks_seq_stride, int64_t chunks_head_stride,
    int64_t max_chunks, int64_t chunk_size) {
  const Args a{static_cast<const float*>(q),
               q_token_stride,
               q_head_stride,
               static_cast<const float*>(k_cache),
               static_cast<const float*>(v_cache),
               block_tables,
               block_table_stride,
               query_start,
               seq_lens,
               tree_mask,
               tree_mask_stride,
               static_cast<float*>(out),
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
