// Attention, flash style: no T x T tensor is ever stored. Grouped KV heads (query head h reads kv head
// h / (H / KV)), the attention softcap c tanh(s / c) applied to the scores before the mask, the sliding window
// (key j visible to query i iff 0 <= i - j <= W - 1) on sliding layers, causal everywhere. bf16 tensor-core
// products (mma.sync m16n8k16) with fp32 accumulation; softmax, softcap and its derivative in fp32.
//
// Forward, one pass over the keys per query tile in 64-key tiles, in ascending order: tile n's capped scores z
// raise the row's running maximum to m_n, its weights exp(z - m_n) are rounded to bf16 (attn_probs) and O += P~ V
// in fp32 after O and the row's sum l are scaled by exp(m_{n-1} - m_n); O is divided by l at the end. Since the
// tiles are the reference's 64-key blocks (Policy::attn_probs_blockwise), each rounding is the reference's: the
// running maximum at a tile does not depend on how a kernel schedules its work within the row, only on the tiles
// being visited in order. HF's order (normalise, round, multiply) would need m and l before the first rounding, a
// second pass. O is kept in fp32 for the backward and rounded once to bf16 (attn_out). Cast points: attn_scores
// f32, attn_capped f32, attn_probs bf16 (blockwise in the forward), attn_out bf16.
//
// Backward recomputes the scores from q and k (pre-cap and post-cap scores are never both stored), rebuilds P in
// HF's form bf16(exp(z - m) / l) from the saved m and l, and uses dS = P (dP - D) sech^2(s / c) scale with
// D = rowsum(dO * O) (the forward's weights, not P: the reference's cache.W) and
// sech^2 of the recomputed pre-cap score (omitting it is the flash-attn 2.6.0 bug). dS stays fp32: the products
// dQ = dS K and dK = dS^T Q use its exact three-way bf16 split (common.cuh), so no rounding the reference does not
// have. dK and dV come from one kernel (a block per key tile, looping over the group's query heads and the query
// tiles that see it), dQ from another (a block per query tile): no atomics, so the sums' order is fixed and two
// runs give the same bits.
#pragma once
#include <cstdint>

#include "fast/common.cuh"
#include "fast/mma.cuh"
#include "model/errors.hpp"

namespace gemma::fast {
namespace {

struct AttnParams {
  // q head h starts at q + h*hd, kv head g at k + g*hd and v + g*hd; tokens are rows with stride ld_qkv.
  const bf16* q = nullptr;
  const bf16* k = nullptr;
  const bf16* v = nullptr;
  int64_t ld_qkv = 0;
  int B = 0, T = 0, H = 0, KV = 0, hd = 0;
  float scale = 1;  // query_pre_attn_scalar^-0.5
  // dS's last factor (attn_set_derived): 4 scale with the cap, taking sech^2 = 4 e / (1 + e)^2's 4 (attn_capped_k),
  // scale without it or with drop_sech2
  float ds_scale = 1;
  bool cap_on = false;
  float cap = 1;
  float cap_k = 0;  // -2 log2(e) / cap (attn_set_derived): the softcap's exp2 argument per |score|
  int window = 0;          // 0: every past key; else keys with 0 <= i - j <= window - 1
  const int32_t* doc = nullptr;    // (B*T) document of each token (packed rows); null: one per sequence
  const uint8_t* key_ok = nullptr; // (B*T) 0 for padding tokens, never attended; null: none
  bool drop_sech2 = false; // the softcap-grad-missing fault
  bool vec = false;        // 16-byte tile loads are legal (set by the launchers)
  bool ldm = false;        // fragments through ldmatrix (attn_ldmatrix(); set by the launchers)
  bool mma_only = false;   // the mma.sync kernels even where the Hopper ones apply (tests and fast_bench compare)
  // forward outputs; dout, dq are read/written with the same row stride ld_o = H*hd
  bf16* att = nullptr;  // (N, H*hd)
  float* o32 = nullptr; // (N, H*hd)
  int64_t ld_o = 0;
  float* m = nullptr;   // (B, H, T) row max of the capped scores
  float* l = nullptr;   // (B, H, T) sum of exp(z - m)
  // m and l already hold these inputs' statistics (a recomputed forward after the first one wrote them): the
  // forward leaves them as they are. It computes the same bits either way (one pass, the same order).
  bool stats_in = false;
  // backward
  const bf16* dout = nullptr;  // (N, H*hd)
  float* Dv = nullptr;         // (B, H, T) rowsum(dout * o32)
  // (B, H, ceil(T / 64), 3, 64): each 64-query tile's m, 1 / l (attn_inv_l) and D, rows past T 0, 1 and 0, so that
  // attn_dkdv_sm90_kernel takes a tile's statistics in one bulk copy. attn_rowdot_kernel writes it where set; the
  // head_dim 256 Hopper backward requires it.
  float* tile_stats = nullptr;
  float* dq = nullptr;         // (N, H*hd)
  float* dk = nullptr;         // (N, KV*hd)
  float* dv = nullptr;         // (N, KV*hd)
  int64_t ld_dkv = 0;
};

// p.tile_stats' layout, shared by its writer (attn_rowdot_kernel), its reader (attn_dkdv_sm90_kernel's bulk copy)
// and the buffers' owners (the engine's workspace, the kernel tests): for each (b, h), ceil(T / 64) tiles of
// kAttnStatsTile queries, each [m; 1 / l; D] as three runs of kAttnStatsTile floats.
constexpr int kAttnStatsTile = 64;
constexpr int kAttnStatsTileFloats = 3 * kAttnStatsTile;
// Floats in p.tile_stats for B sequences of T tokens and H heads.
__host__ __device__ constexpr int64_t attn_tile_stats_count(int64_t B, int64_t H, int64_t T) {
  return B * H * ((T + kAttnStatsTile - 1) / kAttnStatsTile) * kAttnStatsTileFloats;
}
// Offset in p.tile_stats of the tile that holds query t of sequence b, head h (its m; 1 / l at + kAttnStatsTile,
// D at + 2 kAttnStatsTile).
__host__ __device__ constexpr int64_t attn_tile_stats_offset(int64_t H, int64_t T, int64_t b, int64_t h, int64_t t) {
  return ((b * H + h) * ((T + kAttnStatsTile - 1) / kAttnStatsTile) + t / kAttnStatsTile) * kAttnStatsTileFloats;
}

constexpr int kAttnThreads = 128;  // 4 warps, 16 rows each

// Key j is visible to query i of sequence b: causal, within the window, in the same document, not padding. A query
// that sees no key (left padding) gets l = 0 and a zero output; its output never reaches a scored position.
__device__ __forceinline__ bool attn_visible(const AttnParams& p, int b, int i, int j) {
  if (!(i < p.T && j <= i && (p.window <= 0 || i - j < p.window))) return false;
  const int64_t base = int64_t(b) * p.T;
  if (p.doc && p.doc[base + i] != p.doc[base + j]) return false;
  return !p.key_ok || p.key_ok[base + j];
}

// Elementwise math per score, shared by both kernel families and by forward and backward (so the backward rebuilds
// the forward's bf16 P bit for bit). It is built on the special-function unit: per score, one exp2 for the softcap,
// one for the probability and one approximate reciprocal, no division. (tanhf, expf and two IEEE divisions before:
// `ncu` showed the kernels latency-bound on that arithmetic, and this form made them 1.37x faster forward and 1.32x
// backward at 9b, T = 4096, cap on; docs/benchmarks.md.)
//
// Softcap of a scaled score x: c tanh(x / c) = sign(x) c (1 - e) / (1 + e) and sech^2(x / c) = 4 e / (1 + e)^2, with
// e = exp(-2|x|/c) = 2^(cap_k |x|), cap_k = -2 log2(e) / c. Error: attn_exp2 is exp2f's approximation, within 2 ulp
// (CUDA C Programming Guide, table of single-precision functions), and so is __fdividef for a divisor in [1, 2], so
// 1 - e is off by at most 3e-7 and the capped score by at most 6e-7 c (3e-5 at Gemma 2's c = 50), absolutely; tanhf
// was within 2 ulp relatively (6e-6 at |z| = 50). Scores enter the softmax through exp(z - m), so an absolute error
// d in z is a relative error d in P, here 1/65 of the 2^-9 half-step of P's bf16 rounding. The form has no
// cancellation in the tail, where 1 - tanh^2 would fall to zero (docs/model.md).
constexpr double kLog2eF64 = 1.4426950408889634;
constexpr float kLog2e = float(kLog2eF64);

// 2^x on the special-function unit, ex2.approx.ftz.f32: exp2f compiles to ex2.approx.f32, which for results of
// 2^-126 and above is this same approximation (within exp2f's 2 ulp) and wraps it, for subnormal results, in a
// compare and two scalings: three instructions of the roughly 35 a score costs in the backward, twice per score.
// Here a result below 2^-126 is 0 instead of subnormal, which moves the two uses below by less than 2^-126
// absolutely where it happens: exp(z - m) < 2^-126 (then P = exp(z - m) / l is 0 instead of below 2^-126 / l; a
// row's largest P is at least 1 / T) and the cap's e < 2^-126 (|score| > 43.7 c), whose sech^2 < 2^-124 then
// becomes 0 as the factor of the score's gradient.
__device__ __forceinline__ float attn_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The capped score, and a quarter of d(capped)/dx = sech^2(x / c) in sech2_q: e / (1 + e)^2 (1 / 4 without the
// cap). The 4 goes into dS's last factor instead (attn_ds_from_p, p.ds_scale): scaling by a power of two is exact, so
// ((ds e / (1 + e)^2) 4 scale) rounds to the same bits as ((ds 4 e / (1 + e)^2) scale) wherever no intermediate is
// below 2^-126, and that saves a multiply per score. CAP is p.cap_on as a compile-time constant: the Hopper kernels
// choose it once per tile (attn_tile_kind), attn_capped per call.
template <bool CAP>
__device__ __forceinline__ float attn_capped_k(float x, const AttnParams& p, float& sech2_q) {
  if constexpr (!CAP) {
    sech2_q = 0.25f;
    return x;
  } else {
    const float e = attn_exp2(p.cap_k * fabsf(x)), r = __fdividef(1.0f, 1.0f + e);
    sech2_q = e * (r * r);
    return copysignf(p.cap * ((1.0f - e) * r), x);
  }
}
__device__ __forceinline__ float attn_capped(float x, const AttnParams& p, float& sech2_q) {
  return p.cap_on ? attn_capped_k<true>(x, p, sech2_q) : attn_capped_k<false>(x, p, sech2_q);
}
// The capped score alone (the forward; the same arithmetic, so the same bits as the backward's).
__device__ __forceinline__ float attn_capped(float x, const AttnParams& p) {
  float unused;
  return attn_capped(x, p, unused);
}

// exp(z - m) as exp2((z - m) log2(e)). z - m is exact when z is within a factor two of m (Sterbenz; so exactly 1 for
// the row's max); the product's rounding and log2(e)'s own add at most 2^-23 |z - m| relative to the result (an
// error d in the exponent is ln(2) d relatively); attn_exp2 is within 2 ulp. (Folding m into a fused multiply-add,
// exp2(z log2(e) - m log2(e)), saves an add but leaves the rounding of m log2(e), up to 2^-24 |m| relatively, on
// every P including the row's largest. On the H200 that form failed the kernel test B2_T37_H4_KV2_hd16_nocap_W8: o32
// off the fast policy by rel L2 2.55e-4, bound 2e-4, 13 bf16 outputs one ulp off; this form: 4.16e-8, none.)
__device__ __forceinline__ float attn_exp(float z, float m) { return attn_exp2((z - m) * kLog2e); }
// P = exp(z - m) / l before its bf16 rounding, with inv_l = 1 / l (attn_inv_l): attn_exp's error, the reciprocal's
// 0.5 ulp and the product's 0.5 ulp, against P's own rounding to bf16 (2^-9).
__device__ __forceinline__ float attn_prob(float z, float m, float inv_l) { return attn_exp(z, m) * inv_l; }
// 1 / l of a row's sum; a row that sees no key (l = 0) never forms a P.
__device__ __forceinline__ float attn_inv_l(float l) { return l > 0.0f ? __frcp_rn(l) : 0.0f; }

// Shared-memory tile s (rows x HDP, row stride HDP + 8) = rows [row0, row0 + rows) of a head in global memory,
// zero beyond T and beyond hd (zero padding leaves every dot product exact).
template <int HDP>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, int64_t ld_g, int row0, int rows, int T, int hd,
                                          bool vec) {
  constexpr int LDS = HDP + 8, CH = HDP / 8;
  for (int idx = threadIdx.x; idx < rows * CH; idx += blockDim.x) {
    const int r = idx / CH, c = (idx - r * CH) * 8;
    bf16* dst = s + r * LDS + c;
    const int row = row0 + r;
    if (vec && row < T && c + 8 <= hd) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(g + int64_t(row) * ld_g + c);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        dst[e] = (row < T && c + e < hd) ? g[int64_t(row) * ld_g + c + e] : __float2bfloat16_rn(0.0f);
    }
  }
}

// acc (16 x 8*NT) = A rows [r0, r0 + 16) times B^T, both tiles stored [row][HDP]: for A the rows are the output
// rows, for B the output columns. mma fragment layouts (PTX ISA, m16n8k16): lane = 4 g + t; A holds
// (g | g+8, 2t.. | 2t+8..), B holds (k 2t.. | 2t+8.., n g), C holds (g | g+8, 2t, 2t+1).
// LDM: the same fragments through ldmatrix (one instruction per fragment instead of 32-bit loads per register):
// with x4, lanes 8m..8m+7 address the rows of 8x8 matrix m, and each lane receives (row g, columns 2t, 2t+1)
// of each matrix, which is the A fragment for matrices (rows r0 | r0+8) x (columns k0 | k0+8) in that order,
// and two B fragments (n-tiles nt, nt+1) for matrices (rows n0 | n0+8) x (columns k0 | k0+8).
template <int HDP, int NT, bool LDM>
__device__ __forceinline__ void tile_abt(float (&acc)[NT][4], const bf16* As, int r0, const bf16* Bs, int lane) {
  constexpr int LDS = HDP + 8;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < HDP / 16; ++kk) {
    uint32_t a[4];
    if constexpr (LDM) {
      const int m = lane >> 3, rr = lane & 7;
      ldmatrix_x4(a, As + (r0 + rr + 8 * (m & 1)) * LDS + kk * 16 + 8 * (m >> 1));
    } else {
      const bf16* pa = As + (r0 + g) * LDS + kk * 16 + 2 * t;
      a[0] = ld_u32(pa);
      a[1] = ld_u32(pa + 8 * LDS);
      a[2] = ld_u32(pa + 8);
      a[3] = ld_u32(pa + 8 * LDS + 8);
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[2][2];
      if constexpr (LDM) {
        // matrices: 0 = (n-tile nt, k0), 1 = (nt, k0 + 8), 2 = (nt + 1, k0), 3 = (nt + 1, k0 + 8)
        const int m = lane >> 3, rr = lane & 7;
        uint32_t bq[4];
        ldmatrix_x4(bq, Bs + ((nt + (m >> 1)) * 8 + rr) * LDS + kk * 16 + 8 * (m & 1));
        b[0][0] = bq[0];
        b[0][1] = bq[1];
        b[1][0] = bq[2];
        b[1][1] = bq[3];
      } else {
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const bf16* pb = Bs + ((nt + u) * 8 + g) * LDS + kk * 16 + 2 * t;
          b[u][0] = ld_u32(pb);
          b[u][1] = ld_u32(pb + 8);
        }
      }
      mma16816(acc[nt], a, b[0]);
      mma16816(acc[nt + 1], a, b[1]);
    }
  }
}

// B fragment for k rows [k0, k0 + 16) and n columns [n0, n0 + 8) of a tile stored [k][n] (row stride LDS).
// LDM: ldmatrix .trans, lanes 0-7 addressing rows k0..k0+7 and lanes 8-15 rows k0+8..k0+15 (at column n0):
// each lane receives (rows 2t, 2t+1; column g) of each 8x8 matrix, the B fragment.
template <bool LDM>
__device__ __forceinline__ void frag_b_kn(uint32_t (&b)[2], const bf16* s, int LDS, int k0, int n0, int lane) {
  if constexpr (LDM) {
    const bf16* p = s + (k0 + (lane & 15)) * LDS + n0;
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(smem_addr(p)));
  } else {
    const int g = lane >> 2, t = lane & 3;
    const bf16* p = s + (k0 + 2 * t) * LDS + n0 + g;
    b[0] = pack_bf16(p[0], p[LDS]);
    b[1] = pack_bf16(p[8 * LDS], p[9 * LDS]);
  }
}

// The C fragments of a 16 x 32 tile (4 n-tiles) as the A fragments of two k16 steps (the k index is the column).
__device__ __forceinline__ void c_to_a(uint32_t (&a)[2][4], const bf16 (&x)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    a[kk][0] = pack_bf16(x[2 * kk][0], x[2 * kk][1]);
    a[kk][1] = pack_bf16(x[2 * kk][2], x[2 * kk][3]);
    a[kk][2] = pack_bf16(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[kk][3] = pack_bf16(x[2 * kk + 1][2], x[2 * kk + 1][3]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward: a block per (query tile of 64, head, sequence).

template <int HDP, bool LDM>
__global__ void __launch_bounds__(kAttnThreads) attn_forward_kernel(const AttnParams p) {
  constexpr int BR = 64, BC = 64, LDS = HDP + 8, NTD = HDP / 8;  // BC: the reference's kAttnKeyBlock
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Ks = Qs + BR * LDS;
  bf16* Vs = Ks + BC * LDS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int i0 = blockIdx.x * BR, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (p.H / p.KV);
  const int64_t tok0 = int64_t(b) * p.T;
  const bf16* qg = p.q + tok0 * p.ld_qkv + int64_t(h) * p.hd;
  const bf16* kg = p.k + tok0 * p.ld_qkv + int64_t(kvh) * p.hd;
  const bf16* vg = p.v + tok0 * p.ld_qkv + int64_t(kvh) * p.hd;
  load_tile<HDP>(Qs, qg, p.ld_qkv, i0, BR, p.T, p.hd, p.vec);

  const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
  const int j_end = min(p.T, i0 + BR);
  const int j_begin = p.window > 0 ? max(0, i0 - p.window + 1) : 0;
  const int kt0 = j_begin / BC, kt1 = (j_end + BC - 1) / BC;

  // One pass over the 64-key tiles in ascending order (the Hopper forward's, attention_sm90.cuh): tile kt's
  // weights exp(z - m_kt) rounded to bf16 against the running maximum, O and l scaled by exp(m_{kt-1} - m_kt) first,
  // O divided by l at the end.
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
  float o[NTD][4];
#pragma unroll
  for (int nd = 0; nd < NTD; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
  for (int kt = kt0; kt < kt1; ++kt) {
    __syncthreads();
    load_tile<HDP>(Ks, kg, p.ld_qkv, kt * BC, BC, p.T, p.hd, p.vec);
    load_tile<HDP>(Vs, vg, p.ld_qkv, kt * BC, BC, p.T, p.hd, p.vec);
    __syncthreads();
    float s[8][4];
    tile_abt<HDP, 8, LDM>(s, Qs, warp * 16, Ks, lane);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = kt * BC + nt * 8 + 2 * t + (e & 1);
        s[nt][e] = attn_visible(p, b, row[e >> 1], j) ? attn_capped(__fmul_rn(s[nt][e], p.scale), p) : -INFINITY;
      }
    float alpha[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * hr], s[nt][2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mnew = fmaxf(mrow[hr], mx);
      const float mref = mnew == -INFINITY ? 0.0f : mnew;  // a row with no visible key yet keeps l = 0
      alpha[hr] = attn_exp(mrow[hr], mref);  // exactly 1 where the maximum stays
      float sum = 0;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
          s[nt][e] = s[nt][e] == -INFINITY ? 0.0f : attn_exp(s[nt][e], mref);
          sum += s[nt][e];
        }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      lrow[hr] = lrow[hr] * alpha[hr] + sum;
      mrow[hr] = mnew;
    }
#pragma unroll
    for (int nd = 0; nd < NTD; ++nd)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nd][e] *= alpha[e >> 1];
    bf16 pb[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) pb[nt][e] = __float2bfloat16_rn(s[nt][e]);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      uint32_t aP[2][4];
      c_to_a(aP, *reinterpret_cast<const bf16(*)[4][4]>(&pb[4 * half]));
#pragma unroll
      for (int nd = 0; nd < NTD; ++nd)
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          uint32_t bb[2];
          frag_b_kn<LDM>(bb, Vs, LDS, 32 * half + kk * 16, nd * 8, lane);
          mma16816(o[nd], aP[kk], bb);
        }
    }
  }
  const float inv_l[2] = {attn_inv_l(lrow[0]), attn_inv_l(lrow[1])};
#pragma unroll
  for (int nd = 0; nd < NTD; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nd][e] *= inv_l[e >> 1];

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = row[hr];
    if (r >= p.T) continue;
    const int64_t base = (tok0 + r) * p.ld_o + int64_t(h) * p.hd;
#pragma unroll
    for (int nd = 0; nd < NTD; ++nd)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int d = nd * 8 + 2 * t + c;
        if (d < p.hd) {
          p.o32[base + d] = o[nd][2 * hr + c];
          p.att[base + d] = __float2bfloat16_rn(o[nd][2 * hr + c]);
        }
      }
    if (t == 0 && !p.stats_in) {
      const int64_t si = (int64_t(b) * p.H + h) * p.T + r;
      p.m[si] = mrow[hr];
      p.l[si] = lrow[hr];
    }
  }
}

// D = rowsum(dO * O) per (token, head), the softmax backward's rowsum(W * dP) with W the forward's weights
// (O = W V; the reference's attention_backward takes D in this form under Policy::attn_probs_blockwise). O is the
// fp32 sum, so no rounding enters here. A warp per (token, head), the
// warps in (b, h, t) order: consecutive warps' lane 0 then read m, l and write D and p.tile_stats at consecutive
// addresses (in token order they were T floats apart: 63-67 us a launch at 9b 2 x 4096 against 58-60 now, ncu).
__global__ void attn_rowdot_kernel(const AttnParams p) {
  const int64_t gw = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (gw >= int64_t(p.B) * p.T * p.H) return;
  const int64_t si = gw;  // (b H + h) T + t, the index of m, l and D
  const int64_t bh = si / p.T, t = si - bh * p.T, b = bh / p.H;
  const int h = int(bh - b * p.H);
  const int64_t base = (b * p.T + t) * p.ld_o + int64_t(h) * p.hd;
  float s = 0;
  for (int d = lane; d < p.hd; d += 32) s += __bfloat162float(p.dout[base + d]) * p.o32[base + d];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) {
    p.Dv[si] = s;
    if (p.tile_stats != nullptr) {
      constexpr int R = kAttnStatsTile;
      float* ts = p.tile_stats + attn_tile_stats_offset(p.H, p.T, b, h, t) + t % R;
      ts[0] = p.m[si];
      ts[R] = attn_inv_l(p.l[si]);
      ts[2 * R] = s;
      if (t == p.T - 1)  // the last tile's rows past T
        for (int u = 1; (t + u) % R != 0; ++u) {
          ts[u] = 0.0f;
          ts[R + u] = 1.0f;
          ts[2 * R + u] = 0.0f;
        }
    }
  }
}

// dS = P (dP - D) sech^2(s / c) scale from a score's bf16 P, with sech2_q = sech^2 / 4 (attn_capped_k): the
// multiplies in the order they had with sech^2 whole, its 4 applied last as part of p.ds_scale (the same bits, as
// attn_capped_k says). CAP as attn_capped_k.
template <bool CAP>
__device__ __forceinline__ float attn_ds_from_p(float P, float dp, float D, float sech2_q, const AttnParams& p) {
  float ds = P * (dp - D);
  if constexpr (CAP)
    if (!p.drop_sech2) ds *= sech2_q;
  return ds * p.ds_scale;
}

// dS for one score: P (dP - D) sech^2(s / c) scale, with P rebuilt exactly as the forward's bf16 probability
// (m, inv_l: the query row's saved max and the reciprocal of its saved sum, attn_inv_l). CAP as attn_capped_k.
template <bool CAP>
__device__ __forceinline__ float attn_ds_k(float acc_s, float dp, float m, float inv_l, float D, bool vis,
                                           float& p_out, const AttnParams& p) {
  if (!vis) {
    p_out = 0.0f;
    return 0.0f;
  }
  const float s = __fmul_rn(acc_s, p.scale);
  float sech2_q;
  const float P = round_bf16(attn_prob(attn_capped_k<CAP>(s, p, sech2_q), m, inv_l));
  p_out = P;
  return attn_ds_from_p<CAP>(P, dp, D, sech2_q, p);
}
__device__ __forceinline__ float attn_ds(float acc_s, float dp, float m, float inv_l, float D, bool vis,
                                         float& p_out, const AttnParams& p) {
  return p.cap_on ? attn_ds_k<true>(acc_s, dp, m, inv_l, D, vis, p_out, p)
                  : attn_ds_k<false>(acc_s, dp, m, inv_l, D, vis, p_out, p);
}

// attn_ds_k for the two scores u = 0, 1 of an accumulator fragment's pair, with their P also returned as the
// packed bf16 pair p01 (u = 0 in the low half, as pack_bf16). One paired conversion rounds both P, and its halves
// serve as P's value in dS and as the A operand of P^T dO: the same roundings as two round_bf16 and a repacking,
// in three instructions a pair instead of five. An invisible score gives P = 0 and dS = 0, as attn_ds_k.
// Its two halves, for a kernel that has S before dP (attn_dkdv_sm90_kernel): attn_p2_k needs the scores alone and
// gives p01 and the pair's sech2_q; attn_ds2_from_p then takes dP.
template <bool CAP>
__device__ __forceinline__ void attn_p2_k(const float (&acc_s)[2], const float (&m)[2], const float (&inv_l)[2],
                                          const bool (&vis)[2], float (&sech2_q)[2], uint32_t& p01,
                                          const AttnParams& p) {
  float x[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    x[u] = attn_prob(attn_capped_k<CAP>(__fmul_rn(acc_s[u], p.scale), p, sech2_q[u]), m[u], inv_l[u]);
    if (!vis[u]) x[u] = 0.0f;
  }
  const __nv_bfloat162 pp = __floats2bfloat162_rn(x[0], x[1]);
  p01 = *reinterpret_cast<const uint32_t*>(&pp);
}
template <bool CAP>
__device__ __forceinline__ void attn_ds2_from_p(uint32_t p01, const float (&dp)[2], const float (&D)[2],
                                                const float (&sech2_q)[2], const bool (&vis)[2], float (&ds)[2],
                                                const AttnParams& p) {
  const __nv_bfloat162 pp = *reinterpret_cast<const __nv_bfloat162*>(&p01);
  const float P[2] = {__low2float(pp), __high2float(pp)};
#pragma unroll
  for (int u = 0; u < 2; ++u) ds[u] = vis[u] ? attn_ds_from_p<CAP>(P[u], dp[u], D[u], sech2_q[u], p) : 0.0f;
}
template <bool CAP>
__device__ __forceinline__ void attn_ds2_k(const float (&acc_s)[2], const float (&dp)[2], const float (&m)[2],
                                           const float (&inv_l)[2], const float (&D)[2], const bool (&vis)[2],
                                           float (&ds)[2], uint32_t& p01, const AttnParams& p) {
  float sech2_q[2];
  attn_p2_k<CAP>(acc_s, m, inv_l, vis, sech2_q, p01, p);
  attn_ds2_from_p<CAP>(p01, dp, D, sech2_q, vis, ds, p);
}

// ---------------------------------------------------------------------------------------------------------
// dQ: a block per (query tile of 64, head, sequence), looping over the key tiles the tile sees.

template <int HDP, bool LDM>
__global__ void __launch_bounds__(kAttnThreads) attn_dq_kernel(const AttnParams p) {
  constexpr int BR = 64, BC = 32, LDS = HDP + 8, NTD = HDP / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* dOs = Qs + BR * LDS;
  bf16* Ks = dOs + BR * LDS;
  bf16* Vs = Ks + BC * LDS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int i0 = blockIdx.x * BR, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (p.H / p.KV);
  const int64_t tok0 = int64_t(b) * p.T;
  const bf16* kg = p.k + tok0 * p.ld_qkv + int64_t(kvh) * p.hd;
  const bf16* vg = p.v + tok0 * p.ld_qkv + int64_t(kvh) * p.hd;
  load_tile<HDP>(Qs, p.q + tok0 * p.ld_qkv + int64_t(h) * p.hd, p.ld_qkv, i0, BR, p.T, p.hd, p.vec);
  load_tile<HDP>(dOs, p.dout + tok0 * p.ld_o + int64_t(h) * p.hd, p.ld_o, i0, BR, p.T, p.hd, p.vec);

  const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
  float mrow[2], inv_l[2], Drow[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const bool ok = row[hr] < p.T;
    const int64_t si = (int64_t(b) * p.H + h) * p.T + row[hr];
    mrow[hr] = ok ? p.m[si] : 0.0f;
    inv_l[hr] = attn_inv_l(ok ? p.l[si] : 1.0f);
    Drow[hr] = ok ? p.Dv[si] : 0.0f;
  }
  const int j_end = min(p.T, i0 + BR);
  const int j_begin = p.window > 0 ? max(0, i0 - p.window + 1) : 0;
  const int kt0 = j_begin / BC, kt1 = (j_end + BC - 1) / BC;

  float dq[NTD][4];
#pragma unroll
  for (int nd = 0; nd < NTD; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.0f;
  for (int kt = kt0; kt < kt1; ++kt) {
    __syncthreads();
    load_tile<HDP>(Ks, kg, p.ld_qkv, kt * BC, BC, p.T, p.hd, p.vec);
    load_tile<HDP>(Vs, vg, p.ld_qkv, kt * BC, BC, p.T, p.hd, p.vec);
    __syncthreads();
    float s[4][4], dp[4][4];
    tile_abt<HDP, 4, LDM>(s, Qs, warp * 16, Ks, lane);
    tile_abt<HDP, 4, LDM>(dp, dOs, warp * 16, Vs, lane);
    bf16 x1[4][4], x2[4][4], x3[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hr = e >> 1, j = kt * BC + nt * 8 + 2 * t + (e & 1);
        float pv;
        const float ds = attn_ds(s[nt][e], dp[nt][e], mrow[hr], inv_l[hr], Drow[hr],
                                 attn_visible(p, b, row[hr], j), pv, p);
        split3(ds, x1[nt][e], x2[nt][e], x3[nt][e]);
      }
    uint32_t a1[2][4], a2[2][4], a3[2][4];
    c_to_a(a1, x1);
    c_to_a(a2, x2);
    c_to_a(a3, x3);
#pragma unroll
    for (int nd = 0; nd < NTD; ++nd)
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        uint32_t bb[2];
        frag_b_kn<LDM>(bb, Ks, LDS, kk * 16, nd * 8, lane);
        mma16816(dq[nd], a1[kk], bb);
        mma16816(dq[nd], a2[kk], bb);
        mma16816(dq[nd], a3[kk], bb);
      }
  }

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = row[hr];
    if (r >= p.T) continue;
    const int64_t base = (tok0 + r) * p.ld_o + int64_t(h) * p.hd;
#pragma unroll
    for (int nd = 0; nd < NTD; ++nd)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int d = nd * 8 + 2 * t + c;
        if (d < p.hd) p.dq[base + d] = dq[nd][2 * hr + c];
      }
  }
}

// ---------------------------------------------------------------------------------------------------------
// dK, dV: a block per (key tile of 64, kv head x head-dim chunk, sequence). Each warp owns 16 keys; the block
// loops over the kv head's query heads and the query tiles (32 queries) that can see its keys. For hd > 128 the
// head dimension of dK and dV is split into chunks of 128 (a grid dimension), so the fp32 accumulators fit in
// registers; the scores are recomputed per chunk.

template <int HDP, bool LDM>
__global__ void __launch_bounds__(kAttnThreads) attn_dkdv_kernel(const AttnParams p) {
  constexpr int BK = 64, BQ = 32, LDS = HDP + 8, DC = HDP > 128 ? 128 : HDP, NTD = DC / 8, NCH = HDP / DC;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem);
  bf16* Vs = Ks + BK * LDS;
  bf16* Qs = Vs + BK * LDS;
  bf16* dOs = Qs + BQ * LDS;
  float* mS = reinterpret_cast<float*>(dOs + BQ * LDS);
  float* inv_lS = mS + BQ;
  float* DS = inv_lS + BQ;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int j0 = blockIdx.x * BK, chunk = blockIdx.y % NCH, kvh = blockIdx.y / NCH, b = blockIdx.z;
  const int d0 = chunk * DC;
  const int64_t tok0 = int64_t(b) * p.T;
  load_tile<HDP>(Ks, p.k + tok0 * p.ld_qkv + int64_t(kvh) * p.hd, p.ld_qkv, j0, BK, p.T, p.hd, p.vec);
  load_tile<HDP>(Vs, p.v + tok0 * p.ld_qkv + int64_t(kvh) * p.hd, p.ld_qkv, j0, BK, p.T, p.hd, p.vec);

  const int key[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
  const int G = p.H / p.KV;
  const int i_begin = j0;
  const int i_end = p.window > 0 ? min(p.T, j0 + BK - 1 + p.window) : p.T;
  const int qt0 = i_begin / BQ, qt1 = i_begin < i_end ? (i_end + BQ - 1) / BQ : qt0;

  float dk[NTD][4], dv[NTD][4];
#pragma unroll
  for (int nd = 0; nd < NTD; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.0f;

  for (int hq = kvh * G; hq < kvh * G + G; ++hq) {
    const bf16* qg = p.q + tok0 * p.ld_qkv + int64_t(hq) * p.hd;
    const bf16* dog = p.dout + tok0 * p.ld_o + int64_t(hq) * p.hd;
    for (int qt = qt0; qt < qt1; ++qt) {
      __syncthreads();
      load_tile<HDP>(Qs, qg, p.ld_qkv, qt * BQ, BQ, p.T, p.hd, p.vec);
      load_tile<HDP>(dOs, dog, p.ld_o, qt * BQ, BQ, p.T, p.hd, p.vec);
      if (threadIdx.x < BQ) {
        const int i = qt * BQ + threadIdx.x;
        const bool ok = i < p.T;
        const int64_t si = (int64_t(b) * p.H + hq) * p.T + i;
        mS[threadIdx.x] = ok ? p.m[si] : 0.0f;
        inv_lS[threadIdx.x] = attn_inv_l(ok ? p.l[si] : 1.0f);
        DS[threadIdx.x] = ok ? p.Dv[si] : 0.0f;
      }
      __syncthreads();
      float st[4][4], dpt[4][4];
      tile_abt<HDP, 4, LDM>(st, Ks, warp * 16, Qs, lane);   // S^T: keys x queries
      tile_abt<HDP, 4, LDM>(dpt, Vs, warp * 16, dOs, lane); // dP^T
      bf16 pb[4][4], x1[4][4], x2[4][4], x3[4][4];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ci = nt * 8 + 2 * t + (e & 1);
          const int i = qt * BQ + ci, j = key[e >> 1];
          float pv;
          const float ds =
              attn_ds(st[nt][e], dpt[nt][e], mS[ci], inv_lS[ci], DS[ci], attn_visible(p, b, i, j), pv, p);
          pb[nt][e] = __float2bfloat16_rn(pv);  // exact: pv is already a bf16 value
          split3(ds, x1[nt][e], x2[nt][e], x3[nt][e]);
        }
      uint32_t aP[2][4], a1[2][4], a2[2][4], a3[2][4];
      c_to_a(aP, pb);
      c_to_a(a1, x1);
      c_to_a(a2, x2);
      c_to_a(a3, x3);
#pragma unroll
      for (int nd = 0; nd < NTD; ++nd)
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          uint32_t bb[2];
          frag_b_kn<LDM>(bb, dOs, LDS, kk * 16, d0 + nd * 8, lane);
          mma16816(dv[nd], aP[kk], bb);
          frag_b_kn<LDM>(bb, Qs, LDS, kk * 16, d0 + nd * 8, lane);
          mma16816(dk[nd], a1[kk], bb);
          mma16816(dk[nd], a2[kk], bb);
          mma16816(dk[nd], a3[kk], bb);
        }
    }
  }

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int j = key[hr];
    if (j >= p.T) continue;
    const int64_t base = (tok0 + j) * p.ld_dkv + int64_t(kvh) * p.hd + d0;
#pragma unroll
    for (int nd = 0; nd < NTD; ++nd)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int d = nd * 8 + 2 * t + c;
        if (d0 + d < p.hd) {
          p.dk[base + d] = dk[nd][2 * hr + c];
          p.dv[base + d] = dv[nd][2 * hr + c];
        }
      }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers

inline int attn_hdp(int hd) {
  if (hd <= 16) return 16;
  if (hd <= 32) return 32;
  if (hd <= 64) return 64;
  if (hd <= 128) return 128;
  if (hd <= 256) return 256;
  throw InputError("fast: head_dim " + std::to_string(hd) + " is above the 256 the attention kernels support");
}

// The window a layer's attention uses: W keys on sliding layers (one more under the sliding-off-by-one fault), 0 (every
// past key) on global ones.
inline int attn_window(bool sliding, int64_t W) { return sliding ? int(W) + (faults().sliding_off_by_one ? 1 : 0) : 0; }

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

inline void attn_set_derived(AttnParams& p) {
  p.ldm = attn_ldmatrix();
  p.cap_k = p.cap_on ? float(-2.0 * kLog2eF64 / double(p.cap)) : 0.0f;
  p.ds_scale = p.cap_on && !p.drop_sech2 ? 4.0f * p.scale : p.scale;
  p.vec = p.hd % 8 == 0 && p.ld_qkv % 8 == 0 && p.ld_o % 8 == 0 && aligned16(p.q) && aligned16(p.k) &&
          aligned16(p.v) && (p.dout == nullptr || aligned16(p.dout));
}

template <int HDP, bool LDM>
void attn_forward_launch(const AttnParams& p, cudaStream_t st) {
  const int smem = (64 + 64 + 64) * (HDP + 8) * int(sizeof(bf16));
  GEMMA_CUDA(cudaFuncSetAttribute(attn_forward_kernel<HDP, LDM>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(unsigned((p.T + 63) / 64), unsigned(p.H), unsigned(p.B));
  attn_forward_kernel<HDP, LDM><<<grid, kAttnThreads, smem, st>>>(p);
  GEMMA_LAUNCHED("attn_forward_kernel");
}

template <int HDP, bool LDM>
void attn_backward_launch(const AttnParams& p, cudaStream_t st) {
  const int smem_dq = (64 + 64 + 32 + 32) * (HDP + 8) * int(sizeof(bf16));
  GEMMA_CUDA(cudaFuncSetAttribute(attn_dq_kernel<HDP, LDM>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dq));
  const dim3 grid_q(unsigned((p.T + 63) / 64), unsigned(p.H), unsigned(p.B));
  attn_dq_kernel<HDP, LDM><<<grid_q, kAttnThreads, smem_dq, st>>>(p);
  GEMMA_LAUNCHED("attn_dq_kernel");
  const int smem_kv = (64 + 64 + 32 + 32) * (HDP + 8) * int(sizeof(bf16)) + 3 * 32 * int(sizeof(float));
  GEMMA_CUDA(cudaFuncSetAttribute(attn_dkdv_kernel<HDP, LDM>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_kv));
  constexpr int nch = HDP > 128 ? HDP / 128 : 1;
  const dim3 grid_k(unsigned((p.T + 63) / 64), unsigned(p.KV * nch), unsigned(p.B));
  attn_dkdv_kernel<HDP, LDM><<<grid_k, kAttnThreads, smem_kv, st>>>(p);
  GEMMA_LAUNCHED("attn_dkdv_kernel");
}

template <int HDP>
void attn_forward_hdp(const AttnParams& p, cudaStream_t st) {
  if (p.ldm)
    attn_forward_launch<HDP, true>(p, st);
  else
    attn_forward_launch<HDP, false>(p, st);
}

template <int HDP>
void attn_backward_hdp(const AttnParams& p, cudaStream_t st) {
  if (p.ldm)
    attn_backward_launch<HDP, true>(p, st);
  else
    attn_backward_launch<HDP, false>(p, st);
}

// att, o32, m, l from q, k, v (the mma.sync kernels; attention_sm90.cuh's attention_forward picks).
inline void attention_forward_mma(AttnParams p, cudaStream_t st) {
  if (p.B == 0 || p.T == 0) return;
  attn_set_derived(p);
  switch (attn_hdp(p.hd)) {
    case 16: return attn_forward_hdp<16>(p, st);
    case 32: return attn_forward_hdp<32>(p, st);
    case 64: return attn_forward_hdp<64>(p, st);
    case 128: return attn_forward_hdp<128>(p, st);
    default: return attn_forward_hdp<256>(p, st);
  }
}

// dq, dk, dv (fp32, before the RoPE backward) from dout (bf16), o32, m, l and a recomputation of the scores
// (the mma.sync kernels; attention_sm90.cuh's attention_backward picks).
inline void attention_backward_mma(AttnParams p, cudaStream_t st) {
  if (p.B == 0 || p.T == 0) return;
  attn_set_derived(p);
  const int64_t warps = int64_t(p.B) * p.T * p.H;
  attn_rowdot_kernel<<<unsigned((warps * 32 + 255) / 256), 256, 0, st>>>(p);
  GEMMA_LAUNCHED("attn_rowdot_kernel");
  switch (attn_hdp(p.hd)) {
    case 16: return attn_backward_hdp<16>(p, st);
    case 32: return attn_backward_hdp<32>(p, st);
    case 64: return attn_backward_hdp<64>(p, st);
    case 128: return attn_backward_hdp<128>(p, st);
    default: return attn_backward_hdp<256>(p, st);
  }
}

}  // namespace
}  // namespace gemma::fast
