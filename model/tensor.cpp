#include "tensor.hpp"

#include <cmath>
#include <cstring>

namespace gemma {

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

double Tensor::at(int64_t i) const {
  double v;
  to_double(i, 1, &v);
  return v;
}

void Tensor::to_double(int64_t first, int64_t count, double* out) const {
  // Bytes may sit at any alignment (safetensors offsets are not aligned to the element size), so every
  // element is read through memcpy, which compiles to a plain load.
  const std::byte* p = bytes.get() + first * int64_t(dtype_size(dtype));
  switch (dtype) {
    case DType::f64:
      std::memcpy(out, p, size_t(count) * 8);
      break;
    case DType::f32:
      for (int64_t i = 0; i < count; ++i) {
        float f;
        std::memcpy(&f, p + 4 * i, 4);
        out[i] = f;
      }
      break;
    case DType::bf16:
      for (int64_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = bf16_to_float(h);
      }
      break;
    case DType::f16:
      for (int64_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = f16_to_float(h);
      }
      break;
  }
}

std::vector<double> Tensor::to_double() const {
  std::vector<double> v(static_cast<size_t>(numel()));
  to_double(0, numel(), v.data());
  return v;
}

OwnedTensor make_tensor(DType d, Shape shape) {
  OwnedTensor o;
  o.t.dtype = d;
  o.t.shape = std::move(shape);
  const size_t n = size_t(o.t.numel()) * dtype_size(d);
  std::shared_ptr<std::byte[]> buf(new std::byte[n ? n : 1]());
  o.raw = buf.get();
  o.t.bytes = std::shared_ptr<const std::byte>(buf, buf.get());
  return o;
}

Tensor tensor_from_doubles(DType d, Shape shape, const std::vector<double>& values) {
  OwnedTensor o = make_tensor(d, std::move(shape));
  const int64_t n = o.t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const double x = values[size_t(i)];
    switch (d) {
      case DType::f64: o.data<double>()[i] = x; break;
      case DType::f32: o.data<float>()[i] = float(x); break;
      case DType::bf16: o.data<uint16_t>()[i] = float_to_bf16(float(x)); break;
      case DType::f16: o.data<uint16_t>()[i] = float_to_f16(float(x)); break;
    }
  }
  return o.t;
}

int64_t first_non_finite(const Tensor& t) {
  const int64_t n = t.numel();
  const int64_t block = 1 << 16;
  std::vector<double> buf(size_t(std::min(n, block)));
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t m = std::min(block, n - i0);
    t.to_double(i0, m, buf.data());
    for (int64_t i = 0; i < m; ++i)
      if (!std::isfinite(buf[size_t(i)])) return i0 + i;
  }
  return -1;
}

}  // namespace gemma
