// Exact top-k of float32 vocabulary rows on CPU, in one pass over each row.
//
// Why: token recycling takes the top 8 of every logits row of a step (the targets, and the
// candidates its matrix stores). In PyTorch that is two passes (chunk maxima, then a top-k of
// the chosen chunks; slipstream/engine/vocab_topk.py) plus a handful of small ops: ~100 us
// for 9 rows of 49152 logits on 2 cores and ~0.44 ms a step in the engine, against a decode
// step of ~13 ms. One row here is one streaming read: 8 logits are compared at once with the
// current k-th best, and only the few that beat it (~k ln(V / k), ~70 of 49152 for random
// order) take a scalar insertion into a sorted list of k. Measured, [R, 49152] random
// logits, k 8, 2 cores: 1 row 14 us, 9 rows 37, 25 rows 78 (vocab_topk.py's two passes:
// 66, 146, 328).
//
// Semantics: out_vals[r] = the k largest values of row r, largest first; out_idx[r] their
// positions. Among equal values the lower position comes first, and a value equal to the
// k-th best does not displace it: the result is torch.topk's values, with its indices in
// the order "lowest index among equals", so out_idx[r][0] is argmax's answer. NaN has no
// place in that order (torch ranks it largest): a row holding one makes the call return 1
// and the caller takes torch.topk. Needs k <= vocab.
//
// Rows spread over threads (one row each at a time); a row's answer never depends on the
// thread count.
#include <immintrin.h>
#include <omp.h>

#include <cstdint>

namespace {

// Insert (v, i) into the sorted lists vals/idx of n entries (largest first, the earlier
// position first among equals), keeping at most k; returns the new count.
inline int64_t insert(float* vals, int64_t* idx, int64_t n, int64_t k, float v, int64_t i) {
  int64_t pos = n < k ? n : k - 1;  // the slot freed at the end
  while (pos > 0 && vals[pos - 1] < v) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = v;
  idx[pos] = i;
  return n < k ? n + 1 : k;
}

// One row; false when it holds a NaN.
bool row_topk(const float* x, int64_t vocab, int64_t k, float* vals, int64_t* idx) {
  int64_t n = 0;
  int64_t i = 0;
  // The first k values enter unconditionally (so rows of -inf still fill the list).
  for (; i < k; ++i) {
    if (x[i] != x[i]) return false;
    n = insert(vals, idx, n, k, x[i], i);
  }
  float threshold = vals[k - 1];
  __m256 thr = _mm256_set1_ps(threshold);
  // 32 logits a test: lanes above the k-th best or unordered (NaN), or-ed over 4 vectors;
  // only a block with such a lane is looked at value by value.
  for (; i + 32 <= vocab; i += 32) {
    __m256 hit = _mm256_cmp_ps(_mm256_loadu_ps(x + i), thr, _CMP_NLE_UQ);
    hit = _mm256_or_ps(hit, _mm256_cmp_ps(_mm256_loadu_ps(x + i + 8), thr, _CMP_NLE_UQ));
    hit = _mm256_or_ps(hit, _mm256_cmp_ps(_mm256_loadu_ps(x + i + 16), thr, _CMP_NLE_UQ));
    hit = _mm256_or_ps(hit, _mm256_cmp_ps(_mm256_loadu_ps(x + i + 24), thr, _CMP_NLE_UQ));
    if (!_mm256_movemask_ps(hit)) continue;
    for (int64_t j = i; j < i + 32; ++j) {
      const float value = x[j];
      if (value != value) return false;
      if (value > threshold) {  // the threshold rises as values enter
        n = insert(vals, idx, n, k, value, j);
        threshold = vals[k - 1];
      }
    }
    thr = _mm256_set1_ps(threshold);
  }
  for (; i < vocab; ++i) {
    if (x[i] != x[i]) return false;
    if (x[i] > threshold) {
      n = insert(vals, idx, n, k, x[i], i);
      threshold = vals[k - 1];
    }
  }
  return true;
}

}  // namespace

// values [rows, vocab] float32 (row stride `row_stride`, unit stride within a row);
// out_vals [rows, k] float32 and out_idx [rows, k] int64, contiguous. Returns 0, 1 when a row
// holds a NaN (the outputs are then incomplete), 2 for a k outside [1, vocab].
extern "C" int slipstream_vocab_topk(const float* values, int64_t rows, int64_t vocab,
                                     int64_t row_stride, int64_t k, float* out_vals,
                                     int64_t* out_idx, int num_threads) {
  if (k < 1 || k > vocab) return 2;
  int nan_rows = 0;
  const int threads = rows > 1 ? (num_threads < rows ? num_threads : static_cast<int>(rows)) : 1;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : nan_rows)
  for (int64_t r = 0; r < rows; ++r) {
    if (!row_topk(values + r * row_stride, vocab, k, out_vals + r * k, out_idx + r * k)) {
      ++nan_rows;
    }
  }
  return nan_rows ? 1 : 0;
}
