// AdamW on the fp32 adapters (torch.optim.AdamW, as reference/adamw.hpp): decoupled weight decay applied to the
// weight first, then bias-corrected moments. One flat pass over every adapter tensor (they share one allocation).
// Cast points: adapters f32, optimizer_state f32, grads f32. The step's scalars (bias corrections) are computed
// in float64 on the host, as the reference does, and rounded to fp32 once.
#pragma once
#include <cmath>

#include "fast/common.cuh"

namespace gemma::fast {
namespace {

struct AdamWScalars {
  float decay;      // 1 - lr * weight_decay
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;  // lr / (1 - beta1^t)
  float sqrt_bc2;   // sqrt(1 - beta2^t)
  float eps;
  // Gradient clipping's coefficient (torch.nn.utils.clip_grad_norm_: min(1, max_norm / (norm + 1e-6)), rounded to
  // fp32 as torch's fp32 tensor holds it), applied to each gradient as torch's grad.mul_ does: one fp32 product.
  // 1 when not clipping, and multiplying by 1 changes no bit.
  float grad_scale;
};

inline AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t t,
                                  double grad_scale = 1.0) {
  AdamWScalars s;
  s.grad_scale = float(grad_scale);
  s.decay = float(1.0 - lr * weight_decay);
  s.beta1 = float(beta1);
  s.one_minus_beta1 = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.step_size = float(lr / (1.0 - std::pow(beta1, double(t))));
  s.sqrt_bc2 = float(std::sqrt(1.0 - std::pow(beta2, double(t))));
  s.eps = float(eps);
  return s;
}

__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n, AdamWScalars s) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float gi = g[i] * s.grad_scale;
    const float pi = p[i] * s.decay;
    const float mi = s.beta1 * m[i] + s.one_minus_beta1 * gi;
    const float vi = s.beta2 * v[i] + s.one_minus_beta2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - s.step_size * mi / (sqrtf(vi) / s.sqrt_bc2 + s.eps);
  }
}

inline void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s,
                         cudaStream_t st) {
  adamw_kernel<<<elementwise_blocks(n), 256, 0, st>>>(p, g, m, v, n, s);
  GEMMA_LAUNCHED("adamw_kernel");
}

// The sum of squares of n fp32 values, accumulated in float64 (for the global gradient norm that clipping uses):
// kSumSqBlocks partial sums, each a fixed tree over its block's threads, then one block sums the partials in a
// fixed order, so the result has the same bits on every run and on every GPU holding the same values.
constexpr int kSumSqBlocks = 1024;

__global__ void sum_squares_partial(const float* x, int64_t n, double* partial) {
  __shared__ double sh[256];
  double acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double v = double(x[i]);
    acc += v * v;
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

__global__ void sum_squares_final(const double* partial, double* out) {
  __shared__ double sh[256];
  double acc = 0;
  for (int i = int(threadIdx.x); i < kSumSqBlocks; i += 256) acc += partial[i];
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = sh[0];
}

// work: kSumSqBlocks + 1 doubles on the device; the sum lands in work[kSumSqBlocks].
inline void sum_squares(const float* x, int64_t n, double* work, cudaStream_t st) {
  sum_squares_partial<<<kSumSqBlocks, 256, 0, st>>>(x, n, work);
  GEMMA_LAUNCHED("sum_squares_partial");
  sum_squares_final<<<1, 256, 0, st>>>(work, work + kSumSqBlocks);
  GEMMA_LAUNCHED("sum_squares_final");
}

}  // namespace
}  // namespace gemma::fast
