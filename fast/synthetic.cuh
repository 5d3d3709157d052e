// model/synthetic.hpp's weight generator on the device: element i of a tensor is
// bf16(float(half_width * (splitmix64(key + i * golden) >> 11) * 2^-52 - 1))). The arithmetic is float64 and
// IEEE-exact on both sides (the scaling by 2^-52 is exact, so a fused multiply-add gives the same bits), so the
// device writes exactly the bits synthetic_weights writes on the host: a 9b benchmark needs no host copy.
#pragma once
#include "fast/common.cuh"

namespace gemma::fast {
namespace {

__device__ __forceinline__ uint64_t splitmix64_dev(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Round-to-nearest-even on the bits, as model/dtype.hpp's float_to_bf16 (the values here are finite).
__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

__device__ __forceinline__ float synthetic_value(uint64_t key, uint64_t i, double half_width) {
  const double u = double(splitmix64_dev(key + i * 0x9e3779b97f4a7c15ull) >> 11) * 0x1.0p-52 - 1.0;
  return __uint_as_float(uint32_t(float_to_bf16_bits(float(half_width * u))) << 16);
}

// out[offset + i*ld + j] for a (rows, cols) tensor placed into a larger matrix (a fused weight).
__global__ void synthetic_bf16_kernel(bf16* out, int64_t rows, int64_t cols, int64_t ld, uint64_t key,
                                      double half_width) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    out[r * ld + c] = __float2bfloat16_rn(synthetic_value(key, uint64_t(i), half_width));
  }
}

__global__ void synthetic_f32_kernel(float* out, int64_t n, uint64_t key, double half_width) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = synthetic_value(key, uint64_t(i), half_width);
}

inline void synthetic_bf16(bf16* out, int64_t rows, int64_t cols, int64_t ld, uint64_t key, double half_width,
                           cudaStream_t st) {
  synthetic_bf16_kernel<<<elementwise_blocks(rows * cols), 256, 0, st>>>(out, rows, cols, ld, key, half_width);
  GEMMA_LAUNCHED("synthetic_bf16_kernel");
}

inline void synthetic_f32(float* out, int64_t n, uint64_t key, double half_width, cudaStream_t st) {
  synthetic_f32_kernel<<<elementwise_blocks(n), 256, 0, st>>>(out, n, key, half_width);
  GEMMA_LAUNCHED("synthetic_f32_kernel");
}

}  // namespace
}  // namespace gemma::fast
