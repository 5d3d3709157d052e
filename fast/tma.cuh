// Tensor memory access (TMA) and the shared-memory barriers (mbarrier) it completes, for the Hopper attention
// forward (attention_sm90.cuh): one thread of a producer warp copies whole tiles of rows into the 128-byte swizzled
// layout of wgmma.cuh, the consumer warpgroups wait on a per-slot barrier for the bytes to land and arrive on another
// once their products have read the slot. PTX ISA references: "Tensor copy" (cp.async.bulk.tensor), "mbarrier",
// "setmaxnreg", "bar/barrier". The device functions compile to nothing outside sm_90a device code
// (GEMMA_SM90_DEVICE), as in wgmma.cuh.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fast/device.hpp"
#include "fast/wgmma.cuh"

namespace gemma::fast {
namespace {

// An mbarrier at shared address a expecting `count` arrivals per phase; then fence.mbarrier_init makes the
// initialisation visible to the async proxy (the TMA unit completes transactions on it) before first use.
__device__ __forceinline__ void mbar_init(uint32_t a, uint32_t count) {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_init_fence() {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// One arrival that also expects `bytes` of transactions (the TMA copies that complete on this barrier).
__device__ __forceinline__ void mbar_expect_tx(uint32_t a, uint32_t bytes) {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(a), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t a) {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(a) : "memory");
#endif
}
// True once the phase with the given parity (0 for the first, 1 for the second, ...) has completed; the hardware
// may suspend the thread a while before answering false. Outside sm_90a device code, true: every wait is empty.
__device__ __forceinline__ bool mbar_try_wait(uint32_t a, uint32_t parity) {
  uint32_t done = 1;
#ifdef GEMMA_SM90_DEVICE
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(a), "r"(parity)
      : "memory");
#endif
  return done != 0;
}

// A wait longer than this is a phase that will never complete (a copy never issued, a parity out of step with the
// ring, too few arrivals): the kernel traps, so the launch fails with cudaErrorLaunchFailure at the host's next
// CUDA call instead of the process spinning until something outside kills it. A legitimate wait is a few tiles'
// products, microseconds; under compute-sanitizer, which slows kernels by about three orders of magnitude,
// milliseconds. 4 s leaves a margin of 10^3 over that (a debugger stopped at a breakpoint inside the kernel
// exceeds it) and fits the 32 bits of %globaltimer_lo (ns; wraps every 4.29 s, which the unsigned difference
// absorbs): one register held across the wait, where the forward's consumers have none to spare.
constexpr uint32_t kMbarTimeoutNs = 4'000'000'000u;

// Returns once the phase with the given parity has completed; traps after kMbarTimeoutNs of waiting.
__device__ __forceinline__ void mbar_wait(uint32_t a, uint32_t parity) {
#ifdef GEMMA_SM90_DEVICE
  if (mbar_try_wait(a, parity)) return;
  uint32_t t0, t;
  asm volatile("mov.u32 %0, %%globaltimer_lo;\n" : "=r"(t0));
  while (!mbar_try_wait(a, parity)) {
    asm volatile("mov.u32 %0, %%globaltimer_lo;\n" : "=r"(t));
    if (t - t0 > kMbarTimeoutNs) __trap();
  }
#endif
}

// mbar_wait without the bound, for the forward's consumer warpgroups: any trap in their code makes ptxas spill
// about 1.2 KB a thread of the head_dim 256 kernel (the bound's register alone does not). A consumer waits on
// bytes the producer copies, and the producer's own waits are bounded: while a consumer is stuck, its slot is
// never released, the producer's wait for it traps and the launch ends; after its last copy the producer waits
// for the last ring's worth of releases too, so a launch of at most a ring's worth of copies is covered as well.
__device__ __forceinline__ void mbar_wait_spin(uint32_t a, uint32_t parity) {
  while (!mbar_try_wait(a, parity)) {
  }
}

// One box of the 3-d tensor map at `map` (coordinates c0 innermost) into shared address dst, completing its bytes
// on the mbarrier at mbar. Elements outside the tensor's extent are written as zeros.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint32_t mbar) {
#ifdef GEMMA_SM90_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(mbar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
#endif
}

// `bytes` contiguous bytes from global src into shared address dst, completing on the mbarrier at mbar (PTX ISA,
// cp.async.bulk): src, dst and bytes multiples of 16. One thread; the caller adds bytes to the barrier's expected count.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t mbar) {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(mbar)
               : "memory");
#endif
}

// Rows row0 .. row0 + R - 1 of sequence b, columns col0 .. col0 + HD - 1, of a tma_rows_map's rows into the R-row
// swizzled tile at dst (wgmma.cuh's layout: HD / 64 boxes of R rows, one column panel each), their bytes expected
// on the mbarrier at bar. One thread.
template <int R, int HD>
__device__ __forceinline__ void tma_tile(uint32_t dst, const CUtensorMap* map, int col0, int row0, int b,
                                         uint32_t bar) {
  mbar_expect_tx(bar, R * HD * 2);
#pragma unroll
  for (int c = 0; c < HD / 64; ++c) tma_load_3d(dst + c * (R * 128), map, col0 + c * 64, row0, b, bar);
}

// The register budget of the calling warpgroup (every warp of it executes this): a producer gives registers up,
// consumers take them, so that three warpgroups fit beside each other (PTX ISA, setmaxnreg).
template <int N>
__device__ __forceinline__ void regs_dec() {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void regs_inc() {
#ifdef GEMMA_SM90_DEVICE
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// Named barrier `id` (1..15; 0 is __syncthreads) completing once `n` threads have arrived: bar_sync arrives and
// waits, bar_arrive arrives only.
__device__ __forceinline__ void bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

// cuTensorMapEncodeTiled from the driver, found through the runtime (the trainer links the runtime only).
inline PFN_cuTensorMapEncodeTiled_v12000 tma_encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    GEMMA_CUDA(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || f == nullptr)
      throw std::runtime_error("cuTensorMapEncodeTiled: not found in the CUDA driver (TMA needs driver 12.0 or later)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A tensor map over rows of bf16: B sequences of T rows, each row `cols` elements of which a box copies 64 (128
// bytes) and `box_rows` rows, rows `ld` elements apart, sequences T * ld apart; 128-byte swizzle, so that a box
// lands as one column panel of wgmma.cuh's layout (its shared address a multiple of 1024). Rows at or past T read
// as zeros (the tensor's extent), not as the next sequence's. Needs base 16-byte aligned and ld a multiple of 8
// (AttnParams::vec); throws std::runtime_error naming the driver's error otherwise.
inline CUtensorMap tma_rows_map(const void* base, int64_t cols, int64_t T, int64_t B, int64_t ld, int box_rows) {
  CUtensorMap m;
  const cuuint64_t dim[3] = {cuuint64_t(cols), cuuint64_t(T), cuuint64_t(B)};
  const cuuint64_t stride[2] = {cuuint64_t(ld) * 2, cuuint64_t(ld) * 2 * cuuint64_t(T)};
  const cuuint32_t box[3] = {64, cuuint32_t(box_rows), 1}, estride[3] = {1, 1, 1};
  const CUresult r = tma_encode_fn()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base), dim, stride, box,
                                     estride, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("cuTensorMapEncodeTiled failed (CUresult " + std::to_string(int(r)) + ") for rows of " +
                             std::to_string(cols) + " bf16, stride " + std::to_string(ld) + ", T " + std::to_string(T));
  return m;
}

}  // namespace
}  // namespace gemma::fast
