// Block top-k's page mean keys (Kinetics' "compressed key" cache) on CPU: for each listed
// page and KV head, the mean of its filled key slots, in float32. Plain C++ (GCC vectorizes
// the head_dim loops), built for AVX2 + FMA so that every CPU the other kernels run on takes
// it (AVX512 CPUs have AVX2 too).
//
// Why: PyTorch's version (kernels/page_summaries.py's page_mean_keys_ref: a gather, a masked
// product, a sum, a division and a scatter) took ~2.1 ms a layer for the ~500 pages of an 8k
// context (2 Zen 3 cores), 61 ms in a request's first sparse decode step, which summarises
// every prompt page; and ~20 us a layer for the one page a later step writes.
//
// Same bits as the reference: each lane sums the filled slots in slot order in float32
// (torch's sum over the slot dim of [P, slots, H, D] adds slot after slot when H x D is a
// multiple of 32, the only case the wrapper sends here; empty slots add +0 there, which
// leaves a sum unchanged), then one float32 division by the count.
#include <omp.h>

#include <cstdint>
#include <cstring>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t bits) {  // bf16: the high half of a float32
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

constexpr int64_t kMaxHeadDim = 512;

template <class T>
int run(const T* k_cache, int64_t num_blocks, int64_t block_size, int64_t heads,
        int64_t head_dim, float* means, int64_t mean_block_stride, int64_t mean_head_stride,
        const int64_t* pages, const int64_t* counts, int64_t num_pages, int num_threads) {
  if (head_dim > kMaxHeadDim) return 2;
  for (int64_t i = 0; i < num_pages; ++i) {
    if (pages[i] < 0 || pages[i] >= num_blocks || counts[i] < 1 || counts[i] > block_size) {
      return 1;
    }
  }
  // One page per decode step is the common call: threads only pay off for a prompt's pages.
#pragma omp parallel for num_threads(num_threads) if (num_pages * heads >= 64)
  for (int64_t item = 0; item < num_pages * heads; ++item) {
    const int64_t i = item / heads, h = item % heads;
    const int64_t page = pages[i], count = counts[i];
    float sum[kMaxHeadDim];
    for (int64_t d = 0; d < head_dim; ++d) sum[d] = 0.0f;
    for (int64_t s = 0; s < count; ++s) {
      const T* key = k_cache + ((page * block_size + s) * heads + h) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) sum[d] += to_float(key[d]);
    }
    const float n = static_cast<float>(count);
    float* out = means + page * mean_block_stride + h * mean_head_stride;
    for (int64_t d = 0; d < head_dim; ++d) out[d] = sum[d] / n;
  }
  return 0;
}

}  // namespace

// means[pages[i], h, :] = mean of k_cache[pages[i], :counts[i], h, :] for every listed page
// and KV head h. k_cache: contiguous [num_blocks, block_size, heads, head_dim], float32 (_f32)
// or bf16 bits (_bf16); means: float32 with unit last stride and the given block / head
// strides. Returns 0, 1 for a page or count out of range (nothing written), 2 for a head
// size over 512.
extern "C" int slipstream_page_mean_keys_f32(const float* k_cache, int64_t num_blocks,
                                             int64_t block_size, int64_t heads,
                                             int64_t head_dim, float* means,
                                             int64_t mean_block_stride, int64_t mean_head_stride,
                                             const int64_t* pages, const int64_t* counts,
                                             int64_t num_pages, int num_threads) {
  return run(k_cache, num_blocks, block_size, heads, head_dim, means, mean_block_stride,
             mean_head_stride, pages, counts, num_pages, num_threads);
}

extern "C" int slipstream_page_mean_keys_bf16(const uint16_t* k_cache, int64_t num_blocks,
                                              int64_t block_size, int64_t heads,
                                              int64_t head_dim, float* means,
                                              int64_t mean_block_stride,
                                              int64_t mean_head_stride, const int64_t* pages,
                                              const int64_t* counts, int64_t num_pages,
                                              int num_threads) {
  return run(k_cache, num_blocks, block_size, heads, head_dim, means, mean_block_stride,
             mean_head_stride, pages, counts, num_pages, num_threads);
}
