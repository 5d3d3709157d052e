// Scalar functions of the Gemma 2 math, templated on the scalar type (double, or a Boost.Multiprecision
// number for the oracle). Each is written for full relative accuracy over the whole input range, because
// the reference is what every other result is judged by; oracle/ measures how close each comes.
#pragma once
#include <boost/math/constants/constants.hpp>
#include <cmath>

namespace gemma::ref {

// x - a*c for a = x/c rounded: exact for double through fma, so the quotient's rounding error can be put
// back. Other scalar types carry enough digits that plain arithmetic does the same.
template <class T>
inline T quotient_residual(const T& x, const T& a, const T& c) {
  return x - a * c;
}
template <>
inline double quotient_residual<double>(const double& x, const double& a, const double& c) {
  return std::fma(-a, c, x);
}

// softcap(x) = c tanh(x / c). tanh's condition number is at most 1, so the rounded quotient is harmless.
template <class T>
inline T softcap(const T& x, const T& c) {
  using std::tanh;
  return c * tanh(x / c);
}

// d softcap / dx = sech^2(x / c). Written as 4e / (1 + e)^2 with e = exp(-2|x|/c): the naive 1 - tanh^2
// cancels to zero for |x|/c beyond ~19 while the true value is still ~1e-16 (docs/model.md). The quotient's
// own rounding error would be amplified by 2|x|/c through exp, so its residual is folded back in first
// order: exp(-2(a + da)) = exp(-2a)(1 - 2 da), with |da| < 1 ulp of a, so the dropped term is < 1e-31.
template <class T>
inline T softcap_grad(const T& x, const T& c) {
  using std::abs;
  using std::exp;
  const T ax = abs(x);
  const T a = ax / c;
  const T e0 = exp(T(-2) * a);
  // e0 == 0: the true value (< 4 e^{-745}) underflows too; skipping the correction also keeps x = +-inf
  // (where the residual is inf - inf) at the limit 0 instead of NaN.
  if (e0 == T(0)) return e0;
  const T da = quotient_residual(ax, a, c) / c;
  const T e = e0 * (T(1) - T(2) * da);
  const T one_e = T(1) + e;
  // For tiny |x| the roundings of 1 + e and its square can give 1 + 2^-52, while the true value is <= 1:
  // clamping only moves the result toward it (and keeps NaN a NaN).
  const T r = T(4) * e / (one_e * one_e);
  return r > T(1) ? T(1) : r;
}

// The form every buggy implementation uses, kept to show (in tests) what it loses.
template <class T>
inline T softcap_grad_naive(const T& x, const T& c) {
  using std::tanh;
  const T t = tanh(x / c);
  return T(1) - t * t;
}

// gelu_pytorch_tanh: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), rewritten as x * sigmoid(2u)
// (1 + tanh(u) = 2 / (1 + exp(-2u))) so that the left tail does not cancel to zero. sigmoid(2u) is taken from
// e = exp(-2|u|) <= 1 on both sides: exp(-2u) itself overflows for x < -21.16, while the result is a double
// down to x = -21.54 (normal to -21.18), and 1 - s became inf / inf = NaN in the derivative for every x below.
template <class T>
inline T gelu_tanh_inner(const T& x) {
  return boost::math::constants::root_two_div_pi<T>() * (x + T(0.044715) * x * x * x);
}

template <class T>
inline T gelu_tanh(const T& x) {
  using std::abs;
  using std::exp;
  const T u = gelu_tanh_inner(x);
  const T e = exp(T(-2) * abs(u));
  if (u >= T(0)) return x / (T(1) + e);
  if (e == T(0)) return -T(0);  // underflowed, like the true value; x = -inf gives the limit, not -inf * 0
  return x * e / (T(1) + e);
}

// d gelu_tanh / dx = s + x * 2 u'(x) * s * (1 - s), s = sigmoid(2u); 1 - s is sigmoid(-2u), computed as such
// so that it keeps its relative accuracy when s is close to 1.
template <class T>
inline T gelu_tanh_grad(const T& x) {
  using std::abs;
  using std::exp;
  const T u = gelu_tanh_inner(x);
  const T e = exp(T(-2) * abs(u));
  const T big = T(1) / (T(1) + e), small = e / (T(1) + e);
  const T s = u >= T(0) ? big : small;
  const T one_minus_s = u >= T(0) ? small : big;
  // e == 0: s (1 - s) is exactly 0, and x u'(x) may be inf (|x| > 1.3e154), which would make 0 * inf = NaN.
  if (e == T(0)) return s;
  const T du = boost::math::constants::root_two_div_pi<T>() * (T(1) + T(3) * T(0.044715) * x * x);
  return s + x * T(2) * du * s * one_minus_s;
}

// The exact erf GELU (the gelu-exact variant: what HF used for Gemma before March 2024).
template <class T>
inline T gelu_erf(const T& x) {
  using std::erf;
  return T(0.5) * x * (T(1) + erf(x * boost::math::constants::one_div_root_two<T>()));
}
template <class T>
inline T gelu_erf_grad(const T& x) {
  using std::erf;
  using std::exp;
  using namespace boost::math::constants;
  return T(0.5) * (T(1) + erf(x * one_div_root_two<T>())) + x * one_div_root_two_pi<T>() * exp(T(-0.5) * x * x);
}

}  // namespace gemma::ref
