// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) in float32 for few rows M, on AVX2 + FMA CPUs.
//
// Why: float32 is the engine's dtype on CPUs without native bf16 (AVX2-only: AMD Zen 1-3,
// Intel before Cooper Lake). There, PyTorch's CPU build runs these products through MKL,
// which on an AMD EPYC (Zen 3, 2 cores) read the default model's LM head at 8 GB/s in a
// GEMV (13.7 ms for [49152, 576]) where a plain sum over the same memory reads 20 GB/s, and
// whose small-M GEMM costs about the same per added row as a second GEMV (576 x 3072: 244
// us at 1 row, 506 at 2, 839 at 9). Decoding reads every weight once per step, so the step
// is this product's memory time; this kernel streams each weight once for all rows.
//
// Layout: the weight's own [N, K] rows, unpacked, so there is no second copy of the model
// (float32 weights are 4 bytes a parameter), or the bf16 copy below. Each output n keeps 8
// float32 lanes, lane l
// summing x[k] * w[n, k] over k = l mod 8 in increasing k, one FMA at a time; a fixed tree
// then adds the lanes, then the bias. That order is the same whatever M and whatever
// tile an output falls in, so a row's result does not depend on the rows sharing the call
// (batch invariance: a speculative step verifies with the bits one-row decoding computes).
//
// Tiling: a tile is R rows x NB outputs, R x NB accumulators plus NB weight vectors and one
// x vector within the 16 ymm registers: 1 x 6, 2 x 4, 3 x 3, 4 x 3, 5-6 x 2, up to 12 x 1.
// Threads split N in blocks of 6 outputs; for each block, the rows go in chunks, each chunk
// in tiles as wide as its rows allow, so the block's weights come from DRAM once (the first
// chunk) and from L1 after.
//
// Chunk size: the grouped bf16 copy's chunks are 4 rows, the rest last (9 rows: 4 + 4 + 1).
// 4 x 3 is the widest tile the registers hold and the one with the fewest loads per FMA (7
// for 12); 5 x 2 and 6 x 2 need 7-8 for 10-12, and GCC folded their x loads into the FMAs
// (12 loads for 12 FMAs; x now stays in a register). With one tile width for all chunks and
// chunks of up to 6 (before), 9 rows ran as 5 + 4 in 5 x 2 tiles. A step's products (model
// shapes, 2 threads, benchmarks/skinny_f32_ab.py, 15 rounds) went from 38.3 to 36.3 ms at 9
// rows, 50.6 to 45.9 at 13 and 87.0 to 77.0 at 25; 1-8 rows within noise (0.95-1.03x).
// Chunks of equal size (3 + 3 + 3) measured within 5% of full chunks at 5-25 rows. float32
// weights stream twice the bytes, so their steps are DRAM-bound to ~10 rows and run in one
// pass (Float32Weights says why). Chunks hold as many of x's rows as fit in L1 (24 KB: 10
// at K = 576, 4 at K = 1536).
//
// Prefetch: the first chunk asks for the weights 16 KB ahead of its reads (the hardware
// prefetcher alone left DRAM idle while the FMAs ran). Spreading the asks over all chunks
// (chunk c of C asking for k-blocks c, c + C, ...) measured within noise of this (+-6%).
//
// bf16 weights (slipstream_skinny_linear_f32_bf16g): the same products over a bf16 copy of a
// weight whose values bf16 holds exactly (a checkpoint stored in bf16, as the default model
// is, and upcast to float32). Each 8 bf16 become 8 float32 by a zero-extend and a 16-bit
// shift, which is exact, so every FMA sees the same operands in the same order: the output
// has the float32 kernel's bits while half the bytes stream from DRAM, and a one-row step is
// that stream's time. The copy is laid out in groups of 6 outputs, [ceil(N / 6), ceil(K /
// 8), 6, 8] (zero-padded), so that a thread's share is one contiguous stream: at K = 576 a
// bf16 row is 1152 bytes, and with each row its own stream the hardware prefetcher, which
// restarts at every row, read 11-12 GB/s where streams of 9 KB read 15-17 (Zen 3; measured
// on a row-major bf16 copy while developing this; benchmarks/skinny_f32_layouts.py shows the
// same effect on float32 rows, and times the two layouts).

#include <immintrin.h>
#include <omp.h>

#include <cstdint>

#include "avx2_fma.h"

namespace {

using slipstream_cpu::first_lanes;
using slipstream_cpu::sum_lanes;

constexpr int kLanes = 8;         // float32 lanes in a ymm register
constexpr int kMaxTileRows = 12;  // 12 accumulators + 1 weight vector at NB = 1
constexpr int64_t kBlock = 6;     // outputs a thread takes at a time: 1 x 6, 2 x (4 + 2), 3 x 3
constexpr int64_t kRowBytesInL1 = 24 * 1024;  // x's rows of a chunk, of a 32 KB L1

constexpr int64_t kPrefetchBytes = 16 * 1024;  // how far ahead of the weight reads
constexpr int64_t kLineBytes = 64;

// A weight layout: its element type, where output n's k-blocks of 8 lie, and how 8 elements
// become 8 float32 lanes.
//
// float32 [N, K] in place: output n's lanes k .. k + 7 at n * K + k.
struct Float32Weights {
  using T = float;
  static constexpr bool kGrouped = false;  // each output row its own stream
  static constexpr int64_t kBlockMul = 1;  // a k-block of 8 advances 8 elements
  // Twice the bytes of bf16, so a step of up to 10 rows (at K = 576) is DRAM-bound: one pass
  // in tall tiles (9 x 1 at 9 rows) streams the weights with the FMAs interleaved. Chunks of
  // 4 rows read them from L1 while DRAM idled: a step's products at 5 and 9 rows measured
  // 7-20% slower with them (model shapes, 2 threads, while this was developed).
  static constexpr int64_t kMaxChunkRows = kMaxTileRows;
  // One row: the hardware prefetcher keeps up with the 6 weight rows a tile streams.
  static constexpr bool kPrefetchOneRow = false;
  static const T* output(const T* w, int64_t k, int64_t n) { return w + n * k; }
  static int64_t output_stride(int64_t k) { return k; }
  static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 load_first(const float* p, int64_t n) {  // lanes past n read as zero
    return _mm256_maskload_ps(p, first_lanes(n));
  }
};

// bf16 bits in groups of 6 outputs: output n's lanes k .. k + 7 (k a multiple of 8) at
// (n / 6) * 6 * Kp + 6 * k + 8 * (n % 6), Kp = K rounded up to 8, padding zero.
struct GroupedBf16Weights {
  using T = uint16_t;  // bf16 bits: the high half of a float32
  static constexpr bool kGrouped = true;  // a group of kBlock outputs is one stream
  static constexpr int64_t kBlockMul = kBlock;  // a k-block of 8 advances 6 * 8 elements
  static constexpr int64_t kMaxChunkRows = 4;  // the 4 x 3 tile's rows (see the top)
  // One row too: the hardware prefetcher alone left DRAM idle (measured on the row-major
  // copy: 26.2 -> 22.4 ms for a step's products and LM head).
  static constexpr bool kPrefetchOneRow = true;
  static const T* output(const T* w, int64_t k, int64_t n) {
    const int64_t padded_k = (k + kLanes - 1) / kLanes * kLanes;
    return w + n / kBlock * kBlock * padded_k + n % kBlock * kLanes;
  }
  static int64_t output_stride(int64_t) { return kLanes; }  // within a group
  static __m256 load(const uint16_t* p) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  static __m256 load_first(const uint16_t* p, int64_t) { return load(p); }  // zero-padded
};

template <class W>
struct Problem {
  using T = typename W::T;
  const float* x;     // [M, K]
  const T* w;         // the weight [N, K] in W's layout
  const float* bias;  // [N] or null
  float* y;           // [M, N]
  int64_t k;          // K (row stride of x)
  int64_t n;          // N (row stride of y)
};

// Outputs col0 .. col0 + NB - 1 for rows row0 .. row0 + R - 1 (within one block).
// kPrefetch: whether this tile asks for the weights ahead (a compile-time choice: a run-time
// flag in the loop cost the one-row tile ~10%).
template <class W, int R, int NB, bool kPrefetch>
void tile(const Problem<W>& pr, int64_t row0, int64_t col0) {
  using T = typename W::T;
  constexpr int64_t kLineElems = kLineBytes / sizeof(T);
  constexpr int64_t kAhead = kPrefetchBytes / sizeof(T);
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  }
  const int64_t k = pr.k, full = k - k % kLanes;
  const T* w = W::output(pr.w, k, col0);
  const int64_t stride = W::output_stride(k);  // between outputs j and j + 1
  const float* x = pr.x + row0 * k;
  for (int64_t c = 0; c < full; c += kLanes) {
    const T* wc = w + c * W::kBlockMul;  // this k-block of output col0
    if (kPrefetch && W::kGrouped) {  // the group's one stream: 6 x 16 bytes a k-block
      _mm_prefetch(reinterpret_cast<const char*>(wc + kAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wc + kAhead + kLineElems), _MM_HINT_T0);
    } else if (kPrefetch && c % kLineElems == 0) {  // a line per weight row as it starts
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(wc + j * stride + kAhead), _MM_HINT_T0);
      }
    }
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = W::load(wc + j * stride);
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * k + c);
      // Keep x in a register: GCC otherwise folds the load into each of the NB FMAs.
      if constexpr (NB > 1) asm("" : "+x"(xv));
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  if (full < k) {
    const __m256i mask = first_lanes(k - full);  // lanes past K read as zero: FMAs add +0
    const T* wc = w + full * W::kBlockMul;
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = W::load_first(wc + j * stride, k - full);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_maskload_ps(x + r * k + full, mask);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NB; ++j) {
      const float sum = sum_lanes(acc[r][j]);
      pr.y[(row0 + r) * pr.n + col0 + j] = pr.bias ? sum + pr.bias[col0 + j] : sum;
    }
  }
}

template <class W>
using TileFn = void (*)(const Problem<W>&, int64_t, int64_t);

// Outputs per tile for R rows: R x NB accumulators + NB weights + x <= 16 registers.
constexpr int width_for(int rows) {
  return rows == 1 ? 6 : rows == 2 ? 4 : rows <= 4 ? 3 : rows <= 6 ? 2 : 1;
}

template <class W, int R, bool kPrefetch>
TileFn<W> tile_for(int nb) {
  constexpr int kWidest = width_for(R);
  // Every width from 1 to kWidest: a block's tail (nb < kWidest) is covered by one tile.
  if constexpr (kWidest >= 6) {
    if (nb >= 6) return tile<W, R, 6, kPrefetch>;
  }
  if constexpr (kWidest >= 5) {
    if (nb >= 5) return tile<W, R, 5, kPrefetch>;
  }
  if constexpr (kWidest >= 4) {
    if (nb >= 4) return tile<W, R, 4, kPrefetch>;
  }
  if (nb >= 3) return tile<W, R, 3, kPrefetch>;
  if (nb >= 2) return tile<W, R, 2, kPrefetch>;
  return tile<W, R, 1, kPrefetch>;
}

template <class W, int R = 1>
TileFn<W> pick_tile(int rows, int nb, bool prefetch) {
  if constexpr (R < kMaxTileRows) {
    if (rows > R) return pick_tile<W, R + 1>(rows, nb, prefetch);
  }
  return prefetch ? tile_for<W, R, true>(nb) : tile_for<W, R, false>(nb);
}

template <class W>
void run(const Problem<W>& pr, int64_t m, int num_threads) {
  // Row chunks, each tiled as its rows allow: grouped, full chunks then the rest (9 rows: 4 +
  // 4 + 1); float32, chunks of near-equal size (17 rows at K = 576: 8 + 9).
  const int64_t fit = kRowBytesInL1 / (pr.k * static_cast<int64_t>(sizeof(float)));
  const int64_t most = W::kMaxChunkRows;
  const int64_t chunk_rows = fit < 4 ? 4 : fit > most ? most : fit;
  const int64_t num_chunks = (m + chunk_rows - 1) / chunk_rows;
  const int64_t num_blocks = (pr.n + kBlock - 1) / kBlock;
  if (num_threads > num_blocks) num_threads = static_cast<int>(num_blocks);
  if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t first = num_blocks * t / nt * kBlock;
    const int64_t end = num_blocks * (t + 1) / nt * kBlock;
    const int64_t last = end < pr.n ? end : pr.n;
    for (int64_t block = first; block < last; block += kBlock) {
      const int64_t stop = block + kBlock < last ? block + kBlock : last;
      int64_t row0 = 0;
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t left = m - row0;
        const int64_t rows = W::kGrouped ? (left < chunk_rows ? left : chunk_rows)
                                         : left / (num_chunks - c);
        const int width = width_for(static_cast<int>(rows));
        for (int64_t col = block; col < stop;) {
          const int nb = static_cast<int>(stop - col < width ? stop - col : width);
          // The first chunk streams the block (and asks ahead); the rest read L1/L2.
          // Grouped, its first tile asks for the group's one stream; float32, each tile for
          // its rows.
          const bool prefetch =
              c == 0 && (m > 1 || W::kPrefetchOneRow) && (!W::kGrouped || col == block);
          pick_tile<W>(static_cast<int>(rows), nb, prefetch)(pr, row0, col);
          col += nb;
        }
        row0 += rows;
      }
    }
  }
}

}  // namespace

// Returns 0, or 1 for a negative size. x, w and y are contiguous float32.
extern "C" int slipstream_skinny_linear_f32(const float* x, int64_t m, int64_t k,
                                            const float* w, int64_t n, const float* bias,
                                            float* y, int num_threads) {
  if (m < 0 || k < 0 || n < 0) return 1;
  if (m == 0 || n == 0) return 0;
  run(Problem<Float32Weights>{x, w, bias, y, k, n}, m, num_threads);
  return 0;
}

// The same with w as bf16 bits in GroupedBf16Weights' layout: the float32 function's output,
// bit for bit, when w holds the bf16 roundings of that function's weights.
extern "C" int slipstream_skinny_linear_f32_bf16g(const float* x, int64_t m, int64_t k,
                                                  const uint16_t* w, int64_t n,
                                                  const float* bias, float* y,
                                                  int num_threads) {
  if (m < 0 || k < 0 || n < 0) return 1;
  if (m == 0 || n == 0) return 0;
  run(Problem<GroupedBf16Weights>{x, w, bias, y, k, n}, m, num_threads);
  return 0;
}
