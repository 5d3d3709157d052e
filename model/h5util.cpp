#include "h5util.hpp"

#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "model/atomic_file.hpp"

namespace gemma::h5 {

void quiet() {
  static bool done = false;
  if (!done) {
    H5::Exception::dontPrint();
    done = true;
  }
}

std::string innermost_error() {
  std::string r;
  // Walking upward starts at the most specific error, where the library detected the problem.
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned n, const H5E_error2_t* e, void* out) -> herr_t {
        if (n == 0 && e->desc) *static_cast<std::string*>(out) = e->desc;
        return 0;
      },
      &r);
  return r;
}

bool exists(const H5::Group& g, const std::string& path) {
  std::string prefix;
  size_t start = 0;
  while (start <= path.size()) {
    size_t slash = path.find('/', start);
    std::string part = path.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    prefix += (prefix.empty() ? "" : "/") + part;
    const htri_t r = H5Lexists(g.getId(), prefix.c_str(), H5P_DEFAULT);
    // Negative is a damaged group, not an absent member: reporting "missing" would blame the wrong thing.
    if (r < 0) throw H5::GroupIException("exists", "cannot look up '" + prefix + "'");
    if (r == 0) return false;
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return true;
}

std::vector<std::string> children(const H5::Group& g) {
  std::vector<std::string> r;
  const hsize_t n = g.getNumObjs();
  for (hsize_t i = 0; i < n; ++i) r.push_back(g.getObjnameByIdx(i));
  return r;
}

std::string read_string_attr(const H5::H5Object& o, const std::string& name, const std::string& path) {
  return guard(path, "attribute '" + name + "'", [&] {
    H5::Attribute a = o.openAttribute(name);
    if (a.getTypeClass() != H5T_STRING) fail(path, "attribute '" + name + "' is not a string");
    // The C++ API reads a variable-length string into one char*: a string array would write past it.
    const H5::DataSpace sp = a.getSpace();
    if (sp.getSimpleExtentType() != H5S_SCALAR && sp.getSimpleExtentNpoints() != 1)
      fail(path, "attribute '" + name + "' holds " + std::to_string(sp.getSimpleExtentNpoints()) +
                     " strings, expected one");
    std::string s;
    a.read(a.getStrType(), s);
    return s;
  });
}

void write_string_attr(H5::H5Object& o, const std::string& name, const std::string& value) {
  H5::StrType st(H5::PredType::C_S1, H5T_VARIABLE);
  st.setCset(H5T_CSET_UTF8);
  H5::Attribute a = o.createAttribute(name, st, H5::DataSpace(H5S_SCALAR));
  a.write(st, value);
}

namespace {

// Case files hold small models; a larger extent is corrupt (and would be an absurd allocation).
constexpr int64_t kMaxElements = int64_t(1) << 31;

Shape dataset_shape(const H5::DataSet& ds, const std::string& name, const std::string& path) {
  H5::DataSpace sp = ds.getSpace();
  if (sp.getSimpleExtentType() == H5S_NULL) fail(path, "'" + name + "' is an empty (null) dataset");
  const int rank = sp.getSimpleExtentNdims();
  if (rank < 0 || rank > 8) fail(path, "'" + name + "' has an unsupported rank " + std::to_string(rank));
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  if (rank) sp.getSimpleExtentDims(dims.data());
  Shape s;
  int64_t n = 1;
  for (hsize_t d : dims) {
    if (d > hsize_t(kMaxElements)) fail(path, "'" + name + "' has an implausible extent");
    s.push_back(int64_t(d));
    n *= int64_t(d);
    if (n > kMaxElements) fail(path, "'" + name + "' has more than 2^31 elements");
  }
  return s;
}

// Charges a dataset's in-memory size to `budget` before it is read (see the header).
void charge(int64_t* budget, int64_t bytes, const std::string& name, const std::string& path) {
  if (!budget) return;
  if (bytes > *budget)
    fail(path, "'" + name + "' would take " + std::to_string(bytes) +
                   " bytes in memory, more than the file's size allows (corrupt, or a decompression bomb)");
  *budget -= bytes;
}

}  // namespace

Tensor read_float_tensor(const H5::Group& g, const std::string& name, const std::string& path, int64_t* budget) {
  return guard(path, "reading '" + name + "'", [&] {
    if (!exists(g, name)) fail(path, "missing dataset '" + name + "'");
    H5::DataSet ds = g.openDataSet(name);
    if (ds.getTypeClass() != H5T_FLOAT) fail(path, "'" + name + "' is not a floating-point dataset");
    const size_t width = ds.getFloatType().getSize();
    Shape s = dataset_shape(ds, name, path);
    charge(budget, shape_numel(s) * (width > 4 ? 8 : 4), name, path);
    if (width > 4) {
      OwnedTensor o = make_tensor(DType::f64, s);
      if (o.t.numel()) ds.read(o.raw, H5::PredType::NATIVE_DOUBLE);
      return o.t;
    }
    // float16 (h5py's IEEE half) converts exactly to float32 inside HDF5.
    OwnedTensor o = make_tensor(DType::f32, s);
    if (o.t.numel()) ds.read(o.raw, H5::PredType::NATIVE_FLOAT);
    return o.t;
  });
}

std::vector<int64_t> read_int_dataset(const H5::Group& g, const std::string& name, const std::string& path, Shape& shape,
                                      int64_t* budget) {
  return guard(path, "reading '" + name + "'", [&] {
    if (!exists(g, name)) fail(path, "missing dataset '" + name + "'");
    H5::DataSet ds = g.openDataSet(name);
    if (ds.getTypeClass() != H5T_INTEGER) fail(path, "'" + name + "' is not an integer dataset");
    shape = dataset_shape(ds, name, path);
    charge(budget, shape_numel(shape) * 8, name, path);
    std::vector<int64_t> v(size_t(shape_numel(shape)));
    if (v.empty()) return v;
    // libhdf5 converts an unsigned 64-bit value above INT64_MAX to INT64_MAX, and the value's own error message
    // then quoted 9223372036854775807 for 2^64 - 5 (found by a probe, 2026-12-05): such values are named as they are.
    if (ds.getIntType().getSign() == H5T_SGN_NONE && ds.getIntType().getSize() >= 8) {
      std::vector<uint64_t> u(v.size());
      ds.read(u.data(), H5::PredType::NATIVE_UINT64);
      for (size_t i = 0; i < u.size(); ++i) {
        if (u[i] > uint64_t(INT64_MAX))
          fail(path, "'" + name + "' has the value " + std::to_string(u[i]) + " at flat index " + std::to_string(i) +
                         ", beyond any token id, label or position");
        v[i] = int64_t(u[i]);
      }
      return v;
    }
    ds.read(v.data(), H5::PredType::NATIVE_INT64);
    return v;
  });
}

double read_scalar(const H5::Group& g, const std::string& name, const std::string& path, int64_t* budget) {
  Tensor t = read_float_tensor(g, name, path, budget);
  if (t.numel() != 1) fail(path, "'" + name + "' must be a scalar, has shape " + shape_str(t.shape));
  return t.at(0);
}

namespace {

H5::DataSpace space_of(const Shape& shape) {
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  return shape.empty() ? H5::DataSpace(H5S_SCALAR) : H5::DataSpace(int(dims.size()), dims.data());
}

H5::FloatType half_type() {
  // IEEE binary16, laid out as h5py writes numpy float16.
  H5::FloatType t(H5::PredType::IEEE_F32LE);
  t.setFields(15, 10, 5, 0, 10);
  t.setSize(2);
  t.setEbias(15);
  return t;
}

}  // namespace

void write_tensor(H5::Group& g, const std::string& name, const Tensor& t) {
  H5::DataSpace sp = space_of(t.shape);
  switch (t.dtype) {
    case DType::f64: {
      H5::DataSet ds = g.createDataSet(name, H5::PredType::IEEE_F64LE, sp);
      ds.write(t.bytes.get(), H5::PredType::NATIVE_DOUBLE);
      break;
    }
    case DType::f32: {
      H5::DataSet ds = g.createDataSet(name, H5::PredType::IEEE_F32LE, sp);
      ds.write(t.bytes.get(), H5::PredType::NATIVE_FLOAT);
      break;
    }
    case DType::bf16: {
      // HDF5 has no bfloat16; every bf16 value is exact in float32.
      std::vector<float> f(size_t(t.numel()));
      const uint16_t* h = reinterpret_cast<const uint16_t*>(t.bytes.get());
      for (size_t i = 0; i < f.size(); ++i) f[i] = bf16_to_float(h[i]);
      H5::DataSet ds = g.createDataSet(name, H5::PredType::IEEE_F32LE, sp);
      ds.write(f.data(), H5::PredType::NATIVE_FLOAT);
      break;
    }
    case DType::f16: {
      H5::FloatType ht = half_type();
      H5::DataSet ds = g.createDataSet(name, ht, sp);
      ds.write(t.bytes.get(), ht);
      break;
    }
  }
}

void write_doubles(H5::Group& g, const std::string& name, const Shape& shape, const double* data) {
  H5::DataSet ds = g.createDataSet(name, H5::PredType::IEEE_F64LE, space_of(shape));
  ds.write(data, H5::PredType::NATIVE_DOUBLE);
}

void write_ints(H5::Group& g, const std::string& name, const Shape& shape, const std::vector<int64_t>& v) {
  H5::DataSet ds = g.createDataSet(name, H5::PredType::STD_I64LE, space_of(shape));
  ds.write(v.data(), H5::PredType::NATIVE_INT64);
}

void write_scalar(H5::Group& g, const std::string& name, double v) { write_doubles(g, name, {}, &v); }

void write_atomically(const std::string& path_given, const std::function<void(H5::H5File&)>& body) {
  quiet();
  // Through a symbolic link to the file it names (renaming over the link would replace it); HDF5 needs a file it
  // can seek in, so a device or pipe is refused rather than replaced by a regular file (write_file_atomically).
  const OutputTarget target = output_target(path_given);
  if (target.special) fail(path_given, "is not a regular file (a device or pipe): an HDF5 file cannot be written there");
  const std::string& path = target.path;
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  try {
    {
      H5::H5File f(tmp, H5F_ACC_TRUNC);
      body(f);
    }
    std::filesystem::rename(tmp, path);
  } catch (const H5::Exception& e) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    fail(path_given, "cannot write: " + e.getDetailMsg());
  } catch (const std::filesystem::filesystem_error& e) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    fail(path_given, std::string("cannot write: ") + e.what());
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    throw;
  }
}

}  // namespace gemma::h5
