// Row-major matrix products through cuBLAS: bf16 inputs, fp32 accumulation (CUBLAS_COMPUTE_32F), C in bf16 or
// fp32. Every product of the trainer goes through gemm() below, so the layouts are decided in one place.
//
// cuBLAS is column-major: a row-major X (r x c, row stride ld) is the column-major X^T with the same ld. So
// row-major C = op(A) op(B) is computed as column-major C^T = op(B)^T op(A)^T, swapping the operands.
#pragma once
#include <cublas_v2.h>

#include "fast/common.cuh"

namespace gemma::fast {
namespace {

// An operand and how it is stored: `t` false means A is (M x K) / B is (K x N) row-major; `t` true means A is
// stored (K x M) / B is stored (N x K) row-major (a weight [out, in] used as x W^T).
struct Operand {
  const bf16* p;
  int64_t ld;
  bool t;
};

// C (M x N, row stride ldc) = alpha op(A) op(B) + beta C; C is bf16 (rounded once from fp32) or fp32.
inline void gemm(cublasHandle_t h, int64_t M, int64_t N, int64_t K, Operand A, Operand B, void* C, bool c_fp32,
                 int64_t ldc, float alpha, float beta) {
  if (M == 0 || N == 0) return;
  const cublasOperation_t op_first = B.t ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = A.t ? CUBLAS_OP_T : CUBLAS_OP_N;
  GEMMA_CUBLAS(cublasGemmEx(h, op_first, op_second, int(N), int(M), int(K), &alpha, B.p, CUDA_R_16BF, int(B.ld), A.p,
                            CUDA_R_16BF, int(A.ld), &beta, C, c_fp32 ? CUDA_R_32F : CUDA_R_16BF, int(ldc),
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// A batch of `count` products of the same shape, C_i = alpha op(A_i) op(B_i) + beta C_i, with X_i = X + i
// stride_X (elements; 0 repeats one operand): one launch, where a loop of gemm() calls would launch count small
// products, each with its own ramp and launch gap (LoRA's per-adapter products, 9 to 22 us each at 9b 2 x 1024).
inline void gemm_batched(cublasHandle_t h, int64_t M, int64_t N, int64_t K, Operand A, int64_t stride_a, Operand B,
                         int64_t stride_b, void* C, bool c_fp32, int64_t ldc, int64_t stride_c, float alpha, float beta,
                         int64_t count) {
  if (M == 0 || N == 0 || count == 0) return;
  if (count == 1) return gemm(h, M, N, K, A, B, C, c_fp32, ldc, alpha, beta);
  const cublasOperation_t op_first = B.t ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = A.t ? CUBLAS_OP_T : CUBLAS_OP_N;
  GEMMA_CUBLAS(cublasGemmStridedBatchedEx(h, op_first, op_second, int(N), int(M), int(K), &alpha, B.p, CUDA_R_16BF,
                                          int(B.ld), stride_b, A.p, CUDA_R_16BF, int(A.ld), stride_a, &beta, C,
                                          c_fp32 ? CUDA_R_32F : CUDA_R_16BF, int(ldc), stride_c, int(count),
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// A cuBLAS handle on a stream, with a workspace the trainer owns (counted in the peak, and fixed, so the
// algorithm cuBLAS picks, and with it the bits, do not depend on what else was allocated).
struct Blas {
  cublasHandle_t h = nullptr;
  DeviceArray<unsigned char> workspace;
  Blas(cudaStream_t stream, MemoryTracker& t) {
    GEMMA_CUBLAS(cublasCreate(&h));
    GEMMA_CUBLAS(cublasSetStream(h, stream));
    workspace = DeviceArray<unsigned char>(size_t(32) << 20, "cuBLAS workspace", t);
    GEMMA_CUBLAS(cublasSetWorkspace(h, workspace.get(), workspace.size()));
    // Products are never reduced in lower precision than fp32.
    GEMMA_CUBLAS(cublasSetMathMode(h, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
  }
  ~Blas() {
    if (h) cublasDestroy(h);
  }
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
};

}  // namespace
}  // namespace gemma::fast
