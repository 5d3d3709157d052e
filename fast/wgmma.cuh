// Warpgroup MMA (wgmma.mma_async, sm_90a) over shared-memory tiles in the 128-byte swizzled layout, shared by the
// Hopper attention (attention_sm90.cuh) and the adapters' fused add (lora.cuh).
//
// Layout (PTX ISA, "Shared Memory Matrix Layout", 128B swizzle): a tile of R rows x C bf16 is C / 64 column
// panels, each R rows of 128 bytes; inside a panel the eight 16-byte units of row r sit at unit ^ (r mod 8), and
// a panel starts at a multiple of 1024 bytes (the swizzle is computed from address bits). For a K-major operand
// (K contiguous) one k16 step is a 32-byte offset inside the panel and the 8-row groups are 1024 bytes apart (the
// descriptor's stride byte offset). For an N-major B (stored [k][n]) the 16 k of a step are 16 consecutive rows,
// a 64-wide column block is one panel, and again the 8-row groups (now along K) are 1024 bytes apart.
// Accumulators: per warp of the warpgroup 16 rows in the mma.sync m16n8 C layout, d[n8 tile][4].
// Every function compiles to nothing outside sm_90a device code (GEMMA_SM90_DEVICE), so that the host pass and
// other architectures see the same declarations.
#pragma once
#include <cstdint>

#include "fast/mma.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GEMMA_SM90_DEVICE 1
#endif

namespace gemma::fast {
namespace {

// Byte offset of element (r, c) in an R-row swizzled tile (see the file comment).
template <int R>
__device__ __forceinline__ uint32_t swz(int r, int c) {
  return uint32_t((c >> 6) * (R * 128) + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4) + (c & 7) * 2);
}

// cp.async writes through the generic proxy, wgmma reads through the async proxy: this orders the two.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Matrix descriptors (PTX ISA, "Matrix Descriptor Format"): start address >> 4 (bits 0-13), leading byte offset
// >> 4 (16-29), stride byte offset >> 4 (32-45), swizzle mode 1 = 128 bytes (62-63). K-major swizzled operands
// ignore the leading offset (1 by convention); for the N-major V, whose 64-wide blocks are one swizzle atom wide,
// both offsets are the 1024-byte 8-row stride, so whichever the hardware takes for the K direction is right.
__device__ __forceinline__ uint64_t desc_kmajor(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
__device__ __forceinline__ uint64_t desc_nmajor(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1024 >> 4) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// N-major B spanning several 64-column panels (for an n128 product): the leading byte offset is the panel
// stride (CUTLASS's canonical MN-major 128B-swizzle layout, ((8 elements, 8, m), (8, k)) : ((1, 8, LBO), (64,
// SBO)) in 16-byte units, m counting the 64-wide panels), the stride byte offset the 8-row groups along K.
__device__ __forceinline__ uint64_t desc_nmajor_panels(uint32_t addr, uint32_t panel_bytes) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(panel_bytes >> 4) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// The descriptor of the operand off bytes on from desc's (off a multiple of 16): shared-memory addresses stay below
// 2^18, so the 14-bit address field (addr >> 4) plus off / 16 cannot carry into the leading byte offset, and
// desc_advance(desc_kmajor(a), off) == desc_kmajor(a + off) (likewise the N-major ones). Only the low word changes,
// one uniform add where building the descriptor from a + off takes five (mask, shift, the constant bits): the
// scorer of the dK, dV kernel issued about 390 such instructions a tile for its 32 products (ncu, 2026-12-03).
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t off) {
  return (desc & 0xFFFFFFFF00000000ull) | uint32_t(uint32_t(desc) + (off >> 4));
}

#define GEMMA_WG_D32(d)                                                                                          \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),       \
      "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),   \
      "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),   \
      "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),   \
      "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define GEMMA_WG_D32_ASM                                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"

// d (64 x 64 per warpgroup; per warp 16 rows in the m16n8 C layout, d[n8 tile][4]) (+)= A B over one k16 step, A
// (64 x 16) K-major and B from shared memory: B K-major (TB = 0, B stored as the rows of B^T) or N-major (TB = 1).
// accumulate = 0 overwrites d.
template <int TB>
__device__ __forceinline__ void wgmma_ss(float (&d)[8][4], uint64_t da, uint64_t db, int accumulate) {
#ifdef GEMMA_SM90_DEVICE
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " GEMMA_WG_D32_ASM ", %32, %33, p, 1, 1, 0, %35;\n}\n"
      : GEMMA_WG_D32(d)
      : "l"(da), "l"(db), "r"(accumulate), "n"(TB));
#endif
}
// d0 | d1 (64 x 128, columns 0-63 in d0 and 64-127 in d1, each as wgmma_ss's d) += A B over one k16 step, A
// K-major; B K-major (TB = 0: 128 rows of B^T, 16 groups of 8 rows 1024 bytes apart, desc_kmajor) or N-major over
// two 64-column panels (TB = 1, desc_nmajor_panels); accumulate = 0 overwrites d. One product instead of two
// m64n64 ones: A is read from shared memory once, not twice (the dK, dV products of the attention
// backward at head_dim 256 and the adapters' fused add: per warpgroup an m64n64k16 reads 4 KB in its 32 cycles, and
// two warpgroups share 128 bytes a cycle).
template <int TB>
__device__ __forceinline__ void wgmma_ss_n128(float (&d0)[8][4], float (&d1)[8][4], uint64_t da, uint64_t db,
                                              int accumulate = 1) {
#ifdef GEMMA_SM90_DEVICE
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %67, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
      "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, %66;\n}\n"
      : GEMMA_WG_D32(d0), GEMMA_WG_D32(d1)
      : "l"(da), "l"(db), "n"(TB), "r"(accumulate));
#endif
}
// d += A B with A (64 x 16 per warpgroup) from registers in the mma.sync A-fragment layout and B (16 x 64) an
// N-major shared-memory tile.
__device__ __forceinline__ void wgmma_rs_nmajor(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db) {
#ifdef GEMMA_SM90_DEVICE
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " GEMMA_WG_D32_ASM
      ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : GEMMA_WG_D32(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
#endif
}
// d (64 x 64 NP: panel q of d holds columns 64 q .. 64 q + 63, each as wgmma_ss's d) += A B over one k16 step, A
// (64 x 16 per warpgroup) from registers in the mma.sync A-fragment layout (as wgmma_rs_nmajor), B an N-major
// shared-memory operand over NP 64-column panels (desc_nmajor_panels). NP = 2 (m64n128k16) or 4 (m64n256k16): the
// whole head dimension of the attention backward's dQ, dK or dV in one product per k step.
template <int NP>
__device__ __forceinline__ void wgmma_rs_panels(float (&d)[NP][8][4], const uint32_t (&a)[4], uint64_t db) {
#ifdef GEMMA_SM90_DEVICE
  static_assert(NP == 2 || NP == 4, "m64n128k16 or m64n256k16");
  if constexpr (NP == 2) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21,"
        " %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41,"
        " %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61,"
        " %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : GEMMA_WG_D32(d[0]), GEMMA_WG_D32(d[1])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21,"
        " %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41,"
        " %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61,"
        " %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81,"
        " %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101,"
        " %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118,"
        " %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "{%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
        : GEMMA_WG_D32(d[0]), GEMMA_WG_D32(d[1]), GEMMA_WG_D32(d[2]), GEMMA_WG_D32(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
  }
#endif
}
// The inverse of ldmatrix_x4_at (sm_90): lane l's registers go to (row g, columns 2t, 2t + 1) of the four 8 x 8
// matrices whose row addresses lanes 8m .. 8m + 7 give.
__device__ __forceinline__ void stmatrix_x4_at(uint32_t row, const uint32_t (&r)[4]) {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(row), "r"(r[0]), "r"(r[1]),
               "r"(r[2]), "r"(r[3])
               : "memory");
#endif
}
__device__ __forceinline__ void wg_arrive() {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N of this warpgroup's committed product groups are in flight (they complete in order).
template <int N>
__device__ __forceinline__ void wg_wait() {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// A barrier of warpgroup wg's 128 threads alone (named barrier 1 + wg: 1 to 3; __syncthreads is barrier 0): the
// Hopper attention's and the fused adapter add's warpgroups each wait for their own copies and stores.
__device__ __forceinline__ void wg_bar(int wg) { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); }
// Keeps the compiler from moving reads or writes of accumulator registers across the asynchronous products.
template <int N>
__device__ __forceinline__ void wg_hold(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

}  // namespace
}  // namespace gemma::fast
