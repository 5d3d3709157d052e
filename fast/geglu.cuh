// GeGLU: act = gelu_tanh(gate) * up, from the fused gate|up product (N, 2I); and its backward.
// Cast points: gelu f32 (computed in registers, never stored), geglu bf16 (the down_proj input, matmul_in);
// backward: dact is the fp32 product sum rounded to bf16 on read (grad_act), dgate and dup rounded to bf16.
#pragma once
#include "fast/common.cuh"

namespace gemma::fast {
namespace {

__global__ void geglu_forward_kernel(bf16* act,            // (N, I)
                                     const bf16* gate_up,  // (N, 2I): gate in [0, I), up in [I, 2I)
                                     int64_t N, int64_t I) {
  const int64_t total = N * I;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / I, j = i - n * I;
    const float g = __bfloat162float(gate_up[n * 2 * I + j]);
    const float u = __bfloat162float(gate_up[n * 2 * I + I + j]);
    act[i] = __float2bfloat16_rn(__fmul_rn(gelu_tanh(g), u));
  }
}

__global__ void geglu_backward_kernel(bf16* dgate_up,       // (N, 2I)
                                      const float* dact,    // (N, I) fp32 product sum
                                      const bf16* gate_up,  // (N, 2I)
                                      int64_t N, int64_t I) {
  const int64_t total = N * I;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / I, j = i - n * I;
    const float d = round_bf16(dact[i]);
    const float g = __bfloat162float(gate_up[n * 2 * I + j]);
    const float u = __bfloat162float(gate_up[n * 2 * I + I + j]);
    dgate_up[n * 2 * I + j] = __float2bfloat16_rn(d * u * gelu_tanh_grad(g));
    dgate_up[n * 2 * I + I + j] = __float2bfloat16_rn(d * gelu_tanh(g));
  }
}

inline void geglu_forward(bf16* act, const bf16* gate_up, int64_t N, int64_t I, cudaStream_t st) {
  geglu_forward_kernel<<<elementwise_blocks(N * I), 256, 0, st>>>(act, gate_up, N, I);
  GEMMA_LAUNCHED("geglu_forward_kernel");
}

inline void geglu_backward(bf16* dgate_up, const float* dact, const bf16* gate_up, int64_t N, int64_t I,
                           cudaStream_t st) {
  geglu_backward_kernel<<<elementwise_blocks(N * I), 256, 0, st>>>(dgate_up, dact, gate_up, N, I);
  GEMMA_LAUNCHED("geglu_backward_kernel");
}

}  // namespace
}  // namespace gemma::fast
