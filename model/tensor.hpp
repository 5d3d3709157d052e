// A tensor as it sits in a file: its storage format, shape and bytes. Frozen weights stay in this form
// (bf16 weights of a real 27b layer are 1.1 GB; in float64 they would be 4.5 GB) and backends convert
// them block by block.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dtype.hpp"

namespace gemma {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);  // "[256000, 4608]"
int64_t shape_numel(const Shape& s);

struct Tensor {
  DType dtype = DType::f32;
  Shape shape;
  // Shares ownership of whatever holds the bytes (a heap buffer, or a mapped safetensors file).
  std::shared_ptr<const std::byte> bytes;

  int64_t numel() const { return shape_numel(shape); }
  int64_t rows() const { return shape.empty() ? 1 : shape[0]; }
  int64_t cols() const { return shape.size() < 2 ? 1 : numel() / rows(); }
  double at(int64_t i) const;
  // Converts elements [first, first + count) to double (exact for every format).
  void to_double(int64_t first, int64_t count, double* out) const;
  std::vector<double> to_double() const;
};

// A tensor with its own zero-filled buffer, writable through `data<E>()` until it is shared.
struct OwnedTensor {
  Tensor t;
  std::byte* raw = nullptr;
  template <class E> E* data() { return reinterpret_cast<E*>(raw); }
};
OwnedTensor make_tensor(DType d, Shape shape);
Tensor tensor_from_doubles(DType d, Shape shape, const std::vector<double>& values);  // values rounded to d

// Index of the first non-finite element, or -1.
int64_t first_non_finite(const Tensor& t);

using TensorMap = std::map<std::string, Tensor>;

// A safetensors U8 tensor: not a weight, but bitsandbytes' packed 4-bit codes, 8-bit absmax codes and the JSON of
// a quant state are stored that way (model/nf4.hpp reads them).
struct ByteTensor {
  Shape shape;
  std::shared_ptr<const std::byte> bytes;
  int64_t numel() const { return shape_numel(shape); }
};
using ByteTensorMap = std::map<std::string, ByteTensor>;

}  // namespace gemma
