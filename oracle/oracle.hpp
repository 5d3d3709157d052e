// High-precision truth for the reference's own numerics. Each function is the mathematical definition
// evaluated in a 50-digit binary float (Mp), in a form chosen to keep those 50 digits where the definition
// cancels: where a form loses digits, it is swapped for an exact identity (named at the function), never for
// the float64 reference's own rewrite, so that a wrong rewrite in reference/scalar.hpp cannot agree with
// itself here. The functions are templated on the number type so that a test can check the oracle against
// a 100-digit instantiation of itself.
//
// The reference instantiated at Mp (reference/gemma2.hpp with Real = Mp) is declared here too and compiled
// once in oracle.cpp: it is the same code run without float64 rounding, so float64-vs-Mp differences are
// the reference's rounding errors and nothing else.
#pragma once
// Eigen's NumTraits for Boost.Multiprecision must be seen before any Eigen matrix of Mp is instantiated.
#include <boost/multiprecision/eigen.hpp>

#include <boost/math/constants/constants.hpp>
#include <boost/multiprecision/cpp_bin_float.hpp>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "reference/gemma2.hpp"

namespace gemma::oracle {

// et_off: Eigen needs plain values, not Boost's expression templates.
using Mp = boost::multiprecision::number<boost::multiprecision::cpp_bin_float<50>, boost::multiprecision::et_off>;
using Mp100 = boost::multiprecision::number<boost::multiprecision::cpp_bin_float<100>, boost::multiprecision::et_off>;

// ----------------------------------------------------------------------------------------------------
// Measuring float64 results

inline constexpr double kUnitRoundoff = 0x1p-53;  // eps: a correctly rounded operation errs by <= eps |x|

// The spacing of doubles at |y|: 2^(e - 52) for 2^e <= |y| < 2^(e+1), and 2^-1074 among the subnormals.
double ulp_of(double y);

// |got - exact| in ulps of exact rounded to double. NaN when exactly one of them is NaN or they are
// unequal infinities; 0 when both are the same infinity or both NaN.
double ulp_error(double got, const Mp& exact);

// ----------------------------------------------------------------------------------------------------
// Scalar functions

// c tanh(x / c): well conditioned (condition number <= 1), no cancellation.
template <class T>
T softcap(const T& x, const T& c) {
  using std::tanh;
  return c * tanh(x / c);
}

// sech^2(x / c) = 1 / cosh^2(x / c): no subtraction at all, so the saturated tail (where 1 - tanh^2
// cancels) keeps every digit; cosh(inf) = inf gives the limit 0 at +-inf.
template <class T>
T softcap_grad(const T& x, const T& c) {
  using std::cosh;
  const T ch = cosh(x / c);
  return T(1) / (ch * ch);
}

// u = sqrt(2/pi) (x + 0.044715 x^3) with the decimal constant (the float64 reference rounds it to double:
// one of its input roundings, which the oracle must see).
template <class T>
T gelu_tanh_inner(const T& x) {
  using std::sqrt;
  static const T kappa = T("0.044715");
  return sqrt(T(2) / boost::math::constants::pi<T>()) * (x + kappa * x * x * x);
}

// 1 + tanh(u). For u < 0 it cancels (1 + tanh(-40) ~ 4e-35 would keep only 15 of 50 digits), so there the
// exact identity 1 + tanh(u) = 2 / (1 + e^{-2u}) is used, whose terms are all positive.
template <class T>
T one_plus_tanh(const T& u) {
  using std::exp;
  using std::tanh;
  if (u >= 0) return T(1) + tanh(u);
  return T(2) / (T(1) + exp(T(-2) * u));
}

// gelu_pytorch_tanh: 0.5 x (1 + tanh(u)).
template <class T>
T gelu_tanh(const T& x) {
  return T(0.5) * x * one_plus_tanh(gelu_tanh_inner(x));
}

// d/dx 0.5 x (1 + tanh u) = 0.5 (1 + tanh u) + 0.5 x sech^2(u) u'(x), u' = sqrt(2/pi) (1 + 3 0.044715 x^2).
template <class T>
T gelu_tanh_grad(const T& x) {
  using std::cosh;
  using std::sqrt;
  static const T kappa = T("0.044715");
  const T u = gelu_tanh_inner(x);
  const T du = sqrt(T(2) / boost::math::constants::pi<T>()) * (T(1) + T(3) * kappa * x * x);
  const T ch = cosh(u);
  return T(0.5) * one_plus_tanh(u) + T(0.5) * x * du / (ch * ch);
}

// ----------------------------------------------------------------------------------------------------
// Row-level functions (inputs are the float64 values the reference sees, converted exactly)

template <class T>
std::vector<T> to_mp(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// RMSNorm of one row: y_j = x_j r (1 + w_j), r = 1 / sqrt(mean(x^2) + eps).
template <class T>
struct RmsNorm {
  std::vector<T> y;
  T rstd;
};
template <class T>
RmsNorm<T> rmsnorm(const std::vector<T>& x, const std::vector<T>& w, const T& eps) {
  using std::sqrt;
  T ss = T(0);
  for (const T& v : x) ss += v * v;
  RmsNorm<T> r;
  r.rstd = T(1) / sqrt(ss / T(x.size()) + eps);
  for (size_t j = 0; j < x.size(); ++j) r.y.push_back(x[j] * r.rstd * (T(1) + w[j]));
  return r;
}

// Its gradient for one row: with xhat = x r and g = dy (1 + w),
// dx_j = r (g_j - xhat_j mean(g . xhat)) (d r / d x_j = -r^3 x_j / D); dw_j = dy_j xhat_j.
template <class T>
struct RmsNormGrad {
  std::vector<T> dx, dw;
};
template <class T>
RmsNormGrad<T> rmsnorm_grad(const std::vector<T>& x, const std::vector<T>& w, const T& eps, const std::vector<T>& dy) {
  const T r = rmsnorm(x, w, eps).rstd;
  const size_t D = x.size();
  T dot = T(0);
  for (size_t j = 0; j < D; ++j) dot += dy[j] * (T(1) + w[j]) * x[j] * r;
  RmsNormGrad<T> g;
  for (size_t j = 0; j < D; ++j) {
    g.dx.push_back(r * (dy[j] * (T(1) + w[j]) - x[j] * r * dot / T(D)));
    g.dw.push_back(dy[j] * x[j] * r);
  }
  return g;
}

// log sum_j e^{z_j}; shifting by the maximum keeps every exponential in range and loses nothing at 50 digits.
template <class T>
T logsumexp(const std::vector<T>& z) {
  using std::exp;
  using std::log;
  T mx = z[0];
  for (const T& v : z)
    if (v > mx) mx = v;
  T s = T(0);
  for (const T& v : z) s += exp(v - mx);
  return mx + log(s);
}

template <class T>
std::vector<T> softmax(const std::vector<T>& z) {
  using std::exp;
  const T lse = logsumexp(z);
  std::vector<T> p;
  for (const T& v : z) p.push_back(exp(v - lse));
  return p;
}

// Softcapped cross-entropy of one row of raw logits l with label y (cap c, or none):
// z = c tanh(l / c); loss = logsumexp(z) - z_y; dloss/dl_j = (softmax(z)_j - [j == y]) sech^2(l_j / c).
template <class T>
struct CrossEntropy {
  T loss;
  std::vector<T> grad;
};
template <class T>
CrossEntropy<T> cross_entropy(const std::vector<T>& l, int64_t y, bool capped, const T& c) {
  std::vector<T> z;
  for (const T& v : l) z.push_back(capped ? softcap(v, c) : v);
  CrossEntropy<T> r;
  r.loss = logsumexp(z) - z[size_t(y)];
  const std::vector<T> p = softmax(z);
  for (size_t j = 0; j < l.size(); ++j) {
    T d = p[j] - (int64_t(j) == y ? T(1) : T(0));
    if (capped) d *= softcap_grad(l[j], c);
    r.grad.push_back(d);
  }
  return r;
}

// RoPE of the pair (a, b) = (x_k, x_{k + hd/2}) at position t: angle t / theta^(2k / hd), exact.
template <class T>
std::pair<T, T> rope_rotate(const T& a, const T& b, int64_t t, int64_t k, int64_t hd, const T& theta) {
  using std::cos;
  using std::pow;
  using std::sin;
  const T angle = T(t) / pow(theta, T(2 * k) / T(hd));
  const T cs = cos(angle), sn = sin(angle);
  return {a * cs - b * sn, b * cs + a * sn};
}

}  // namespace gemma::oracle

// The reference at 50 digits, instantiated once in oracle.cpp.
namespace gemma::ref {
extern template Model<oracle::Mp> make_model<oracle::Mp>(const Checkpoint&, const Policy&);
extern template Grads<oracle::Mp> zero_grads<oracle::Mp>(const Model<oracle::Mp>&);
extern template Result<oracle::Mp> forward_backward<oracle::Mp>(const Model<oracle::Mp>&, const Batch&, const RunOptions&,
                                                                const oracle::Mp&, Grads<oracle::Mp>*, Trace<oracle::Mp>*);
extern template oracle::Mp step_loss_and_grads<oracle::Mp>(const Model<oracle::Mp>&, const std::vector<Batch>&,
                                                           const RunOptions&, Grads<oracle::Mp>&,
                                                           std::vector<Result<oracle::Mp>>*);
}  // namespace gemma::ref
