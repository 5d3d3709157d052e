// Device helpers every CUDA layer shares: bf16 rounding (round-to-nearest-even, as model/dtype.hpp), the exact
// three-way bf16 split of an fp32 value, fixed-order block reductions (so results are bit-identical run to run),
// the fp32 forms of the softcap derivative and GELU, and launch geometry.
//
// Everything here and in the other .cuh files sits in an anonymous namespace: each translation unit (the
// engine, the kernel test entry points) gets its own copy, and the tests run the very launchers that ship.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "fast/device.hpp"

namespace gemma::fast {
namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float x) {
  return __float2bfloat16_rn(x);
}
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// x = h1 + h2 + h3 exactly (fp32 has 24 significant bits, bf16 8: each remainder is exact in fp32 and the third
// one fits in 8 bits). Products of these terms with bf16 values are exact in fp32, so a bf16 tensor-core product
// over the terms equals an fp32 product up to fp32 accumulation order: adapters and attention gradients stay fp32
// without an fp32 GEMM, and without a rounding the reference would not know about.
__device__ __forceinline__ void split3(float x, bf16& h1, bf16& h2, bf16& h3) {
  h1 = __float2bfloat16_rn(x);
  const float r1 = __fsub_rn(x, __bfloat162float(h1));
  h2 = __float2bfloat16_rn(r1);
  const float r2 = __fsub_rn(r1, __bfloat162float(h2));
  h3 = __float2bfloat16_rn(r2);
}

// split3 of two values at once, each pair of terms packed as two bf16 (x0's term in the low half, as pack_bf16):
// the same roundings, with one conversion instruction (cvt.rn.bf16x2.f32) per pair instead of one per value and
// a pack (the attention backward splits every dS).
__device__ __forceinline__ void split3x2(float x0, float x1, uint32_t& h1, uint32_t& h2, uint32_t& h3) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(x0, x1);
  const float2 fa = __bfloat1622float2(a);
  const float r0 = __fsub_rn(x0, fa.x), r1 = __fsub_rn(x1, fa.y);
  const __nv_bfloat162 b = __floats2bfloat162_rn(r0, r1);
  const float2 fb = __bfloat1622float2(b);
  const __nv_bfloat162 c = __floats2bfloat162_rn(__fsub_rn(r0, fb.x), __fsub_rn(r1, fb.y));
  h1 = *reinterpret_cast<const uint32_t*>(&a);
  h2 = *reinterpret_cast<const uint32_t*>(&b);
  h3 = *reinterpret_cast<const uint32_t*>(&c);
}

// d softcap / dx = sech^2(x / c) as 4e / (1 + e)^2, e = exp(-2|x|/c): 1 - tanh^2 would cancel to zero in the tail
// (docs/model.md).
__device__ __forceinline__ float softcap_grad(float x, float c) {
  const float e = expf(-2.0f * (fabsf(x) / c));
  const float one_e = 1.0f + e;
  return 4.0f * e / (one_e * one_e);
}

// sigmoid(2u) and 1 - sigmoid(2u) without overflow on either side (e = exp(-2|u|) <= 1).
__device__ __forceinline__ void sigmoid2(float u, float& s, float& oms) {
  const float e = expf(-2.0f * fabsf(u));
  const float inv = 1.0f / (1.0f + e);
  if (u >= 0) {
    s = inv;
    oms = e * inv;
  } else {
    s = e * inv;
    oms = inv;
  }
}

// gelu_pytorch_tanh = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3) (the reference's form, reference/scalar.hpp).
__device__ __forceinline__ float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  float s, oms;
  sigmoid2(u, s, oms);
  return x * s;
}
__device__ __forceinline__ float gelu_tanh_grad(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  float s, oms;
  sigmoid2(u, s, oms);
  const float du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
  return s + x * 2.0f * du * s * oms;
}

// Sum over a block in a fixed order: a warp xor tree, then the warps' sums in index order by warp 0. Every
// thread gets the same bits. `scratch` holds 33 floats; the call ends with a barrier so it can be reused.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (int w = 0; w < nw; ++w) s += scratch[w];
    scratch[32] = s;
  }
  __syncthreads();
  const float r = scratch[32];
  __syncthreads();
  return r;
}

// Whether every pointer can be read and written 16 bytes at a time (the eight-wide kernels' condition).
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

inline int elementwise_blocks(int64_t n, int threads = 256) {
  return int(std::min<int64_t>((n + threads - 1) / threads, 132 * 32));
}

}  // namespace
}  // namespace gemma::fast
