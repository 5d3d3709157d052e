// Attention for Hopper (sm_90a): the same algorithm and cast points as attention.cuh (one pass over 64-key tiles
// in ascending order, each tile's weights rounded to bf16 against the running maximum, scores recomputed in the
// backward), with the products on warpgroup MMA
// (wgmma.mma_async, fp32 accumulation) reading 128-byte-swizzled shared-memory tiles that TMA fills (tma.cuh): in
// the forward a producer warp keeps a ring of slots ahead of the consumers; in the ping-pong backward kernels each
// warpgroup's first thread fetches its next tile once its products are done, and the other warpgroup's work covers
// the wait; in the warp-specialised dK/dV kernel each consumer warpgroup fetches its half of the tile after next.
//
// Layout: fast/wgmma.cuh (128-byte swizzled tiles). For S = Q K^T both operands are K-major (the head dimension
// is contiguous); for O = P V the B operand V is N-major (stored [key][d]). P enters from registers: the
// accumulator fragment of S (per warp the mma.sync m16n8 C layout) is, after the bf16 rounding, the A fragment of
// the next product (round_p in the forward; c_to_a in attention.cuh).
//
// Only head_dim 128 and 256 (the released models) with 16-byte aligned rows take this path; everything else,
// and GEMMA_FAST_ATTN=mma, runs attention.cuh's kernels. The numbers differ from those kernels only by the fp32
// accumulation order inside the products.
#pragma once
#include <type_traits>

#include "fast/attention.cuh"
#include "fast/tma.cuh"
#include "fast/wgmma.cuh"

namespace gemma::fast {
namespace {

// Can any of rows [r_lo, r_hi] see a key of [j0, j0 + 64)? (causal and window only; the per-element test does
// the rest.) The forward skips the per-score work of a tile its warpgroup cannot see (not its products).
__device__ __forceinline__ bool attn_tile_seen(const AttnParams& p, int r_lo, int r_hi, int j0) {
  return r_lo < p.T && j0 <= r_hi && (p.window <= 0 || j0 + 63 > r_lo - p.window);
}
// Is every key of [j0, j0 + 64) visible to every row of [r_lo, r_hi]? Then the per-element test is skipped.
__device__ __forceinline__ bool attn_tile_full(const AttnParams& p, int r_lo, int r_hi, int j0) {
  return !p.doc && !p.key_ok && r_hi < p.T && j0 + 63 <= r_lo && (p.window <= 0 || r_hi - j0 < p.window);
}

// Calls f(cap, full) with p.cap_on and a tile's attn_tile_full as compile-time constants (std::bool_constant), so
// that a tile's per-score code is straight-line: with a branch per score (on the cap, on the mask test) the
// compiler kept each score's chain of exp2, reciprocal and multiplies apart, and with two warps per scheduler
// nothing hid their latency (ncu, forward at 9b T = 4096: issue slots 30% busy, 5.7 cycles between a warp's
// instructions, fixed-latency dependencies the largest stall).
template <class F>
__device__ __forceinline__ void attn_tile_kind(bool cap, bool full, F&& f) {
  if (cap) {
    if (full)
      f(std::true_type{}, std::true_type{});
    else
      f(std::true_type{}, std::false_type{});
  } else {
    if (full)
      f(std::false_type{}, std::true_type{});
    else
      f(std::false_type{}, std::false_type{});
  }
}

constexpr int kSm90Threads = 256;  // two warpgroups, 64 query rows each

// S (64 rows x 64 keys) = A B^T over the whole head dimension, issued as one commit group (wg_wait completes
// it): A the 64-row slice at a_base of an RA-row tile, B the 64-row tile at b_base. Each step's descriptors are
// built from their addresses, not advanced from a base's (desc_advance), here and in wg_pv_issue: the forward
// calls these, and held base descriptors made ptxas spill 68 bytes of its head_dim 256 kernel (2026-12-03).
template <int RA, int HD>
__device__ __forceinline__ void wg_abt_issue(float (&s)[8][4], uint32_t a_base, uint32_t b_base) {
  wg_arrive();
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk)
    wgmma_ss<0>(s, desc_kmajor(a_base + (kk >> 2) * (RA * 128) + (kk & 3) * 32),
                desc_kmajor(b_base + (kk >> 2) * (64 * 128) + (kk & 3) * 32), kk > 0);
  wg_commit();
}
// Step kk (k16) of a score product over 64-row tiles, from their base descriptors (desc_advance).
__device__ __forceinline__ void wg_abt_step(float (&s)[8][4], uint64_t da, uint64_t db, int kk) {
  const uint32_t off = (kk >> 2) * (64 * 128) + (kk & 3) * 32;
  wgmma_ss<0>(s, desc_advance(da, off), desc_advance(db, off), kk > 0);
}
// Two score products over the whole head dimension, both in one commit group, and their completion: s = A B^T and
// s2 = A2 B2^T (64 x 64 each), A, A2 the 64-row tiles at a_base, a2_base, B, B2 the 64-row tiles at b_base, b2_base
// (the backward's S and dP, or S^T and dP^T).
template <int HD>
__device__ __forceinline__ void wg_abt_pair(float (&s)[8][4], uint32_t a_base, uint32_t b_base, float (&s2)[8][4],
                                            uint32_t a2_base, uint32_t b2_base) {
  const uint64_t da = desc_kmajor(a_base), db = desc_kmajor(b_base), da2 = desc_kmajor(a2_base),
                 db2 = desc_kmajor(b2_base);
  wg_arrive();
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    wg_abt_step(s, da, db, kk);
    wg_abt_step(s2, da2, db2, kk);
  }
  wg_commit();
  wg_wait<0>();
  wg_hold(s);
  wg_hold(s2);
}
// wg_abt_pair's products as two commit groups, s's first, not waited for: s is complete after wg_wait<1>, s2
// after wg_wait<0>, so that the work on s overlaps s2's product.
template <int HD>
__device__ __forceinline__ void wg_abt_pair_issue(float (&s)[8][4], uint32_t a_base, uint32_t b_base,
                                                  float (&s2)[8][4], uint32_t a2_base, uint32_t b2_base) {
  const uint64_t da = desc_kmajor(a_base), db = desc_kmajor(b_base), da2 = desc_kmajor(a2_base),
                 db2 = desc_kmajor(b2_base);
  wg_arrive();
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) wg_abt_step(s, da, db, kk);
  wg_commit();
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) wg_abt_step(s2, da2, db2, kk);
  wg_commit();
}

// o[dc] (64 x 64 columns dc*64..) += P V, issued as one commit group: P (64 x 64 keys) as four k16 A fragments
// (written before wgmma.fence, which the empty asm statements keep the compiler from reordering), V the 64-key
// tile at v_base.
template <int ND>
__device__ __forceinline__ void wg_pv_issue(float (&o)[ND][8][4], uint32_t (&a)[4][4], uint32_t v_base) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[k][i])::"memory");
  wg_arrive();
#pragma unroll
  for (int dc = 0; dc < ND; ++dc)
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) wgmma_rs_nmajor(o[dc], a[ks], desc_nmajor(v_base + dc * (64 * 128) + ks * 2048));
  wg_commit();
}

// Launch order. Blocks start in linear-index order (x fastest), so the grids are (head, sequence, row block) with
// the row block's rank in z, 0 for the one with the most tiles: every head's and sequence's longest blocks start
// first and the short ones fill the last wave (longest processing time first). With the row block in x, the
// (head, sequence) groups started one after another and the last groups' long blocks ran on alone: ncu had the
// multiprocessors idle 12%, 10% and 5% of the forward's, the dK, dV kernel's and the dQ kernel's time at 9b,
// T = 4096 (2026-12-03). gridDim.y and gridDim.z are at most 65535: attn_check_grid.
inline void attn_check_grid(int64_t batch, int64_t row_blocks) {
  if (batch > 65535)
    throw InputError("fast: batch " + std::to_string(batch) + " exceeds the attention kernels' grid (at most 65535)");
  if (row_blocks > 65535)
    throw InputError("fast: the sequence takes " + std::to_string(row_blocks) +
                     " row blocks, more than the attention kernels' grid holds (65535)");
}

// Forward: a block per (128 queries, head, sequence) of three warpgroups: warpgroups 0 and 1 (the consumers) own
// rows 64 w .. 64 w + 63 of the query tile, warpgroup 2's first thread (the producer) copies every tile by TMA
// (tma.cuh). The copies run in one order known to all (Q, then K_0, V_0, K_1, V_1, ...)
// through a ring of attn_fwd_slots 64-row slots, each with a "full" barrier (the producer's expected bytes) and an
// "empty" one (one arrival per consumer warp once the products reading the slot are complete), so neither side
// waits for the other but at a slot: no block-wide barrier, no copy instructions or address arithmetic in the
// consumers (in the backward's cp.async dK kernel those were a fifth of the instructions, ncu). The two consumers
// take turns issuing their products (ping-pong, as FlashAttention 3 schedules them): warpgroup w waits at barrier 3 + w
// for the other's signal, issues one step's products, then signals the other, so that one's exponentials run while
// the other's products do instead of both at once (the barrier-per-tile kernel kept them in step, ncu: issue slots
// 30% busy). Within a warpgroup the pass is software-pipelined (Q K_i^T and P_{i-1} V_{i-1} issued together, tile
// i's weights computed while P_{i-1} V_{i-1} runs, O rescaled once that product is complete). One pass, not the
// two HF's order needs: the second pass alone ran at 398-435 TFLOP/s on the forward's counted FLOPs, both at
// 257-268 (docs/benchmarks.md, 2026-12-04). Every
// consumer runs every tile's products, also the (at most one per block) tile its rows cannot see, whose
// scores it then ignores: a product issued only on some paths makes ptxas serialize all of them (C7514).
constexpr int kFwdThreads = 384;
template <int HD>
__host__ __device__ constexpr int attn_fwd_slots() {
  return HD == 256 ? 5 : 8;  // 5 x 32 KB beside the 64 KB Q tile fill the 227 KB a block can have
}
template <int HD>
constexpr int attn_fwd_sm90_smem() {  // Q tile, the slots, alignment slack, a full and an empty barrier a slot and Q's
  return 1024 + (128 + attn_fwd_slots<HD>() * 64) * HD * 2 + 8 * (2 * attn_fwd_slots<HD>() + 1);
}
struct AttnTmaps {
  CUtensorMap q, k, v;  // tma_rows_map over p.q (128-row boxes), p.k, p.v (64-row boxes)
};

template <int HD>
__global__ void __launch_bounds__(kFwdThreads, 1)
    attn_fwd_sm90_kernel(const AttnParams p, const __grid_constant__ AttnTmaps tm) {
#ifndef GEMMA_SM90_DEVICE
  __trap();  // built without wgmma: attn_sm90_applies never launches this
#endif
  constexpr int BR = 128, BC = 64, ND = HD / 64, NS = attn_fwd_slots<HD>();
  constexpr uint32_t KBYTES = BC * HD * 2;
  extern __shared__ __align__(16) unsigned char smem_sm90[];
  const uint32_t sQ = (smem_addr(smem_sm90) + 1023u) & ~1023u;
  const uint32_t sKV = sQ + BR * HD * 2;
  const uint32_t bar_full = sKV + NS * KBYTES, bar_empty = bar_full + 8 * NS, bar_q = bar_empty + 8 * NS;
  // The warpgroup index from lane 0: ptxas then knows it is the same across the warp, and so are the branches
  // around the products below (otherwise it serializes every wgmma: C7518, "WG.DP in divergent path").
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x >> 7), 0), warp = (threadIdx.x >> 5) & 3,
            lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // Blocks of later queries see more keys: they start first (the launch order above).
  const int i0 = (gridDim.z - 1 - blockIdx.z) * BR, h = blockIdx.x, b = blockIdx.y;
  const int kvh = h / (p.H / p.KV);
  const int j_end = min(p.T, i0 + BR);
  const int j_begin = p.window > 0 ? max(0, i0 - p.window + 1) : 0;
  const int kt0 = j_begin / BC, n = (j_end + BC - 1) / BC - kt0;  // n >= 1: j_begin <= i0 < j_end
  if (threadIdx.x == 0) {
    for (int s = 0; s < NS; ++s) {
      mbar_init(bar_full + 8 * s, 1);
      mbar_init(bar_empty + 8 * s, 8);  // the eight consumer warps
    }
    mbar_init(bar_q, 1);
    mbar_init_fence();
  }
  __syncthreads();  // the last block-wide barrier: the producer's other warps leave below

  if (wg == 2) {  // the producer
    regs_dec<24>();
    if (threadIdx.x == 256) {
      tma_tile<BR, HD>(sQ, &tm.q, h * p.hd, i0, b, bar_q);
      int L = 0;  // copies issued
      auto put = [&](const CUtensorMap* map, int i) {
        const int s = L % NS;
        if (L >= NS) mbar_wait(bar_empty + 8 * s, uint32_t(L / NS - 1) & 1u);  // the slot's previous tile is read
        tma_tile<BC, HD>(sKV + s * KBYTES, map, kvh * p.hd, (kt0 + i) * BC, b, bar_full + 8 * s);
        ++L;
      };
      for (int i = 0; i < n; ++i) {
        put(&tm.k, i);
        put(&tm.v, i);
      }
      // The producer leaves once the consumers have released the last slot-full of copies: a consumer stuck in
      // its unbounded waits then holds the producer in a bounded one, whose trap ends the launch. Without this, a
      // launch of at most NS copies (head_dim 128 with T up to 128, head_dim 256 with one key tile) had no bounded
      // wait anywhere.
      for (int l = L > NS ? L - NS : 0; l < L; ++l) mbar_wait(bar_empty + 8 * (l % NS), uint32_t(l / NS) & 1u);
    }
    return;
  }
  regs_inc<240>();

  const int64_t tok0 = int64_t(b) * p.T;
  const int r_lo = i0 + wg * 64, r_hi = r_lo + 63;
  const int row[2] = {r_lo + warp * 16 + g, r_lo + warp * 16 + g + 8};
  const uint32_t a_base = sQ + wg * 64 * 128;
  auto seen = [&](int i) { return attn_tile_seen(p, r_lo, r_hi, (kt0 + i) * BC); };
  // Copy L of the common order: its slot, the wait for its bytes, the release once this warp's products that
  // read it are complete.
  auto slot = [&](int L) { return sKV + uint32_t(L % NS) * KBYTES; };
  auto arrived = [&](int L) { mbar_wait_spin(bar_full + 8 * (L % NS), uint32_t(L / NS) & 1u); };
  auto release = [&](int L) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar_empty + 8 * (L % NS));
  };
  // The turn-taking around each step's products (one step: the first tile's score product, a tile's score product
  // with the previous tile's P V, the last P V). Warpgroup 1 signals once ahead, so warpgroup 0 goes first, and
  // leaves out its last signal, which nothing waits for: both run the same number of steps.
  auto turn = [&] { bar_sync(3 + wg, 256); };
  auto pass_turn = [&](bool last) {
    if (!(last && wg == 1)) bar_arrive(4 - wg, 256);
  };
  if (wg == 1) bar_arrive(3, 256);
  // Tile i's scores in place: scaled, capped, -inf where masked.
  auto capped = [&](float (&s)[8][4], int i) {
    const int j0 = (kt0 + i) * BC;
    attn_tile_kind(p.cap_on, attn_tile_full(p, r_lo, r_hi, j0), [&](auto cap, auto full) {
      constexpr bool kCap = decltype(cap)::value, kFull = decltype(full)::value;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = j0 + nt * 8 + 2 * t + (e & 1);
          float unused;
          s[nt][e] = kFull || attn_visible(p, b, row[e >> 1], j)
                         ? attn_capped_k<kCap>(__fmul_rn(s[nt][e], p.scale), p, unused)
                         : -INFINITY;
        }
    });
  };
  mbar_wait_spin(bar_q, 0);

  // One pass over the key tiles in ascending order: tile i's weights exp(z - m_i) are rounded to bf16 against the
  // row's running maximum m_i over tiles 0..i (Policy::attn_probs_blockwise: tiles are the reference's 64-key
  // blocks), O and l are scaled by exp(m_{i-1} - m_i) before tile i's P V adds to them, and O is divided by l at the
  // end. Tile i's K is copy 2 i, its V copy 2 i + 1.
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
  float o[ND][8][4];
#pragma unroll
  for (int dc = 0; dc < ND; ++dc)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) o[dc][nt][0] = o[dc][nt][1] = o[dc][nt][2] = o[dc][nt][3] = 0.0f;
  float s[8][4];
  uint32_t aP[4][4];
  float alpha[2];  // tile i's factor exp(m_{i-1} - m_i) for O, per row
  // Tile i's weights (unrounded) in place of its scores, the tile folded into mrow and lrow, alpha set.
  auto probs = [&](int i) {
    alpha[0] = alpha[1] = 1.0f;
    if (!seen(i)) {  // its product ran (the pipeline is the same for every tile) but no score is visible
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
      return;
    }
    capped(s, i);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * hr], s[nt][2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mnew = fmaxf(mrow[hr], mx);
      const float mref = mnew == -INFINITY ? 0.0f : mnew;  // a row with no visible key yet keeps l = 0
      // exp(0) = 1 exactly where the maximum stays (attn_exp2 of 0), so O is rescaled only where it moved.
      alpha[hr] = attn_exp(mrow[hr], mref);
      float sum = 0;
      // A masked score (-inf) needs no test: ex2.approx.ftz of -inf is +0, mref being finite (FlashAttention's
      // kernels rely on the same). The test cost 1.6-3.5% of the forward on the H100 (docs/benchmarks.md).
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
          s[nt][e] = attn_exp(s[nt][e], mref);
          sum += s[nt][e];
        }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      lrow[hr] = lrow[hr] * alpha[hr] + sum;
      mrow[hr] = mnew;
    }
  };
  // O (the products up to tile i - 1, complete) scaled to tile i's maximum, each of the thread's two rows (the warp's
  // rows g and g + 8) skipped by the whole warp when none of its eight rows' maximum moved: a multiply by 1 changes
  // no bits either way. For random scores a row's maximum rises at tile b with probability 1 / (b + 1), so eight
  // rows skip more often than sixteen would.
  auto rescale = [&] {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      if (!__any_sync(0xffffffffu, alpha[hr] != 1.0f)) continue;
#pragma unroll
      for (int dc = 0; dc < ND; ++dc)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          o[dc][nt][2 * hr] *= alpha[hr];
          o[dc][nt][2 * hr + 1] *= alpha[hr];
        }
    }
  };
  // The C fragments of the 16 x 64 tile (8 n-tiles) as the A fragments of four k16 steps, each pair rounded by one
  // paired conversion.
  auto round_p = [&] {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int nt = 2 * kk + (q >> 1), e = 2 * (q & 1);
        const __nv_bfloat162 pp = __floats2bfloat162_rn(s[nt][e], s[nt][e + 1]);
        aP[kk][q] = *reinterpret_cast<const uint32_t*>(&pp);
      }
  };
  arrived(0);
  turn();
  wg_abt_issue<BR, HD>(s, a_base, slot(0));
  pass_turn(false);
  wg_wait<0>();
  wg_hold(s);
  release(0);
  probs(0);  // O is still 0: no rescale
  round_p();
  for (int i = 1; i < n; ++i) {
    const int Lk = 2 * i, Lv = Lk - 1;  // K_i, V_{i-1}
    arrived(Lv);
    arrived(Lk);
    turn();
    wg_abt_issue<BR, HD>(s, a_base, slot(Lk));
    wg_pv_issue<ND>(o, aP, slot(Lv));
    pass_turn(false);
    wg_wait<1>();
    wg_hold(s);
    release(Lk);
    probs(i);
    wg_wait<0>();
#pragma unroll
    for (int dc = 0; dc < ND; ++dc) wg_hold(o[dc]);
    release(Lv);
    rescale();
    round_p();
  }
  const int Lv = 2 * n - 1;  // V_{n-1}
  arrived(Lv);
  turn();
  wg_pv_issue<ND>(o, aP, slot(Lv));
  pass_turn(true);
  wg_wait<0>();
#pragma unroll
  for (int dc = 0; dc < ND; ++dc) wg_hold(o[dc]);
  release(Lv);  // the producer waits for every copy's release before it leaves
  const float inv_l[2] = {attn_inv_l(lrow[0]), attn_inv_l(lrow[1])};
#pragma unroll
  for (int dc = 0; dc < ND; ++dc)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dc][nt][e] *= inv_l[e >> 1];

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = row[hr];
    if (r >= p.T) continue;
    const int64_t base = (tok0 + r) * p.ld_o + int64_t(h) * p.hd;
#pragma unroll
    for (int dc = 0; dc < ND; ++dc)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int d = dc * 64 + nt * 8 + 2 * t;
        const float x0 = o[dc][nt][2 * hr], x1 = o[dc][nt][2 * hr + 1];
        *reinterpret_cast<float2*>(p.o32 + base + d) = make_float2(x0, x1);
        *reinterpret_cast<__nv_bfloat162*>(p.att + base + d) =
            __halves2bfloat162(__float2bfloat16_rn(x0), __float2bfloat16_rn(x1));
      }
    if (t == 0 && !p.stats_in) {
      const int64_t si = (int64_t(b) * p.H + h) * p.T + r;
      p.m[si] = mrow[hr];
      p.l[si] = lrow[hr];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, ping-pong: one template (attn_bwd_sm90_kernel) for dQ (both head sizes) and for dK with dV (head_dim
// 128; at 256 see attn_dkdv_sm90_kernel below), each block computing a 64-row block of its result over the whole
// head dimension. The block's fixed 64-row tiles (X: Q and dO for dQ; K and V for dK, dV) are shared by both
// warpgroups; the tiles of the other side (Y: K and V for dQ; Q and dO of each of the kv head's query heads for dK,
// dV) alternate between them, warpgroup w taking tiles w, w + 2, ... into its own buffers, with its own fp32
// accumulators (64 x HD: 128 registers a thread for dQ at head_dim 256, for dK and dV together at 128). Nothing but
// the final sum couples the warpgroups, so one can compute its scores while the other's products run (ping-pong;
// the forward's turn-taking between the warpgroups, tried here, measured the same at head_dim 256 and 2.8% slower
// at 128, so nothing orders them). The warpgroup's first thread copies its next Y tiles by TMA once the products
// reading its buffers are complete (one buffer each: two per warpgroup do not fit beside X at head_dim 256); the
// split-tile kernels before (one tile at a time shared by the warpgroups, two block-wide barriers a tile) kept the
// tensor pipe 29-35% busy (ncu at 9b, T = 4096). Per tile a warpgroup computes S = X1 Y1^T and dP = X2 Y2^T as
// m64n64 products over the head dimension, turns them into dS (its three exact bf16 terms) and, for dV, P as bf16 A
// fragments in registers (the accumulator layout is the A layout, as P in the forward), and adds dS K (dQ), or dS^T
// Q and P^T dO (dK, dV), as m64nHD products with A from registers. At the end warpgroup 1's sums go through shared
// memory and warpgroup 0 adds them to its own: a fixed order, so two runs give the same bits.
enum AttnBwdPart { kAttnDQ, kAttnDKDV };

template <int HD>
constexpr int attn_bwd_sm90_smem() {
  // X1, X2, each warpgroup's Y1 and Y2, each warpgroup's [m; l; D] of its tile's 64 queries, alignment slack, five
  // mbarriers (X; each warpgroup's Y1 and Y2)
  return 1024 + 6 * 64 * HD * 2 + 2 * 3 * 64 * 4 + 5 * 8;
}
struct AttnBwdTmaps {
  CUtensorMap q, k, v, dout;  // tma_rows_map over p.q, p.k, p.v, p.dout, 64-row boxes
};

template <int HD, int PART>
__global__ void __launch_bounds__(kSm90Threads, 1)
    attn_bwd_sm90_kernel(const AttnParams p, const __grid_constant__ AttnBwdTmaps tm) {
#ifndef GEMMA_SM90_DEVICE
  __trap();  // built without wgmma: attn_sm90_applies never launches this
#endif
  constexpr int NP = HD / 64;
  constexpr uint32_t TB = 64 * HD * 2;
  constexpr bool kDQ = PART == kAttnDQ, kDKDV = PART == kAttnDKDV;
  // Accumulators: dQ; or dK and dV (kDKDV, head_dim 128 only: 128 registers a thread, as dQ's at 256).
  constexpr int NACC = kDKDV ? 2 : 1;
  static_assert(!kDKDV || HD == 128, "dK and dV in one kernel at head_dim 128 only");
  // The A terms of a tile: dS's three bf16 terms, and for kDKDV P's one (in 3).
  constexpr int NTERM = kDKDV ? 4 : 3;
  extern __shared__ __align__(16) unsigned char smem_sm90[];
  const uint32_t s0 = smem_addr(smem_sm90), sX1 = (s0 + 1023u) & ~1023u, sX2 = sX1 + TB;
  // The warpgroup index from lane 0, so that ptxas knows the branches around the products are warp-uniform
  // (attn_fwd_sm90_kernel).
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x >> 7), 0), tid = threadIdx.x & 127,
            warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint32_t sY1 = sX1 + 2 * TB + uint32_t(wg) * 2 * TB, sY2 = sY1 + TB;
  const uint32_t sStat = sX1 + 6 * TB + uint32_t(wg) * (3 * 64 * 4);
  const uint32_t bar_x = sX1 + 6 * TB + 2 * 3 * 64 * 4, bar_y1 = bar_x + 8 + 16 * wg, bar_y2 = bar_y1 + 8;
  float* stat = reinterpret_cast<float*>(smem_sm90 + (sStat - s0));
  const int b = blockIdx.y, G = p.H / p.KV;
  const int64_t tok0 = int64_t(b) * p.T;

  // dQ: the block's 64 queries of head h (the longest rows first, as the forward), the key tiles they see.
  // dK, dV: the block's 64 keys of kv head kvh (the earliest keys, seen by the most queries, first), the 64-query
  // tiles of each of its G query heads that see them.
  int r0, h = 0, kvh, kt0 = 0, qt0 = 0, nqt = 1, total;
  if constexpr (kDQ) {
    r0 = (gridDim.z - 1 - blockIdx.z) * 64;
    h = blockIdx.x;
    kvh = h / G;
    const int j_end = min(p.T, r0 + 64), j_begin = p.window > 0 ? max(0, r0 - p.window + 1) : 0;
    kt0 = j_begin / 64;
    total = (j_end + 63) / 64 - kt0;
  } else {
    r0 = blockIdx.z * 64;
    kvh = blockIdx.x;
    const int i_end = p.window > 0 ? min(p.T, r0 + 63 + p.window) : p.T;
    qt0 = r0 / 64;
    nqt = (i_end + 63) / 64 - qt0;
    total = G * nqt;
  }
  // Tile it of the other side: its first row, and (dK, dV) its query head (one division, once per tile).
  struct YTile {
    int row, head;
  };
  auto y_tile = [&](int it) {
    if constexpr (kDQ) return YTile{(kt0 + it) * 64, h};
    const int hi = it / nqt;
    return YTile{(qt0 + it - hi * nqt) * 64, kvh * G + hi};
  };
  // A tile's copies by TMA, issued by the warpgroup's first thread, each completing on its own barrier.
  auto load_y1 = [&](YTile y) {  // K (dQ) or Q (dK, dV)
    if (tid == 0) tma_tile<64, HD>(sY1, kDQ ? &tm.k : &tm.q, (kDQ ? kvh : y.head) * p.hd, y.row, b, bar_y1);
  };
  auto load_y2 = [&](YTile y) {  // V (dQ) or dO (dK, dV)
    if (tid == 0) tma_tile<64, HD>(sY2, kDQ ? &tm.v : &tm.dout, (kDQ ? kvh : y.head) * p.hd, y.row, b, bar_y2);
  };
  // The saved m, l (and D) of a tile's 64 queries (dK, dV; rows past T zero), read per score column once
  // invert_l has made l its reciprocal.
  auto load_stats = [&](YTile y) {
    if constexpr (!kDQ) {
      const int64_t si0 = (int64_t(b) * p.H + y.head) * p.T;
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        if (tid >= 64) break;
        const float* src = a == 0 ? p.m : a == 1 ? p.l : p.Dv;
        const int i = y.row + tid;
        cp_async4(sStat + uint32_t((a * 64 + tid) * 4), src + si0 + (i < p.T ? i : 0), i < p.T);
      }
    }
  };

  // dK, dV: once this thread's copies of a tile's statistics are complete, the l it copied becomes 1 / l
  // (attn_inv_l; 1 for rows past T, as before), so the per-score loop reads a reciprocal per query instead of
  // computing one per score pair (a correctly rounded reciprocal is several instructions).
  auto invert_l = [&](YTile y) {
    if constexpr (!kDQ)
      if (tid < 64) stat[64 + tid] = attn_inv_l(y.row + tid < p.T ? stat[64 + tid] : 1.0f);
  };

  if (threadIdx.x == 0) {
    mbar_init(bar_x, 2);  // X1 and X2 arrive with their bytes
    for (int i = 1; i <= 4; ++i) mbar_init(bar_x + 8 * i, 1);  // each warpgroup's Y1 and Y2
    mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if constexpr (kDQ) {
      tma_tile<64, HD>(sX1, &tm.q, h * p.hd, r0, b, bar_x);
      tma_tile<64, HD>(sX2, &tm.dout, h * p.hd, r0, b, bar_x);
    } else {
      tma_tile<64, HD>(sX1, &tm.k, kvh * p.hd, r0, b, bar_x);
      tma_tile<64, HD>(sX2, &tm.v, kvh * p.hd, r0, b, bar_x);
    }
  }
  if (wg < total) {
    const YTile y = y_tile(wg);
    load_y1(y);
    load_y2(y);
    load_stats(y);
  }
  cp_commit();  // the statistics (dK, dV)

  // dQ: this thread's two query rows' statistics, for every tile.
  const int rr[2] = {warp * 16 + g, warp * 16 + g + 8};  // rows of the score tile (queries for dQ, keys otherwise)
  float mrow[2] = {}, inv_lrow[2] = {}, Drow[2] = {};
  if constexpr (kDQ) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int i = r0 + rr[hr];
      const bool ok = i < p.T;
      const int64_t si = (int64_t(b) * p.H + h) * p.T + i;
      mrow[hr] = ok ? p.m[si] : 0.0f;
      inv_lrow[hr] = attn_inv_l(ok ? p.l[si] : 1.0f);
      Drow[hr] = ok ? p.Dv[si] : 0.0f;
    }
  }
  float acc[NACC][NP][8][4];
#pragma unroll
  for (int n = 0; n < NACC; ++n)
#pragma unroll
    for (int dc = 0; dc < NP; ++dc)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        acc[n][dc][nt][0] = acc[n][dc][nt][1] = acc[n][dc][nt][2] = acc[n][dc][nt][3] = 0.0f;

  YTile cur = y_tile(wg);
  if constexpr (kDKDV) {
    cp_wait<0>();
    if (wg < total) invert_l(cur);
  }
  __syncthreads();  // each warpgroup's first statistics (dK, dV)
  mbar_wait(bar_x, 0);
  for (int it = wg, j = 0; it < total; it += 2, ++j) {
    const YTile next = y_tile(it + 2);  // meaningful when it + 2 < total
    if constexpr (kDKDV)
      if (it != wg) {
        cp_wait<0>();
        invert_l(cur);
        wg_bar(wg);  // this warpgroup's copies of tile it's statistics
      }
    mbar_wait(bar_y1, uint32_t(j) & 1u);
    mbar_wait(bar_y2, uint32_t(j) & 1u);
    float s[8][4], dp[8][4];
    wg_abt_pair<HD>(s, sX1, sY1, dp, sX2, sY2);
    if constexpr (kDQ) {
      if (it + 2 < total) {  // V is read by no later product of this tile: fetch the next one now
        wg_bar(wg);
        load_y2(next);
      }
    }

    // dS (three bf16 terms) and, for dV, P as the A fragments of the k16 steps over this tile's 64 columns.
    uint32_t a[NTERM][4][4];
    const int x0 = cur.row;  // first column: key (dQ) or query (dK, dV)
    // Every score of the tile visible (attn_tile_full with the queries as rows: r0.. for dQ, x0.. for dK, dV).
    const bool full =
        !p.doc && !p.key_ok &&
        (kDQ ? x0 + 63 <= r0 && r0 + 63 < p.T && (p.window <= 0 || r0 + 63 - x0 < p.window)
             : r0 + 63 <= x0 && x0 + 63 < p.T && (p.window <= 0 || x0 + 63 - r0 < p.window));
    attn_tile_kind(p.cap_on, full, [&](auto cap, auto full_c) {
      constexpr bool kCap = decltype(cap)::value, kFull = decltype(full_c)::value;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        // The statistics of this thread's two columns: the row's (dQ), or its two queries' (dK, dV: read as
        // pairs; rows past T m = D = 0, cp_async4's zero fill, and 1 / l = 1).
        float stc[3][2] = {};
        if constexpr (!kDQ) {
          const int c = nt * 8 + 2 * t;
#pragma unroll
          for (int k = 0; k < 3; ++k) {
            const float2 v = *reinterpret_cast<const float2*>(stat + 64 * k + c);
            stc[k][0] = v.x, stc[k][1] = v.y;
          }
        }
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          float ds[2];
          bool vis[2];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int c = x0 + nt * 8 + 2 * t + u, r = r0 + rr[hr];
            vis[u] = kFull || attn_visible(p, b, kDQ ? r : c, kDQ ? c : r);
          }
          const float sc[2] = {s[nt][2 * hr], s[nt][2 * hr + 1]}, dpc[2] = {dp[nt][2 * hr], dp[nt][2 * hr + 1]};
          const float mc[2] = {kDQ ? mrow[hr] : stc[0][0], kDQ ? mrow[hr] : stc[0][1]},
                      inv_lc[2] = {kDQ ? inv_lrow[hr] : stc[1][0], kDQ ? inv_lrow[hr] : stc[1][1]},
                      Dc[2] = {kDQ ? Drow[hr] : stc[2][0], kDQ ? Drow[hr] : stc[2][1]};
          if constexpr (kDQ) {  // P's value only: the paired form made ptxas spill here at head_dim 256
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              float pv;
              ds[u] = attn_ds_k<kCap>(sc[u], dpc[u], mc[u], inv_lc[u], Dc[u], vis[u], pv, p);
            }
          }
          const int ks = nt >> 1, slot = (nt & 1) * 2 + hr;  // the forward's round_p order
          if constexpr (kDKDV)  // P also as dV's A operand
            attn_ds2_k<kCap>(sc, dpc, mc, inv_lc, Dc, vis, ds, a[NTERM - 1][ks][slot], p);
          split3x2(ds[0], ds[1], a[0][ks][slot], a[1][ks][slot], a[2][ks][slot]);
        }
      }
    });

    // acc += A B over the tile's 64 columns, B N-major over NP panels: dQ += dS K; dK += dS^T Q, dV += P^T dO.
#pragma unroll
    for (int x = 0; x < NTERM; ++x)
#pragma unroll
      for (int k = 0; k < 4; ++k)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[x][k][i])::"memory");
#pragma unroll
    for (int n = 0; n < NACC; ++n)
#pragma unroll
      for (int dc = 0; dc < NP; ++dc) wg_hold(acc[n][dc]);
    const uint64_t dy1 = desc_nmajor_panels(sY1, 64 * 128), dy2 = desc_nmajor_panels(sY2, 64 * 128);
    wg_arrive();
#pragma unroll
    for (int x = 0; x < (kDKDV ? 3 : NTERM); ++x)
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) wgmma_rs_panels<NP>(acc[0], a[x][ks], desc_advance(dy1, ks * 2048));
    if constexpr (kDKDV) {
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) wgmma_rs_panels<NP>(acc[NACC - 1], a[NTERM - 1][ks], desc_advance(dy2, ks * 2048));
    }
    wg_commit();
    wg_wait<0>();
#pragma unroll
    for (int n = 0; n < NACC; ++n)
#pragma unroll
      for (int dc = 0; dc < NP; ++dc) wg_hold(acc[n][dc]);
    if (it + 2 < total) {  // every product reading this tile is complete: fetch the next tile
      wg_bar(wg);
      load_y1(next);
      if constexpr (kDKDV) load_y2(next);
      load_stats(next);
      cp_commit();
    }
    cur = next;
  }

  // Warpgroup 1's sums, in its own fragment order, into shared memory (all of it is free once both warpgroups'
  // products are complete); warpgroup 0 adds them to its own.
  static_assert(NACC * 64 * HD * 4 <= 6 * int(TB), "the sums fit in the tiles' space");
  float* red = reinterpret_cast<float*>(smem_sm90 + (sX1 - s0));
  __syncthreads();  // every product of both warpgroups is complete
  if (wg == 1) {
#pragma unroll
    for (int n = 0; n < NACC; ++n)
#pragma unroll
      for (int dc = 0; dc < NP; ++dc)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) red[(((n * NP + dc) * 8 + nt) * 4 + e) * 128 + tid] = acc[n][dc][nt][e];
  }
  __syncthreads();
  if (wg == 1) return;
  const int64_t ld = kDQ ? p.ld_o : p.ld_dkv;
  const int col0 = (kDQ ? h : kvh) * p.hd;
#pragma unroll
  for (int n = 0; n < NACC; ++n) {
    float* out = kDQ ? p.dq : n == 1 ? p.dv : p.dk;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = r0 + rr[hr];
      if (r >= p.T) continue;
      const int64_t base = (tok0 + r) * ld + col0;
#pragma unroll
      for (int dc = 0; dc < NP; ++dc)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int d = dc * 64 + nt * 8 + 2 * t, f = (((n * NP + dc) * 8 + nt) * 4 + 2 * hr) * 128 + tid;
          *reinterpret_cast<float2*>(out + base + d) =
              make_float2(acc[n][dc][nt][2 * hr] + red[f], acc[n][dc][nt][2 * hr + 1] + red[f + 128]);
        }
    }
  }
}

// dK and dV at head_dim 256 (attn_dkdv_sm90_kernel): both accumulators over the whole head dimension would need
// 256 registers a thread, so the ping-pong schedule above does not apply (separate dK and dV kernels measured slower
// than one fused kernel: docs/benchmarks.md, 2.22 + 1.91 ms against 3.90 in one step of 4 layers at 9b, T = 4096,
// ncu). The work is split by kind instead (warp specialisation): warpgroups 0 and 1, the consumers, each keep dK and
// dV for half of the head dimension (128 registers a thread) and only multiply; warpgroup 2, the scorer, computes each
// 64 x 64 tile's S^T = K Q^T and dP^T = V dO^T, turns them into the bf16 operand tiles in shared memory (P and the
// three terms of the dS split; P and sech^2 while dP^T's product runs, the two being separate commit groups) and
// hands them over. The scorer's work on tile i + 1 runs while the consumers'
// products of tile i do, where the split-tile kernel before (the two warpgroups computing half a tile's scores each,
// then both multiplying, two block-wide barriers a tile) left the tensor cores idle during the per-score work.
// Hand-over, by named barriers of all 384 threads, in two parts: P's tile as soon as P is computed (kPFull; kPFree once
// the consumers' dV product of the last tile is complete), so that dV's product runs while the scorer computes dS, and
// the three dS tiles after (kSFull; kSFree once the dK products are complete). The tiles are written by stmatrix. (One
// hand-over of all four tiles before, each 32-bit word stored by itself: ncu had the kernel at 2.07 ms, 2.01 with the
// two parts; docs/benchmarks.md, eighteenth session.) The dS tiles of tile i are stored at the end of iteration i but
// released (kSFull) only once tile i + 1's S^T product is complete, so the scorer's products run ahead of the
// consumers' dK products instead of queueing behind them (nineteenth session: a tile every 4633 cycles instead of
// 5276, by clock64 stamps in one block). Q and dO are double
// buffered: consumer c copies (TMA) its half of the head dimension of tile i + 2 into tile i's buffer once its own
// products reading that half are complete, consumer 0 with the tile's statistics (m, 1 / l and D, which
// attn_rowdot_kernel lays out a tile at a time: one bulk copy); the scorer copies K, V and the first two tiles.
// (Until the nineteenth session the scorer copied each tile's statistics itself, by cp.async a tile ahead, and
// turned l into 1 / l, behind a barrier of its four warps: ncu's samples put 18% of the scorer's time there.) The
// products, their operands and their order are those of the split-tile kernel, so the results are the same bits.

// acc (64 x 128: columns of panels first and first + 1 of Y) += X Y over 64 k: X a 64 x 64 K-major operand tile,
// Y a 64-row N-major tile (rows are k) of 64-column panels.
__device__ __forceinline__ void wg_xy(float (&acc)[2][8][4], uint32_t x, uint32_t y, int first) {
  const uint64_t dx = desc_kmajor(x), dy = desc_nmajor_panels(y + first * (64 * 128), 64 * 128);
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)  // both panels in one n128 product per k step
    wgmma_ss_n128<1>(acc[0], acc[1], desc_advance(dx, ks * 32), desc_advance(dy, ks * 2048));
}

// A warp's 16 rows of a 64 x 64 swizzled operand tile from the accumulator layout: w[nt][hr] packs (pack_bf16, the
// lower column in the low half) the values at row 16 warp + g + 8 hr, columns 8 nt + 2t, 8 nt + 2t + 1 (lane 4g + t).
// One stmatrix per pair of 8-column chunks; row[cp] is this lane's row address for chunks 2 cp, 2 cp + 1
// (stmatrix_rows).
__device__ __forceinline__ void st_tile64(const uint32_t (&row)[4], uint32_t tile, const uint32_t (&w)[8][2]) {
#pragma unroll
  for (int cp = 0; cp < 4; ++cp) {
    const uint32_t v[4] = {w[2 * cp][0], w[2 * cp][1], w[2 * cp + 1][0], w[2 * cp + 1][1]};
    stmatrix_x4_at(tile + row[cp], v);
  }
}
// Lane l's row offsets for st_tile64: matrix q = l / 8 of an stmatrix_x4 is rows g + 8 (q mod 2) of chunk 2 cp + q / 2
// (the order of st_tile64's registers), so lane l addresses row 16 warp + (l mod 8) + 8 ((l / 8) mod 2) of chunk
// 2 cp + l / 16.
__device__ __forceinline__ void stmatrix_rows(int warp, int lane, uint32_t (&row)[4]) {
  const int r = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1), half = (lane >> 4) & 1;
#pragma unroll
  for (int cp = 0; cp < 4; ++cp) row[cp] = swz<64>(r, 8 * (2 * cp + half));
}

constexpr int kDkdvThreads = 384;  // two consumer warpgroups and the scorer
template <int HD>
constexpr int attn_dkdv_sm90_smem() {
  // K and V, Q and dO double-buffered, four operand tiles, two buffers of a tile's m, 1 / l, D, three mbarriers (K
  // and V; each buffer's Q, dO and statistics)
  return 1024 + 6 * 64 * HD * 2 + 4 * 64 * 64 * 2 + 2 * 3 * 64 * 4 + 3 * 8;
}

// dK, dV: a block per (64 keys, kv head, sequence), looping over the group's query heads and the 64-query tiles
// that see the keys. Consumer c accumulates dK, dV for head-dimension columns c HD/2 .. (c + 1) HD/2 - 1.
template <int HD>
__global__ void __launch_bounds__(kDkdvThreads, 1)
    attn_dkdv_sm90_kernel(const AttnParams p, const __grid_constant__ AttnBwdTmaps tm) {
#ifndef GEMMA_SM90_DEVICE
  __trap();  // built without wgmma: attn_sm90_applies never launches this
#endif
  static_assert(HD == 256, "head_dim 128 takes the ping-pong dK, dV kernel");
  constexpr int BK = 64, BQ = 64, NDH = HD / 128;
  static_assert(BQ == kAttnStatsTile, "a query tile's statistics are one tile of p.tile_stats");
  constexpr uint32_t TB = 64 * HD * 2, OB = 64 * 64 * 2;
  // named barriers (1 and 2 are wg_bar's): the P tile written / read, the dS tiles written / read
  constexpr int kPFull = 5, kPFree = 6, kSFull = 8, kSFree = 9;
  extern __shared__ __align__(16) unsigned char smem_sm90[];
  const uint32_t sK = (smem_addr(smem_sm90) + 1023u) & ~1023u;
  const uint32_t sV = sK + TB, sQ = sV + TB, sO = sQ + 2 * TB, sP = sO + 2 * TB, sS = sP + OB;  // sS: 3 tiles
  const uint32_t sStat = sS + 3 * OB;  // two buffers of [m; 1 / l; D] for a tile's 64 queries
  const uint32_t bar_kv = sStat + 2 * 3 * 64 * 4, bar_t = bar_kv + 8;  // bar_t + 8 bf: buffer bf's Q, dO, statistics
  float* stat = reinterpret_cast<float*>(smem_sm90 + (sStat - smem_addr(smem_sm90)));
  // The warpgroup index from lane 0, so that ptxas knows the branches around the products are warp-uniform
  // (attn_fwd_sm90_kernel).
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x >> 7), 0), tid = threadIdx.x & 127,
            warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // the earliest keys, seen by the most queries, first (the launch order above)
  const int j0 = blockIdx.z * BK, kvh = blockIdx.x, b = blockIdx.y;
  const int G = p.H / p.KV;
  const int i_end = p.window > 0 ? min(p.T, j0 + BK - 1 + p.window) : p.T;
  const int qt0 = j0 / BQ, nqt = (i_end + BQ - 1) / BQ - qt0, total = G * nqt;
  auto row_of = [&](int it) { return (qt0 + it % nqt) * BQ; };
  // Half c of the head dimension (panels 2c, 2c + 1) of tile it's Q and dO into buffer bf, and with half 0 the
  // tile's statistics [m; 1 / l; D] (p.tile_stats, one bulk copy of 768 bytes), one arrival on the buffer's barrier
  // with the bytes. One thread.
  auto load_half = [&](int it, int bf, int c) {
    const int h = kvh * G + it / nqt, col = h * p.hd + c * 128;
    const uint32_t bar = bar_t + 8 * bf;
    mbar_expect_tx(bar, 2 * 2 * 64 * 128 + (c == 0 ? 3 * BQ * 4 : 0));
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      tma_load_3d(sQ + bf * TB + (2 * c + q) * (64 * 128), &tm.q, col + q * 64, row_of(it), b, bar);
      tma_load_3d(sO + bf * TB + (2 * c + q) * (64 * 128), &tm.dout, col + q * 64, row_of(it), b, bar);
    }
    if (c == 0)
      bulk_load(sStat + uint32_t(bf * 3 * BQ * 4),
                p.tile_stats + attn_tile_stats_offset(p.H, p.T, b, h, row_of(it)), 3 * BQ * 4, bar);
  };

  if (threadIdx.x == 0) {
    for (int i = 0; i < 3; ++i) mbar_init(bar_kv + 8 * i, 2);  // two arrivals with bytes each
    mbar_init_fence();
  }
  __syncthreads();  // the last block-wide barrier

  const int key[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
  if (wg == 2) {  // the scorer
    if (tid == 0) {
      tma_tile<BK, HD>(sK, &tm.k, kvh * p.hd, j0, b, bar_kv);
      tma_tile<BK, HD>(sV, &tm.v, kvh * p.hd, j0, b, bar_kv);
      for (int it = 0; it < 2 && it < total; ++it) {
        load_half(it, it, 0);
        load_half(it, it, 1);
      }
    }
    uint32_t st_row[4];
    stmatrix_rows(warp, lane, st_row);
    mbar_wait(bar_kv, 0);
    for (int it = 0; it < total; ++it) {
      const int buf = it & 1;
      mbar_wait(bar_t + 8 * buf, uint32_t(it >> 1) & 1u);  // this tile's Q, dO and statistics
      const int i0 = row_of(it);
      float st[8][4], dpt[8][4];
      wg_abt_pair_issue<HD>(st, sK, sQ + buf * TB, dpt, sV, sO + buf * TB);
      wg_wait<1>();
      wg_hold(st);
      // Only now do the consumers get tile it - 1's dS tiles (stored at the end of the last iteration): their dK
      // products issued beside this tile's S^T and dP^T held the scorer's own issue up behind them (clock64 stamps:
      // 2366 cycles from the loop's head to the last product issued, 1017 with the tensor cores to itself).
      if (it > 0) bar_arrive(kSFull, kDkdvThreads);
      // P and dS's three terms as bf16 pairs, held until the operand tiles are free. P (and sech^2 / 4, in place of
      // the scores) while dP^T's product runs, then dS.
      uint32_t wp[8][2], w1[8][2], w2[8][2], w3[8][2];
      const bool full = !p.doc && !p.key_ok && i0 >= j0 + BK - 1 && i0 + BQ - 1 < p.T &&
                        (p.window <= 0 || i0 + BQ - 1 - j0 < p.window);
      // [m; 1 / l; D] of queries i and i + 1, read as pairs (past T 0, 1 and 0: attn_rowdot_kernel)
      const float* sq = stat + buf * 3 * BQ + 2 * t;
      attn_tile_kind(p.cap_on, full, [&](auto cap, auto full_c) {
        constexpr bool kCap = decltype(cap)::value, kFull = decltype(full_c)::value;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int i = i0 + nt * 8 + 2 * t;
          const float2 m2 = *reinterpret_cast<const float2*>(sq + nt * 8),
                       l2 = *reinterpret_cast<const float2*>(sq + nt * 8 + BQ);
          const float mq[2] = {m2.x, m2.y}, inv_lq[2] = {l2.x, l2.y};
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const bool vis[2] = {kFull || attn_visible(p, b, i, key[hr]), kFull || attn_visible(p, b, i + 1, key[hr])};
            const float sc[2] = {st[nt][2 * hr], st[nt][2 * hr + 1]};
            float sech2_q[2];
            attn_p2_k<kCap>(sc, mq, inv_lq, vis, sech2_q, wp[nt][hr], p);
            st[nt][2 * hr] = sech2_q[0];
            st[nt][2 * hr + 1] = sech2_q[1];
          }
        }
      });
      // P goes to its tile now, so that the consumers' dV product runs while dS is computed.
      if (it > 0) bar_sync(kPFree, kDkdvThreads);  // the consumers' dV product of tile it - 1 is complete
      st_tile64(st_row, sP, wp);
      fence_async_smem();
      bar_arrive(kPFull, kDkdvThreads);
      wg_wait<0>();
      wg_hold(dpt);
      // vis is recomputed (only on tiles not wholly visible): 32 flags held across would cost registers.
      attn_tile_kind(p.cap_on, full, [&](auto cap, auto full_c) {
        constexpr bool kCap = decltype(cap)::value, kFull = decltype(full_c)::value;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int i = i0 + nt * 8 + 2 * t;
          const float2 d2 = *reinterpret_cast<const float2*>(sq + nt * 8 + 2 * BQ);
          const float Dq[2] = {d2.x, d2.y};
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const bool vis[2] = {kFull || attn_visible(p, b, i, key[hr]), kFull || attn_visible(p, b, i + 1, key[hr])};
            const float dpc[2] = {dpt[nt][2 * hr], dpt[nt][2 * hr + 1]}, sech2_q[2] = {st[nt][2 * hr], st[nt][2 * hr + 1]};
            float ds[2];
            attn_ds2_from_p<kCap>(wp[nt][hr], dpc, Dq, sech2_q, vis, ds, p);
            split3x2(ds[0], ds[1], w1[nt][hr], w2[nt][hr], w3[nt][hr]);
          }
        }
      });
      if (it > 0) bar_sync(kSFree, kDkdvThreads);  // the consumers' dK products of tile it - 1 are complete
      st_tile64(st_row, sS, w1);
      st_tile64(st_row, sS + OB, w2);
      st_tile64(st_row, sS + 2 * OB, w3);
      fence_async_smem();
    }
    bar_arrive(kSFull, kDkdvThreads);  // the last tile's dS tiles
    return;
  }

  // The consumers.
  const int64_t tok0 = int64_t(b) * p.T;
  float dk[NDH][8][4], dv[NDH][8][4];
#pragma unroll
  for (int dc = 0; dc < NDH; ++dc)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[dc][nt][e] = dv[dc][nt][e] = 0.0f;
  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    bar_sync(kPFull, kDkdvThreads);  // tile it's P (and so its Q and dO, which the scorer waited for)
#pragma unroll
    for (int dc = 0; dc < NDH; ++dc) {
      wg_hold(dk[dc]);
      wg_hold(dv[dc]);
    }
    wg_arrive();
    wg_xy(dv, sP, sO + buf * TB, wg * NDH);
    wg_commit();
    bar_sync(kSFull, kDkdvThreads);  // tile it's dS terms
    wg_arrive();
    wg_xy(dk, sS, sQ + buf * TB, wg * NDH);
    wg_xy(dk, sS + OB, sQ + buf * TB, wg * NDH);
    wg_xy(dk, sS + 2 * OB, sQ + buf * TB, wg * NDH);
    wg_commit();
    wg_wait<1>();
#pragma unroll
    for (int dc = 0; dc < NDH; ++dc) wg_hold(dv[dc]);
    if (it + 1 < total) bar_arrive(kPFree, kDkdvThreads);  // P's tile is read
    wg_wait<0>();
#pragma unroll
    for (int dc = 0; dc < NDH; ++dc) {
      wg_hold(dk[dc]);
      wg_hold(dv[dc]);
    }
    // This warpgroup's half of buffer buf is read: tile it + 2 goes there. The other half is the other's. Consumer 0
    // also overwrites the buffer's statistics, which the scorer read before it released tile it's dS (kSFull).
    if (tid == 0 && it + 2 < total) load_half(it + 2, buf, wg);
    if (it + 1 < total) bar_arrive(kSFree, kDkdvThreads);
  }

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int j = key[hr];
    if (j >= p.T) continue;
    const int64_t base = (tok0 + j) * p.ld_dkv + int64_t(kvh) * p.hd;
#pragma unroll
    for (int dc = 0; dc < NDH; ++dc)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int d = (wg * NDH + dc) * 64 + nt * 8 + 2 * t;
        *reinterpret_cast<float2*>(p.dk + base + d) = make_float2(dk[dc][nt][2 * hr], dk[dc][nt][2 * hr + 1]);
        *reinterpret_cast<float2*>(p.dv + base + d) = make_float2(dv[dc][nt][2 * hr], dv[dc][nt][2 * hr + 1]);
      }
  }
}

// Whether a call takes the Hopper path: built for sm_90a (GEMMA_FAST_WGMMA), not switched off, on an sm_90 device,
// a head size it has, rows TMA can copy (16-byte aligned, row strides too), and outputs it can write two at a time
// (float2 and bf16 pairs: even row strides, 8-byte aligned fp32 outputs).
inline bool attn_aligned(const void* ptr, uintptr_t a) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % a == 0; }
inline bool attn_sm90_applies(const AttnParams& p) {
#ifdef GEMMA_FAST_WGMMA
  return !p.mma_only && (p.hd == 128 || p.hd == 256) && p.vec && p.ld_o % 2 == 0 && p.ld_dkv % 2 == 0 &&
         attn_aligned(p.att, 4) && attn_aligned(p.o32, 8) && attn_aligned(p.dq, 8) && attn_aligned(p.dk, 8) &&
         attn_aligned(p.dv, 8) && attn_hopper();
#else
  (void)p;
  return false;
#endif
}

template <int HD>
void attn_fwd_sm90_launch(const AttnParams& p, cudaStream_t st) {
  constexpr int smem = attn_fwd_sm90_smem<HD>();
  AttnTmaps tm;
  tm.q = tma_rows_map(p.q, int64_t(p.H) * p.hd, p.T, p.B, p.ld_qkv, 128);
  tm.k = tma_rows_map(p.k, int64_t(p.KV) * p.hd, p.T, p.B, p.ld_qkv, 64);
  tm.v = tma_rows_map(p.v, int64_t(p.KV) * p.hd, p.T, p.B, p.ld_qkv, 64);
  attn_check_grid(p.B, (p.T + 127) / 128);
  const dim3 grid(unsigned(p.H), unsigned(p.B), unsigned((p.T + 127) / 128));
  GEMMA_CUDA(cudaFuncSetAttribute(attn_fwd_sm90_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  attn_fwd_sm90_kernel<HD><<<grid, kFwdThreads, smem, st>>>(p, tm);
  GEMMA_LAUNCHED("attn_fwd_sm90_kernel");
}

// att, o32, m, l from q, k, v.
inline void attention_forward(AttnParams p, cudaStream_t st) {
  if (p.B == 0 || p.T == 0) return;
  attn_set_derived(p);
  if (!attn_sm90_applies(p)) return attention_forward_mma(p, st);
  if (p.hd == 256)
    attn_fwd_sm90_launch<256>(p, st);
  else
    attn_fwd_sm90_launch<128>(p, st);
}

template <int HD>
void attn_bwd_sm90_launch(const AttnParams& p, cudaStream_t st) {
  AttnBwdTmaps tm;
  tm.q = tma_rows_map(p.q, int64_t(p.H) * p.hd, p.T, p.B, p.ld_qkv, 64);
  tm.k = tma_rows_map(p.k, int64_t(p.KV) * p.hd, p.T, p.B, p.ld_qkv, 64);
  tm.v = tma_rows_map(p.v, int64_t(p.KV) * p.hd, p.T, p.B, p.ld_qkv, 64);
  tm.dout = tma_rows_map(p.dout, int64_t(p.H) * p.hd, p.T, p.B, p.ld_o, 64);
  attn_check_grid(p.B, (p.T + 63) / 64);
  const dim3 grid_q(unsigned(p.H), unsigned(p.B), unsigned((p.T + 63) / 64));
  const dim3 grid_k(unsigned(p.KV), unsigned(p.B), unsigned((p.T + 63) / 64));
  constexpr int smem = attn_bwd_sm90_smem<HD>();
  constexpr auto kMaxSmem = cudaFuncAttributeMaxDynamicSharedMemorySize;
  GEMMA_CUDA(cudaFuncSetAttribute(attn_bwd_sm90_kernel<HD, kAttnDQ>, kMaxSmem, smem));
  attn_bwd_sm90_kernel<HD, kAttnDQ><<<grid_q, kSm90Threads, smem, st>>>(p, tm);
  GEMMA_LAUNCHED("attn_bwd_sm90_kernel (dq)");
  if constexpr (HD == 128) {
    GEMMA_CUDA(cudaFuncSetAttribute(attn_bwd_sm90_kernel<HD, kAttnDKDV>, kMaxSmem, smem));
    attn_bwd_sm90_kernel<HD, kAttnDKDV><<<grid_k, kSm90Threads, smem, st>>>(p, tm);
    GEMMA_LAUNCHED("attn_bwd_sm90_kernel (dk, dv)");
  } else {
    constexpr int smem_kv = attn_dkdv_sm90_smem<HD>();
    GEMMA_CUDA(cudaFuncSetAttribute(attn_dkdv_sm90_kernel<HD>, kMaxSmem, smem_kv));
    attn_dkdv_sm90_kernel<HD><<<grid_k, kDkdvThreads, smem_kv, st>>>(p, tm);
    GEMMA_LAUNCHED("attn_dkdv_sm90_kernel");
  }
}

// dq, dk, dv (fp32, before the RoPE backward) from dout (bf16), o32, m, l and a recomputation of the scores.
inline void attention_backward(AttnParams p, cudaStream_t st) {
  if (p.B == 0 || p.T == 0) return;
  attn_set_derived(p);
  // Only the head_dim 256 dK, dV kernel reads the tile layout of the statistics: elsewhere the rowdot kernel skips it.
  if (!attn_sm90_applies(p) || p.hd != 256) p.tile_stats = nullptr;
  else if (p.tile_stats == nullptr) throw std::logic_error("attention_backward: head_dim 256 needs p.tile_stats");
  if (!attn_sm90_applies(p)) return attention_backward_mma(p, st);
  const int64_t warps = int64_t(p.B) * p.T * p.H;
  attn_rowdot_kernel<<<unsigned((warps * 32 + 255) / 256), 256, 0, st>>>(p);
  GEMMA_LAUNCHED("attn_rowdot_kernel");
  if (p.hd == 256)
    attn_bwd_sm90_launch<256>(p, st);
  else
    attn_bwd_sm90_launch<128>(p, st);
}

}  // namespace
}  // namespace gemma::fast
