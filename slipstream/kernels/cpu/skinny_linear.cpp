// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) in bf16 for few rows M, on AVX512-BF16 CPUs.
//
// Why: a decode step feeds 1 row per sequence, a speculative step 2-17. oneDNN's packed
// GEMM is flat from 1 to ~9 rows but slow at 1; ATen's GEMV is quicker at 1 row but grows
// ~100 us per added row. This kernel streams each weight once for all rows, so a step's
// cost stays at the weight read until the FMAs catch up. The 120 projections of a step of
// the default model (weights streamed from DRAM, 2 cores; benchmarks/cpu_kernels_cpp.py),
// ms at 1 / 9 / 32 / 256 rows: this kernel 7.3 / 9.6 / 21.5 / 139, packed oneDNN 15.1 /
// 14.4 / 31.3 / 159 (a noisy VM: a second run was 5-40% slower for both).
//
// Weight layout (pack_skinny_weight in skinny_linear.py): [N/16, K/2, 16, 2] bf16, i.e.
// block b, pair p holds w[16b + i, 2p + j] at (i, j): one 64-byte load gives 16 outputs x
// 2 inputs, which VDPBF16PS multiplies by a broadcast x pair and adds into 16 fp32 lanes.
// Each output accumulates its K/2 pair products in the same order whatever M is, so a
// row's result does not depend on which other rows share the call (batch invariance).
//
// Tiling: a tile is R rows x NB 16-wide blocks, R x NB <= 24 accumulators of the 32 zmm
// registers (R <= 6 takes NB = 4; 8 rows NB = 3; 12 rows NB = 2). Per k-pair it loads NB
// weight vectors and broadcasts R x pairs for R * NB FMAs. Threads split the N blocks
// evenly; each walks its blocks a group (NB) at a time and, per group, every row chunk, so
// a group's weights (K * 32 bytes a block, 74 KB for 4 blocks at K = 576) come from DRAM
// once and from L2 for the further chunks, while the last chunk prefetches the next group.
// Up to 12 rows (a speculative step) run as one chunk: the weights stream once, at about
// the one-row cost. Measured (benchmarks/skinny_linear_ab.py, 120 projections, 2 cores)
// against chunks of at most 6 rows: 8 rows 7.95 -> 6.59 ms, 9 rows 8.37 -> 7.48, 16 rows
// 10.96 -> 9.97; 1 row 5.96 either way. Above 24 rows (prefill) chunks of 6 with NB = 4
// stay, 1-10% quicker there than 12 x 2.

#include <immintrin.h>
#include <omp.h>

#include <cstdint>

#include "avx512_bf16.h"

namespace {

using slipstream_cpu::load_bf16x16;
using slipstream_cpu::store_bf16x16;

constexpr int kBlock = 16;         // fp32 lanes in a zmm accumulator: outputs per block
constexpr int kMaxGroup = 4;       // blocks per tile
constexpr int kMaxTileRows = 12;   // rows per tile for up to 24 rows
constexpr int kPrefillTileRows = 6;  // rows per tile above 24 rows
constexpr int kAccumulators = 24;  // R x NB of 32 zmm registers: the rest hold w and x

struct Problem {
  const uint32_t* x;     // [M, K/2] bf16 pairs
  const uint32_t* w;     // [N/16, K/2, 16] bf16 pairs
  const uint16_t* bias;  // [N] bf16 or null
  void* y;               // [M, N] bf16 or fp32
  int64_t kp;            // K/2
  int64_t n;             // N (row stride of y)
};

// next: the weights of the thread's next group, prefetched into L2 while this tile runs, or
// null (none left, or a row chunk that is not the last: one prefetch per weight line).
template <int R, int NB, bool F32>
void tile(const Problem& pr, int64_t row0, int64_t block0, const uint32_t* next) {
  __m512 acc[R][NB];
  for (int j = 0; j < NB; ++j) {
    const __m512 init =
        pr.bias ? load_bf16x16(pr.bias + (block0 + j) * kBlock) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) acc[r][j] = init;
  }
  const int64_t kp = pr.kp;
  const uint32_t* wj[NB];
  for (int j = 0; j < NB; ++j) wj[j] = pr.w + (block0 + j) * kp * kBlock;
  const uint32_t* x = pr.x + row0 * kp;
  for (int64_t p = 0; p < kp; ++p) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wj[j] + p * kBlock);
    if (next != nullptr) {
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(next + (j * kp + p) * kBlock), _MM_HINT_T1);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * kp + p]));
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xb, wv[j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NB; ++j) {
      const int64_t offset = (row0 + r) * pr.n + (block0 + j) * kBlock;
      if constexpr (F32) {
        _mm512_storeu_ps(static_cast<float*>(pr.y) + offset, acc[r][j]);
      } else {
        store_bf16x16(static_cast<uint16_t*>(pr.y) + offset, acc[r][j]);
      }
    }
  }
}

using TileFn = void (*)(const Problem&, int64_t, int64_t, const uint32_t*);

// The widest group R rows can take (R x NB accumulators), capped at kMaxGroup.
constexpr int group_for(int rows) {
  return kAccumulators / rows < kMaxGroup ? kAccumulators / rows : kMaxGroup;
}

// Tile of R rows for a group of nb blocks (nb <= group_for(R): wider ones are never made).
template <bool F32, int R>
TileFn tile_for(int nb) {
  constexpr int kWidest = group_for(R);
  if constexpr (kWidest >= 4) {
    if (nb >= 4) return tile<R, 4, F32>;
  }
  if constexpr (kWidest >= 3) {
    if (nb >= 3) return tile<R, 3, F32>;
  }
  if constexpr (kWidest >= 2) {
    if (nb >= 2) return tile<R, 2, F32>;
  }
  return tile<R, 1, F32>;
}

template <bool F32>
TileFn pick_tile(int rows, int nb) {
  switch (rows) {
    case 1: return tile_for<F32, 1>(nb);
    case 2: return tile_for<F32, 2>(nb);
    case 3: return tile_for<F32, 3>(nb);
    case 4: return tile_for<F32, 4>(nb);
    case 5: return tile_for<F32, 5>(nb);
    case 6: return tile_for<F32, 6>(nb);
    case 7: return tile_for<F32, 7>(nb);
    case 8: return tile_for<F32, 8>(nb);
    case 9: return tile_for<F32, 9>(nb);
    case 10: return tile_for<F32, 10>(nb);
    case 11: return tile_for<F32, 11>(nb);
    default: return tile_for<F32, 12>(nb);
  }
}

template <bool F32>
void run(const Problem& pr, int64_t m, int num_threads) {
  const int64_t num_blocks = pr.n / kBlock;
  // Row chunks of near-equal size (17 rows -> 9 + 8, not 12 + 5): the smallest chunk sets
  // how many FMAs each weight load feeds. The widest chunk sets the group (how many blocks
  // a tile covers): 12 rows take 2 blocks at a time, 6 rows 4.
  const int64_t chunk_rows = m <= 24 ? kMaxTileRows : kPrefillTileRows;
  const int64_t num_chunks = (m + chunk_rows - 1) / chunk_rows;
  const int group = group_for(static_cast<int>((m + num_chunks - 1) / num_chunks));
  if (num_threads > num_blocks) num_threads = static_cast<int>(num_blocks);
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t first = num_blocks * t / nt, last = num_blocks * (t + 1) / nt;
    for (int64_t b = first; b < last; b += group) {
      const int nb = static_cast<int>(last - b < group ? last - b : group);
      // The last row chunk streams the next group's weights in while it computes: without
      // this, a chunk that reads from L2 leaves DRAM idle (9 rows, 120 projections: 12.0
      // -> 10.2 ms).
      const uint32_t* next = b + group < last ? pr.w + (b + group) * pr.kp * kBlock : nullptr;
      int64_t row0 = 0;
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t rows = (m - row0) / (num_chunks - c);
        pick_tile<F32>(static_cast<int>(rows), nb)(pr, row0, b, c == num_chunks - 1 ? next : nullptr);
        row0 += rows;
      }
    }
  }
}

}  // namespace

// Returns 0, or 1 when K is odd or N is not a multiple of 16 (the caller checks these).
extern "C" int slipstream_skinny_linear(const void* x, int64_t m, int64_t k, const void* w,
                                        int64_t n, const void* bias, void* y, int out_f32,
                                        int num_threads) {
  if (k % 2 != 0 || n % kBlock != 0 || m < 0) return 1;
  if (m == 0 || n == 0) return 0;
  const Problem pr{static_cast<const uint32_t*>(x), static_cast<const uint32_t*>(w),
                   static_cast<const uint16_t*>(bias), y, k / 2, n};
  if (out_f32) {
    run<true>(pr, m, num_threads);
  } else {
    run<false>(pr, m, num_threads);
  }
  return 0;
}
