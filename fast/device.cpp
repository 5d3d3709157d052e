#include "fast/device.hpp"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <utility>

#include "fast/fast.hpp"
#include "model/bugs.hpp"

namespace gemma::fast {

void cuda_fail(cudaError_t e, const char* call, const char* file, int line) {
  std::ostringstream s;
  s << "fast: CUDA error in " << call << " at " << file << ":" << line << ": " << cudaGetErrorName(e) << ": "
    << cudaGetErrorString(e);
  throw CudaError(s.str());
}

void cublas_fail(cublasStatus_t st, const char* call, const char* file, int line) {
  std::ostringstream s;
  s << "fast: cuBLAS error in " << call << " at " << file << ":" << line << ": " << cublasGetStatusName(st) << ": "
    << cublasGetStatusString(st);
  throw CudaError(s.str());
}

namespace {
std::string gib(size_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f GiB", double(bytes) / double(1ull << 30));
  return b;
}
}  // namespace

void* device_alloc(size_t bytes, const std::string& what, MemoryTracker& t) {
  // Sizes round up to 256 bytes, cudaMalloc's own alignment, so the count matches what the device gives.
  const size_t n = std::max<size_t>(256, (bytes + 255) / 256 * 256);
  if (t.limit && t.current + n > t.limit)
    throw OutOfMemory("fast: over the memory limit: " + what + " needs " + gib(n) + ", the limit is " + gib(t.limit) +
                      " and this trainer holds " + gib(t.current));
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, n);
  if (e == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();  // not sticky: clear it so the context stays usable
    size_t free_b = 0, total_b = 0;
    (void)cudaMemGetInfo(&free_b, &total_b);
    throw OutOfMemory("fast: out of GPU memory: " + what + " needs " + gib(n) + ", the device has " + gib(free_b) +
                      " free of " + gib(total_b) + " (this trainer already holds " + gib(t.current) +
                      "); hint: split the batch into more micro-batches, use shorter sequences, or keep activation "
                      "checkpoints in host memory (offload)");
  }
  if (e != cudaSuccess) cuda_fail(e, ("cudaMalloc(" + what + ")").c_str(), __FILE__, __LINE__);
  t.current += n;
  t.peak = std::max(t.peak, t.current);
  return p;
}

void device_free(void* p, size_t bytes, MemoryTracker& t) noexcept {
  const size_t n = std::max<size_t>(256, (bytes + 255) / 256 * 256);
  cudaFree(p);  // a failure here cannot be reported from a destructor; the next checked call sees it
  t.current -= n;
}

const Faults& faults() {
  static const Faults f = [] {
    Faults r;
    const char* env = std::getenv("GEMMA_FAST_FAULT");
    const std::string s = env ? env : "";
    for (Bug b : parse_bug_list(s, "GEMMA_FAST_FAULT")) {
      switch (b) {
        case Bug::softcap_grad_missing: r.softcap_grad_missing = true; break;
        case Bug::sliding_off_by_one: r.sliding_off_by_one = true; break;
        case Bug::logit_softcap_grad_missing: r.logit_softcap_grad_missing = true; break;
        case Bug::padded_vocab_unmasked: r.padded_vocab_unmasked = true; break;
        case Bug::rmsnorm_plain_weight: r.rmsnorm_plain_weight = true; break;
        default:
          throw InputError("GEMMA_FAST_FAULT: the fast trainer has no switch for '" + std::string(bug_info(b).id) +
                           "' (it has softcap-grad-missing, sliding-off-by-one, logit-softcap-grad-missing, "
                           "padded-vocab-unmasked, rmsnorm-plain-weight)");
      }
    }
    if (!s.empty()) std::fprintf(stderr, "fast: GEMMA_FAST_FAULT=%s: deliberate bugs are ON\n", s.c_str());
    return r;
  }();
  return f;
}

bool attn_ldmatrix() {
  // On by default: measured on the H200 (2026-11-28) it gave bit-identical results to the plain loads in every
  // GPU test and 2-3% more tokens/s on gemma2-9b.
  static const bool on = [] {
    const char* env = std::getenv("GEMMA_FAST_LDMATRIX");
    return !(env && std::string(env) == "0");
  }();
  return on;
}

bool attn_hopper() {
  static const bool on = [] {
    const char* env = std::getenv("GEMMA_FAST_ATTN");
    const std::string s = env ? env : "";
    if (!s.empty() && s != "mma" && s != "wgmma")
      throw InputError("GEMMA_FAST_ATTN: '" + s + "' is neither 'wgmma' (the default) nor 'mma'");
    return s != "mma";
  }();
  return on && device_sm90();
}

namespace {

// attr's value on the current device, asked once per host thread (one drives each GPU), device and attribute:
// these are asked at every launch that picks a kernel. -1 stands for "not asked yet" (no attribute asked here is
// negative; 0 could not, since the H200's compute capability minor is 0).
int device_attribute(cudaDeviceAttr attr) {
  thread_local std::map<std::pair<int, int>, int> cached;
  int dev = 0;
  GEMMA_CUDA(cudaGetDevice(&dev));
  int& v = cached.try_emplace({dev, int(attr)}, -1).first->second;
  if (v < 0) GEMMA_CUDA(cudaDeviceGetAttribute(&v, attr, dev));
  return v;
}

}  // namespace

bool device_sm90() {
  return device_attribute(cudaDevAttrComputeCapabilityMajor) == 9 &&
         device_attribute(cudaDevAttrComputeCapabilityMinor) == 0;
}

int device_sms() { return device_attribute(cudaDevAttrMultiProcessorCount); }

}  // namespace gemma::fast
