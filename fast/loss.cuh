// Final softcap + cross-entropy over the vocabulary, fused with the tied LM head and chunked over tokens, so the
// (N, V) logits never exist at once: per chunk, logits = xf E^T (fp32, cuBLAS), one block per row finds
// logsumexp of the capped logits online (max and sum merged in a fixed order), writes the row's loss
// lse - z_y (fp32: the true-class term never goes through bf16) and d/dlogits
// = grad_scale (softmax(z) - onehot(y)) sech^2(l / c), rounded to bf16, then dxf = dlogits E (bf16 out).
// The vocabulary is padded to a multiple of 128 rows of E (nonzero rows no token maps to): padded columns are
// excluded from the softmax and get a zero gradient, they are not treated as logits of 0 (docs/model.md).
// Label -100: loss 0 and a zero gradient row. grad_scale is 1 / (scored targets over all micro-batches of the
// step). Cast points: logits f32, logits_capped f32, loss f64 (row losses are summed in double on the host),
// grad_act bf16 for dlogits and dxf.
#pragma once
#include "fast/gemm.cuh"

namespace gemma::fast {
namespace {

constexpr int kCeThreads = 1024;

// (m, s) with s = sum exp(z - m): merge two partial results. Symmetric in its arguments, so both lanes of a
// butterfly get the same bits.
__device__ __forceinline__ void ms_merge(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  if (M == -INFINITY) return;
  s = s * expf(m - M) + s2 * expf(m2 - M);
  m = M;
}

__device__ __forceinline__ float final_capped(float l, bool cap_on, float cap) {
  return cap_on ? cap * tanhf(l / cap) : l;
}

__global__ void __launch_bounds__(kCeThreads) ce_kernel(bf16* dlog,              // (rows, Vp)
                                                        float* row_loss,         // (rows)
                                                        float* capped_out,       // (slots, V) capped logits
                                                        const int* capped_slot,  // (rows) slot or -1; may be null
                                                        const float* logits,     // (rows, Vp)
                                                        const int32_t* target,   // (rows), -100 ignored
                                                        int64_t V, int64_t Vp, bool cap_on, float cap,
                                                        float grad_scale, bool drop_sech2, bool pad_unmasked) {
  __shared__ float wm[32], ws[32], res[2];
  const int64_t n = blockIdx.x;
  const float* lr = logits + n * Vp;
  const int64_t cols = pad_unmasked ? Vp : V;
  float m = -INFINITY, s = 0.0f;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float z = final_capped(lr[j], cap_on, cap);
    if (z > m) {
      s = s * expf(m - z) + 1.0f;
      m = z;
    } else {
      s += expf(z - m);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    ms_merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    wm[warp] = m;
    ws[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float M = wm[0], S = ws[0];
    for (int w = 1; w < int(blockDim.x >> 5); ++w) ms_merge(M, S, wm[w], ws[w]);
    res[0] = M;
    res[1] = S;
  }
  __syncthreads();
  const float lse = res[0] + logf(res[1]);

  const int slot = capped_slot ? capped_slot[n] : -1;
  if (slot >= 0)
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) capped_out[int64_t(slot) * V + j] = final_capped(lr[j], cap_on, cap);

  const int64_t y = target[n];
  bf16* dr = dlog + n * Vp;
  if (y < 0) {
    if (threadIdx.x == 0) row_loss[n] = 0.0f;
    for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) dr[j] = __float2bfloat16_rn(0.0f);
    return;
  }
  if (threadIdx.x == 0) row_loss[n] = lse - final_capped(lr[y], cap_on, cap);
  for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) {
    float d = 0.0f;
    if (j < cols) {
      const float l = lr[j];
      const float zl = final_capped(l, cap_on, cap) - lse;
      // The true class: softmax - 1 as expm1, which keeps its relative accuracy when the softmax is near 1.
      d = j == y ? expm1f(zl) : expf(zl);
      if (cap_on && !drop_sech2) d *= softcap_grad(l, cap);
      d *= grad_scale;
    }
    dr[j] = __float2bfloat16_rn(d);
  }
}

struct LossChunk {
  const bf16* xf;          // (rows, D) final-norm output
  const bf16* E;           // (Vp, D) tied embedding, padded
  const int32_t* target;   // (rows)
  const int* capped_slot;  // (rows) or null
  int64_t rows, D, V, Vp;
  bool cap_on;
  float cap, grad_scale;
  float* logits;     // (rows, Vp) scratch
  bf16* dlog;        // (rows, Vp) scratch
  float* row_loss;   // (rows)
  float* capped_out; // (slots, V)
  bf16* dxf;         // (rows, D)
};

inline void lm_head_loss_chunk(cublasHandle_t h, const LossChunk& c, cudaStream_t st) {
  if (c.rows == 0) return;
  gemm(h, c.rows, c.Vp, c.D, {c.xf, c.D, false}, {c.E, c.D, true}, c.logits, true, c.Vp, 1.0f, 0.0f);
  ce_kernel<<<unsigned(c.rows), kCeThreads, 0, st>>>(c.dlog, c.row_loss, c.capped_out, c.capped_slot, c.logits,
                                                     c.target, c.V, c.Vp, c.cap_on, c.cap, c.grad_scale,
                                                     faults().logit_softcap_grad_missing, faults().padded_vocab_unmasked);
  GEMMA_LAUNCHED("ce_kernel");
  gemm(h, c.rows, c.D, c.Vp, {c.dlog, c.Vp, false}, {c.E, c.D, false}, c.dxf, false, c.D, 1.0f, 0.0f);
}

inline int64_t padded_vocab(int64_t V) { return (V + 127) / 128 * 128; }

}  // namespace
}  // namespace gemma::fast
