// AdamW on the trainable weights (PyTorch's torch.optim.AdamW semantics): decoupled weight decay applied to
// the weight before the Adam update (to the parameters HF's Trainer decays: weight_decay_applies), bias-corrected
// moments.
#pragma once
#include <cmath>
#include <vector>

#include "model/optimizer.hpp"
#include "reference/gemma2.hpp"

namespace gemma::ref {

using gemma::AdamWConfig;

template <class Real>
struct AdamWState {
  std::vector<std::vector<Real>> m, v;  // one per trainable tensor, in for_each_trainable order
  int64_t step = 0;
};

template <class Real>
void adamw_step(Model<Real>& model, Grads<Real>& g, AdamWState<Real>& s, const AdamWConfig& h, const Policy& policy) {
  using std::pow;
  using std::sqrt;
  ++s.step;
  const Real bc1 = Real(1) - pow(Real(h.beta1), Real(s.step));
  const Real bc2 = Real(1) - pow(Real(h.beta2), Real(s.step));
  const Real step_size = Real(h.lr) / bc1;
  const Real sqrt_bc2 = sqrt(bc2);
  size_t k = 0;
  for_each_trainable(model, g, [&](const std::string& name, const Shape&, Real* p, const Real* gr, int64_t n) {
    if (s.m.size() <= k) {
      s.m.emplace_back(static_cast<size_t>(n), Real(0));
      s.v.emplace_back(static_cast<size_t>(n), Real(0));
    }
    std::vector<Real>& m = s.m[k];
    std::vector<Real>& v = s.v[k];
    // HF's Trainer gives norms and biases no decay (weight_decay_applies); a factor of exactly 1 leaves them alone.
    const Real decay = weight_decay_applies(name) ? Real(1) - Real(h.lr) * Real(h.weight_decay) : Real(1);
    for (int64_t i = 0; i < n; ++i) {
      p[i] *= decay;
      m[size_t(i)] = cast(policy, Cast::optimizer_state, Real(h.beta1) * m[size_t(i)] + (Real(1) - Real(h.beta1)) * gr[i]);
      v[size_t(i)] =
          cast(policy, Cast::optimizer_state, Real(h.beta2) * v[size_t(i)] + (Real(1) - Real(h.beta2)) * gr[i] * gr[i]);
      p[i] -= step_size * m[size_t(i)] / (sqrt(v[size_t(i)]) / sqrt_bc2 + Real(h.eps));
      p[i] = cast(policy, Cast::adapters, p[i]);
    }
    ++k;
  });
}

}  // namespace gemma::ref
