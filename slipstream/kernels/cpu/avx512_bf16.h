// Small AVX512 helpers shared by the CPU kernels (bf16 storage, float32 arithmetic).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace slipstream_cpu {

// 16 bf16 -> 16 float32 (a bf16 is the high half of a float32).
inline __m512 load_bf16x16(const uint16_t* src) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// 16 float32 -> 16 bf16, rounded to nearest even as torch rounds.
inline void store_bf16x16(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

}  // namespace slipstream_cpu
