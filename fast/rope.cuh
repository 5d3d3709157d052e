// Rotary embeddings, half-split convention: pairs (k, k + hd/2) of each head rotate by t * inv_freq[k], t the token's
// position (pos[n], from the batch's position_ids, or n % T without them).
// Cast points: rope_inputs f32 (inv_freq), rope_angle f32, rope_cossin f32: the tables are built on the host in
// float64 and rounded to fp32 exactly as the reference's rope_tables does, so they match it bit for bit; the
// rotation runs in fp32 and the result is rounded once to bf16 (rope_out). The backward rotates the fp32
// attention gradients by -angle and rounds once (grad_act), as the reference casts dq, dk after rope_apply.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include "fast/common.cuh"

namespace gemma::fast {
namespace {

// cos and sin tables (T, hd/2) in fp32 for positions 0..T-1, the reference's rope_tables under f32 rope casts.
inline void rope_tables(int64_t T, int64_t hd, double theta, std::vector<float>& cosv, std::vector<float>& sinv) {
  const int64_t half = hd / 2;
  cosv.assign(size_t(T * half), 0.0f);
  sinv.assign(size_t(T * half), 0.0f);
  for (int64_t k = 0; k < half; ++k) {
    const float inv_freq = float(1.0 / std::pow(theta, double(2 * k) / double(hd)));
    for (int64_t t = 0; t < T; ++t) {
      const float angle = float(double(float(t)) * double(inv_freq));
      cosv[size_t(t * half + k)] = float(std::cos(double(angle)));
      sinv[size_t(t * half + k)] = float(std::sin(double(angle)));
    }
  }
}

// Launch shape of the kernels below: threads over a token's (head, pair) or column index on the grid's x, the
// tokens on its y (looping past the grid's 65535 rows), so no element pays a 64-bit division for its indices.
constexpr int kRowThreads = 256;
inline dim3 row_grid(int64_t N, int64_t per_row) {
  return dim3(unsigned((per_row + kRowThreads - 1) / kRowThreads), unsigned(std::min<int64_t>(std::max<int64_t>(N, 1), 65535)));
}

// In place on `heads` heads starting at column 0 of x (row stride ld); row n is position pos[n] (n % T when pos is
// null).
__global__ void rope_forward_kernel(bf16* x, int64_t ld, int64_t N, int64_t T, const int32_t* pos, int heads, int hd,
                                    const float* cosv, const float* sinv) {
  const int half = hd / 2, i = blockIdx.x * kRowThreads + threadIdx.x;
  if (i >= heads * half) return;
  const int h = i / half, k = i - h * half;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t t = pos ? pos[n] : n % T;
    const float c = cosv[t * half + k], s = sinv[t * half + k];
    bf16* p = x + n * ld + int64_t(h) * hd;
    const float a = __bfloat162float(p[k]), b = __bfloat162float(p[k + half]);
    p[k] = __float2bfloat16_rn(a * c - b * s);
    p[k + half] = __float2bfloat16_rn(b * c + a * s);
  }
}

// out (bf16, row stride ld_out) = rotation by -angle of dx (fp32, row stride ld_in).
__global__ void rope_backward_kernel(bf16* out, int64_t ld_out, const float* dx, int64_t ld_in, int64_t N, int64_t T,
                                     const int32_t* pos, int heads, int hd, const float* cosv, const float* sinv) {
  const int half = hd / 2, i = blockIdx.x * kRowThreads + threadIdx.x;
  if (i >= heads * half) return;
  const int h = i / half, k = i - h * half;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t t = pos ? pos[n] : n % T;
    const float c = cosv[t * half + k], s = sinv[t * half + k];
    const float* p = dx + n * ld_in + int64_t(h) * hd;
    const float a = p[k], b = p[k + half];
    bf16* o = out + n * ld_out + int64_t(h) * hd;
    o[k] = __float2bfloat16_rn(a * c + b * s);
    o[k + half] = __float2bfloat16_rn(b * c - a * s);
  }
}

// out (bf16) = round(in) for an (N, cols) block: the v gradient, and the attention-output gradient.
__global__ void to_bf16_kernel(bf16* out, int64_t ld_out, const float* in, int64_t ld_in, int64_t N, int64_t cols) {
  const int64_t j = int64_t(blockIdx.x) * kRowThreads + threadIdx.x;
  if (j >= cols) return;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) out[n * ld_out + j] = __float2bfloat16_rn(in[n * ld_in + j]);
}

inline void rope_forward(bf16* x, int64_t ld, int64_t N, int64_t T, const int32_t* pos, int heads, int hd,
                         const float* cosv, const float* sinv, cudaStream_t st) {
  if (N == 0) return;
  rope_forward_kernel<<<row_grid(N, int64_t(heads) * (hd / 2)), kRowThreads, 0, st>>>(x, ld, N, T, pos, heads, hd, cosv,
                                                                                       sinv);
  GEMMA_LAUNCHED("rope_forward_kernel");
}

inline void rope_backward(bf16* out, int64_t ld_out, const float* dx, int64_t ld_in, int64_t N, int64_t T,
                          const int32_t* pos, int heads, int hd, const float* cosv, const float* sinv, cudaStream_t st) {
  if (N == 0) return;
  rope_backward_kernel<<<row_grid(N, int64_t(heads) * (hd / 2)), kRowThreads, 0, st>>>(out, ld_out, dx, ld_in, N, T,
                                                                                        pos, heads, hd, cosv, sinv);
  GEMMA_LAUNCHED("rope_backward_kernel");
}

inline void to_bf16(bf16* out, int64_t ld_out, const float* in, int64_t ld_in, int64_t N, int64_t cols,
                    cudaStream_t st) {
  if (N == 0 || cols == 0) return;
  to_bf16_kernel<<<row_grid(N, cols), kRowThreads, 0, st>>>(out, ld_out, in, ld_in, N, cols);
  GEMMA_LAUNCHED("to_bf16_kernel");
}

}  // namespace
}  // namespace gemma::fast
