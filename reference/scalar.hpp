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
// cancels to zero for |x|/c beyond ~19 while the true value is still ~1e-16 (numerics.md). The quotient's
// own rounding error would be amplified by 2|x|/c through exp, so its residual is folded back in first
// order: exp(-2(a + da)) = exp(-2a)(1 - 2 da), with |da| < 1 ulp of a, so the dropped term is < 1e-31.
template <class T>
inline T softcap_grad(const T& x, const T& c) {
  using std::abs;
  using std::exp;
  const T ax = abs(x);
  const T a = ax / c;
  const T da = quotient_residual(ax, a, c) / c;
  const T e = exp(T(-2) * a) * (T(1) - T(2) * da);
  const T one_e = T(1) + e;
  return T(4) * e / (one_e * one_e);
}

// The form every buggy implementation uses, kept to show (in tests) what it loses.
template <class T>
inline T softcap_grad_naive(const T& x, const T& c) {
  using std::tanh;
  const T t = tanh(x / c);
  return T(1) - t * t;
}

// gelu_pytorch_tanh: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), rewritten as x * sigmoid(2u)
// (1 + tanh(u) = 2 / (1 + exp(-2u))) so that the left tail does not cancel to zero.
template <class T>
inline T gelu_tanh_inner(const T& x) {
  return boost::math::constants::root_two_div_pi<T>() * (x + T(0.044715) * x * x * x);
}

template <class T>
inline T gelu_tanh(const T& x) {
  using std::exp;
  const T u = gelu_tanh_inner(x);
  return x / (T(1) + exp(T(-2) * u));
}

// d gelu_tanh / dx = s + x * 2 u'(x) * s * (1 - s), s = sigmoid(2u); 1 - s is sigmoid(-2u), computed as such
// so that it keeps its relative accuracy when s is close to 1.
template <class T>
inline T gelu_tanh_grad(const T& x) {
  using std::exp;
  const T u = gelu_tanh_inner(x);
  const T e = exp(T(-2) * u);
  const T s = T(1) / (T(1) + e);
  const T one_minus_s = e / (T(1) + e);
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
