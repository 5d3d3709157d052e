// Error bounds of the float64 reference's numerics against the 50-digit oracle, shared by the oracle
// tests and the properties that check against it. Each is derived from the roundings and condition
// numbers of the computation (docs/oracle.md lists them with the measured maxima).
//
// Libm accuracy assumed (glibc 2.36, x86-64, libm-test-ulps): exp, log, pow, sin, cos <= 1 ulp; tanh <= 2 ulp.
// A relative error of k eps (eps = 2^-53) is below k ulps, since ulp(y) > eps |y| for every double y.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "oracle/oracle.hpp"

namespace gemma::test {

inline constexpr double kEps = gemma::oracle::kUnitRoundoff;

// softcap(x) = c tanh(x / c): x / c (eps; tanh's condition number a (1 - t^2) / t <= 1 carries it
// through unamplified), tanh (2 ulp <= 4 eps), times c (eps): 6 eps, so 6 ulps. Normal x only: a
// subnormal x / c keeps fewer bits (up to c/2 ulps of error).
inline constexpr double kSoftcapUlp = 6;

// softcap_grad = 4e / (1 + e)^2, e = exp(-2a)(1 - 2 da): exp 2 eps, the correction factor and its product
// 2 eps (the residual da is exact through fma; the dropped (da)^2 term is < 1e-31), 1 + e eps, the square
// 2 eps + eps, the division eps: 9 eps. Without the residual, exp would amplify the quotient's rounding by
// 2a (80 eps at a = 40), which this bound catches.
inline constexpr double kSoftcapGradUlp = 9;

// Cross-entropy of one row (loss_forward_backward), inputs: the raw logits l, the label y, the cap.
// Loss, absolute: each capped logit z_j carries 6 eps relative (softcap's bound) and reaches logsumexp
// weighted by p_j; the shifted exponentials add |z_j - max| eps + exp's 2 eps; their V-term positive sum
// V eps; log 2 eps of |log s| (|log s| = |lse - max|) and the add eps |lse|. Then - z_y: 6 eps |z_y| and
// eps |loss|. Gradient element j, absolute: exp's argument z_j - lse carries eps |z_j - lse|, z_j's 6 eps
// |z_j| and lse's bound, so p_j that much relative plus exp's 2 eps; the subtraction of [j = y], the cap
// derivative (9 eps) and the scale add 11 eps of |p_j - [j = y]|; all times sech^2(l_j / c). Where p_j
// underflows, exp and the product with the scale each round to 2^-1074 absolute.
struct CrossEntropyBound {
  oracle::Mp loss;               // exact loss of the row
  oracle::Mp loss_err;           // bound on the float64 loss's absolute error
  std::vector<oracle::Mp> grad;  // exact d loss / d l_j (unscaled)
  std::vector<oracle::Mp> grad_err;  // bound on the float64 gradient's absolute error (unscaled)
};

inline CrossEntropyBound cross_entropy_bound(const std::vector<double>& logits, int64_t y, bool capped, double cap) {
  using oracle::Mp;
  const auto L = oracle::to_mp<Mp>(logits);
  const auto ce = oracle::cross_entropy(L, y, capped, Mp(cap));
  std::vector<Mp> z;
  for (const Mp& v : L) z.push_back(capped ? oracle::softcap(v, Mp(cap)) : v);
  const Mp lse = oracle::logsumexp(z);
  const auto p = oracle::softmax(z);
  Mp mx = z[0];
  for (const Mp& v : z) mx = std::max(mx, v);
  Mp b_lse = Mp(int64_t(z.size())) + 2 * abs(lse - mx) + abs(lse) + 2;
  for (size_t j = 0; j < z.size(); ++j) b_lse += p[j] * (6 * abs(z[j]) + abs(z[j] - mx) + 2);
  CrossEntropyBound r;
  r.loss = ce.loss;
  r.loss_err = kEps * (b_lse + 6 * abs(z[size_t(y)]) + abs(ce.loss));
  r.grad = ce.grad;
  for (size_t j = 0; j < z.size(); ++j) {
    const Mp sg = capped ? oracle::softcap_grad(L[j], Mp(cap)) : Mp(1);
    const Mp hot = int64_t(j) == y ? Mp(1) : Mp(0);
    r.grad_err.push_back(kEps * sg * (p[j] * (abs(z[j] - lse) + 6 * abs(z[j]) + b_lse + 2) + 11 * abs(p[j] - hot)));
  }
  return r;
}

}  // namespace gemma::test
