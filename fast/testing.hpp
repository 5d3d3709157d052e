// Error measures the GPU tests print and bound: the fast trainer against the reference under the `fast` policy
// (its own cast points) and under f64 (exact math). Plain C++, header only.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "model/dtype.hpp"
#include "model/synthetic.hpp"

namespace gemma::fast::testing {

struct Diff {
  size_t n = 0;
  double rel_l2 = 0;       // |got - ref| / |ref|
  double max_abs = 0;      // max |got - ref|
  double ref_max = 0;      // max |ref|
  int64_t nan = 0;         // non-finite elements in got (an output a kernel never wrote stays NaN)
  int64_t differ = 0;      // elements not equal to the reference
  int64_t beyond_ulp = 0;  // elements further than one bf16 ulp (plus slack) from the reference
};

// One unit in the last place of bf16 at |x| (8 significant bits).
inline double bf16_ulp(double x) {
  const double a = std::fabs(x);
  if (a < 1e-30) return 1e-30;
  return std::ldexp(1.0, std::ilogb(a) - 7);
}

// `slack` is an absolute allowance relative to the tensor's largest reference value: a result that cancels to
// far below its terms carries the terms' fp32 accumulation error, which one ulp of the small result does not cover.
inline Diff compare(const std::vector<float>& got, const std::vector<double>& ref, double slack = 1e-5) {
  Diff d;
  d.n = ref.size();
  double num = 0, den = 0;
  for (double r : ref) d.ref_max = std::max(d.ref_max, std::fabs(r));
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    const double g = got[i], r = ref[i];
    if (!std::isfinite(g)) {
      ++d.nan;
      continue;
    }
    const double e = std::fabs(g - r);
    num += e * e;
    den += r * r;
    d.max_abs = std::max(d.max_abs, e);
    if (g != r) ++d.differ;
    if (e > bf16_ulp(r) * 1.0001 + slack * d.ref_max) ++d.beyond_ulp;
  }
  if (got.size() != ref.size()) d.nan += int64_t(ref.size() > got.size() ? ref.size() - got.size() : 0);
  d.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return d;
}

inline std::string describe(const Diff& d) {
  char b[256];
  std::snprintf(b, sizeof b, "rel L2 %.2e, max |diff| %.2e (max |ref| %.2e), %lld differ, %lld beyond 1 bf16 ulp, %lld NaN of %zu",
                d.rel_l2, d.max_abs, d.ref_max, (long long)d.differ, (long long)d.beyond_ulp, (long long)d.nan, d.n);
  return b;
}

// Uniform in [-scale, scale) from the project's counter-based hash (never zeros, the same on every machine);
// rounded to bf16 when the kernel reads bf16.
inline std::vector<float> random(size_t n, double scale, uint64_t seed, const std::string& name, bool bf16) {
  std::vector<float> v(n);
  const uint64_t key = stream_key(seed, name);
  for (size_t i = 0; i < n; ++i) {
    const float f = float(scale * stream_uniform(key, i));
    v[i] = bf16 ? bf16_to_float(float_to_bf16(f)) : f;
  }
  return v;
}

inline std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

}  // namespace gemma::fast::testing
