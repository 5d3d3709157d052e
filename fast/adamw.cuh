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
};

inline AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t t) {
  AdamWScalars s;
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
    const float gi = g[i];
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

}  // namespace
}  // namespace gemma::fast
