// Projections with LoRA adapters, a group at a time (q|k|v, o, gate|up, down: the projections sharing an input):
// y = x W^T (the group's base weights fused into one bf16 matrix, one cuBLAS product) plus, per adapter,
// s (x A^T) B^T with A and B the fp32 masters. Every product runs on bf16 tensor cores with fp32 accumulation:
// A, B and the fp32 intermediates (xa = x A^T, dxa = s dy B) enter as their exact three-way bf16 splits
// (common.cuh). x A^T over the split of A is exact up to fp32 accumulation order; xa B^T keeps the six pairs
// of split terms whose product is at least 2^-16 of the leading one (the dropped three are below 2^-24, fp32's
// own rounding). So the adapter branch is fp32 throughout, like PEFT's fp32 adapters, and matches the reference's
// cast points: lora_mid f32, lora_out f32 (the adapter term stays fp32 up to its add), matmul_out bf16 twice: the base
// product rounded, then bf16(base + adapter term) rounded once by lora_out_add_kernel (or, for a rank it does not
// take, lora_add_kernel after the term's product into fp32). (Letting cuBLAS add the term
// into the bf16 output with beta = 1 does not do that: measured on the H200, 18% of the outputs differed from
// the single fp32 add and rounding, up to 2 ulps, while every fp32 output agreed to 1e-7.)
// adapters f32, grads f32.
//
// Layouts. One bf16 copy per master, in the backward's layout, whose middle blocks are the forward's operand:
// Abwd = [A1; A1; A1; A2; A3; A2] (6r, in) per adapter, rows [2r, 5r) = [A1; A2; A3]; Bfwd = [B1 B1 B1 B2 B3 B2]
// (out, 6r), columns [2r, 5r) = [B1 B2 B3]. Forward: the three fp32 partials x Ai^T (one product with rows
// [2r, 5r) of Abwd) are summed into xa and written as L = [s1 s2 s3 s1 s1 s2] (N, 6r per adapter), then
// y += s L Bfwd^T: pairs (1,1) (2,1) (3,1) (1,2) (1,3) (2,2). Backward: dxa = s dy [B1 B2 B3] summed the same
// way into Lb = [d1 d2 d3 d1 d1 d2], dx += Lb Abwd; dA = sum_i di^T x and dB = s sum_i dy^T si come from the
// first 3r columns of Lb and L.
#pragma once
#include <algorithm>
#include <functional>
#include <vector>

#include "fast/gemm.cuh"
#include "fast/mma.cuh"

namespace gemma::fast {
namespace {

struct LoraProjDev {
  int64_t out = 0, col = 0;   // output width and first column in the group's fused output
  float* A = nullptr;         // (r, in) fp32 master
  float* B = nullptr;         // (out, r)
  float* gA = nullptr;        // (r, in) fp32 gradient, accumulated over micro-batches
  float* gB = nullptr;        // (out, r)
  bf16* Bfwd = nullptr;       // (out, 6r)
};

struct LoraGroupDev {
  int64_t in = 0, out_total = 0;
  const bf16* W = nullptr;           // (out_total, in) fused base weight
  std::vector<LoraProjDev> projs;    // the adapted projections of the group, in HF order
  bf16* Abwd = nullptr;              // (6r * np, in)
};

__global__ void lora_prepare_A_kernel(bf16* Abwd, const float* A, int r, int64_t in, int pi) {
  const int64_t total = int64_t(r) * in;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i / in, j = i - c * in;
    bf16 h[3];
    split3(A[i], h[0], h[1], h[2]);
    const int pick[6] = {0, 0, 0, 1, 2, 1};
#pragma unroll
    for (int blk = 0; blk < 6; ++blk) Abwd[((int64_t(pi) * 6 + blk) * r + c) * in + j] = h[pick[blk]];
  }
}

__global__ void lora_prepare_B_kernel(bf16* Bfwd, const float* B, int r, int64_t out) {
  const int64_t total = out * r;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = i / r, c = i - o * r;
    bf16 h[3];
    split3(B[i], h[0], h[1], h[2]);
    const int pick[6] = {0, 0, 0, 1, 2, 1};
#pragma unroll
    for (int blk = 0; blk < 6; ++blk) Bfwd[o * 6 * r + blk * r + c] = h[pick[blk]];
  }
}

// part (N, 3r per adapter) holds three fp32 partial products; L (N, 6r per adapter) gets the split of
// scale * (p1 + p2 + p3) in the [s1 s2 s3 s1 s1 s2] layout.
__global__ void lora_split_kernel(bf16* L, const float* part, int64_t N, int r, int np, float scale) {
  const int64_t total = N * np * r;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(i % r);
    const int pi = int((i / r) % np);
    const int64_t n = i / (int64_t(r) * np);
    const float* pp = part + n * (3 * int64_t(r) * np) + int64_t(pi) * 3 * r + c;
    const float x = __fmul_rn(__fadd_rn(__fadd_rn(pp[0], pp[r]), pp[2 * r]), scale);
    bf16 h1, h2, h3;
    split3(x, h1, h2, h3);
    bf16* Lp = L + n * (6 * int64_t(r) * np) + int64_t(pi) * 6 * r + c;
    Lp[0] = h1;
    Lp[r] = h2;
    Lp[2 * r] = h3;
    Lp[3 * r] = h1;
    Lp[4 * r] = h1;
    Lp[5 * r] = h2;
  }
}

// The adapter term d added to the rounded base product y in fp32; the caller rounds the sum to bf16 once. Both
// adapter-add kernels (lora_add_kernel, lora_out_add_kernel) go through it.
__device__ __forceinline__ float lora_sum(float y, float d) { return __fadd_rn(y, d); }

// y = bf16(y + delta) over an (N, cols) block of the group's output: the one rounding of base + adapter term.
// Two elements per thread (4- and 8-byte accesses) when the widths are even, as they are at every released width.
__global__ void lora_add_kernel(bf16* y, const float* delta, int64_t N, int64_t cols, int64_t ld) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (cols % 2 == 0 && ld % 2 == 0 && (reinterpret_cast<uintptr_t>(y) & 3) == 0 &&
      (reinterpret_cast<uintptr_t>(delta) & 7) == 0) {
    const int64_t half = cols / 2, total = N * half;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += stride) {
      const int64_t n = i / half, j = 2 * (i - n * half);
      __nv_bfloat162* py = reinterpret_cast<__nv_bfloat162*>(y + n * ld + j);
      const float2 d = *reinterpret_cast<const float2*>(delta + n * ld + j);
      const float2 v = __bfloat1622float2(*py);
      *py = __floats2bfloat162_rn(lora_sum(v.x, d.x), lora_sum(v.y, d.y));
    }
    return;
  }
  const int64_t total = N * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += stride) {
    const int64_t n = i / cols, j = i - n * cols;
    y[n * ld + j] = __float2bfloat16_rn(lora_sum(__bfloat162float(y[n * ld + j]), delta[n * ld + j]));
  }
}

// The forward's adapter term and its add in one kernel: y (N, out; row stride ldy) = bf16(y + fl(s acc)) with
// acc = L B^T in fp32 over K = 6r (L: a group's split xa for one adapter, (N, K), row stride ldl; B: its Bfwd,
// (out, K)). The same arithmetic as the product into fp32 (alpha = s) followed by lora_add_kernel, without the
// fp32 term's round trip through memory (8 of the 12 bytes moved per output). A block per 128 x 128 output
// tile holds the whole K of both operand tiles in shared memory (K <= 384, so r <= 64); eight warps of 64 x 32
// outputs, mma.sync m16n8k16 fed by ldmatrix; the fp32 terms then go through shared memory so that y is read
// and written in whole 16-byte pieces. lora_out_fused says when it applies. (A first version added straight
// from the accumulator registers, 4 bytes and one dependent load per pair: on the H200 it made the 9b step
// take 362 ms instead of 324 with the product into fp32 and lora_add_kernel.)
constexpr int kLoraOutTile = 128, kLoraOutThreads = 256, kLoraOutMaxK = 384, kLoraOutLdc = 136;
// Shared memory: the two operand tiles, later the fp32 output tile.
inline int lora_out_smem(int K) {
  return std::max(2 * kLoraOutTile * (K + 8) * 2, kLoraOutTile * kLoraOutLdc * 4);
}

__global__ void __launch_bounds__(kLoraOutThreads, 2) lora_out_add_kernel(bf16* y, int64_t ldy, const bf16* L,
                                                                          int64_t ldl, const bf16* B, int K,
                                                                          int64_t N, int64_t out, float s) {
  extern __shared__ __align__(16) unsigned char smem_lora[];
  const int LDS = K + 8;  // 16-byte rows for ldmatrix, and a 4-bank shift per row: no bank conflicts
  bf16* Ls = reinterpret_cast<bf16*>(smem_lora);
  bf16* Bs = Ls + kLoraOutTile * LDS;
  const int64_t n0 = int64_t(blockIdx.y) * kLoraOutTile, o0 = int64_t(blockIdx.x) * kLoraOutTile;
  const int chunks = K / 8;
  // Both operand tiles by cp.async, rows past N or out zero-filled (every sum stays exact), all in flight at once.
  for (int idx = threadIdx.x; idx < kLoraOutTile * chunks; idx += kLoraOutThreads) {
    const int rr = idx / chunks, c = (idx - rr * chunks) * 8;
    const bool lok = n0 + rr < N, bok = o0 + rr < out;
    cp_async16(smem_addr(Ls + rr * LDS + c), L + (lok ? n0 + rr : 0) * ldl + c, lok);
    cp_async16(smem_addr(Bs + rr * LDS + c), B + (bok ? o0 + rr : 0) * K + c, bok);
  }
  cp_commit();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wr = (warp >> 2) * 64, wc = (warp & 3) * 32;  // the warp's rows and columns within the tile
  cp_wait<0>();
  __syncthreads();
  const int m = lane >> 3, rr = lane & 7;
  float acc[4][4][4] = {};
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t a[4][4], b[4][2];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) ldmatrix_x4(a[mt], Ls + (wr + mt * 16 + rr + 8 * (m & 1)) * LDS + k0 + 8 * (m >> 1));
#pragma unroll
    for (int nt = 0; nt < 4; nt += 2) {  // matrices (n-tile nt, k0), (nt, k0 + 8), (nt + 1, k0), (nt + 1, k0 + 8)
      uint32_t q[4];
      ldmatrix_x4(q, Bs + (wc + (nt + (m >> 1)) * 8 + rr) * LDS + k0 + 8 * (m & 1));
      b[nt][0] = q[0];
      b[nt][1] = q[1];
      b[nt + 1][0] = q[2];
      b[nt + 1][1] = q[3];
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) mma16816(acc[mt][nt], a[mt], b[nt]);
  }
  // Epilogue through shared memory (the operand tiles are spent): s * acc in fp32 per output, then each thread
  // adds 8 consecutive outputs of a row with 16-byte accesses of y. Row stride 136 floats: a half-warp's 8-byte
  // stores (4 rows x 4 column pairs) fall on 32 distinct banks.
  __syncthreads();
  float* Cs = reinterpret_cast<float*>(smem_lora);
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
        *reinterpret_cast<float2*>(Cs + (wr + mt * 16 + g + 8 * hr) * kLoraOutLdc + wc + nt * 8 + 2 * t) =
            make_float2(__fmul_rn(s, acc[mt][nt][2 * hr]), __fmul_rn(s, acc[mt][nt][2 * hr + 1]));
  __syncthreads();
  const bool vec = (ldy & 7) == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0;
  constexpr int kIters = kLoraOutTile * kLoraOutTile / 8 / kLoraOutThreads;
  uint4 raw[kIters];  // every load of y issued before any store: one memory round trip, not kIters
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int idx = threadIdx.x + it * kLoraOutThreads, row = idx >> 4, c = (idx & 15) * 8;
    const int64_t n = n0 + row, o = o0 + c;
    if (vec && n < N && o + 8 <= out) raw[it] = *reinterpret_cast<const uint4*>(y + n * ldy + o);
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int idx = threadIdx.x + it * kLoraOutThreads, row = idx >> 4, c = (idx & 15) * 8;
    const int64_t n = n0 + row, o = o0 + c;
    if (n >= N || o >= out) continue;
    const float* d = Cs + row * kLoraOutLdc + c;
    bf16* py = y + n * ldy + o;
    if (vec && o + 8 <= out) {
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw[it]);
      const float4 d0 = *reinterpret_cast<const float4*>(d), d1 = *reinterpret_cast<const float4*>(d + 4);
      const float dd[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 v = __bfloat1622float2(h[e]);
        h[e] = __floats2bfloat162_rn(lora_sum(v.x, dd[2 * e]), lora_sum(v.y, dd[2 * e + 1]));
      }
      *reinterpret_cast<uint4*>(py) = raw[it];
    } else {
      for (int e = 0; e < 8 && o + e < out; ++e)
        py[e] = __float2bfloat16_rn(lora_sum(__bfloat162float(py[e]), d[e]));
    }
  }
}

// lora_out_add_kernel takes K = 6r in 16-wide steps of whole 16-byte rows, all of it in shared memory (up to
// 200 KB at K = 384, within sm_90's 227 KB per block: the only target this is built for), and N rows in at most
// 65535 row tiles of the grid's y (8.4 M tokens in one micro-batch).
inline bool lora_out_fused(int r, int64_t N, int64_t ldl, const bf16* L, const bf16* B) {
  const int K = 6 * r;
  return K % 16 == 0 && K <= kLoraOutMaxK && (N + kLoraOutTile - 1) / kLoraOutTile <= 65535 && ldl % 8 == 0 &&
         (reinterpret_cast<uintptr_t>(L) & 15) == 0 && (reinterpret_cast<uintptr_t>(B) & 15) == 0;
}

inline void lora_out_add(bf16* y, int64_t ldy, const bf16* L, int64_t ldl, const bf16* B, int r, int64_t N,
                         int64_t out, float s, cudaStream_t st) {
  const int K = 6 * r, smem = lora_out_smem(K);
  GEMMA_CUDA(cudaFuncSetAttribute(lora_out_add_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(unsigned((out + kLoraOutTile - 1) / kLoraOutTile), unsigned((N + kLoraOutTile - 1) / kLoraOutTile));
  lora_out_add_kernel<<<grid, kLoraOutThreads, smem, st>>>(y, ldy, L, ldl, B, K, N, out, s);
  GEMMA_LAUNCHED("lora_out_add_kernel");
}

// grad (R, C) += scale * (part_0 + part_1 + part_2), the three blocks block_stride apart, rows ld_part apart.
__global__ void lora_grad_accum_kernel(float* grad, const float* part, int64_t R, int64_t C, int64_t ld_part,
                                       int64_t block_stride, float scale) {
  const int64_t total = R * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t rr = i / C, cc = i - rr * C;
    const float* pp = part + rr * ld_part + cc;
    grad[i] += __fmul_rn(__fadd_rn(__fadd_rn(pp[0], pp[block_stride]), pp[2 * block_stride]), scale);
  }
}

// Launchers ------------------------------------------------------------------------------------------------

// Re-derives the bf16 splits from the fp32 masters (after loading them, and after every optimizer step).
inline void lora_prepare(const LoraGroupDev& g, int r, cudaStream_t st) {
  for (size_t pi = 0; pi < g.projs.size(); ++pi) {
    const LoraProjDev& P = g.projs[pi];
    lora_prepare_A_kernel<<<elementwise_blocks(int64_t(r) * g.in), 256, 0, st>>>(g.Abwd, P.A, r, g.in, int(pi));
    GEMMA_LAUNCHED("lora_prepare_A_kernel");
    lora_prepare_B_kernel<<<elementwise_blocks(P.out * r), 256, 0, st>>>(P.Bfwd, P.B, r, P.out);
    GEMMA_LAUNCHED("lora_prepare_B_kernel");
  }
}

inline void lora_split(bf16* L, const float* part, int64_t N, int r, int np, float scale, cudaStream_t st) {
  lora_split_kernel<<<elementwise_blocks(N * np * r), 256, 0, st>>>(L, part, N, r, np, scale);
  GEMMA_LAUNCHED("lora_split_kernel");
}

inline void lora_grad_accum(float* grad, const float* part, int64_t R, int64_t C, int64_t ld_part,
                            int64_t block_stride, float scale, cudaStream_t st) {
  lora_grad_accum_kernel<<<elementwise_blocks(R * C), 256, 0, st>>>(grad, part, R, C, ld_part, block_stride, scale);
  GEMMA_LAUNCHED("lora_grad_accum_kernel");
}

// y (N, out_total) bf16 = x W^T + per adapter s xa B^T; L (N, 6r*np) keeps the split xa for the backward;
// part (N, 3r*np) and delta (N, out_total) fp32 scratch.
// after_base (optional) runs between the base product and the adapter terms (the profiler's mark).
inline void group_forward(cublasHandle_t h, const LoraGroupDev& g, int r, float s, const bf16* x, int64_t N, bf16* y,
                          bf16* L, float* part, float* delta, cudaStream_t st,
                          const std::function<void()>& after_base = {}) {
  gemm(h, N, g.out_total, g.in, {x, g.in, false}, {g.W, g.in, true}, y, false, g.out_total, 1.0f, 0.0f);
  if (after_base) after_base();
  const int np = int(g.projs.size());
  if (np == 0 || N == 0) return;
  const int64_t r3 = 3 * int64_t(r), w3 = r3 * np, w6 = 2 * w3;
  for (int pi = 0; pi < np; ++pi)
    gemm(h, N, r3, g.in, {x, g.in, false}, {g.Abwd + (pi * 2 * r3 + 2 * int64_t(r)) * g.in, g.in, true},
         part + pi * r3, true, w3, 1.0f, 0.0f);
  lora_split(L, part, N, r, np, 1.0f, st);
  for (int pi = 0; pi < np; ++pi) {
    const LoraProjDev& P = g.projs[size_t(pi)];
    if (lora_out_fused(r, N, w6, L + pi * 2 * r3, P.Bfwd)) {
      lora_out_add(y + P.col, g.out_total, L + pi * 2 * r3, w6, P.Bfwd, r, N, P.out, s, st);
      continue;
    }
    gemm(h, N, P.out, 2 * r3, {L + pi * 2 * r3, w6, false}, {P.Bfwd, 2 * r3, true}, delta + P.col, true, g.out_total,
         s, 0.0f);
    lora_add_kernel<<<elementwise_blocks(N * P.out), 256, 0, st>>>(y + P.col, delta + P.col, N, P.out, g.out_total);
    GEMMA_LAUNCHED("lora_add_kernel");
  }
}

// dx (N, in) fp32 = dy W + per adapter dxa A (the caller rounds it to bf16 where the reference does); the adapter
// gradients are accumulated into gA, gB. L is the forward's split xa; part, Lb, gpart are scratch:
// part (N, 3r*np) fp32, Lb (N, 6r*np) bf16, gpart (3r * max(in, out)) fp32.
inline void group_backward(cublasHandle_t h, const LoraGroupDev& g, int r, float s, const bf16* x, const bf16* dy,
                           const bf16* L, int64_t N, float* dx, float* part, bf16* Lb, float* gpart, cudaStream_t st,
                           const std::function<void()>& after_base = {}) {
  gemm(h, N, g.in, g.out_total, {dy, g.out_total, false}, {g.W, g.in, false}, dx, true, g.in, 1.0f, 0.0f);
  if (after_base) after_base();
  const int np = int(g.projs.size());
  if (np == 0 || N == 0) return;
  const int64_t r3 = 3 * int64_t(r), w3 = r3 * np, w6 = 2 * w3;
  for (int pi = 0; pi < np; ++pi) {
    const LoraProjDev& P = g.projs[size_t(pi)];
    gemm(h, N, r3, P.out, {dy + P.col, g.out_total, false}, {P.Bfwd + 2 * int64_t(r), 6 * int64_t(r), false},
         part + pi * r3, true, w3, 1.0f, 0.0f);
  }
  lora_split(Lb, part, N, r, np, s, st);
  gemm(h, N, g.in, w6, {Lb, w6, false}, {g.Abwd, g.in, false}, dx, true, g.in, 1.0f, 1.0f);
  for (int pi = 0; pi < np; ++pi) {
    const LoraProjDev& P = g.projs[size_t(pi)];
    // dA (r, in): the three row blocks of [d1 d2 d3]^T x.
    gemm(h, r3, g.in, N, {Lb + pi * 2 * r3, w6, true}, {x, g.in, false}, gpart, true, g.in, 1.0f, 0.0f);
    lora_grad_accum(P.gA, gpart, r, g.in, g.in, int64_t(r) * g.in, 1.0f, st);
    // dB (out, r): the three column blocks of dy^T [s1 s2 s3], times s.
    gemm(h, P.out, r3, N, {dy + P.col, g.out_total, true}, {L + pi * 2 * r3, w6, false}, gpart, true, r3, 1.0f, 0.0f);
    lora_grad_accum(P.gB, gpart, P.out, r, r3, r, s, st);
  }
}

}  // namespace
}  // namespace gemma::fast
