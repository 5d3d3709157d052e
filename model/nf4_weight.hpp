// One weight in bitsandbytes' NF4 form, the code book and the code of a scaled value: the part of model/nf4.hpp
// that the checkpoint keeps and the CUDA trainer compiles (nf4_code runs on the device too). The facts and their
// sources are in model/nf4.hpp.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "tensor.hpp"

#ifdef __CUDACC__
#define GEMMA_HOST_DEVICE __host__ __device__
#else
#define GEMMA_HOST_DEVICE
#endif

namespace gemma {

inline constexpr std::array<float, 16> kNF4 = {
    -1.0f,                 -0.6961928009986877f,  -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f,  0.16093020141124725f,  0.24611230194568634f,  0.33791524171829224f,
    0.44070982933044434f,  0.5626170039176941f,   0.7229568362236023f,   1.0f};

// QLoRA's settings, bitsandbytes' and transformers' defaults for them: blocks of 64 weights (quantize_4bit's
// default), the absmax quantized again in blocks of 256 (quantize_4bit, compress_statistics=True).
inline constexpr int64_t kNF4Blocksize = 64;
inline constexpr int64_t kNestedBlocksize = 256;

// dQuantizeNF4 (csrc/kernels.cu): the code of a value already scaled into [-1, 1]. The decision boundaries are the
// midpoints of neighbouring code values as float32 literals, walked as a binary tree of strict comparisons: a
// value equal to a boundary takes the lower code, and NaN fails every comparison and ends at code 0.
GEMMA_HOST_DEVICE inline uint8_t nf4_code(float x) {
  if (x > 0.03979014977812767f) {
    if (x > 0.3893125355243683f) {
      if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
      return x > 0.5016634166240692f ? 13 : 12;
    }
    if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
    return x > 0.1202552504837513f ? 9 : 8;
  }
  if (x > -0.33967943489551544f) {
    if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
    return x > -0.23460740596055984f ? 5 : 4;
  }
  if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
  return x > -0.8480964004993439f ? 1 : 0;
}

// One weight in bitsandbytes' NF4 form: the fields of its QuantState (functional.py), one name each.
struct Nf4Weight {
  Shape shape;                    // the weight's [out, in] (QuantState.shape)
  DType dtype = DType::bf16;      // QuantState.dtype: what dequantize_4bit returns
  int64_t blocksize = kNF4Blocksize;
  std::vector<uint8_t> packed;    // (numel + 1) / 2 bytes, first element of each pair in the high nibble
  std::vector<float> absmax;      // not nested: one float32 per block
  bool nested = false;            // double quantization (compress_statistics)
  std::vector<uint8_t> absmax_codes;       // nested: one code per block into nested_quant_map
  std::vector<float> nested_absmax;        // nested: one float32 per nested block
  std::vector<float> nested_quant_map;     // nested: 256 float32 (create_dynamic_map())
  int64_t nested_blocksize = kNestedBlocksize;
  float nested_offset = 0.0f;

  int64_t numel() const { return shape_numel(shape); }
  int64_t blocks() const { return (numel() + blocksize - 1) / blocksize; }
  uint8_t code(int64_t i) const { return (i & 1) ? (packed[size_t(i >> 1)] & 0x0f) : (packed[size_t(i >> 1)] >> 4); }
};

}  // namespace gemma
