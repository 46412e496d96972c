// decoder_layer.cpp's two calls for float32 models on AVX2 + FMA CPUs: a Llama layer's
// work outside attention for steps of up to 32 rows (decode, tree verification).
//
// Why: on a 2-core Zen 3 the one-token step of the default model spends ~17 ms streaming
// the weights (skinny_linear_f32.cpp), and the Python, ctypes and allocation of the layers'
// 240 small calls (8 a layer) cost ~4 ms more: these two calls took batch-1 decoding from
// 38.7 to 45.3 tok/s (benchmarks/fused_layer_ab.py --dtype float32). Each runs the same
// kernels in the same order through their C entry points (skinny_linear_f32.cpp,
// layer_ops_f32.cpp, linked into this library), so the bits equal the op-by-op path's.
//
//   before attention:  h += delta; x = rms_norm(h); qkv = x W_qkv^T (+ b); rot = rope(q|k)
//   after attention:   h += attn W_o^T (+ b); x = rms_norm(h); gu = x W_gu^T (+ b);
//                      act = silu(gate) * up; delta = act W_down^T (+ b)
//
// Every tensor is float32 with contiguous rows; the weights are all float32 [N, K] in place
// (grouped = 0) or all skinny_linear_f32's grouped bf16 copies (grouped = 1). The caller
// owns the buffers (one set a step, shared by the layers).
#include <cstdint>

extern "C" int slipstream_skinny_linear_f32(const float* x, int64_t m, int64_t k,
                                            const float* w, int64_t n, const float* bias,
                                            float* y, int num_threads);
extern "C" int slipstream_skinny_linear_f32_bf16g(const float* x, int64_t m, int64_t k,
                                                  const uint16_t* w, int64_t n,
                                                  const float* bias, float* y,
                                                  int num_threads);
extern "C" int slipstream_add_rms_norm_f32(float* h, const float* delta, const float* weight,
                                           float* out, int64_t rows, int64_t hidden, float eps,
                                           int num_threads);
extern "C" int slipstream_rope_f32(const float* qkv, int64_t qkv_stride, int64_t num_tokens,
                                   int64_t heads, int64_t head_dim, const float* cos,
                                   const float* sin, int64_t cs_stride, float* out);
extern "C" int slipstream_silu_mul_f32(const float* gate_up, int64_t num_tokens, int64_t inter,
                                       float* out, int num_threads);

namespace {

int linear(const float* x, int64_t m, int64_t k, const void* w, int grouped, int64_t n,
           const float* bias, float* y, int num_threads) {
  if (grouped) {
    return slipstream_skinny_linear_f32_bf16g(x, m, k, static_cast<const uint16_t*>(w), n, bias,
                                              y, num_threads);
  }
  return slipstream_skinny_linear_f32(x, m, k, static_cast<const float*>(w), n, bias, y,
                                      num_threads);
}

}  // namespace

// Returns 0, or the failing op's number (1 norm, 2 qkv, 3 rope) when a shape is refused.
extern "C" int slipstream_layer_before_attention_f32(
    float* h,              // [rows, hidden] residual stream, updated in place
    const float* delta,    // [rows, hidden] the previous layer's MLP output, or null
    const float* norm_w,   // [hidden]
    float eps, int64_t rows, int64_t hidden,
    float* x,              // [rows, hidden] scratch: the normed rows
    const void* qkv_w,     // [qkv_n, hidden] float32, or its grouped bf16 copy
    const float* qkv_bias,  // [qkv_n] or null
    int64_t qkv_n,
    float* qkv,            // [rows, qkv_n] out: q | k | v
    int64_t rot_heads, int64_t head_dim,
    const float* cos, const float* sin, int64_t cs_stride,  // [rows, head_dim] rows
    float* rot,            // [rows, rot_heads, head_dim] out: rotated q | k
    int grouped, int num_threads) {
  if (slipstream_add_rms_norm_f32(h, delta, norm_w, x, rows, hidden, eps, num_threads)) {
    return 1;
  }
  if (linear(x, rows, hidden, qkv_w, grouped, qkv_n, qkv_bias, qkv, num_threads)) return 2;
  if (slipstream_rope_f32(qkv, qkv_n, rows, rot_heads, head_dim, cos, sin, cs_stride, rot)) {
    return 3;
  }
  return 0;
}

// Returns 0, or the failing op's number (1 o_proj, 2 norm, 3 gate|up, 4 silu, 5 down).
extern "C" int slipstream_layer_after_attention_f32(
    float* h,               // [rows, hidden] residual stream, updated in place
    const float* attn,      // [rows, q_size] attention output
    int64_t q_size, int64_t rows, int64_t hidden,
    const void* o_w, const float* o_bias,  // [hidden, q_size] (or grouped), [hidden]
    float* attn_proj,       // [rows, hidden] scratch
    const float* norm_w, float eps,
    float* x,               // [rows, hidden] scratch
    const void* gate_up_w, const float* gate_up_bias, int64_t inter,  // [2 inter] outputs
    float* gate_up,         // [rows, 2 inter] scratch
    float* act,             // [rows, inter] scratch
    const void* down_w, const float* down_bias,
    float* delta,           // [rows, hidden] out: the MLP output, not yet added to h
    int grouped, int num_threads) {
  if (linear(attn, rows, q_size, o_w, grouped, hidden, o_bias, attn_proj, num_threads)) {
    return 1;
  }
  if (slipstream_add_rms_norm_f32(h, attn_proj, norm_w, x, rows, hidden, eps, num_threads)) {
    return 2;
  }
  if (linear(x, rows, hidden, gate_up_w, grouped, 2 * inter, gate_up_bias, gate_up,
             num_threads)) {
    return 3;
  }
  if (slipstream_silu_mul_f32(gate_up, rows, inter, act, num_threads)) return 4;
  if (linear(act, rows, inter, down_w, grouped, hidden, down_bias, delta, num_threads)) return 5;
  return 0;
}
