// A Llama decoder layer's work outside attention as two C++ calls, for steps that feed
// few rows (decode, tree verification) on AVX512-BF16 CPUs.
//
// Why: at batch 1 the layer's eight small ops (two norms, four projections, RoPE,
// SiLU * up) each cost a Python call, a ctypes call and an output allocation, ~5-8 us
// apiece besides their arithmetic: ~1.5-2 ms of a ~11 ms step for the default model's 30
// layers, a fixed cost that a sparse attention step (which removes most of attention's
// ~15 ms at 8k) cannot remove. Here each half runs the same kernels in the same order
// through their C entry points (skinny_linear.cpp, rms_norm.cpp, layer_ops.cpp, linked
// into this library), so the results are bit-identical to the op-by-op path; only the
// calls between them are gone.
//
//   before attention:  h += delta; x = rms_norm(h); qkv = x W_qkv^T (+ b); rot = rope(q|k)
//   after attention:   h += attn W_o^T (+ b); x = rms_norm(h); gu = x W_gu^T (+ b);
//                      act = silu(gate) * up; delta = act W_down^T (+ b)
//
// The caller owns every buffer (one set per step, reused by all layers) and guarantees
// the layouts the single ops need: contiguous rows, bf16 except h and the norm weights
// (float32), packed weights from pack_skinny_weight.
#include <cstdint>

extern "C" int slipstream_skinny_linear(const void* x, int64_t m, int64_t k, const void* w,
                                        int64_t n, const void* bias, void* y, int out_f32,
                                        int num_threads);
extern "C" int slipstream_add_rms_norm(float* h, const void* delta, const float* weight,
                                       void* out, int64_t rows, int64_t hidden, float eps,
                                       int num_threads);
extern "C" int slipstream_rope(const uint16_t* qkv, int64_t qkv_stride, int64_t num_tokens,
                               int64_t heads, int64_t head_dim, const uint16_t* cos,
                               const uint16_t* sin, int64_t cs_stride, uint16_t* out);
extern "C" int slipstream_silu_mul(const uint16_t* gate_up, int64_t num_tokens, int64_t inter,
                                   uint16_t* out, int num_threads);

// Returns 0, or the failing op's number (1 norm, 2 qkv, 3 rope) when a shape is refused.
extern "C" int slipstream_layer_before_attention(
    float* h,              // [rows, hidden] float32 residual stream, updated in place
    const void* delta,     // [rows, hidden] bf16, the previous layer's MLP output, or null
    const float* norm_w,   // [hidden] float32
    float eps, int64_t rows, int64_t hidden,
    void* x,               // [rows, hidden] bf16 scratch: the normed rows
    const void* qkv_w,     // packed [qkv_n / 16, hidden / 2, 16, 2] bf16
    const void* qkv_bias,  // [qkv_n] bf16 or null
    int64_t qkv_n,
    void* qkv,             // [rows, qkv_n] bf16 out: q | k | v
    int64_t rot_heads, int64_t head_dim,
    const void* cos, const void* sin, int64_t cs_stride,  // [rows, head_dim] rows, bf16
    void* rot,             // [rows, rot_heads, head_dim] bf16 out: rotated q | k
    int num_threads) {
  if (slipstream_add_rms_norm(h, delta, norm_w, x, rows, hidden, eps, num_threads)) return 1;
  if (slipstream_skinny_linear(x, rows, hidden, qkv_w, qkv_n, qkv_bias, qkv, 0, num_threads)) {
    return 2;
  }
  if (slipstream_rope(static_cast<const uint16_t*>(qkv), qkv_n, rows, rot_heads, head_dim,
                      static_cast<const uint16_t*>(cos), static_cast<const uint16_t*>(sin),
                      cs_stride, static_cast<uint16_t*>(rot))) {
    return 3;
  }
  return 0;
}

// Returns 0, or the failing op's number (1 o_proj, 2 norm, 3 gate|up, 4 silu, 5 down).
extern "C" int slipstream_layer_after_attention(
    float* h,               // [rows, hidden] float32 residual stream, updated in place
    const void* attn,       // [rows, q_size] bf16 attention output
    int64_t q_size, int64_t rows, int64_t hidden,
    const void* o_w, const void* o_bias,  // packed [hidden / 16, q_size / 2, 16, 2], [hidden]
    void* attn_proj,        // [rows, hidden] bf16 scratch
    const float* norm_w, float eps,
    void* x,                // [rows, hidden] bf16 scratch
    const void* gate_up_w, const void* gate_up_bias, int64_t inter,  // [2 inter] outputs
    void* gate_up,          // [rows, 2 inter] bf16 scratch
    void* act,              // [rows, inter] bf16 scratch
    const void* down_w, const void* down_bias,
    void* delta,            // [rows, hidden] bf16 out: the MLP output, not yet added to h
    int num_threads) {
  if (slipstream_skinny_linear(attn, rows, q_size, o_w, hidden, o_bias, attn_proj, 0,
                               num_threads)) {
    return 1;
  }
  if (slipstream_add_rms_norm(h, attn_proj, norm_w, x, rows, hidden, eps, num_threads)) return 2;
  if (slipstream_skinny_linear(x, rows, hidden, gate_up_w, 2 * inter, gate_up_bias, gate_up, 0,
                               num_threads)) {
    return 3;
  }
  if (slipstream_silu_mul(static_cast<const uint16_t*>(gate_up), rows, inter,
                          static_cast<uint16_t*>(act), num_threads)) {
    return 4;
  }
  if (slipstream_skinny_linear(act, rows, inter, down_w, hidden, down_bias, delta, 0,
                               num_threads)) {
    return 5;
  }
  return 0;
}
