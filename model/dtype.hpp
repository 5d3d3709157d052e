// Storage formats and exact rounding between them.
// Every low-precision value in this project is produced by one of these functions, so that the reference's
// emulated casts and the CUDA kernels round identically (round-to-nearest-even, NaN stays NaN).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace gemma {

enum class DType : uint8_t { f64, f32, bf16, f16 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f64: return "f64";
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
  }
  return "?";
}

inline std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::f64: return 8;
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::f16: return 2;
  }
  return 0;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

// Round-to-nearest-even of an fp32 value to bf16: add 0x7FFF plus the lsb of the kept half, truncate.
// A NaN is kept a (quiet) NaN; without the check a NaN with only low mantissa bits set would carry into
// the exponent and become infinity. Finite values beyond the bf16 range round to infinity, as in hardware.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // Subnormal half: value = man * 2^-24, exactly representable in fp32.
    return (sign ? -1.0f : 1.0f) * std::ldexp(float(man), -24);
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round-to-nearest-even of an fp32 value to IEEE half (subnormals and overflow to infinity included).
inline uint16_t float_to_f16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x47800000u) {
    // >= 65536: infinity. Values in [65520, 65536) also round to infinity, handled by the normal path below.
    return uint16_t(sign | 0x7c00u);
  }
  if (a < 0x38800000u) {
    // Below the smallest normal half (2^-14): quantise to multiples of 2^-24 with round-to-nearest-even.
    // The float arithmetic is exact here: a * 2^24 < 2^10 is computed exactly, nearbyint rounds to even.
    const float scaled = bits_float(a) * 16777216.0f;
    return uint16_t(sign | uint16_t(std::nearbyint(scaled)));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even;
  // a carry out of the mantissa correctly bumps the exponent (and reaches infinity at the top).
  uint32_t r = a - (112u << 23);
  r += 0x0fffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}

// Exact rounding of a float64 value to a storage format, returned as float64. bf16 and f16 round the
// fp32 value (what a kernel holds in registers), as docs/model.md prescribes.
inline double round_to(DType d, double x) {
  switch (d) {
    case DType::f64: return x;
    case DType::f32: return double(float(x));
    case DType::bf16: return double(bf16_to_float(float_to_bf16(float(x))));
    case DType::f16: return double(f16_to_float(float_to_f16(float(x))));
  }
  return x;
}

}  // namespace gemma
