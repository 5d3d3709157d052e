// QLoRA's NF4 base weights on the device (model/nf4.hpp has bitsandbytes' definitions and where each comes from).
//
// Nf4Device holds one projection weight in bitsandbytes' form: packed 4-bit codes, and the block absmax either as
// float32 or double-quantized (8-bit codes into nested_quant_map, a float32 scale per nested block, an offset).
// A layer's weights are dequantized into the bf16 buffer the GEMMs read just before the layer runs, so the base
// costs 0.52 bytes a weight on the device instead of 2.
//
// Bit-exactness: nf4_dequantize computes model/nf4.cpp's dequantize_nf4 followed by the `weights` cast to bf16:
//   absmax = float(float(nested_quant_map[code] * nested_absmax[block / nested_blocksize]) + offset)
//   w      = bf16(T(kNF4[code] * absmax))     T = the quant state's dtype (bf16, f16 or f32), then bf16
// with every product and sum an explicitly rounded intrinsic (__fmul_rn, __fadd_rn), so nvcc cannot contract
// them into an FMA that rounds once instead of twice. The quantizer (for synthetic benchmark weights) is
// quantize_4bit's first half: absmax = max |x| per block (exact), inv = 1 / absmax (__frcp_rn: IEEE, as the host's
// 1.0f / m), code = nf4_code(x * inv) (model/nf4_weight.hpp, the same function on both sides).
#pragma once
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "fast/common.cuh"
#include "model/nf4.hpp"

namespace gemma::fast {
namespace {

// The code book as a kernel argument (constant bank): the host's kNF4, so both sides read the same 16 floats.
struct Nf4Book {
  float v[16];
};
inline Nf4Book nf4_book() {
  Nf4Book b;
  for (int c = 0; c < 16; ++c) b.v[c] = kNF4[size_t(c)];
  return b;
}

enum class Nf4Dtype : int { bf16 = 0, f16 = 1, f32 = 2 };

// One quantized weight on the device: pointers into the caller's allocation.
struct Nf4Device {
  const uint8_t* packed = nullptr;         // (n + 1) / 2 bytes, first element of a pair in the high nibble
  const float* absmax = nullptr;           // not nested: one per block
  const uint8_t* absmax_codes = nullptr;   // nested: one per block
  const float* nested_absmax = nullptr;    // nested: one per nested block
  const float* nested_quant_map = nullptr; // nested: 256 entries
  float nested_offset = 0;
  int64_t n = 0, blocksize = 64, nested_blocksize = 256;
  Nf4Dtype dtype = Nf4Dtype::bf16;
  bool nested = false;
};

__device__ __forceinline__ float nf4_block_absmax(const Nf4Device& q, int64_t block) {
  if (!q.nested) return q.absmax[block];
  const float decoded = __fmul_rn(q.nested_quant_map[q.absmax_codes[block]], q.nested_absmax[block / q.nested_blocksize]);
  return __fadd_rn(decoded, q.nested_offset);
}

// One dequantized value: the code's value in the book times its block's absmax, in the quant state's dtype, as bf16.
__device__ __forceinline__ bf16 nf4_from(const Nf4Device& q, float code_value, float absmax) {
  const float v = __fmul_rn(code_value, absmax);  // dequantize_4bit's float32 product
  switch (q.dtype) {
    case Nf4Dtype::f16: return __float2bfloat16_rn(__half2float(__float2half_rn(v)));  // stored f16, cast to bf16
    default: return __float2bfloat16_rn(v);  // bf16: one rounding; f32: the weights cast rounds the f32 value once
  }
}

__device__ __forceinline__ bf16 nf4_value(const Nf4Device& q, const Nf4Book& book, int code, float absmax) {
  return nf4_from(q, book.v[code], absmax);
}

// Writes the dequantized weight to w (n bf16), or with `mismatches` compares it with w bit for bit and counts.
__global__ void nf4_dequantize_kernel(bf16* w, Nf4Device q, Nf4Book book, unsigned long long* mismatches) {
  const int64_t bytes = (q.n + 1) / 2;
  unsigned long long bad = 0;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < bytes; j += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t b = q.packed[j];
    for (int h = 0; h < 2; ++h) {
      const int64_t i = 2 * j + h;
      if (i >= q.n) break;
      const bf16 v = nf4_value(q, book, h == 0 ? b >> 4 : b & 15, nf4_block_absmax(q, i / q.blocksize));
      if (mismatches)
        bad += __bfloat16_as_ushort(v) != __bfloat16_as_ushort(w[i]);
      else
        w[i] = v;
    }
  }
  if (mismatches && bad) atomicAdd(mismatches, bad);
}

// The staging kernel: 16 values per thread (8 packed bytes in, two 16-byte stores out), for a weight whose count
// and blocksize are multiples of 16 (all of Gemma 2's, in bitsandbytes' blocksizes), so that the 16 values share
// one block and its absmax is decoded once. The code book sits in shared memory: the 16 lanes of a warp index it
// with different codes, which the constant bank would serve one address at a time. The same values as
// nf4_dequantize_kernel (nf4_value, nf4_block_absmax); the GPU test runs both paths.
__global__ void nf4_dequantize16_kernel(bf16* w, Nf4Device q, Nf4Book book) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = book.v[threadIdx.x];
  __syncthreads();
  const int64_t groups = q.n / 16;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const uint2 p = reinterpret_cast<const uint2*>(q.packed)[g];
    const float a = nf4_block_absmax(q, g * 16 / q.blocksize);
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t byte = ((j < 4 ? p.x : p.y) >> (8 * (j & 3))) & 0xffu;  // packed byte 8g + j (little-endian)
      const bf16 hi = nf4_from(q, lut[byte >> 4], a), lo = nf4_from(q, lut[byte & 15u], a);
      out[j] = uint32_t(__bfloat16_as_ushort(hi)) | uint32_t(__bfloat16_as_ushort(lo)) << 16;  // element 2j first
    }
    uint4* dst = reinterpret_cast<uint4*>(w + g * 16);
    dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
    dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
  }
}

// One warp per block of x (n bf16): absmax[b] = max |x| over the block (an exact max: the order does not matter).
__global__ void nf4_absmax_kernel(float* absmax, const bf16* x, int64_t n, int64_t blocksize) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int lane = threadIdx.x & 31;
  for (int64_t b = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; b < blocks;
       b += int64_t(gridDim.x) * blockDim.x / 32) {
    float m = 0.0f;
    const int64_t end = (b + 1) * blocksize < n ? (b + 1) * blocksize : n;
    for (int64_t i = b * blocksize + lane; i < end; i += 32)
      m = fmaxf(m, fabsf(__bfloat162float(x[i])));
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) absmax[b] = m;
  }
}

// packed[j] = code(x[2j]) << 4 | code(x[2j + 1]) with code = nf4_code(x * (1 / absmax of its block)); an odd n
// pads code 0 in the last low nibble.
__global__ void nf4_pack_kernel(uint8_t* packed, const bf16* x, const float* absmax, int64_t n, int64_t blocksize) {
  const int64_t bytes = (n + 1) / 2;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < bytes; j += int64_t(gridDim.x) * blockDim.x) {
    uint8_t out = 0;
    for (int h = 0; h < 2; ++h) {
      const int64_t i = 2 * j + h;
      if (i >= n) break;
      const float inv = __frcp_rn(absmax[i / blocksize]);  // 1 / 0 = inf; 0 * inf = NaN takes code 0, as on the host
      const uint8_t c = nf4_code(__fmul_rn(__bfloat162float(x[i]), inv));
      out |= uint8_t(h == 0 ? c << 4 : c);
    }
    packed[j] = out;
  }
}

inline bool nf4_vectorizable(const bf16* w, const Nf4Device& q) {
  return q.n % 16 == 0 && q.blocksize % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(q.packed) % 8 == 0;
}

// w (q.n bf16) = q dequantized. `generic` forces the one-byte-a-thread kernel (the GPU test compares the paths).
inline void nf4_dequantize(bf16* w, const Nf4Device& q, cudaStream_t st, bool generic = false) {
  if (!generic && nf4_vectorizable(w, q)) {
    nf4_dequantize16_kernel<<<elementwise_blocks(q.n / 16), 256, 0, st>>>(w, q, nf4_book());
    GEMMA_LAUNCHED("nf4_dequantize16_kernel");
    return;
  }
  nf4_dequantize_kernel<<<elementwise_blocks((q.n + 1) / 2), 256, 0, st>>>(w, q, nf4_book(), nullptr);
  GEMMA_LAUNCHED("nf4_dequantize_kernel");
}

// How many of w's n values differ from q's dequantization (w: a weight uploaded from the host). `count` is one
// device counter; waits for the stream.
inline unsigned long long nf4_mismatches(const bf16* w, const Nf4Device& q, unsigned long long* count,
                                         cudaStream_t st) {
  GEMMA_CUDA(cudaMemsetAsync(count, 0, sizeof *count, st));
  nf4_dequantize_kernel<<<elementwise_blocks((q.n + 1) / 2), 256, 0, st>>>(const_cast<bf16*>(w), q, nf4_book(), count);
  GEMMA_LAUNCHED("nf4_dequantize_kernel (compare)");
  unsigned long long h = 0;
  GEMMA_CUDA(cudaMemcpyAsync(&h, count, sizeof h, cudaMemcpyDeviceToHost, st));
  GEMMA_CUDA(cudaStreamSynchronize(st));
  return h;
}

// Counts the blocks whose decoded absmax (float32, nf4_block_absmax) differs in any bit from `want` (the host's
// nf4_absmax): the one float32 intermediate of dequantize_4bit, checked exactly, since a wrong decoding (say, an
// FMA where bitsandbytes rounds twice) moves it by an ulp that the bf16 weights show only now and then.
__global__ void nf4_absmax_compare_kernel(Nf4Device q, const float* want, int64_t blocks, unsigned long long* count) {
  unsigned long long bad = 0;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks; b += int64_t(gridDim.x) * blockDim.x)
    bad += __float_as_uint(nf4_block_absmax(q, b)) != __float_as_uint(want[b]);
  if (bad) atomicAdd(count, bad);
}

inline unsigned long long nf4_absmax_mismatches(const Nf4Device& q, const float* want, unsigned long long* count,
                                                cudaStream_t st) {
  const int64_t blocks = (q.n + q.blocksize - 1) / q.blocksize;
  GEMMA_CUDA(cudaMemsetAsync(count, 0, sizeof *count, st));
  nf4_absmax_compare_kernel<<<elementwise_blocks(blocks), 256, 0, st>>>(q, want, blocks, count);
  GEMMA_LAUNCHED("nf4_absmax_compare_kernel");
  unsigned long long h = 0;
  GEMMA_CUDA(cudaMemcpyAsync(&h, count, sizeof h, cudaMemcpyDeviceToHost, st));
  GEMMA_CUDA(cudaStreamSynchronize(st));
  return h;
}

// quantize_4bit's first half on the device: the block absmax (float32, (n + blocksize - 1) / blocksize) and the
// packed codes of x (n bf16). blocksize must be even (bitsandbytes' are 32 to 4096), so a pair never spans blocks.
inline void nf4_quantize(uint8_t* packed, float* absmax, const bf16* x, int64_t n, int64_t blocksize, cudaStream_t st) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  nf4_absmax_kernel<<<elementwise_blocks(blocks * 32), 256, 0, st>>>(absmax, x, n, blocksize);
  GEMMA_LAUNCHED("nf4_absmax_kernel");
  nf4_pack_kernel<<<elementwise_blocks((n + 1) / 2), 256, 0, st>>>(packed, x, absmax, n, blocksize);
  GEMMA_LAUNCHED("nf4_pack_kernel");
}

inline Nf4Dtype nf4_dtype(DType t) {
  switch (t) {
    case DType::bf16: return Nf4Dtype::bf16;
    case DType::f16: return Nf4Dtype::f16;
    case DType::f32: return Nf4Dtype::f32;
    default: throw std::logic_error("fast: an NF4 weight's dtype is bf16, f16 or f32");
  }
}

// One quantized weight in one device allocation (packed codes, then the absmax or its nested form), and the view
// the kernels take of it.
struct Nf4Stored {
  DeviceArray<uint8_t> bytes;
  Nf4Device q;
  bool empty() const { return bytes.get() == nullptr; }
};

inline Nf4Stored nf4_allocate(int64_t n, int64_t blocksize, bool nested, int64_t nested_blocksize, Nf4Dtype dtype,
                              const std::string& what, MemoryTracker& mem) {
  auto up16 = [](int64_t b) { return (b + 15) / 16 * 16; };
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int64_t nested_blocks = (blocks + nested_blocksize - 1) / nested_blocksize;
  const int64_t o_absmax = up16((n + 1) / 2);
  const int64_t o_nested_absmax = o_absmax + up16(nested ? blocks : blocks * 4);
  const int64_t o_map = o_nested_absmax + (nested ? up16(nested_blocks * 4) : 0);
  const int64_t total = o_map + (nested ? 256 * 4 : 0);
  Nf4Stored s;
  s.bytes = DeviceArray<uint8_t>(size_t(total), what, mem);
  uint8_t* b = s.bytes.get();
  s.q.packed = b;
  s.q.n = n;
  s.q.blocksize = blocksize;
  s.q.nested = nested;
  s.q.nested_blocksize = nested_blocksize;
  s.q.dtype = dtype;
  if (nested) {
    s.q.absmax_codes = b + o_absmax;
    s.q.nested_absmax = reinterpret_cast<const float*>(b + o_nested_absmax);
    s.q.nested_quant_map = reinterpret_cast<const float*>(b + o_map);
  } else {
    s.q.absmax = reinterpret_cast<const float*>(b + o_absmax);
  }
  return s;
}

// The quant state's absmax part (not the packed codes) from the host, through `st`; waits for it.
inline void nf4_upload_absmax(Nf4Stored& s, const Nf4Weight& w, cudaStream_t st) {
  auto put = [&](const void* dst, const void* src, size_t bytes) {
    GEMMA_CUDA(cudaMemcpyAsync(const_cast<void*>(dst), src, bytes, cudaMemcpyHostToDevice, st));
  };
  if (w.nested) {
    put(s.q.absmax_codes, w.absmax_codes.data(), w.absmax_codes.size());
    put(s.q.nested_absmax, w.nested_absmax.data(), w.nested_absmax.size() * 4);
    put(s.q.nested_quant_map, w.nested_quant_map.data(), 256 * 4);
    s.q.nested_offset = w.nested_offset;
  } else {
    put(s.q.absmax, w.absmax.data(), w.absmax.size() * 4);
  }
  GEMMA_CUDA(cudaStreamSynchronize(st));
}

// A host NF4 weight on the device (what a checkpoint holds: Checkpoint::nf4).
inline Nf4Stored nf4_upload(const Nf4Weight& w, const std::string& what, MemoryTracker& mem, cudaStream_t st) {
  if (w.nested && w.nested_quant_map.size() != 256) throw std::logic_error("fast: nested_quant_map has 256 entries");
  Nf4Stored s = nf4_allocate(w.numel(), w.blocksize, w.nested, w.nested_blocksize, nf4_dtype(w.dtype), what, mem);
  GEMMA_CUDA(cudaMemcpyAsync(const_cast<uint8_t*>(s.q.packed), w.packed.data(), w.packed.size(), cudaMemcpyHostToDevice, st));
  nf4_upload_absmax(s, w, st);
  return s;
}

// quantize_4bit of a bf16 weight x (n values, [out, in] = shape) already on the device, as QLoRA quantizes
// (model/nf4.hpp's quantize_nf4 with the same blocksize and double quantization): the codes and block absmax on
// the device, the double quantization of the absmax on the host (set_absmax, the host quantizer's own code).
// `absmax_scratch` holds at least (n + blocksize - 1) / blocksize floats. Waits for the stream.
inline Nf4Stored nf4_quantize_device(const bf16* x, const Shape& shape, int64_t blocksize, bool double_quant,
                                     float* absmax_scratch, const std::string& what, MemoryTracker& mem,
                                     cudaStream_t st) {
  Nf4Weight w;
  w.shape = shape;
  w.dtype = DType::bf16;
  w.blocksize = blocksize;
  const int64_t n = w.numel(), blocks = w.blocks();
  Nf4Stored s = nf4_allocate(n, blocksize, double_quant, kNestedBlocksize, Nf4Dtype::bf16, what, mem);
  nf4_quantize(const_cast<uint8_t*>(s.q.packed), absmax_scratch, x, n, blocksize, st);
  std::vector<float> absmax(static_cast<size_t>(blocks));
  GEMMA_CUDA(cudaMemcpyAsync(absmax.data(), absmax_scratch, size_t(blocks) * 4, cudaMemcpyDeviceToHost, st));
  GEMMA_CUDA(cudaStreamSynchronize(st));
  set_absmax(w, std::move(absmax), double_quant);
  nf4_upload_absmax(s, w, st);
  return s;
}

}  // namespace
}  // namespace gemma::fast
