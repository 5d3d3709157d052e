// GeGLU: act = gelu_tanh(gate) * up, from the fused gate|up product (N, 2I); and its backward.
// Cast points: gelu f32 (computed in registers, never stored), geglu bf16 (the down_proj input, matmul_in);
// backward: dact is the fp32 product sum rounded to bf16 on read (grad_act), dgate and dup rounded to bf16.
#pragma once
#include <algorithm>

#include "fast/common.cuh"

namespace gemma::fast {
namespace {

// One element: act from gate g and up u (bf16 values, exact in fp32); the gradients from the rounded dact d.
__device__ __forceinline__ bf16 geglu_act(float g, float u) { return __float2bfloat16_rn(__fmul_rn(gelu_tanh(g), u)); }
__device__ __forceinline__ void geglu_grads(float d, float g, float u, bf16& dgate, bf16& dup) {
  dgate = __float2bfloat16_rn(d * u * gelu_tanh_grad(g));
  dup = __float2bfloat16_rn(d * gelu_tanh(g));
}

__global__ void geglu_forward_kernel(bf16* act,            // (N, I)
                                     const bf16* gate_up,  // (N, 2I): gate in [0, I), up in [I, 2I)
                                     int64_t N, int64_t I) {
  const int64_t total = N * I;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / I, j = i - n * I;
    const float g = __bfloat162float(gate_up[n * 2 * I + j]);
    const float u = __bfloat162float(gate_up[n * 2 * I + I + j]);
    act[i] = geglu_act(g, u);
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
    geglu_grads(d, g, u, dgate_up[n * 2 * I + j], dgate_up[n * 2 * I + I + j]);
  }
}

// The same two kernels eight elements per thread: 16-byte accesses, rows from the grid's y (no index division),
// the same arithmetic per element, so the same bits. They apply where I is a multiple of 8 and the pointers are
// 16-byte aligned (every released width); the kernels above cover the rest.
constexpr int kGegluVecThreads = 128;

__global__ void __launch_bounds__(kGegluVecThreads) geglu_forward_vec_kernel(bf16* act, const bf16* gate_up,
                                                                             int64_t N, int64_t I) {
  const int64_t j = (int64_t(blockIdx.x) * kGegluVecThreads + threadIdx.x) * 8;
  if (j >= I) return;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const uint4 graw = *reinterpret_cast<const uint4*>(gate_up + n * 2 * I + j);
    const uint4 uraw = *reinterpret_cast<const uint4*>(gate_up + n * 2 * I + I + j);
    const bf16* gv = reinterpret_cast<const bf16*>(&graw);
    const bf16* uv = reinterpret_cast<const bf16*>(&uraw);
    uint4 oraw;
    bf16* ov = reinterpret_cast<bf16*>(&oraw);
#pragma unroll
    for (int e = 0; e < 8; ++e)
      ov[e] = geglu_act(__bfloat162float(gv[e]), __bfloat162float(uv[e]));
    *reinterpret_cast<uint4*>(act + n * I + j) = oraw;
  }
}

__global__ void __launch_bounds__(kGegluVecThreads) geglu_backward_vec_kernel(bf16* dgate_up, const float* dact,
                                                                              const bf16* gate_up, int64_t N,
                                                                              int64_t I) {
  const int64_t j = (int64_t(blockIdx.x) * kGegluVecThreads + threadIdx.x) * 8;
  if (j >= I) return;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const float4 d0 = *reinterpret_cast<const float4*>(dact + n * I + j);
    const float4 d1 = *reinterpret_cast<const float4*>(dact + n * I + j + 4);
    const float dv[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
    const uint4 graw = *reinterpret_cast<const uint4*>(gate_up + n * 2 * I + j);
    const uint4 uraw = *reinterpret_cast<const uint4*>(gate_up + n * 2 * I + I + j);
    const bf16* gv = reinterpret_cast<const bf16*>(&graw);
    const bf16* uv = reinterpret_cast<const bf16*>(&uraw);
    uint4 dgraw, duraw;
    bf16* dg = reinterpret_cast<bf16*>(&dgraw);
    bf16* du = reinterpret_cast<bf16*>(&duraw);
#pragma unroll
    for (int e = 0; e < 8; ++e)
      geglu_grads(round_bf16(dv[e]), __bfloat162float(gv[e]), __bfloat162float(uv[e]), dg[e], du[e]);
    *reinterpret_cast<uint4*>(dgate_up + n * 2 * I + j) = dgraw;
    *reinterpret_cast<uint4*>(dgate_up + n * 2 * I + I + j) = duraw;
  }
}

inline bool geglu_vec(int64_t I, std::initializer_list<const void*> ptrs) { return I % 8 == 0 && aligned16(ptrs); }
inline dim3 geglu_vec_grid(int64_t N, int64_t I) {
  return dim3(unsigned((I / 8 + kGegluVecThreads - 1) / kGegluVecThreads), unsigned(std::min<int64_t>(N, 65535)));
}

inline void geglu_forward(bf16* act, const bf16* gate_up, int64_t N, int64_t I, cudaStream_t st) {
  if (N == 0) return;
  if (geglu_vec(I, {act, gate_up})) {
    geglu_forward_vec_kernel<<<geglu_vec_grid(N, I), kGegluVecThreads, 0, st>>>(act, gate_up, N, I);
    GEMMA_LAUNCHED("geglu_forward_vec_kernel");
    return;
  }
  geglu_forward_kernel<<<elementwise_blocks(N * I), 256, 0, st>>>(act, gate_up, N, I);
  GEMMA_LAUNCHED("geglu_forward_kernel");
}

inline void geglu_backward(bf16* dgate_up, const float* dact, const bf16* gate_up, int64_t N, int64_t I,
                           cudaStream_t st) {
  if (N == 0) return;
  if (geglu_vec(I, {dgate_up, dact, gate_up})) {
    geglu_backward_vec_kernel<<<geglu_vec_grid(N, I), kGegluVecThreads, 0, st>>>(dgate_up, dact, gate_up, N, I);
    GEMMA_LAUNCHED("geglu_backward_vec_kernel");
    return;
  }
  geglu_backward_kernel<<<elementwise_blocks(N * I), 256, 0, st>>>(dgate_up, dact, gate_up, N, I);
  GEMMA_LAUNCHED("geglu_backward_kernel");
}

}  // namespace
}  // namespace gemma::fast
