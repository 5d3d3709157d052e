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
#include <array>
#include <functional>
#include <map>
#include <queue>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "fast/gemm.cuh"
#include "fast/mma.cuh"
#include "fast/wgmma.cuh"

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

// One adapter matrix's fp32 master into its bf16 split layout: A (r, in) into rows [6r pi, 6r pi + 6r) of its
// group's Abwd (pi: the projection's index in the group), or B (out, r) into its projection's Bfwd.
struct LoraSplitJob {
  const float* src = nullptr;
  bf16* dst = nullptr;
  int64_t n = 0;   // elements of src
  int64_t in = 0;  // A: its columns; B: 0
  int pi = 0;      // A: the projection's index in its group
};
// Every adapter of a layer (four groups, at most seven projections, an A and a B each) in one launch: the
// matrices are small (at 9b about 10 us of memory traffic for the whole layer), and fourteen launches of their
// own took 52 us a layer, twice a step (the forward's and the backward's), 4.4 ms of a 9b step.
constexpr int kLoraSplitJobsMax = 16;
struct LoraSplitJobs {
  LoraSplitJob job[kLoraSplitJobsMax];
  int count = 0;
};

// Block row blockIdx.y does job blockIdx.y; the split layouts are the file comment's.
__global__ void lora_prepare_kernel(LoraSplitJobs jobs, int r) {
  const LoraSplitJob& jb = jobs.job[blockIdx.y];
  const int pick[6] = {0, 0, 0, 1, 2, 1};
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < jb.n; i += int64_t(gridDim.x) * blockDim.x) {
    bf16 h[3];
    split3(jb.src[i], h[0], h[1], h[2]);
    if (jb.in) {  // A: row c, column j into Abwd's six row blocks [A1; A1; A1; A2; A3; A2]
      const int64_t c = i / jb.in, j = i - c * jb.in;
#pragma unroll
      for (int blk = 0; blk < 6; ++blk) jb.dst[((int64_t(jb.pi) * 6 + blk) * r + c) * jb.in + j] = h[pick[blk]];
    } else {  // B: row o, column c into Bfwd's six column blocks [B1 B1 B1 B2 B3 B2]
      const int64_t o = i / r, c = i - o * r;
#pragma unroll
      for (int blk = 0; blk < 6; ++blk) jb.dst[o * 6 * r + blk * r + c] = h[pick[blk]];
    }
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
// fp32 term's round trip through memory (8 of the 12 bytes moved per output).
//
// A block keeps one 128-column tile of B in shared memory and walks down `iters` row tiles of y, copying the next
// tile's L rows and y rows (cp.async, double-buffered) while it multiplies the current one; the fp32 sums are
// added to y's tile in shared memory, and y goes back in whole 16-byte pieces (element by element where a row's
// width or alignment does not allow them). y is read and written once: 4 bytes per output, 70 us for 27b's
// gate_proj at 2 x 1024 on the H200. Two kernels do the product:
// - lora_out_add_wg_kernel (sm_90a, K <= 192, that is r <= 32, and r % 4 == 0): warpgroup MMA on 128-byte
//   swizzled tiles (fast/wgmma.cuh), each of two or three warpgroups 64 rows x 128 columns, m64n128k16; at r = 16 and
//   32 the tiles hold the 3r distinct split columns of L and B and the k steps pick the six pairs from them (half
//   the shared memory and half the L copies), otherwise all 6r, zero-padded to a multiple of 64 (the padded
//   terms are exact zeros);
// - lora_out_add_kernel (everywhere else, K <= 384 and r % 8 == 0): eight warps of 16 MT rows x 32 columns,
//   mma.sync m16n8k16 fed by ldmatrix, row tiles of 32 MT rows with MT the largest of 4, 2, 1 whose buffers fit
//   (lora_out_mt).
// Why wgmma: measured with ncu on the H200, the mma.sync product ran at about 140 TFLOP/s whatever the tiling
// and whether the block streamed or held one tile (83 us for 9b's gate_proj term, 206 us for 27b's, against the
// 27 and 70 us that moving y takes). A first fused kernel added from the accumulator registers with 4-byte
// accesses and made the 9b step slower than the unfused product and add (362 ms against 324).
constexpr int kLoraOutCols = 128, kLoraOutThreads = 256, kLoraOutMaxK = 384, kLoraOutLdy = kLoraOutCols + 8;
// The adapters of one group (the projections sharing an input, at most three: q|k|v) go in one launch: their
// column tiles side by side in the grid's x, so that the small projections fill the multiprocessors the large one
// leaves idle and the group pays one launch (at 9b 2 x 1024 q, k, v took 18, 10 and 10 us in three launches).
struct LoraOutJob {
  bf16* y = nullptr;        // the projection's first output column (row stride ldy)
  const bf16* L = nullptr;  // its split xa, (N, K), row stride ldl
  const bf16* B = nullptr;  // its Bfwd, (out, K)
  int64_t out = 0;          // its output width
  int64_t tile0 = 0;        // its first column tile in the grid
};
constexpr int kLoraOutJobsMax = 4;
struct LoraOutJobs {
  LoraOutJob job[kLoraOutJobsMax];
  int count = 0;
};
// Block column bx's job, and the job's first output column o0 for it.
__device__ __forceinline__ const LoraOutJob& lora_out_job(const LoraOutJobs& jobs, int64_t bx, int64_t& o0) {
  int k = 0;
  while (k + 1 < jobs.count && bx >= jobs.job[k + 1].tile0) ++k;
  o0 = (bx - jobs.job[k].tile0) * kLoraOutCols;
  return jobs.job[k];
}
constexpr int kLoraOutSmemMax = 232448;  // sm_90's opt-in shared memory per block (227 KB)
// lora_out_add_kernel's shared memory at MT: B's tile, two L tiles, two y tiles. Rows of K + 8 and 136 bf16:
// 16-byte aligned for ldmatrix and cp.async, and shifted by 4 banks per row, so that neither ldmatrix nor the
// epilogue's 4-byte accesses (8 rows x 4 column pairs per warp) conflict.
inline int lora_out_smem(int K, int mt) {
  const int rows = 32 * mt;
  return (kLoraOutCols + 2 * rows) * (K + 8) * 2 + 2 * rows * kLoraOutLdy * 2;
}
inline int lora_out_mt(int K) {
  for (int mt : {4, 2, 1})
    if (lora_out_smem(K, mt) <= kLoraOutSmemMax) return mt;
  return 0;
}
constexpr int kLoraWgMaxK = 192;
// lora_out_add_wg_kernel's configuration for rank r (r <= 32, r % 4 == 0). At r % 16 == 0 (R16 = r / 16) its
// tiles hold only the three distinct split blocks, [s1 s2 s3] of L and [B1 B2 B3] of Bfwd (columns [2r, 5r)), and
// each k16 step picks its pair of blocks; otherwise (R16 = 0) they hold all 6r columns, as the mma.sync kernel's
// do. Kp: the tiles' width, the columns held rounded up to whole 64-column panels.
inline int lora_out_wg_r16(int r) { return r % 16 == 0 ? r / 16 : 0; }
inline int lora_out_wg_kp(int r) { return ((lora_out_wg_r16(r) ? 3 * r : 6 * r) + 63) / 64 * 64; }
// Warpgroups per block at Kp, each 64 rows of a row tile (3 where two stages of 192-row tiles fit beside B's tile,
// else 2), and pipeline stages (L and y tiles in flight): two.
__host__ __device__ constexpr int lora_out_wg_groups(int Kp) { return Kp <= 128 ? 3 : 2; }
constexpr int kLoraWgStages = 2;
// lora_out_add_wg_kernel's shared memory: 1024 bytes of alignment slack, B's tile (128 x Kp), and per stage an L
// tile (64 W x Kp, W warpgroups) and a y tile (64 W x 128, unpadded: its 16-byte units are swizzled instead,
// lora_y_at).
inline int lora_out_wg_smem(int Kp) {
  const int rows = 64 * lora_out_wg_groups(Kp);
  return 1024 + 128 * Kp * 2 + kLoraWgStages * (rows * Kp * 2 + rows * kLoraOutCols * 2);
}
// Element (row, col) of a y tile: row stride kLoraOutLdy (kSwz false: the mma.sync kernel, whose epilogue's 4-byte
// accesses, 8 rows x 4 column pairs a warp, the 8-element pad keeps apart), or kLoraOutCols with the 16-byte unit
// col / 8 at unit ^ (row mod 8) (kSwz true: the wgmma kernel, whose ldmatrix / stmatrix read and write a column of
// 16-byte units of 8 consecutive rows, rows 256 bytes apart, in eight different bank groups).
template <bool kSwz>
__device__ __forceinline__ bf16* lora_y_at(bf16* Yt, int row, int col) {
  return kSwz ? Yt + row * kLoraOutCols + ((((col >> 3) ^ (row & 7)) << 3) | (col & 7)) : Yt + row * kLoraOutLdy + col;
}

// Rows [n0, n0 + rows) x columns [o0, o0 + 128) of y into (kLoad: cp.async for whole aligned 16-byte pieces) or
// out of a shared tile laid out as lora_y_at<kSwz>; rows past N and columns past out are not touched. Threads
// tid = 0 .. nthreads - 1 share the work (the block's, or one warpgroup's). The tile's row 0 is row n0 (a multiple
// of 8 when kSwz, so that the swizzle of rows within it is the whole tile's).
template <bool kLoad, bool kSwz = false>
__device__ __forceinline__ void lora_y_tile(bf16* Yt, bf16* y, int64_t ldy, int64_t n0, int64_t o0, int rows,
                                            int64_t N, int64_t out, bool vec, int tid = int(threadIdx.x),
                                            int nthreads = kLoraOutThreads) {
  if constexpr (kSwz) {
    // A whole tile of aligned rows: thread tid moves unit tid mod 16 of rows tid / 16 + j nthreads / 16, the
    // same column and (nthreads a multiple of 128) the same swizzle in every row, so each 16-byte piece costs
    // an address increment. The general loop below took 41 to 45 instructions a piece, and the copies in and out
    // were half of the instructions lora_out_add_wg_kernel issued (ncu, 9b's gate|up at 2 x 4096).
    if (vec && n0 + rows <= N && o0 + kLoraOutCols <= out && nthreads % 128 == 0 && (rows * 16) % nthreads == 0) {
      const int step = nthreads / 16, r0 = tid >> 4, c = (tid & 15) * 8;
      bf16* sh = lora_y_at<true>(Yt, r0, c);
      bf16* gl = y + (n0 + r0) * ldy + o0 + c;
      for (int rr = r0; rr < rows; rr += step, sh += step * kLoraOutCols, gl += step * ldy) {
        if constexpr (kLoad)
          cp_async16(smem_addr(sh), gl, true);
        else
          *reinterpret_cast<uint4*>(gl) = *reinterpret_cast<const uint4*>(sh);
      }
      return;
    }
  }
  for (int idx = tid; idx < rows * (kLoraOutCols / 8); idx += nthreads) {
    const int rr = idx >> 4, c = (idx & 15) * 8;
    const int64_t n = n0 + rr, o = o0 + c;
    if (n >= N || o >= out) continue;
    bf16* sh = lora_y_at<kSwz>(Yt, rr, c);
    bf16* gl = y + n * ldy + o;
    if (vec && o + 8 <= out) {
      if (kLoad)
        cp_async16(smem_addr(sh), gl, true);
      else
        *reinterpret_cast<uint4*>(gl) = *reinterpret_cast<const uint4*>(sh);
    } else {
      for (int e = 0; e < 8 && o + e < out; ++e) {
        if (kLoad)
          sh[e] = gl[e];
        else
          gl[e] = sh[e];
      }
    }
  }
}

// y's tile (row stride kLoraOutLdy) at (row, col), (row, col + 1) += s (a0, a1), each rounded to bf16 once.
__device__ __forceinline__ void lora_y_add2(bf16* Yt, int row, int col, float s, float a0, float a1) {
  auto* p = reinterpret_cast<__nv_bfloat162*>(lora_y_at<false>(Yt, row, col));
  const float2 v = __bfloat1622float2(*p);
  *p = __floats2bfloat162_rn(lora_sum(v.x, __fmul_rn(s, a0)), lora_sum(v.y, __fmul_rn(s, a1)));
}

template <int MT>
__global__ void __launch_bounds__(kLoraOutThreads, 1)
    lora_out_add_kernel(const LoraOutJobs jobs, int64_t ldy, int64_t ldl, int K, int64_t N, float s, int iters) {
  constexpr int TM = 32 * MT;  // rows per tile
  extern __shared__ __align__(16) unsigned char smem_lora[];
  const int LDS = K + 8, chunks = K / 8;
  bf16* Bs = reinterpret_cast<bf16*>(smem_lora);
  bf16* Ls = Bs + kLoraOutCols * LDS;  // [2][TM][LDS]
  bf16* Ys = Ls + 2 * TM * LDS;        // [2][TM][kLoraOutLdy]
  int64_t o0;
  const LoraOutJob& job = lora_out_job(jobs, blockIdx.x, o0);
  bf16* const y = job.y;
  const bf16* const L = job.L;
  const bf16* const B = job.B;
  const int64_t out = job.out, first = int64_t(blockIdx.y) * iters;
  const int64_t left = (N + TM - 1) / TM - first;
  const int n_it = left < iters ? int(left) : iters;
  const bool vec = (ldy & 7) == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0;
  // B's tile, once; its rows past out zero-filled (every sum stays exact).
  for (int idx = threadIdx.x; idx < kLoraOutCols * chunks; idx += kLoraOutThreads) {
    const int rr = idx / chunks, c = (idx - rr * chunks) * 8;
    const bool ok = o0 + rr < out;
    cp_async16(smem_addr(Bs + rr * LDS + c), B + (ok ? o0 + rr : 0) * K + c, ok);
  }
  // Row tile t's L rows (past N zero-filled) and y rows into buffer b.
  auto load = [&](int64_t t, int b) {
    const int64_t n0 = t * TM;
    bf16* Ld = Ls + b * TM * LDS;
    for (int idx = threadIdx.x; idx < TM * chunks; idx += kLoraOutThreads) {
      const int rr = idx / chunks, c = (idx - rr * chunks) * 8;
      const bool ok = n0 + rr < N;
      cp_async16(smem_addr(Ld + rr * LDS + c), L + (ok ? n0 + rr : 0) * ldl + c, ok);
    }
    lora_y_tile<true>(Ys + b * TM * kLoraOutLdy, y, ldy, n0, o0, TM, N, out, vec);
  };
  load(first, 0);
  cp_commit();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wr = (warp >> 2) * 16 * MT, wc = (warp & 3) * 32;  // the warp's rows and columns within the tile
  const int m = lane >> 3, rr = lane & 7;
  for (int it = 0; it < n_it; ++it) {
    const int b = it & 1;
    if (it + 1 < n_it) {  // the next tile's copies go out before this tile's products
      load(first + it + 1, b ^ 1);
      cp_commit();
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    __syncthreads();
    const bf16* Lt = Ls + b * TM * LDS;
    float acc[MT][4][4] = {};
    for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t a[MT][4], bb[4][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], Lt + (wr + mt * 16 + rr + 8 * (m & 1)) * LDS + k0 + 8 * (m >> 1));
#pragma unroll
      for (int nt = 0; nt < 4; nt += 2) {  // matrices (n-tile nt, k0), (nt, k0 + 8), (nt + 1, k0), (nt + 1, k0 + 8)
        uint32_t q[4];
        ldmatrix_x4(q, Bs + (wc + (nt + (m >> 1)) * 8 + rr) * LDS + k0 + 8 * (m & 1));
        bb[nt][0] = q[0];
        bb[nt][1] = q[1];
        bb[nt + 1][0] = q[2];
        bb[nt + 1][1] = q[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma16816(acc[mt][nt], a[mt], bb[nt]);
    }
    // acc[mt][nt][2 hr + j] is output (wr + 16 mt + g + 8 hr, wc + 8 nt + 2 t + j).
    bf16* Yt = Ys + b * TM * kLoraOutLdy;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
          lora_y_add2(Yt, wr + mt * 16 + g + 8 * hr, wc + nt * 8 + 2 * t, s, acc[mt][nt][2 * hr],
                      acc[mt][nt][2 * hr + 1]);
    __syncthreads();
    lora_y_tile<false>(Yt, y, ldy, (first + it) * TM, o0, TM, N, out, vec);
    __syncthreads();  // buffer b is free: the copies issued next iteration (tile it + 2) overwrite it
  }
}

// k16 step kk of lora_out_add_wg_kernel's product: the 16-column block kl of the L tile and kb of the B tile.
// R16 = 0: the tiles hold [s1 s2 s3 s1 s1 s2] and [B1 B1 B1 B2 B3 B2], step kk is block kk of both. R16 > 0 (r =
// 16 R16): they hold [s1 s2 s3] and [B1 B2 B3], and step kk takes the same pair of split blocks, in the same order,
// as step kk of the first layout, so the two accumulate the same products in the same order (the first layout's
// zero-padded steps, which R16 > 0 skips, add exact zeros).
template <int R16>
__device__ __forceinline__ void lora_wg_step(int kk, int& kl, int& kb) {
  if constexpr (R16 == 0) {
    kl = kb = kk;
  } else {
    // The pairs (1,1) (2,1) (3,1) (1,2) (1,3) (2,2): the split blocks of L and of B each step takes.
    constexpr int l_of[6] = {0, 1, 2, 0, 0, 1}, b_of[6] = {0, 0, 0, 1, 2, 1};
    kl = l_of[kk / R16] * R16 + kk % R16;
    kb = b_of[kk / R16] * R16 + kk % R16;
  }
}

// The same on warpgroup MMA (sm_90a; see above): row tiles of 64 W rows (W = lora_out_wg_groups(Kp) warpgroups),
// warpgroup w multiplies rows 64 w .. 64 w + 63; the tiles Kp wide (lora_out_wg_kp; with R16 > 0, 3r columns of L
// and B, lora_wg_step), compile-time constants so that the k steps unroll and the first overwrites the
// accumulators (a zeroing before the products made ptxas serialize them, C7515). After B's tile, which the whole
// block copies, each warpgroup copies, multiplies, adds and stores its own 64 rows of every tile, with its own
// barrier (named barrier 1 + w): they drift apart, so that one's products run while another's add and store.
// The copies run one tile ahead (a second tile ahead, three stages of 128 rows, moved nothing: ncu, 9b's gate|up
// at 2 x 4096); the shared memory goes to a third warpgroup instead, whose warps hide more of each one's waits
// (product, barriers).
template <int Kp, int R16>
__global__ void __launch_bounds__(128 * lora_out_wg_groups(Kp), 1)
    lora_out_add_wg_kernel(const LoraOutJobs jobs, int64_t ldy, int64_t ldl, int K, int64_t N, float s, int iters) {
#ifdef GEMMA_SM90_DEVICE
  constexpr int W = lora_out_wg_groups(Kp), TM = 64 * W, S = kLoraWgStages, kSteps = R16 ? 6 * R16 : Kp / 16;
  constexpr int kUnits = R16 ? 6 * R16 : Kp / 8;  // 16-byte units copied per tile row: the 3r columns, or all Kp
  extern __shared__ __align__(16) unsigned char smem_lora[];
  const uint32_t raw = smem_addr(smem_lora), base = (raw + 1023) & ~1023u;  // the swizzle needs 1024-byte tiles
  // Bytes of a swizzled L tile and of its 64-column panels (TM rows: a multiple of 1024 bytes), and of B's.
  const uint32_t tile = TM * Kp * 2, panel = TM * 128, btile = kLoraOutCols * Kp * 2, bpanel = kLoraOutCols * 128;
  const uint32_t sB = base, sL = base + btile;  // L stage b at sL + b * tile
  bf16* Ys = reinterpret_cast<bf16*>(smem_lora + (base - raw) + btile + S * tile);  // [S][TM][kLoraOutCols]
  int64_t o0;
  const LoraOutJob& job = lora_out_job(jobs, blockIdx.x, o0);
  bf16* const y = job.y;
  const bf16* const L = job.L;
  const bf16* const B = R16 ? job.B + 2 * 16 * R16 : job.B;  // R16 > 0: Bfwd's columns [2r, 5r), [B1 B2 B3]
  const int Kc = R16 ? 3 * 16 * R16 : K;                       // the columns of L and B the tiles hold
  const int64_t out = job.out, first = int64_t(blockIdx.y) * iters;
  const int64_t left = (N + TM - 1) / TM - first;
  const int n_it = left < iters ? int(left) : iters;
  const bool vec = (ldy & 7) == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0;
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);  // provably warp-uniform (ptxas C7514)
  const int tid = threadIdx.x & 127, lane = threadIdx.x & 31, wi = (threadIdx.x >> 5) & 3;
  // Rows r0 .. r0 + nr - 1 of a swizzled tile of R rows (R = TM: an L tile; kLoraOutCols: B's) at s from rows
  // row0 + r0 .. of a (row stride ld), by threads tid0 .. tid0 + nt - 1; rows past `rows` and columns past Kc
  // are zero-filled.
  auto cp_swz = [&](auto R, uint32_t s_tile, const bf16* a, int64_t ld, int64_t row0, int64_t rows, int r0, int nr,
                    int tid0, int nt) {
    for (int u = tid0; u < nr * kUnits; u += nt) {
      const int r = r0 + u / kUnits, c = (u - (u / kUnits) * kUnits) * 8;
      const bool ok = row0 + r < rows && c < Kc;
      cp_async16(s_tile + swz<decltype(R)::value>(r, c), ok ? a + (row0 + r) * ld + c : a, ok);
    }
  };
  using RowsB = std::integral_constant<int, kLoraOutCols>;
  using RowsL = std::integral_constant<int, TM>;
  cp_swz(RowsB{}, sB, B, K, o0, out, 0, kLoraOutCols, int(threadIdx.x), 128 * W);
  // The warpgroup's share of an L tile whose rows are all below N, planned once: thread tid's kLU units, their
  // shared offsets and their element offsets from the tile's first row (below 2^31: 192 rows of ldl < 2^23, the
  // plan's bound). cp_swz recomputed them for every tile (ncu: 9% of the kernel's stall samples).
  constexpr int kLU = 64 * kUnits / 128;
  uint32_t l_sh[kLU];
  int32_t l_gl[kLU];
  bool l_ok[kLU];
#pragma unroll
  for (int j = 0; j < kLU; ++j) {
    const int u = tid + 128 * j, r = 64 * wg + u / kUnits, c = (u % kUnits) * 8;
    l_sh[j] = swz<TM>(r, c);
    l_gl[j] = int32_t(r * ldl + c);
    l_ok[j] = c < Kc;
  }
  // The epilogue's y accesses, one ldmatrix and one stmatrix per pair of 8-column chunks (2 cp, 2 cp + 1): lane l
  // addresses row 16 wi + (l mod 8) + 8 ((l / 8) mod 2) of this warp's 16 and chunk 2 cp + (l / 16) mod 2, so that
  // register q holds (row g + 8 (q mod 2), columns 2t, 2t + 1) of chunk 2 cp + q / 2: the accumulators' layout.
  // Byte offsets within a stage's y tile; the row's swizzle is l mod 8 (its row mod 8).
  uint32_t y_mat[8];
  {
    const int row = 64 * wg + 16 * wi + (lane & 7) + 8 * ((lane >> 3) & 1), half = (lane >> 4) & 1;
#pragma unroll
    for (int cp = 0; cp < 8; ++cp) y_mat[cp] = uint32_t(row * kLoraOutCols + (((2 * cp + half) ^ (lane & 7)) << 3)) * 2;
  }
  // This warpgroup's 64 rows of row tile tt into stage b: its L rows and its y rows.
  auto load = [&](int64_t tt, int b) {
    if (tt * TM + TM <= N) {
      const bf16* Lt = L + tt * TM * ldl;
#pragma unroll
      for (int j = 0; j < kLU; ++j) cp_async16(sL + b * tile + l_sh[j], l_ok[j] ? Lt + l_gl[j] : L, l_ok[j]);
    } else {
      cp_swz(RowsL{}, sL + b * tile, L, ldl, tt * TM, N, 64 * wg, 64, tid, 128);
    }
    lora_y_tile<true, true>(Ys + (b * TM + 64 * wg) * kLoraOutCols, y, ldy, tt * TM + 64 * wg, o0, 64, N, out, vec,
                            tid, 128);
  };
  // One commit group per stage, empty past the block's last tile, so that "group it is complete" is always
  // cp_wait<S - 1> (B's tile rides in the first group).
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (st < n_it) load(first + st, st);
    cp_commit();
  }
  // The product, the add and the store of a tile run in turn within a warpgroup; the warpgroups drift apart.
  // (Issuing the next tile's product before this one's add needs two accumulator sets in flight by turns, which
  // made ptxas serialize every product, C7514, as in the attention's former first pass.)
  int b = 0, bn = S - 1;  // this tile's stage and the stage the copies issued now go to
  for (int it = 0; it < n_it; ++it) {
    if (it + S - 1 < n_it) load(first + it + S - 1, bn);
    cp_commit();
    cp_wait<S - 1>();
    fence_async_smem();
    if (it == 0)
      __syncthreads();  // B's tile came from the whole block's copies
    else
      wg_bar(wg);
    float d0[8][4], d1[8][4];  // columns 0-63 and 64-127
    // Descriptors of the stage's L rows and of B, each step's advanced from them (desc_advance).
    const uint64_t da = desc_kmajor(sL + b * tile + wg * (64 * 128)), db = desc_kmajor(sB);
    wg_arrive();
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      int kl, kb;
      lora_wg_step<R16>(kk, kl, kb);
      wgmma_ss_n128<0>(d0, d1, desc_advance(da, (kl >> 2) * panel + (kl & 3) * 32),
                       desc_advance(db, (kb >> 2) * bpanel + (kb & 3) * 32), kk > 0);
    }
    wg_commit();
    wg_wait<0>();
    wg_hold(d0);
    wg_hold(d1);
    // d0/d1[nt][2 hr + j] is output (64 wg + 16 wi + g + 8 hr, 8 nt + 2 t + j, + 64 for d1): the sum and its one
    // rounding as lora_y_add2's, on the registers ldmatrix gives (y_mat): 8 + 8 matrix accesses a tile where
    // 4-byte accesses took 32 + 32 and their addresses.
    const uint32_t Yt = smem_addr(Ys) + uint32_t(b * TM * kLoraOutCols * 2);
#pragma unroll
    for (int cp = 0; cp < 8; ++cp) {
      float(&d)[8][4] = cp < 4 ? d0 : d1;
      uint32_t v[4];
      ldmatrix_x4_at(v, Yt + y_mat[cp]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int nt = (2 * cp + (q >> 1)) & 7, hr = q & 1;
        const float2 yv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v[q]));
        const __nv_bfloat162 o = __floats2bfloat162_rn(lora_sum(yv.x, __fmul_rn(s, d[nt][2 * hr])),
                                                       lora_sum(yv.y, __fmul_rn(s, d[nt][2 * hr + 1])));
        v[q] = *reinterpret_cast<const uint32_t*>(&o);
      }
      stmatrix_x4_at(Yt + y_mat[cp], v);
    }
    wg_bar(wg);
    lora_y_tile<false, true>(Ys + (b * TM + 64 * wg) * kLoraOutCols, y, ldy, (first + it) * TM + 64 * wg, o0, 64,
                             N, out, vec, tid, 128);
    wg_bar(wg);  // stage b is free: the copies issued next (tile it + S) overwrite it
    b = b + 1 == S ? 0 : b + 1;
    bn = bn + 1 == S ? 0 : bn + 1;
  }
#else
  (void)jobs, (void)ldy, (void)ldl, (void)K, (void)N, (void)s, (void)iters;
#endif
}

// Whether the sm_90a kernel takes an adapter of K = 6r: built for sm_90a (GEMMA_FAST_WGMMA), K within its shared
// memory, on a compute capability 9.0 device.
inline bool lora_out_wg(int K) {
#ifdef GEMMA_FAST_WGMMA
  return K <= kLoraWgMaxK && device_sm90();
#else
  (void)K;
  return false;
#endif
}

// Row tiles per block. One block per multiprocessor fits (shared memory; registers too for the mma.sync kernel at
// MT = 4), and a block costs its tiles plus one for its first copies, which nothing hides. The count minimises the
// makespan of the grid's blocks handed out in launch order (blockIdx.x fastest), each to the multiprocessor that
// frees first, as the block scheduler does; the last block row may be shorter. (Counting waves x (tiles + 1) instead
// chose 16 tiles for 9b's gate_proj at 2 x 1024, 112 blocks on 132 multiprocessors: 64 us, 38% of the memory
// bandwidth, ncu.) Cached per shape: a step asks for a few shapes many times.
inline int lora_out_iters(int64_t col_tiles, int64_t row_tiles, int sms) {
  thread_local std::map<std::array<int64_t, 3>, int> cache;
  const std::array<int64_t, 3> key{col_tiles, row_tiles, sms};
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  int best = 1;
  int64_t best_span = -1;
  std::priority_queue<int64_t, std::vector<int64_t>, std::greater<int64_t>> free_at;
  for (int64_t it = 1; it <= std::min<int64_t>(row_tiles, 64); ++it) {
    const int64_t groups = (row_tiles + it - 1) / it;
    if (groups > 65535) continue;
    free_at = {};
    for (int i = 0; i < sms; ++i) free_at.push(0);
    int64_t span = 0;
    for (int64_t gy = 0; gy < groups; ++gy) {
      const int64_t cost = std::min(it, row_tiles - gy * it) + 1;
      for (int64_t gx = 0; gx < col_tiles; ++gx) {
        const int64_t end = free_at.top() + cost;
        free_at.pop();
        free_at.push(end);
        span = std::max(span, end);
      }
    }
    if (best_span < 0 || span < best_span) {
      best_span = span;
      best = int(it);
    }
  }
  cache.emplace(key, best);
  return best;
}

// How lora_out_add runs a group's adapter terms, decided on the host from the rank, the shapes and the device.
struct LoraOutPlan {
  const char* kernel = nullptr;  // the fused kernel's name; nullptr: not fused (each term's product into fp32,
                                 // then lora_add_kernel)
  int K = 0;                     // 6r, the split product's depth
  int Kp = 0;                    // the Hopper kernel's tile width, 64, 128 or 192 (0 for mma.sync; lora_out_wg_kp)
  int r16 = 0;                   // the Hopper kernel's R16 (lora_out_wg_r16)
  int mt = 0;                    // the mma.sync kernel's MT (0 for the Hopper kernel)
  int rows = 0;                  // rows per row tile: 64 W (Hopper, lora_out_wg_groups) or 32 MT
  int threads = 0;               // per block: 128 W (Hopper) or kLoraOutThreads
  int iters = 0;                 // row tiles per block; the grid's last block row may have fewer
  int smem = 0;                  // dynamic shared memory, bytes
  int64_t col_tiles = 0, row_tiles = 0;  // of 128 columns (every job's, side by side) and of `rows` rows
  LoraOutJobs jobs;                      // the adapters of the launch, with their first column tiles
};

// One of the two fused kernels takes K = 6r when its rows fit a block's shared memory (K <= 384: r <= 64), its
// product can step through K (the Hopper kernel pads its tiles to a multiple of 64 and needs only whole 16-byte
// pieces, K % 8 == 0: r % 4 == 0; the mma.sync one takes 16 at a time, K % 16 == 0: r % 8 == 0), every L and B
// has 16-byte aligned rows, and N fits in at most 65535 groups of 64 row tiles (tiles of 128 or 192 rows up to
// r = 32: at least 537 M tokens in one micro-batch; 64 rows up to r = 56, 32 at r = 64), and ldl < 2^23 (the
// Hopper kernel's L offsets within a tile are 32-bit: 191 ldl + K below 2^31). jobs[i].tile0 is ignored (the plan
// sets it).
inline LoraOutPlan lora_out_plan(int r, int64_t N, int64_t ldl, const LoraOutJob* jobs, int njobs) {
  LoraOutPlan p;
  p.K = 6 * r;
  const bool wg = lora_out_wg(p.K);
  p.mt = wg || p.K > kLoraOutMaxK ? 0 : lora_out_mt(p.K);
  const int groups = wg ? lora_out_wg_groups(lora_out_wg_kp(r)) : 0;  // the Hopper kernel's warpgroups
  p.rows = wg ? 64 * groups : 32 * p.mt;
  p.threads = wg ? 128 * groups : kLoraOutThreads;
  bool fits = njobs > 0 && njobs <= kLoraOutJobsMax && p.K % (wg ? 8 : 16) == 0 && p.rows > 0 && N > 0 &&
              (N + p.rows - 1) / p.rows <= int64_t(65535) * 64 && ldl % 8 == 0 && ldl < (int64_t(1) << 23);
  for (int i = 0; fits && i < njobs; ++i)
    fits = jobs[i].out > 0 && (reinterpret_cast<uintptr_t>(jobs[i].L) & 15) == 0 &&
           (reinterpret_cast<uintptr_t>(jobs[i].B) & 15) == 0;
  if (!fits) return p;
  p.Kp = wg ? lora_out_wg_kp(r) : 0;
  p.r16 = wg ? lora_out_wg_r16(r) : 0;
  p.smem = wg ? lora_out_wg_smem(p.Kp) : lora_out_smem(p.K, p.mt);
  for (int i = 0; i < njobs; ++i) {
    p.jobs.job[i] = jobs[i];
    p.jobs.job[i].tile0 = p.col_tiles;
    p.col_tiles += (jobs[i].out + kLoraOutCols - 1) / kLoraOutCols;
  }
  p.jobs.count = njobs;
  p.row_tiles = (N + p.rows - 1) / p.rows;
  p.iters = lora_out_iters(p.col_tiles, p.row_tiles, device_sms());
  p.kernel = wg ? (p.r16 == 1    ? "lora_out_add_wg_kernel<64, 1>"
                   : p.r16 == 2  ? "lora_out_add_wg_kernel<128, 2>"
                   : p.Kp == 64  ? "lora_out_add_wg_kernel<64, 0>"
                   : p.Kp == 128 ? "lora_out_add_wg_kernel<128, 0>"
                                 : "lora_out_add_wg_kernel<192, 0>")
                : (p.mt == 4   ? "lora_out_add_kernel<4>"
                   : p.mt == 2 ? "lora_out_add_kernel<2>"
                               : "lora_out_add_kernel<1>");
  return p;
}
// One adapter's plan (out columns, split rows L, Bfwd B).
inline LoraOutPlan lora_out_plan(int r, int64_t N, int64_t out, int64_t ldl, const bf16* L, const bf16* B) {
  LoraOutJob j;
  j.L = L;
  j.B = B;
  j.out = out;
  return lora_out_plan(r, N, ldl, &j, 1);
}

// For every job of the plan, y (N, out; row stride ldy) = bf16(y + fl(s L B^T)) by the kernel the plan names
// (plan.kernel set; every job's L has row stride ldl).
inline void lora_out_add(const LoraOutPlan& plan, int64_t ldy, int64_t ldl, int64_t N, float s, cudaStream_t st) {
  const dim3 grid(unsigned(plan.col_tiles), unsigned((plan.row_tiles + plan.iters - 1) / plan.iters));
  auto launch = [&](auto kernel) {
    GEMMA_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem));
    kernel<<<grid, unsigned(plan.threads), plan.smem, st>>>(plan.jobs, ldy, ldl, plan.K, N, s, plan.iters);
  };
  if (plan.r16 == 1)
    launch(lora_out_add_wg_kernel<64, 1>);
  else if (plan.r16 == 2)
    launch(lora_out_add_wg_kernel<128, 2>);
  else if (plan.Kp == 64)
    launch(lora_out_add_wg_kernel<64, 0>);
  else if (plan.Kp == 128)
    launch(lora_out_add_wg_kernel<128, 0>);
  else if (plan.Kp == 192)
    launch(lora_out_add_wg_kernel<192, 0>);
  else if (plan.mt == 4)
    launch(lora_out_add_kernel<4>);
  else if (plan.mt == 2)
    launch(lora_out_add_kernel<2>);
  else
    launch(lora_out_add_kernel<1>);
  const cudaError_t e = cudaGetLastError();  // GEMMA_LAUNCHED, with the name chosen at run time
  if (e != cudaSuccess) cuda_fail(e, plan.kernel, __FILE__, __LINE__);
}

// grad (R, C) += scale * (part_0 + part_1 + part_2), the three blocks block_stride apart, rows ld_part apart.
struct LoraAccumJob {
  float* grad = nullptr;
  const float* part = nullptr;
  int64_t R = 0, C = 0, ld_part = 0, block_stride = 0;
  float scale = 1.0f;
};
// A group's gradients, dA and dB of each adapter (q|k|v: six), in one launch.
constexpr int kLoraAccumJobsMax = 2 * kLoraOutJobsMax;
struct LoraAccumJobs {
  LoraAccumJob job[kLoraAccumJobsMax];
  int count = 0;
};
// Block row blockIdx.y does job blockIdx.y.
__global__ void lora_grad_accum_kernel(const LoraAccumJobs jobs) {
  const LoraAccumJob& jb = jobs.job[blockIdx.y];
  const int64_t total = jb.R * jb.C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t rr = i / jb.C, cc = i - rr * jb.C;
    const float* pp = jb.part + rr * jb.ld_part + cc;
    jb.grad[i] += __fmul_rn(__fadd_rn(__fadd_rn(pp[0], pp[jb.block_stride]), pp[2 * jb.block_stride]), jb.scale);
  }
}

// Launchers ------------------------------------------------------------------------------------------------

// Re-derives the bf16 splits from the fp32 masters (after loading them, and after every optimizer step) for
// groups[0 .. ngroups): one launch.
inline void lora_prepare(const LoraGroupDev* groups, int ngroups, int r, cudaStream_t st) {
  LoraSplitJobs jobs;
  int64_t most = 0;
  auto add = [&](const LoraSplitJob& jb) {
    if (jobs.count == kLoraSplitJobsMax) throw std::logic_error("lora_prepare: more adapter matrices than jobs");
    jobs.job[jobs.count++] = jb;
    most = std::max(most, jb.n);
  };
  for (int gi = 0; gi < ngroups; ++gi) {
    const LoraGroupDev& g = groups[gi];
    for (size_t pi = 0; pi < g.projs.size(); ++pi) {
      const LoraProjDev& P = g.projs[pi];
      add({P.A, g.Abwd, int64_t(r) * g.in, g.in, int(pi)});
      add({P.B, P.Bfwd, P.out * r, 0, 0});
    }
  }
  if (jobs.count == 0 || most == 0) return;
  const dim3 grid(unsigned(std::min<int64_t>((most + 255) / 256, 512)), unsigned(jobs.count));
  lora_prepare_kernel<<<grid, 256, 0, st>>>(jobs, r);
  GEMMA_LAUNCHED("lora_prepare_kernel");
}

inline void lora_split(bf16* L, const float* part, int64_t N, int r, int np, float scale, cudaStream_t st) {
  lora_split_kernel<<<elementwise_blocks(N * np * r), 256, 0, st>>>(L, part, N, r, np, scale);
  GEMMA_LAUNCHED("lora_split_kernel");
}

inline void lora_grad_accum(const LoraAccumJobs& jobs, cudaStream_t st) {
  int64_t most = 0;
  for (int i = 0; i < jobs.count; ++i) most = std::max(most, jobs.job[i].R * jobs.job[i].C);
  if (jobs.count == 0 || most == 0) return;
  lora_grad_accum_kernel<<<dim3(unsigned(elementwise_blocks(most)), unsigned(jobs.count)), 256, 0, st>>>(jobs);
  GEMMA_LAUNCHED("lora_grad_accum_kernel");
}

// Elements of group_backward's gradient partials for a group: dA's of every adapter (3r x in each), then dB's
// (out x 3r each).
inline int64_t lora_gpart_elems(const LoraGroupDev& g, int r) {
  int64_t n = 0;
  for (const LoraProjDev& P : g.projs) n += 3 * int64_t(r) * (g.in + P.out);
  return n;
}

// A run of consecutive adapters of a group whose backward products batch: equal widths, their dy columns dcol
// and their Bfwd blocks dB elements apart (k and v of q|k|v; gate and up). A run of one has dcol = dB = 0.
struct LoraRun {
  int first = 0, count = 0;
  int64_t dcol = 0, dB = 0;
};
struct LoraRuns {
  std::array<LoraRun, kLoraOutJobsMax> run;
  int count = 0;
};
// g's adapters as runs (at most kLoraOutJobsMax adapters: group_backward's limit).
inline LoraRuns lora_runs(const LoraGroupDev& g) {
  LoraRuns runs;
  const int np = int(g.projs.size());
  int i = 0;
  while (i < np) {
    LoraRun& run = runs.run[size_t(runs.count++)];
    run = {i, 1, 0, 0};
    for (int j = i + 1; j < np; ++j, ++run.count) {
      const LoraProjDev &a = g.projs[size_t(j - 1)], &b = g.projs[size_t(j)];
      const int64_t dcol = b.col - a.col, dB = b.Bfwd - a.Bfwd;
      if (b.out != a.out || dcol <= 0 || dB <= 0 || (run.count > 1 && (dcol != run.dcol || dB != run.dB))) break;
      run.dcol = dcol;
      run.dB = dB;
    }
    i += run.count;
  }
  return runs;
}

// y (N, out_total) bf16 = x W^T + per adapter s xa B^T; L (N, 6r*np) keeps the split xa for the backward;
// part (N, 3r*np) fp32 scratch; delta fp32 scratch of delta_elems elements, at least out_total, used only where the
// fused add does not apply (the adapter terms in fp32, then lora_add_kernel), in blocks of rows of out_total each.
// after_base (optional) runs between the base product and the adapter terms (the profiler's mark).
inline void group_forward(cublasHandle_t h, const LoraGroupDev& g, int r, float s, const bf16* x, int64_t N, bf16* y,
                          bf16* L, float* part, float* delta, int64_t delta_elems, cudaStream_t st,
                          const std::function<void()>& after_base = {}) {
  gemm(h, N, g.out_total, g.in, {x, g.in, false}, {g.W, g.in, true}, y, false, g.out_total, 1.0f, 0.0f);
  if (after_base) after_base();
  const int np = int(g.projs.size());
  if (np == 0 || N == 0) return;
  const int64_t r3 = 3 * int64_t(r), w3 = r3 * np, w6 = 2 * w3;
  // x A^T of every adapter at once: rows [2r, 5r) of each adapter's block of Abwd, into its 3r columns of part.
  gemm_batched(h, N, r3, g.in, {x, g.in, false}, 0, {g.Abwd + 2 * int64_t(r) * g.in, g.in, true}, 2 * r3 * g.in, part,
               true, w3, r3, 1.0f, 0.0f, np);
  lora_split(L, part, N, r, np, 1.0f, st);
  std::array<LoraOutJob, kLoraOutJobsMax> jobs{};
  for (int pi = 0; pi < np && pi < kLoraOutJobsMax; ++pi) {
    const LoraProjDev& P = g.projs[size_t(pi)];
    jobs[size_t(pi)].y = y + P.col;
    jobs[size_t(pi)].L = L + pi * 2 * r3;
    jobs[size_t(pi)].B = P.Bfwd;
    jobs[size_t(pi)].out = P.out;
  }
  const LoraOutPlan plan = lora_out_plan(r, N, w6, jobs.data(), np);
  if (plan.kernel) {
    lora_out_add(plan, g.out_total, w6, N, s, st);
    return;
  }
  // Blocks of rows: the engine's delta is sized for the backward's widest input, half of gate|up's output at Gemma
  // 2's shapes. cuBLAS may take another kernel for fewer rows, so these terms' fp32 bits may depend on the block (as
  // any product's on its shape; the tests judge this path by the policy's tolerance, not by bits).
  if (delta_elems < g.out_total)
    throw std::logic_error("group_forward: delta holds " + std::to_string(delta_elems) + " elements, fewer than a row");
  const int64_t rows = std::min(N, delta_elems / g.out_total);
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t n = std::min(rows, N - r0);
    for (int pi = 0; pi < np; ++pi) {
      const LoraProjDev& P = g.projs[size_t(pi)];
      gemm(h, n, P.out, 2 * r3, {L + r0 * w6 + pi * 2 * r3, w6, false}, {P.Bfwd, 2 * r3, true}, delta + P.col, true,
           g.out_total, s, 0.0f);
      lora_add_kernel<<<elementwise_blocks(n * P.out), 256, 0, st>>>(y + r0 * g.out_total + P.col, delta + P.col, n,
                                                                     P.out, g.out_total);
      GEMMA_LAUNCHED("lora_add_kernel");
    }
  }
}

// dx (N, in) fp32 = dy W + per adapter dxa A (the caller rounds it to bf16 where the reference does); the adapter
// gradients are accumulated into gA, gB. L is the forward's split xa; part, Lb, gpart are scratch:
// part (N, 3r*np) fp32, Lb (N, 6r*np) bf16, gpart (lora_gpart_elems(g, r)) fp32.
// The adapters' share of dx is computed first and the base product adds itself to it (beta = 1, in cuBLAS's
// epilogue): one fp32 addition of the two fp32 products either way, but dx is written once and read once in the
// big product's epilogue, not written, read and written again by the small product (at 27b, down_proj's dx is
// 302 MB in fp32: the small product that added into it took 232 us, the base product 1.7 ms).
// before_base and after_base (optional) run around the base product (the profiler's marks).
inline void group_backward(cublasHandle_t h, const LoraGroupDev& g, int r, float s, const bf16* x, const bf16* dy,
                           const bf16* L, int64_t N, float* dx, float* part, bf16* Lb, float* gpart, cudaStream_t st,
                           const std::function<void()>& after_base = {},
                           const std::function<void()>& before_base = {}) {
  const int np = int(g.projs.size());
  if (np > kLoraOutJobsMax) throw std::logic_error("group_backward: more adapters in a group than kLoraOutJobsMax");
  const auto base = [&](float beta) {
    if (before_base) before_base();
    gemm(h, N, g.in, g.out_total, {dy, g.out_total, false}, {g.W, g.in, false}, dx, true, g.in, 1.0f, beta);
    if (after_base) after_base();
  };
  if (np == 0 || N == 0) {
    base(0.0f);
    return;
  }
  const int64_t r3 = 3 * int64_t(r), w3 = r3 * np, w6 = 2 * w3;
  // Products batched over a run of adapters (lora_runs): one launch for gate and up, one for k and v.
  const LoraRuns runs = lora_runs(g);
  for (int k = 0; k < runs.count; ++k) {
    const LoraRun& run = runs.run[size_t(k)];
    const LoraProjDev& P = g.projs[size_t(run.first)];
    gemm_batched(h, N, r3, P.out, {dy + P.col, g.out_total, false}, run.dcol,
                 {P.Bfwd + 2 * int64_t(r), 6 * int64_t(r), false}, run.dB, part + run.first * r3, true, w3, r3, 1.0f,
                 0.0f, run.count);
  }
  lora_split(Lb, part, N, r, np, s, st);
  gemm(h, N, g.in, w6, {Lb, w6, false}, {g.Abwd, g.in, false}, dx, true, g.in, 1.0f, 0.0f);
  base(1.0f);
  // gpart: every adapter's dA partials (3r x in each), then every adapter's dB partials (out x 3r each).
  float* const gpart_b = gpart + np * r3 * g.in;
  // dA (r, in) of each adapter: the three row blocks of [d1 d2 d3]^T x.
  gemm_batched(h, r3, g.in, N, {Lb, w6, true}, 2 * r3, {x, g.in, false}, 0, gpart, true, g.in, r3 * g.in, 1.0f, 0.0f,
               np);
  // dB (out, r): the three column blocks of dy^T [s1 s2 s3], times s.
  std::array<int64_t, kLoraOutJobsMax + 1> b_at{};
  for (int pi = 0; pi < np; ++pi) b_at[size_t(pi + 1)] = b_at[size_t(pi)] + g.projs[size_t(pi)].out * r3;
  for (int k = 0; k < runs.count; ++k) {
    const LoraRun& run = runs.run[size_t(k)];
    const LoraProjDev& P = g.projs[size_t(run.first)];
    gemm_batched(h, P.out, r3, N, {dy + P.col, g.out_total, true}, run.dcol, {L + run.first * 2 * r3, w6, false},
                 2 * r3, gpart_b + b_at[size_t(run.first)], true, r3, P.out * r3, 1.0f, 0.0f, run.count);
  }
  LoraAccumJobs acc;
  for (int pi = 0; pi < np; ++pi) {
    const LoraProjDev& P = g.projs[size_t(pi)];
    acc.job[acc.count++] = {P.gA, gpart + pi * r3 * g.in, r, g.in, g.in, int64_t(r) * g.in, 1.0f};
    acc.job[acc.count++] = {P.gB, gpart_b + b_at[size_t(pi)], P.out, r, r3, r, s};
  }
  lora_grad_accum(acc, st);
}

}  // namespace
}  // namespace gemma::fast
