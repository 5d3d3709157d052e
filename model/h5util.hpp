// Small helpers over the HDF5 C++ API shared by the case-file and golden readers. Every HDF5 failure is
// turned into an InputError naming the file and the object, never left to HDF5's own error printer.
#pragma once
#include <H5Cpp.h>

#include <functional>
#include <string>
#include <vector>

#include "errors.hpp"
#include "tensor.hpp"

namespace gemma::h5 {

// The innermost entry of HDF5's error stack ("truncated file: eof = 9400, ..."): the C++ exception itself
// only names the API call that failed ("H5Fopen failed").
std::string innermost_error();

// Runs `f`, converting HDF5 exceptions into InputError("path: what: detail").
template <class F>
auto guard(const std::string& path, const std::string& what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const H5::Exception& e) {
    std::string d = innermost_error();
    if (d.empty()) d = e.getDetailMsg();
    fail(path, what + (d.empty() ? "" : ": " + d));
  }
}

void quiet();  // switch off HDF5's automatic error-stack printing (once per process)
bool exists(const H5::Group& g, const std::string& path);  // every component checked, no HDF5 error
std::vector<std::string> children(const H5::Group& g);
std::string read_string_attr(const H5::H5Object& o, const std::string& name, const std::string& path);
void write_string_attr(H5::H5Object& o, const std::string& name, const std::string& value);
// A float dataset of any float width as a Tensor (f16 and f32 as f32, f64 as f64).
// `budget`, when given, is the bytes the reader may still allocate; each dataset's in-memory size is taken
// from it before any is allocated. A chunked dataset whose chunks were never written reads as fill values,
// so a file of a few kilobytes can declare gigabytes: the budget ties memory to the file's size instead.
Tensor read_float_tensor(const H5::Group& g, const std::string& name, const std::string& path,
                         int64_t* budget = nullptr);
std::vector<int64_t> read_int_dataset(const H5::Group& g, const std::string& name, const std::string& path, Shape& shape,
                                      int64_t* budget = nullptr);
double read_scalar(const H5::Group& g, const std::string& name, const std::string& path, int64_t* budget = nullptr);
void write_tensor(H5::Group& g, const std::string& name, const Tensor& t);
void write_doubles(H5::Group& g, const std::string& name, const Shape& shape, const double* data);
void write_ints(H5::Group& g, const std::string& name, const Shape& shape, const std::vector<int64_t>& v);
void write_scalar(H5::Group& g, const std::string& name, double v);

// Writes through `body` into `path`.tmp-<pid> and renames it to `path` only when body returns.
void write_atomically(const std::string& path, const std::function<void(H5::H5File&)>& body);

}  // namespace gemma::h5
