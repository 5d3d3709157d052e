// RMSNorm: y = x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32, one block per row; backward with the weight
// gradient (dw = sum over rows of dy * xhat; frozen under LoRA, computed for full finetuning and tested).
// Cast points (reference rmsnorm_forward/backward): norm_in f32 (the fp32 residual, or a bf16 product output,
// read exactly), norm_scale f32 (1 + w, precomputed once per weight), norm_normed f32 (x * r), norm_out f32;
// the input norms then round to bf16 (matmul_in), the post norms add in fp32 to the residual (residual f32).
// Backward: the incoming gradient is read as bf16 (grad_act, rounding an fp32 product sum here if needed), the
// result is rounded to bf16 (grad_act), and where the reference adds it to the residual gradient, the sum is
// rounded again (dx += dtmp; cast).
#pragma once
#include "fast/common.cuh"

namespace gemma::fast {
namespace {

// An fp32 value arriving here is a product sum the reference rounds to bf16 before the norm sees it.
__device__ __forceinline__ float grad_in(float x) { return round_bf16(x); }
__device__ __forceinline__ float grad_in(bf16 x) { return __bfloat162float(x); }

constexpr int kNormThreads = 256;

// scale = 1 + w (fp32, exact for bf16 w of the sizes norms have), or w itself under the rmsnorm-plain-weight fault.
__global__ void norm_scale_kernel(float* scale, const bf16* w, int64_t D, bool plain) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < D; j += int64_t(gridDim.x) * blockDim.x)
    scale[j] = plain ? __bfloat162float(w[j]) : __fadd_rn(1.0f, __bfloat162float(w[j]));
}

// What both kernel widths compute per row and per element: they differ in the order of the fp32 sums, and may
// differ in where the compiler contracts a multiply and an add.
// 1/rms from the fp32 sum of squares of the row's D values.
__device__ __forceinline__ float norm_rstd(float ss, int64_t D, float eps) { return 1.0f / sqrtf(ss / float(D) + eps); }
// One output: x r (1 + w), plus the residual (fp32) for the post norms.
template <bool RES>
__device__ __forceinline__ float norm_out(float x, float r, float scale, float res) {
  const float xhat = __fmul_rn(x, r);
  float y = __fmul_rn(xhat, scale);
  if constexpr (RES) y = __fadd_rn(res, y);
  return y;
}
// One input gradient: r (g - xhat mean) with g = dout (1 + w), xhat = x r.
__device__ __forceinline__ float norm_dx(float g, float xhat, float r, float mean) { return r * (g - xhat * mean); }
// What is stored: bf16(d), or with ACC bf16(dres + bf16(d)) (the reference's dx += dtmp, then its cast).
template <bool ACC>
__device__ __forceinline__ bf16 norm_dx_store(float d, bf16 dres) {
  if constexpr (ACC) return __float2bfloat16_rn(__fadd_rn(__bfloat162float(dres), round_bf16(d)));
  return __float2bfloat16_rn(d);
}

// RES: out = res + norm(x) (the post norms' residual add, fp32); otherwise out = norm(x) in TOut.
template <class TIn, class TOut, bool RES>
__global__ void __launch_bounds__(kNormThreads) rmsnorm_forward_kernel(TOut* out,          // (N, D)
                                                                       float* rstd,        // (N)
                                                                       const TIn* x,       // (N, D)
                                                                       const float* scale, // (D)
                                                                       const float* res,   // (N, D) when RES
                                                                       int64_t D, float eps) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const TIn* xr = x + row * D;
  float ss = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float v = to_f(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float r = norm_rstd(ss, D, eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x)
    out[row * D + j] = from_f<TOut>(norm_out<RES>(to_f(xr[j]), r, scale[j], RES ? res[row * D + j] : 0.0f));
}

// ACC: dres = bf16(dres + bf16(dx)); otherwise dx_out = bf16(dx).
template <class TD, class TX, bool ACC>
__global__ void __launch_bounds__(kNormThreads) rmsnorm_backward_kernel(bf16* dx,            // (N, D)
                                                                        const TD* dout,      // (N, D)
                                                                        const TX* x,         // (N, D) forward input
                                                                        const float* rstd,   // (N)
                                                                        const float* scale,  // (D)
                                                                        int64_t D) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const float r = rstd[row];
  const TD* dr = dout + row * D;
  const TX* xr = x + row * D;
  float dot = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float g = grad_in(dr[j]) * scale[j];
    dot += g * (to_f(xr[j]) * r);
  }
  dot = block_sum(dot, scratch);
  const float mean = dot / float(D);
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float g = grad_in(dr[j]) * scale[j];
    const float xhat = to_f(xr[j]) * r;
    dx[row * D + j] = norm_dx_store<ACC>(norm_dx(g, xhat, r, mean), ACC ? dx[row * D + j] : bf16{});
  }
}

// The same two kernels eight elements per thread, one thread per eight (blockDim = D / 8 rounded up to whole
// warps, at most 1024): each element is read once, with 16-byte accesses, and kept in registers between the
// row's sum and its outputs. They apply where D is a multiple of 8, D <= 8192 and the pointers are 16-byte
// aligned (every released width: 2304, 3584, 4608); the kernels above cover the rest.
__device__ __forceinline__ void ld8(const float* p, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void ld8(const bf16* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const bf16* h = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = __bfloat162float(h[e]);
}
__device__ __forceinline__ void st8(float* p, const float (&v)[8]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void st8(bf16* p, const float (&v)[8]) {
  uint4 raw;
  bf16* h = reinterpret_cast<bf16*>(&raw);
#pragma unroll
  for (int e = 0; e < 8; ++e) h[e] = __float2bfloat16_rn(v[e]);
  *reinterpret_cast<uint4*>(p) = raw;
}

template <class TIn, class TOut, bool RES>
__global__ void __launch_bounds__(1024) rmsnorm_forward_vec_kernel(TOut* out, float* rstd, const TIn* x,
                                                                   const float* scale, const float* res, int64_t D,
                                                                   float eps) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x, j = int64_t(threadIdx.x) * 8;
  const bool on = j < D;
  float v[8] = {};
  if (on) ld8(x + row * D + j, v);
  float ss = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) ss += v[e] * v[e];
  ss = block_sum(ss, scratch);
  const float r = norm_rstd(ss, D, eps);
  if (threadIdx.x == 0) rstd[row] = r;
  if (!on) return;
  float sc[8], rs[8] = {}, y[8];
  ld8(scale + j, sc);
  if constexpr (RES) ld8(res + row * D + j, rs);
#pragma unroll
  for (int e = 0; e < 8; ++e) y[e] = norm_out<RES>(v[e], r, sc[e], rs[e]);
  st8(out + row * D + j, y);
}

template <class TD, class TX, bool ACC>
__global__ void __launch_bounds__(1024) rmsnorm_backward_vec_kernel(bf16* dx, const TD* dout, const TX* x,
                                                                    const float* rstd, const float* scale,
                                                                    int64_t D) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x, j = int64_t(threadIdx.x) * 8;
  const bool on = j < D;
  const float r = rstd[row];
  float g[8] = {}, xh[8] = {};
  if (on) {
    float sc[8];
    ld8(dout + row * D + j, g);
    ld8(x + row * D + j, xh);
    ld8(scale + j, sc);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      g[e] = round_bf16(g[e]) * sc[e];  // grad_in: exact for a bf16 dout, the reference's rounding for fp32
      xh[e] = xh[e] * r;
    }
  }
  float dot = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) dot += g[e] * xh[e];
  dot = block_sum(dot, scratch);
  const float mean = dot / float(D);
  if (!on) return;
  uint4 raw = {};
  if constexpr (ACC) raw = *reinterpret_cast<const uint4*>(dx + row * D + j);
  bf16* h = reinterpret_cast<bf16*>(&raw);
#pragma unroll
  for (int e = 0; e < 8; ++e) h[e] = norm_dx_store<ACC>(norm_dx(g[e], xh[e], r, mean), h[e]);
  *reinterpret_cast<uint4*>(dx + row * D + j) = raw;
}

inline bool norm_vec(int64_t D, std::initializer_list<const void*> ptrs) {
  return D % 8 == 0 && D <= 8192 && aligned16(ptrs);
}
inline unsigned norm_vec_threads(int64_t D) { return unsigned((D / 8 + 31) / 32 * 32); }

// dw[j] += sum over rows, in row order, of dout * xhat: one thread per column, so the sum's order is fixed.
template <class TD, class TX>
__global__ void rmsnorm_dw_kernel(float* dw, const TD* dout, const TX* x, const float* rstd, int64_t N, int64_t D) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= D) return;
  float s = 0;
  for (int64_t n = 0; n < N; ++n) s += grad_in(dout[n * D + j]) * (to_f(x[n * D + j]) * rstd[n]);
  dw[j] += s;
}

// Launchers ------------------------------------------------------------------------------------------------

inline void norm_scale(float* scale, const bf16* w, int64_t D, cudaStream_t st) {
  norm_scale_kernel<<<elementwise_blocks(D), 256, 0, st>>>(scale, w, D, faults().rmsnorm_plain_weight);
  GEMMA_LAUNCHED("norm_scale_kernel");
}

// Input norms (input_layernorm, pre_feedforward_layernorm, the final norm): fp32 residual in, bf16 out.
inline void rmsnorm_forward_in(bf16* out, float* rstd, const float* x, const float* scale, int64_t N, int64_t D,
                               float eps, cudaStream_t st) {
  if (N == 0) return;
  if (norm_vec(D, {out, x, scale})) {
    rmsnorm_forward_vec_kernel<float, bf16, false>
        <<<unsigned(N), norm_vec_threads(D), 0, st>>>(out, rstd, x, scale, nullptr, D, eps);
    GEMMA_LAUNCHED("rmsnorm_forward_vec_kernel<f32,bf16>");
    return;
  }
  rmsnorm_forward_kernel<float, bf16, false><<<unsigned(N), kNormThreads, 0, st>>>(out, rstd, x, scale, nullptr, D, eps);
  GEMMA_LAUNCHED("rmsnorm_forward_kernel<f32,bf16>");
}

// Post norms (post_attention_layernorm, post_feedforward_layernorm): bf16 product in, out = res + norm (fp32).
inline void rmsnorm_forward_post(float* out, float* rstd, const bf16* x, const float* scale, const float* res,
                                 int64_t N, int64_t D, float eps, cudaStream_t st) {
  if (N == 0) return;
  if (norm_vec(D, {out, x, scale, res})) {
    rmsnorm_forward_vec_kernel<bf16, float, true><<<unsigned(N), norm_vec_threads(D), 0, st>>>(out, rstd, x, scale, res, D, eps);
    GEMMA_LAUNCHED("rmsnorm_forward_vec_kernel<bf16,f32,res>");
    return;
  }
  rmsnorm_forward_kernel<bf16, float, true><<<unsigned(N), kNormThreads, 0, st>>>(out, rstd, x, scale, res, D, eps);
  GEMMA_LAUNCHED("rmsnorm_forward_kernel<bf16,f32,res>");
}

// Post norms' backward: bf16 residual gradient in, bf16 gradient of the product output out.
inline void rmsnorm_backward_post(bf16* dx, const bf16* dout, const bf16* x, const float* rstd, const float* scale,
                                  int64_t N, int64_t D, cudaStream_t st) {
  if (N == 0) return;
  if (norm_vec(D, {dx, dout, x, scale})) {
    rmsnorm_backward_vec_kernel<bf16, bf16, false><<<unsigned(N), norm_vec_threads(D), 0, st>>>(dx, dout, x, rstd, scale, D);
    GEMMA_LAUNCHED("rmsnorm_backward_vec_kernel<bf16,bf16>");
    return;
  }
  rmsnorm_backward_kernel<bf16, bf16, false><<<unsigned(N), kNormThreads, 0, st>>>(dx, dout, x, rstd, scale, D);
  GEMMA_LAUNCHED("rmsnorm_backward_kernel<bf16,bf16>");
}

// Input norms' backward: fp32 product sum in (rounded to bf16 on read), added to the residual gradient dres.
inline void rmsnorm_backward_in(bf16* dres, const float* dout, const float* x, const float* rstd, const float* scale,
                                int64_t N, int64_t D, cudaStream_t st) {
  if (N == 0) return;
  if (norm_vec(D, {dres, dout, x, scale})) {
    rmsnorm_backward_vec_kernel<float, float, true><<<unsigned(N), norm_vec_threads(D), 0, st>>>(dres, dout, x, rstd, scale, D);
    GEMMA_LAUNCHED("rmsnorm_backward_vec_kernel<f32,f32,acc>");
    return;
  }
  rmsnorm_backward_kernel<float, float, true><<<unsigned(N), kNormThreads, 0, st>>>(dres, dout, x, rstd, scale, D);
  GEMMA_LAUNCHED("rmsnorm_backward_kernel<f32,f32,acc>");
}

// Final norm's backward: bf16 gradient from the LM head in, the residual gradient out (overwritten).
inline void rmsnorm_backward_final(bf16* dres, const bf16* dout, const float* x, const float* rstd, const float* scale,
                                   int64_t N, int64_t D, cudaStream_t st) {
  if (N == 0) return;
  if (norm_vec(D, {dres, dout, x, scale})) {
    rmsnorm_backward_vec_kernel<bf16, float, false><<<unsigned(N), norm_vec_threads(D), 0, st>>>(dres, dout, x, rstd, scale, D);
    GEMMA_LAUNCHED("rmsnorm_backward_vec_kernel<bf16,f32>");
    return;
  }
  rmsnorm_backward_kernel<bf16, float, false><<<unsigned(N), kNormThreads, 0, st>>>(dres, dout, x, rstd, scale, D);
  GEMMA_LAUNCHED("rmsnorm_backward_kernel<bf16,f32>");
}

template <class TD, class TX>
inline void rmsnorm_dw(float* dw, const TD* dout, const TX* x, const float* rstd, int64_t N, int64_t D,
                       cudaStream_t st) {
  rmsnorm_dw_kernel<TD, TX><<<unsigned((D + 127) / 128), 128, 0, st>>>(dw, dout, x, rstd, N, D);
  GEMMA_LAUNCHED("rmsnorm_dw_kernel");
}

}  // namespace
}  // namespace gemma::fast
