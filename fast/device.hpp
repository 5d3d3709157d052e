// Device plumbing for the fast trainer: checks on every CUDA and cuBLAS call that name the call, file and line;
// device memory that is named, counted (the peak is exact) and fails with a clear out-of-memory message; the
// fault switches that let a GPU run prove the tests can fail.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <utility>

namespace gemma::fast {

[[noreturn]] void cuda_fail(cudaError_t e, const char* call, const char* file, int line);
[[noreturn]] void cublas_fail(cublasStatus_t s, const char* call, const char* file, int line);

#define GEMMA_CUDA(call)                                                                   \
  do {                                                                                     \
    const cudaError_t gemma_e_ = (call);                                                   \
    if (gemma_e_ != cudaSuccess) ::gemma::fast::cuda_fail(gemma_e_, #call, __FILE__, __LINE__); \
  } while (0)

#define GEMMA_CUBLAS(call)                                                                        \
  do {                                                                                            \
    const cublasStatus_t gemma_s_ = (call);                                                       \
    if (gemma_s_ != CUBLAS_STATUS_SUCCESS) ::gemma::fast::cublas_fail(gemma_s_, #call, __FILE__, __LINE__); \
  } while (0)

// After every kernel launch: a bad launch configuration shows here, with the kernel's name.
#define GEMMA_LAUNCHED(kernel)                                                                          \
  do {                                                                                                  \
    const cudaError_t gemma_e_ = cudaGetLastError();                                                    \
    if (gemma_e_ != cudaSuccess) ::gemma::fast::cuda_fail(gemma_e_, "launch of " kernel, __FILE__, __LINE__); \
  } while (0)

struct MemoryTracker {
  size_t current = 0, peak = 0;
  // 0: the device's own memory is the limit. Else allocations that would take `current` past it fail with
  // OutOfMemory as on a device of that size (fast_bench --memory-limit: the longest sequence a smaller GPU trains).
  size_t limit = 0;
};

// cudaMalloc, counted in `t`; on failure an OutOfMemory naming `what`, the size, the free memory and a hint.
void* device_alloc(size_t bytes, const std::string& what, MemoryTracker& t);
void device_free(void* p, size_t bytes, MemoryTracker& t) noexcept;

template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(size_t n, const std::string& what, MemoryTracker& t) : n_(n), t_(&t) {
    p_ = static_cast<T*>(device_alloc(n * sizeof(T), what, t));
  }
  ~DeviceArray() { reset(); }
  DeviceArray(DeviceArray&& o) noexcept { swap(o); }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      reset();
      swap(o);
    }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return p_; }
  size_t size() const { return n_; }
  void reset() noexcept {
    if (p_) device_free(p_, n_ * sizeof(T), *t_);
    p_ = nullptr;
    n_ = 0;
  }

 private:
  void swap(DeviceArray& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    std::swap(t_, o.t_);
  }
  T* p_ = nullptr;
  size_t n_ = 0;
  MemoryTracker* t_ = nullptr;
};

// Deliberate bugs, switched on by the environment variable GEMMA_FAST_FAULT (a comma-separated list of bug ids of
// model/bugs.hpp), so that a GPU run can show each test failing on the bug it exists to catch. Off unless named;
// never set in production. An id the fast trainer has no switch for is an InputError at first use.
struct Faults {
  bool softcap_grad_missing = false;        // attention backward without the softcap derivative (flash-attn 2.6.0)
  bool sliding_off_by_one = false;          // sliding window one key too wide (HF flash path, issue #39408)
  bool logit_softcap_grad_missing = false;  // final softcap derivative dropped in the loss backward
  bool padded_vocab_unmasked = false;       // padded vocabulary columns left in the softmax
  bool rmsnorm_plain_weight = false;        // RMSNorm scaled by w instead of (1 + w)
};
const Faults& faults();

// Attention fragments through ldmatrix (the default) or, with GEMMA_FAST_LDMATRIX=0, through plain shared loads.
bool attn_ldmatrix();
// The attention kernels: GEMMA_FAST_ATTN=wgmma (default) takes the Hopper kernels (fast/attention_sm90.cuh) for
// head_dim 128 and 256 on a compute capability 9.0 device, =mma the mma.sync kernels (fast/attention.cuh)
// everywhere; anything else is an InputError.
bool attn_hopper();
// Whether the current device is compute capability 9.0, the one the sm_90a kernels (wgmma) run on: a build for
// several architectures may run on another.
bool device_sm90();
// The current device's multiprocessors.
int device_sms();

}  // namespace gemma::fast
