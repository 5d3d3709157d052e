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
  const float r = 1.0f / sqrtf(ss / float(D) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float xhat = __fmul_rn(to_f(xr[j]), r);
    float y = __fmul_rn(xhat, scale[j]);
    if constexpr (RES) y = __fadd_rn(res[row * D + j], y);
    out[row * D + j] = from_f<TOut>(y);
  }
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
    const float d = r * (g - xhat * mean);
    if constexpr (ACC)
      dx[row * D + j] = __float2bfloat16_rn(__fadd_rn(__bfloat162float(dx[row * D + j]), round_bf16(d)));
    else
      dx[row * D + j] = __float2bfloat16_rn(d);
  }
}

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
  rmsnorm_forward_kernel<float, bf16, false><<<unsigned(N), kNormThreads, 0, st>>>(out, rstd, x, scale, nullptr, D, eps);
  GEMMA_LAUNCHED("rmsnorm_forward_kernel<f32,bf16>");
}

// Post norms (post_attention_layernorm, post_feedforward_layernorm): bf16 product in, out = res + norm (fp32).
inline void rmsnorm_forward_post(float* out, float* rstd, const bf16* x, const float* scale, const float* res,
                                 int64_t N, int64_t D, float eps, cudaStream_t st) {
  if (N == 0) return;
  rmsnorm_forward_kernel<bf16, float, true><<<unsigned(N), kNormThreads, 0, st>>>(out, rstd, x, scale, res, D, eps);
  GEMMA_LAUNCHED("rmsnorm_forward_kernel<bf16,f32,res>");
}

// Post norms' backward: bf16 residual gradient in, bf16 gradient of the product output out.
inline void rmsnorm_backward_post(bf16* dx, const bf16* dout, const bf16* x, const float* rstd, const float* scale,
                                  int64_t N, int64_t D, cudaStream_t st) {
  if (N == 0) return;
  rmsnorm_backward_kernel<bf16, bf16, false><<<unsigned(N), kNormThreads, 0, st>>>(dx, dout, x, rstd, scale, D);
  GEMMA_LAUNCHED("rmsnorm_backward_kernel<bf16,bf16>");
}

// Input norms' backward: fp32 product sum in (rounded to bf16 on read), added to the residual gradient dres.
inline void rmsnorm_backward_in(bf16* dres, const float* dout, const float* x, const float* rstd, const float* scale,
                                int64_t N, int64_t D, cudaStream_t st) {
  if (N == 0) return;
  rmsnorm_backward_kernel<float, float, true><<<unsigned(N), kNormThreads, 0, st>>>(dres, dout, x, rstd, scale, D);
  GEMMA_LAUNCHED("rmsnorm_backward_kernel<f32,f32,acc>");
}

// Final norm's backward: bf16 gradient from the LM head in, the residual gradient out (overwritten).
inline void rmsnorm_backward_final(bf16* dres, const bf16* dout, const float* x, const float* rstd, const float* scale,
                                   int64_t N, int64_t D, cudaStream_t st) {
  if (N == 0) return;
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
