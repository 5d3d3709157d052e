// Final softcap + cross-entropy over the vocabulary, fused with the tied LM head and chunked over tokens, so the
// (N, V) logits never exist at once: per chunk, logits = xf E^T (fp32, cuBLAS); ce_stats_kernel finds the max and
// sum of exp of the capped logits over blocks of columns, and ce_grad_kernel merges a row's blocks in a fixed order
// into its logsumexp, writes the row's loss lse - z_y (fp32: the true-class term never goes through bf16) and
// d/dlogits = grad_scale (softmax(z) - onehot(y)) sech^2(l / c), rounded to bf16; then dxf = dlogits E (bf16 out).
// The vocabulary is padded to a multiple of 128 rows of E (nonzero rows no token maps to): padded columns are
// excluded from the softmax and get a zero gradient, they are not treated as logits of 0 (docs/model.md).
// Label -100: loss 0 and a zero gradient row. grad_scale is 1 / (scored targets over all micro-batches of the
// step). Cast points: logits f32, logits_capped f32, loss f64 (row losses are summed in double on the host),
// grad_act bf16 for dlogits and dxf.
#pragma once
#include <stdexcept>

#include "fast/gemm.cuh"

namespace gemma::fast {
namespace {

// The per-row work is split over blocks of kCePart columns (32 per thread), so that a chunk of a few hundred rows
// still fills the device (one 1024-thread block per row left the second of two waves a third full at 349 rows, and
// took 4.2 ms for the 2048 rows of 9b 2 x 1024 on the H200, about 4x the time its 5 GB of traffic take):
// ce_stats_kernel writes each block's (max, sum of exp) and ce_grad_kernel merges a row's blocks in a fixed order,
// so the results do not depend on the chunking or on the run.
constexpr int kCeThreads = 256;
constexpr int64_t kCePart = 8192;
constexpr int64_t kCeMaxRows = 65535;  // rows of a chunk: the grid's y dimension
inline int64_t ce_parts(int64_t cols) { return (cols + kCePart - 1) / kCePart; }

// (m, s) with s = sum exp(z - m): merge two partial results. Symmetric in its arguments, so both lanes of a
// butterfly get the same bits.
__device__ __forceinline__ void ms_merge(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  if (M == -INFINITY) return;
  s = s * expf(m - M) + s2 * expf(m2 - M);
  m = M;
}

// c tanh(l / c), the quotient an IEEE division (as the reference's order has it: divide, tanh, multiply).
__device__ __forceinline__ float final_capped(float l, bool cap_on, float cap) {
  return cap_on ? cap * tanhf(l / cap) : l;
}

// The whole block's (m, s) in thread 0 (the one that stores it), merged by a butterfly in each warp and then warp by
// warp in order; the other threads keep their warp's pair. Once per kernel: a second call would overwrite wm, ws
// before thread 0 has read them.
__device__ __forceinline__ void ce_block_ms(float& m, float& s) {
  __shared__ float wm[kCeThreads / 32], ws[kCeThreads / 32];
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
  if (threadIdx.x != 0) return;
  m = wm[0];
  s = ws[0];
  for (int w = 1; w < kCeThreads / 32; ++w) ms_merge(m, s, wm[w], ws[w]);
}

// Block (part, row): (max, sum of exp(z - max)) of the capped logits z in columns [part kCePart, (part + 1)
// kCePart) of the first `cols` (V, or Vp when the padded columns are wrongly left in: the fault switch) into
// stats[row, part]. Rows are read as float4 (Vp is a multiple of 128, so every row is 16-byte aligned and a
// group of 4 never crosses Vp); a thread folds each group of 4 into its running pair once.
__global__ void __launch_bounds__(kCeThreads) ce_stats_kernel(float2* stats, const float* logits, int64_t cols,
                                                              int64_t Vp, int parts, bool cap_on, float cap) {
  const int part = blockIdx.x;
  const int64_t n = blockIdx.y, j0 = part * kCePart, j1 = min(j0 + kCePart, cols);
  const float* lr = logits + n * Vp;
  float m = -INFINITY, s = 0.0f;
  for (int64_t j = j0 + 4 * threadIdx.x; j < j1; j += 4 * kCeThreads) {
    const float4 v = *reinterpret_cast<const float4*>(lr + j);
    float z[4] = {v.x, v.y, v.z, v.w};
    float g = -INFINITY;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      z[e] = j + e < j1 ? final_capped(z[e], cap_on, cap) : -INFINITY;
      g = fmaxf(g, z[e]);
    }
    if (g > m) {
      s *= expf(m - g);  // 0 while m is -inf, unless s is already NaN: a NaN logit keeps the row's sum NaN
      m = g;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) s += z[e] == -INFINITY ? 0.0f : expf(z[e] - m);
  }
  ce_block_ms(m, s);
  if (threadIdx.x == 0) stats[n * parts + part] = make_float2(m, s);
}

// Block (part, row): the row's max M and log S, S = sum exp(z - M), from its blocks' pairs (merged in a fixed
// order: lane q folds parts q, q + 32, ... in turn, then a butterfly; the same bits in every block), then for its
// columns d/dlogits = grad_scale (softmax(z) - onehot(y)) sech^2(l / c) in bf16, zeros for the padded columns past
// cols and for an ignored row; block 0 writes the row's loss (M - z_y) + log S. Rows of capped logits the caller asked for (capped_slot) are written too.
// The logsumexp is never formed as one fp32 number M + log S: its rounding (up to half an ulp of M, 1e-6 at M = 30)
// would move z - lse by as much, and for the true class of a sharply peaked row z_y - lse is about -log S, small
// (the rounding is 10% of it at log S = 1e-5), so softmax - 1 would move by the same fraction. z - M is exact for z
// within a factor two of M (Sterbenz), so expm1((z_y - M) - log S) keeps its relative accuracy. (With
// z - (M + log S) the gate's head probe on gemma2-odd failed: 0.278% of dxf a bf16 ulp or more off the reference,
// tolerance 0.104%.)
__global__ void __launch_bounds__(kCeThreads) ce_grad_kernel(bf16* dlog,              // (rows, Vp)
                                                             float* row_loss,         // (rows)
                                                             float* capped_out,       // (slots, V) capped logits
                                                             const int* capped_slot,  // (rows) slot or -1; may be null
                                                             const float* logits,     // (rows, Vp)
                                                             const int32_t* target,   // (rows), -100 ignored
                                                             const float2* stats,     // (rows, parts)
                                                             int parts, int64_t V, int64_t Vp, int64_t cols,
                                                             bool cap_on, float cap, float grad_scale,
                                                             bool drop_sech2) {
  __shared__ float row_max, row_log_sum;
  const int part = blockIdx.x;
  const int64_t n = blockIdx.y, j0 = part * kCePart, j1 = part + 1 == parts ? Vp : min(j0 + kCePart, Vp);
  const float* lr = logits + n * Vp;
  bf16* dr = dlog + n * Vp;
  if (threadIdx.x < 32) {  // lanes fold parts lane, lane + 32, ... in order, then a butterfly
    float m = -INFINITY, s = 0.0f;
    for (int q = threadIdx.x; q < parts; q += 32) {
      const float2 ms = stats[n * parts + q];
      ms_merge(m, s, ms.x, ms.y);
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      ms_merge(m, s, m2, s2);
    }
    if (threadIdx.x == 0) {
      row_max = m;
      row_log_sum = logf(s);
    }
  }
  __syncthreads();
  const float M = row_max, log_s = row_log_sum;
  const int64_t y = target[n];
  const int slot = capped_slot ? capped_slot[n] : -1;
  if (slot >= 0)
    for (int64_t j = j0 + threadIdx.x; j < min(j1, V); j += kCeThreads)
      capped_out[int64_t(slot) * V + j] = final_capped(lr[j], cap_on, cap);
  if (part == 0 && threadIdx.x == 0) row_loss[n] = y < 0 ? 0.0f : (M - final_capped(lr[y], cap_on, cap)) + log_s;
  for (int64_t j = j0 + 4 * threadIdx.x; j < j1; j += 4 * kCeThreads) {
    const float4 v = *reinterpret_cast<const float4*>(lr + j);
    const float l[4] = {v.x, v.y, v.z, v.w};
    float d[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      d[e] = 0.0f;
      if (y >= 0 && j + e < cols) {
        const float zl = (final_capped(l[e], cap_on, cap) - M) - log_s;
        // The true class: softmax - 1 as expm1, which keeps its relative accuracy when the softmax is near 1.
        d[e] = j + e == y ? expm1f(zl) : expf(zl);
        if (cap_on && !drop_sech2) d[e] *= softcap_grad(l[e], cap);
        d[e] *= grad_scale;
      }
    }
    __nv_bfloat162 lo = __floats2bfloat162_rn(d[0], d[1]), hi = __floats2bfloat162_rn(d[2], d[3]);
    uint2 packed;
    packed.x = *reinterpret_cast<uint32_t*>(&lo);
    packed.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(dr + j) = packed;
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
  float2* stats;     // (rows, ce_parts(Vp)) scratch
  float* row_loss;   // (rows)
  float* capped_out; // (slots, V)
  bf16* dxf;         // (rows, D)
};

inline void lm_head_loss_chunk(cublasHandle_t h, const LossChunk& c, cudaStream_t st) {
  if (c.rows == 0) return;
  if (c.rows > kCeMaxRows) throw std::logic_error("lm_head_loss_chunk: more rows than the grid takes");
  gemm(h, c.rows, c.Vp, c.D, {c.xf, c.D, false}, {c.E, c.D, true}, c.logits, true, c.Vp, 1.0f, 0.0f);
  const bool pad_unmasked = faults().padded_vocab_unmasked;
  const int64_t cols = pad_unmasked ? c.Vp : c.V;
  const int parts = int(ce_parts(cols));
  const dim3 grid(unsigned(parts), unsigned(c.rows));  // c.rows <= kCeMaxRows: gridDim.y
  ce_stats_kernel<<<grid, kCeThreads, 0, st>>>(c.stats, c.logits, cols, c.Vp, parts, c.cap_on, c.cap);
  GEMMA_LAUNCHED("ce_stats_kernel");
  ce_grad_kernel<<<grid, kCeThreads, 0, st>>>(c.dlog, c.row_loss, c.capped_out, c.capped_slot, c.logits, c.target,
                                              c.stats, parts, c.V, c.Vp, cols, c.cap_on, c.cap, c.grad_scale,
                                              faults().logit_softcap_grad_missing);
  GEMMA_LAUNCHED("ce_grad_kernel");
  gemm(h, c.rows, c.D, c.Vp, {c.dlog, c.Vp, false}, {c.E, c.D, false}, c.dxf, false, c.D, 1.0f, 0.0f);
}

inline int64_t padded_vocab(int64_t V) { return (V + 127) / 128 * 128; }

}  // namespace
}  // namespace gemma::fast
