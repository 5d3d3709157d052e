// Embedding lookup times the normalizer: x = E[id] * bf16(sqrt(D)) into the fp32 residual stream.
// Cast points: embed_out bf16 (the table), normalizer bf16 (48.0, 59.75, 68.0 at the released widths),
// embed_scaled f32 (the product of two bf16 values is exact in fp32, so this matches the reference bit for bit).
#pragma once
#include "fast/common.cuh"

namespace gemma::fast {
namespace {

__global__ void embed_kernel(float* x,             // (N, D) residual stream
                             const int32_t* ids,   // (N)
                             const bf16* E,        // (Vp, D)
                             int64_t N, int64_t D, float normalizer) {
  const int64_t total = N * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / D, j = i - n * D;
    x[i] = __fmul_rn(__bfloat162float(E[int64_t(ids[n]) * D + j]), normalizer);
  }
}

inline void embed_forward(float* x, const int32_t* ids, const bf16* E, int64_t N, int64_t D, float normalizer,
                          cudaStream_t st) {
  embed_kernel<<<elementwise_blocks(N * D), 256, 0, st>>>(x, ids, E, N, D, normalizer);
  GEMMA_LAUNCHED("embed_kernel");
}

}  // namespace
}  // namespace gemma::fast
