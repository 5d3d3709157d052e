// Test inputs: small synthetic models and batches, and the error measures the tests report.
#pragma once
#include <cmath>
#include <string>
#include <vector>

#include "model/synthetic.hpp"
#include "check/inputs.hpp"

namespace gemma::test {

// A preset (or a variation of it) with synthetic bf16 weights, LoRA adapters of rank `r` on all seven
// projections when r > 0, and a synthetic batch.
struct Case {
  Checkpoint ck;
  Batch batch;
};

inline Case make_case(const Config& c, int64_t r, uint64_t seed, int64_t B, int64_t T, double ignore = 0.125) {
  Case k;
  k.ck.config = c;
  k.ck.weights = synthetic_weights(c, seed);
  if (r > 0) {
    k.ck.adapter = check::synthetic_adapter_config(r);
    TensorMap a = synthetic_adapters(c, *k.ck.adapter, seed);
    k.ck.weights.insert(a.begin(), a.end());
  }
  k.batch = synthetic_batch(c, B, T, seed, ignore);
  return k;
}

inline double rel_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

inline double l2(const std::vector<double>& a) {
  double s = 0;
  for (double x : a) s += x * x;
  return std::sqrt(s);
}

}  // namespace gemma::test
