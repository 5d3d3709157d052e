// The float64 reference's scalar and row-level numerics held to the 50-digit oracle, in ulps of the float64
// result (or, where a result is a difference that may cancel, in units of eps times the magnitude of the
// terms it is made of). Each bound is derived in a comment from the roundings and condition numbers of the
// function; docs/oracle.md collects them with the measured maxima that these tests print.
// tests/oracle_bounds.hpp states the libm accuracy assumed.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "model/synthetic.hpp"
#include "oracle/oracle.hpp"
#include "tests/oracle_bounds.hpp"

using namespace gemma;
using namespace gemma::ref;
using namespace gemma::test;
using gemma::oracle::Mp;
using gemma::oracle::Mp100;
using gemma::oracle::ulp_error;
using gemma::oracle::ulp_of;

namespace {

// Tiny matrices: OpenMP's fork and join per call cost more than the work, and on a loaded 2-core machine its
// spinning threads made these tests 10x slower; one thread keeps their run time independent of other load.
[[maybe_unused]] const bool kOneThread = (omp_set_num_threads(1), true);

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// |x| from 1e-300 through ordinary values to `top`, both signs: every decade at three mantissas, then a
// dense sweep of [0, top] that hits ordinary and saturated arguments, with hashed (not round) mantissas.
std::vector<double> sweep(double top, int dense = 4000) {
  std::vector<double> xs;
  for (int e = -300; e <= 2; ++e)
    for (double m : {1.0, 2.7182818284590451, 7.3890560989306504}) {
      const double x = m * std::pow(10.0, double(e));
      if (x <= top) xs.insert(xs.end(), {x, -x});
    }
  const uint64_t key = stream_key(1, "oracle-sweep");
  for (int i = 0; i < dense; ++i) {
    const double x = top * (double(i) + 0.5 * (stream_uniform(key, uint64_t(i)) + 1.0)) / double(dense);
    xs.insert(xs.end(), {x, -x});
  }
  xs.push_back(0.0);
  return xs;
}

struct Worst {
  double err = 0, x = 0, bound = 0;
  void see(double e, double at, double b) {
    if (!(e <= err)) err = e, x = at, bound = b;  // NaN wins, so that it is reported
  }
};

// gelu_tanh = x sigmoid(2u) from e = exp(-2|u|). u carries 7 eps relative: the cubic term's 3 products and
// its rounded constant, the add (same signs: no cancellation), sqrt(2/pi) and its product. exp turns that
// into an absolute error 14 |u| eps of its argument, which reaches the result weighted by 1 - sigmoid(2|u|)
// ... in the left tail the whole of it ("the left tail amplifies u's error by 2|u|"). Add exp (2 eps), x e,
// 1 + e and the division: 4 eps. Where e is subnormal it is known to half a subnormal ulp only, and x e /
// (1 + e) rounds there again: |x| 2^-1074 absolute.
double gelu_bound_ulp(double x) {
  const Mp u = oracle::gelu_tanh_inner(Mp(x));
  const double au = std::fabs(static_cast<double>(u));
  const double w = static_cast<double>(u >= 0 ? Mp(1) - oracle::one_plus_tanh(u) / 2 : oracle::one_plus_tanh(-u) / 2);
  const double y = static_cast<double>(oracle::gelu_tanh(Mp(x)));
  return 14 * au * w + 6 + std::fabs(x) * (0x1p-1074 / ulp_of(y));
}

// gelu_tanh_grad = s + x 2u' s (1 - s): s and 1 - s carry the same 14 |u| eps through exp as gelu plus
// 4 eps; u' = sqrt(2/pi)(1 + 3 0.044715 x^2) 6 eps; the tail's four products 4 eps; the final add eps.
// Bounded relative to |s| + |tail|, since near x = -0.75 (where the derivative is 0) the two cancel; where
// s (1 - s) is subnormal, e and e / (1 + e) each round to half a subnormal ulp, 2^-1074 absolute, which the
// tail multiplies by |2x u'|.
double gelu_grad_bound_ulp(double x) {
  using std::cosh;
  const Mp X(x);
  const Mp u = oracle::gelu_tanh_inner(X);
  const double au = std::fabs(static_cast<double>(u));
  const Mp s = oracle::one_plus_tanh(u) / 2;
  const Mp du = sqrt(Mp(2) / boost::math::constants::pi<Mp>()) * (1 + 3 * Mp("0.044715") * X * X);
  const Mp ch = cosh(u);
  const Mp tail = X * du / (2 * ch * ch);  // x 2u' s (1 - s), s (1 - s) = sech^2(u) / 4
  const double y = static_cast<double>(s + tail);
  const double mag = static_cast<double>(abs(s) + abs(tail));
  return (14 * au + 16) * kEps * mag / ulp_of(y) + std::fabs(static_cast<double>(2 * X * du)) * (0x1p-1074 / ulp_of(y)) + 1;
}

}  // namespace

// ------------------------------------------------------------------------------------------------------
// Scalar functions over the whole range

TEST(OracleScalar, SoftcapWithinBoundFromTinyToSaturated) {
  for (double c : {30.0, 50.0, 1.0}) {
    Worst w;
    for (double x : sweep(40 * c)) {
      const double e = ulp_error(softcap(x, c), oracle::softcap(Mp(x), Mp(c)));
      w.see(e, x, kSoftcapUlp);
      ASSERT_LE(e, kSoftcapUlp) << "softcap(" << x << ", " << c << ")";
    }
    std::printf("softcap       c=%-4g max %.3f ulp at x=%.6g (bound %g)\n", c, w.err, w.x, kSoftcapUlp);
  }
}

TEST(OracleScalar, SoftcapGradWithinBoundFromTinyToSaturated) {
  for (double c : {30.0, 50.0, 1.0}) {
    Worst w;
    for (double x : sweep(40 * c)) {
      const double e = ulp_error(softcap_grad(x, c), oracle::softcap_grad(Mp(x), Mp(c)));
      w.see(e, x, kSoftcapGradUlp);
      ASSERT_LE(e, kSoftcapGradUlp) << "softcap_grad(" << x << ", " << c << ")";
    }
    std::printf("softcap_grad  c=%-4g max %.3f ulp at x=%.6g (bound %g)\n", c, w.err, w.x, kSoftcapGradUlp);
  }
}

// sech^2 <= 1, but for tiny |x| the roundings of 4e / (1 + e)^2 gave 1 + 2^-52 (found by the soak run of
// SoftcapProperty.DerivativeIsInZeroOne at x = 3.55271e-15, c = 8.54).
TEST(OracleScalar, SoftcapGradNeverExceedsOne) {
  int above = 0;
  for (double c : {0.5, 1.0, 8.54, 30.0, 50.0, 99.0})
    for (double x : sweep(1e-6 * c, 20000)) above += softcap_grad(x, c) > 1.0;
  EXPECT_LE(softcap_grad(3.55271e-15, 8.54), 1.0);
  EXPECT_EQ(above, 0);
}

// The "Must show" table: 1 - t*t with t = tanh(a) rounded keeps only the bits of t below 1, an absolute
// error ~eps that is relative 1e16 times the value at a = 20, and is exactly 0 from a ~ 19.1 on.
TEST(OracleScalar, NaiveOneMinusTanhSquaredLosesTheSaturatedRangeTheReferenceKeepsIt) {
  const double c = 30.0;
  std::printf("%8s %10s %24s %24s %14s %10s\n", "a=|x|/c", "x", "exact sech^2", "naive 1-t*t", "naive ulp", "ref ulp");
  double worst_ref = 0;
  for (double a : {1.0, 2.0, 5.0, 8.0, 10.0, 15.0, 18.0, 19.0, 20.0, 25.0, 30.0, 35.0, 40.0}) {
    const double x = a * c * (1 + 1e-9);  // off the round numbers, so the quotient is inexact
    const Mp exact = oracle::softcap_grad(Mp(x), Mp(c));
    const double naive = softcap_grad_naive(x, c);
    const double en = ulp_error(naive, exact), er = ulp_error(softcap_grad(x, c), exact);
    std::printf("%8g %10.4f %24.17g %24.17g %14.4g %10.3f\n", a, x, static_cast<double>(exact), naive, en, er);
    EXPECT_LE(er, kSoftcapGradUlp) << "a = " << a;
    // From a = 10 on, the naive form's error is at least 1e6 ulps (a relative error above 1e-10).
    if (a >= 10) {
      EXPECT_GT(en, 1e6) << "a = " << a;
    }
    worst_ref = std::max(worst_ref, er);
  }
  std::printf("reference max %.3f ulp over the table (bound %g)\n", worst_ref, kSoftcapGradUlp);
}

TEST(OracleScalar, GeluTanhWithinBoundOverTheWholeRange) {
  Worst w, raw;
  for (double x : sweep(30.0)) {
    const double e = ulp_error(gelu_tanh(x), oracle::gelu_tanh(Mp(x)));
    const double b = gelu_bound_ulp(x);
    w.see(e / b, x, b);
    raw.see(e, x, b);
    ASSERT_LE(e, b) << "gelu_tanh(" << x << ")";
  }
  std::printf("gelu_tanh      max %.3f ulp at x=%.6g (bound there %.1f); max err/bound %.3f at x=%.6g\n", raw.err, raw.x,
              raw.bound, w.err, w.x);
  // Away from the left tail (|u| small) the bound is the plain 6 ulps.
  Worst mid;
  for (double x : sweep(3.0, 2000)) mid.see(ulp_error(gelu_tanh(x), oracle::gelu_tanh(Mp(x))), x, 0);
  std::printf("gelu_tanh      |x| <= 3: max %.3f ulp at x=%.6g\n", mid.err, mid.x);
}

TEST(OracleScalar, GeluTanhGradWithinBoundOverTheWholeRange) {
  Worst w, raw;
  for (double x : sweep(30.0)) {
    const double e = ulp_error(gelu_tanh_grad(x), oracle::gelu_tanh_grad(Mp(x)));
    const double b = gelu_grad_bound_ulp(x);
    w.see(e / b, x, b);
    raw.see(e, x, b);
    ASSERT_LE(e, b) << "gelu_tanh_grad(" << x << ")";
  }
  std::printf("gelu_tanh_grad max %.3f ulp at x=%.6g (bound there %.1f); max err/bound %.3f at x=%.6g\n", raw.err, raw.x,
              raw.bound, w.err, w.x);
  Worst mid;
  for (double x : sweep(3.0, 2000))
    if (std::fabs(x + 0.7518) > 0.05) mid.see(ulp_error(gelu_tanh_grad(x), oracle::gelu_tanh_grad(Mp(x))), x, 0);
  std::printf("gelu_tanh_grad |x| <= 3 (away from the zero at -0.75): max %.3f ulp at x=%.6g\n", mid.err, mid.x);
}

// ------------------------------------------------------------------------------------------------------
// Non-finite inputs: what the reference returns (docs/oracle.md lists the same table).

TEST(OracleScalar, InfinitiesGiveTheLimitsAndNaNPropagates) {
  for (double c : {30.0, 50.0}) {
    EXPECT_EQ(softcap(kInf, c), c);
    EXPECT_EQ(softcap(-kInf, c), -c);
    EXPECT_EQ(softcap_grad(kInf, c), 0.0);  // sech^2's limit (1 - tanh^2 gives it too)
    EXPECT_EQ(softcap_grad(-kInf, c), 0.0);
    EXPECT_EQ(softcap_grad_naive(kInf, c), 0.0);
    EXPECT_EQ(softcap_grad(1e308, c), 0.0);  // finite but far past underflow: exactly the rounded value
    EXPECT_TRUE(std::isnan(softcap(kNaN, c)));
    EXPECT_TRUE(std::isnan(softcap_grad(kNaN, c)));
  }
  EXPECT_EQ(gelu_tanh(kInf), kInf);
  EXPECT_EQ(gelu_tanh(-kInf), 0.0);
  EXPECT_TRUE(std::signbit(gelu_tanh(-kInf)));  // -0: the limit from below
  EXPECT_EQ(gelu_tanh(-1e300), 0.0);
  EXPECT_EQ(gelu_tanh(1e300), 1e300);
  EXPECT_EQ(gelu_tanh_grad(kInf), 1.0);
  EXPECT_EQ(gelu_tanh_grad(-kInf), 0.0);
  EXPECT_EQ(gelu_tanh_grad(1e200), 1.0);  // x u'(x) overflows to inf; s (1 - s) is exactly 0
  EXPECT_EQ(gelu_tanh_grad(-1e200), 0.0);
  EXPECT_EQ(gelu_tanh_grad(-30.0), 0.0);  // the true value, -1.9e-854, underflows (it was NaN)
  EXPECT_TRUE(std::isnan(gelu_tanh(kNaN)));
  EXPECT_TRUE(std::isnan(gelu_tanh_grad(kNaN)));
  // The oracle agrees on every limit.
  EXPECT_EQ(static_cast<double>(oracle::softcap_grad(Mp(kInf), Mp(30))), 0.0);
  EXPECT_EQ(static_cast<double>(oracle::softcap(Mp(-kInf), Mp(30))), -30.0);
  EXPECT_EQ(static_cast<double>(oracle::gelu_tanh(Mp(-1e300))), 0.0);
}

// Left tail between exp(-2u)'s overflow (x = -21.16) and the true value's underflow (x = -21.54; normal to
// -21.18): the result is still a double there, so the reference must return neither 0 nor NaN.
TEST(OracleScalar, GeluLeftTailPastExpOverflowStaysFiniteAndAccurate) {
  for (double x : {-21.0, -21.16, -21.17, -21.2, -21.3, -21.4, -21.5}) {
    const double g = gelu_tanh(x), d = gelu_tanh_grad(x);
    const Mp eg = oracle::gelu_tanh(Mp(x)), ed = oracle::gelu_tanh_grad(Mp(x));
    std::printf("x=%-7g gelu %.6e (%.2f ulp, bound %.0f)  grad %.6e (%.2f ulp, bound %.0f)\n", x, g, ulp_error(g, eg),
                gelu_bound_ulp(x), d, ulp_error(d, ed), gelu_grad_bound_ulp(x));
    EXPECT_LE(ulp_error(g, eg), gelu_bound_ulp(x)) << x;
    EXPECT_LE(ulp_error(d, ed), gelu_grad_bound_ulp(x)) << x;
    EXPECT_LT(g, 0.0) << x;
  }
}

// ------------------------------------------------------------------------------------------------------
// The oracle itself: 50 digits against 100, and its derivatives against its own finite differences.

TEST(OracleSelf, FiftyDigitsAgreeWithAHundredToFortyFive) {
  double worst = 0;
  for (double x : {-40.0, -20.7, -3.3, -0.7518, -1e-5, 1e-300, 0.25, 1.5, 7.0, 600.0, 1199.0}) {
    const Mp100 X(x), c(30);
    const auto rel = [](const Mp& a, const Mp100& b) {
      return b == 0 ? static_cast<double>(abs(Mp100(a))) : static_cast<double>(abs((Mp100(a) - b) / b));
    };
    worst = std::max({worst, rel(oracle::softcap(Mp(x), Mp(30)), oracle::softcap(X, c)),
                      rel(oracle::softcap_grad(Mp(x), Mp(30)), oracle::softcap_grad(X, c))});
    if (std::fabs(x) < 100) {
      worst = std::max({worst, rel(oracle::gelu_tanh(Mp(x)), oracle::gelu_tanh(X)),
                        rel(oracle::gelu_tanh_grad(Mp(x)), oracle::gelu_tanh_grad(X))});
    }
  }
  std::printf("oracle 50 vs 100 digits: max relative difference %.3g\n", worst);
  // 50 digits is 166 bits (relative 1e-50); the worst amplification (2|u| ~ 1500 in gelu's tail, sech^2's
  // 2a = 80) still leaves 1e-45, thirty orders below what a float64 ulp (1e-16) needs.
  EXPECT_LE(worst, 1e-45);
}

TEST(OracleSelf, DerivativesMatchTheirOwnCentralDifferences) {
  // At 100 digits, step 1e-30: truncation h^2 f'''/f' ~ 1e-60, rounding 1e-100 |f| / (h |f'|) ~ 1e-70 where
  // |f/f'| is moderate: both far below 1e-40 (the check is scaled by the floor where it is not).
  const Mp100 h("1e-30"), c(30);
  double worst = 0;
  for (double x : {-20.0, -3.0, -0.5, 1e-3, 0.9, 4.0, 45.0, 300.0, 1100.0}) {
    const Mp100 X(x);
    // In the saturated range softcap ~ c while its slope is ~1e-32: the difference's rounding,
    // 1e-100 c / (h slope), is the floor there.
    const Mp100 fd_s = (oracle::softcap(X + h, c) - oracle::softcap(X - h, c)) / (2 * h);
    const Mp100 slope = oracle::softcap_grad(X, c);
    const Mp100 floor = Mp100("1e-99") * c / (h * slope);
    worst = std::max(worst, static_cast<double>(abs(fd_s / slope - 1) / (1 + floor / Mp100("1e-40"))));
    if (std::fabs(x) < 30) {
      const Mp100 fd_g = (oracle::gelu_tanh(X + h) - oracle::gelu_tanh(X - h)) / (2 * h);
      worst = std::max(worst, static_cast<double>(abs(fd_g / oracle::gelu_tanh_grad(X) - 1)));
    }
  }
  std::printf("oracle derivatives vs central differences: max relative difference %.3g\n", worst);
  EXPECT_LE(worst, 1e-40);
}

// ------------------------------------------------------------------------------------------------------
// Row-level math through the real reference functions, on tiny matrices.

namespace {

struct RowCtx {
  Config cfg = preset("gemma2-micro");
  Policy policy;
  Semantics sem;
  Ctx<double> make(int64_t B, int64_t T, double final_cap, bool final_on) const {
    return plain_ctx<double>(cfg, policy, sem, B, T, true, final_on, 50.0, final_cap, 1.0 / std::sqrt(cfg.query_pre_attn_scalar));
  }
};

double hashed(uint64_t key, uint64_t i, double scale) { return scale * stream_uniform(key, i); }

}  // namespace

// RMSNorm forward, per element: the sum of D squares (all positive: D eps relative), / D, + eps, sqrt
// (halves what it is given), 1 / (eps), then x r, (1 + w) and their product: (D + 2)/2 + 5 eps, so
// D/2 + 6 ulps. Backward, per element, against eps times the magnitude of its terms
// r (|g_j| + |xhat_j| sum_i |g_i xhat_i| / D), g = dy (1 + w): the dot product's D-term sum (D eps) on terms
// carrying xhat's D/2 + 5 eps, the subtraction and r's error: 2D + 16 such units. dw_j sums N rows of
// dy xhat (N eps) carrying xhat's D/2 + 5 eps: D/2 + N + 6 units of eps sum_i |dy_ij xhat_ij|.
TEST(OracleRows, RmsNormForwardAndBackwardWithinBound) {
  RowCtx rc;
  for (int64_t D : {4, 12, 64, 257}) {
    rc.cfg.hidden_size = D;
    const int64_t N = 4;
    const Ctx<double> ctx = rc.make(1, N, 30.0, true);
    const uint64_t key = stream_key(D, "rmsnorm");
    Mat<double> x(N, D), dy(N, D), out, dx;
    Vec<double> w(D), rstd, dw = Vec<double>::Zero(D);
    for (int64_t i = 0; i < N * D; ++i) {
      // Rows spanning 1e-6 .. 1e6 in scale (one row near eps's size, where eps matters).
      const double scale = std::pow(10.0, double(6 * (i / D) - 9) / 1.5);
      x.data()[i] = hashed(key, uint64_t(i), scale);
      dy.data()[i] = hashed(key, uint64_t(i + 100000), 1.0);
    }
    for (int64_t j = 0; j < D; ++j) w(j) = hashed(key, uint64_t(j + 200000), 0.5);
    rmsnorm_forward(x, w, ctx, out, rstd);
    rmsnorm_backward(dy, x, rstd, w, ctx, dx, &dw);

    const Mp eps(ctx.cfg.rms_norm_eps);
    std::vector<double> wv(w.data(), w.data() + D);
    const double fwd_bound = double(D) / 2 + 6, bwd_bound = 2 * double(D) + 16, dw_bound = double(D) / 2 + double(N) + 6;
    double worst_f = 0, worst_b = 0, worst_w = 0;
    std::vector<Mp> dw_exact(size_t(D), Mp(0)), dw_mag(size_t(D), Mp(0));
    for (int64_t i = 0; i < N; ++i) {
      std::vector<double> xr(x.row(i).data(), x.row(i).data() + D), gr(dy.row(i).data(), dy.row(i).data() + D);
      const auto X = oracle::to_mp<Mp>(xr), W = oracle::to_mp<Mp>(wv), G = oracle::to_mp<Mp>(gr);
      const auto f = oracle::rmsnorm(X, W, eps);
      const auto b = oracle::rmsnorm_grad(X, W, eps, G);
      Mp dot_mag = 0;
      for (int64_t j = 0; j < D; ++j) dot_mag += abs(G[size_t(j)] * (1 + W[size_t(j)]) * X[size_t(j)] * f.rstd);
      for (int64_t j = 0; j < D; ++j) {
        worst_f = std::max(worst_f, ulp_error(out(i, j), f.y[size_t(j)]));
        const Mp xhat = X[size_t(j)] * f.rstd;
        const Mp mag = f.rstd * (abs(G[size_t(j)] * (1 + W[size_t(j)])) + abs(xhat) * dot_mag / D);
        worst_b = std::max(worst_b, static_cast<double>(abs(Mp(dx(i, j)) - b.dx[size_t(j)]) / (kEps * mag)));
        dw_exact[size_t(j)] += b.dw[size_t(j)];
        dw_mag[size_t(j)] += abs(b.dw[size_t(j)]);
      }
    }
    for (int64_t j = 0; j < D; ++j)
      worst_w = std::max(worst_w, static_cast<double>(abs(Mp(dw(j)) - dw_exact[size_t(j)]) / (kEps * dw_mag[size_t(j)])));
    std::printf("rmsnorm D=%-4lld forward max %.3f ulp (bound %g); dx max %.3f eps-units (bound %g); dw max %.3f (bound %g)\n",
                (long long)D, worst_f, fwd_bound, worst_b, bwd_bound, worst_w, dw_bound);
    EXPECT_LE(worst_f, fwd_bound);
    EXPECT_LE(worst_b, bwd_bound);
    EXPECT_LE(worst_w, dw_bound);
  }
}

// Softcapped cross-entropy of rows through loss_forward_backward, against cross_entropy_bound
// (tests/oracle_bounds.hpp derives it): logits up to 40 c, deep in the cap's saturation, and uncapped rows
// spread over +-1200 where most probabilities underflow.
TEST(OracleRows, SoftcappedCrossEntropyLossAndGradientWithinBound) {
  RowCtx rc;
  double worst_l = 0, worst_g = 0, worst_l_ulp = 0;
  for (double c : {30.0, 1.0}) {
    for (bool capped : {true, false}) {
      for (int64_t V : {2, 40, 1000}) {
        for (double spread : {0.1, 1.0, 3.0, 40.0}) {
          const int64_t R = 3, T = R + 1;
          const Ctx<double> ctx = rc.make(1, T, c, capped);
          Batch batch;
          batch.B = 1;
          batch.T = T;
          batch.input_ids.assign(size_t(T), 0);
          batch.labels.assign(size_t(T), kIgnoreIndex);
          const uint64_t key = stream_key(uint64_t(V) * 7 + uint64_t(spread * 10), "ce");
          Mat<double> logits(T, V), pad(T, 0);
          for (int64_t i = 0; i < T * V; ++i) logits.data()[i] = hashed(key, uint64_t(i), spread * c);
          for (int64_t r = 0; r < R; ++r) batch.labels[size_t(r + 1)] = (r * 17 + 3) % V;
          const Mat<double> raw = logits;
          const double scale = 1.0 / double(R);
          const double loss = loss_forward_backward<double>(logits, pad, batch, ctx, scale, nullptr);

          Mp exact_loss = 0, loss_bound = kEps * R;  // the R-term sum of row losses
          for (int64_t r = 0; r < R; ++r) {
            const int64_t y = batch.target(0, r);
            const auto b = cross_entropy_bound(std::vector<double>(raw.row(r).data(), raw.row(r).data() + V), y, capped, c);
            exact_loss += b.loss;
            loss_bound += b.loss_err;
            for (int64_t j = 0; j < V; ++j) {
              const Mp err = abs(Mp(logits(r, j)) - b.grad[size_t(j)] * Mp(scale));
              const Mp excess = std::max(Mp(0), err - Mp(0x1p-1073));
              if (b.grad_err[size_t(j)] > 0) {
                worst_g = std::max(worst_g, static_cast<double>(excess / (b.grad_err[size_t(j)] * Mp(scale))));
              } else {
                EXPECT_EQ(logits(r, j), 0.0);
              }
            }
          }
          worst_l = std::max(worst_l, static_cast<double>(abs(Mp(loss) - exact_loss) / loss_bound));
          worst_l_ulp = std::max(worst_l_ulp, ulp_error(loss, exact_loss));
        }
      }
    }
  }
  std::printf("cross-entropy loss: max %.3f ulp, %.4f of its bound; gradient: max %.4f of its bound\n", worst_l_ulp,
              worst_l, worst_g);
  EXPECT_LE(worst_l, 1.0);
  EXPECT_LE(worst_g, 1.0);
}

// RoPE through rope_tables + rope_apply at the real width (hd 256) and every position of the 8192-token
// context: the angle t * inv_freq carries pow (2 eps), 1 / (eps), the product (eps), and 2k/hd's rounding
// times ln(theta) 2k/hd (9.2 eps; 0 when hd is a power of two): 13 eps relative, an absolute |angle| 13 eps;
// cos and sin 2 eps each, the rotation's products and add 3 eps: per pair, |error| <= (13 |angle| + 8) eps |v|.
TEST(OracleRows, RopeRotationWithinBoundUpToPosition8191) {
  for (const char* name : {"gemma2-2b", "gemma2-micro"}) {
    Config cfg = preset(name);
    const int64_t hd = cfg.head_dim, half = hd / 2;
    const int64_t T = std::min<int64_t>(8192, cfg.max_position_embeddings);
    Policy policy;
    Semantics sem;
    Ctx<double> ctx = plain_ctx<double>(cfg, policy, sem, 1, T, true, true, 50.0, 30.0, 1.0);
    Mat<double> x(T, hd);
    const uint64_t key = stream_key(3, "rope");
    for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = stream_uniform(key, uint64_t(i));
    const Mat<double> x0 = x;
    rope_apply(x, 1, ctx, false);
    double worst = 0, worst_units = 0;
    int64_t at_t = 0;
    for (int64_t t : {0, 1, 2, 3, 5, 17, 63, 100, 1000, 4095, 8191}) {
      if (t >= T) continue;
      for (int64_t k = 0; k < half; ++k) {
        const auto [ea, eb] = oracle::rope_rotate(Mp(x0(t, k)), Mp(x0(t, k + half)), t, k, hd, Mp(cfg.rope_theta));
        const Mp err = sqrt((Mp(x(t, k)) - ea) * (Mp(x(t, k)) - ea) + (Mp(x(t, k + half)) - eb) * (Mp(x(t, k + half)) - eb));
        const Mp norm = sqrt(Mp(x0(t, k)) * x0(t, k) + Mp(x0(t, k + half)) * x0(t, k + half));
        const double angle = double(t) / std::pow(cfg.rope_theta, double(2 * k) / double(hd));
        const double units = static_cast<double>(err / (kEps * norm));
        const double bound = 13 * angle + 8;
        EXPECT_LE(units, bound) << name << " t=" << t << " k=" << k;
        if (units / bound > worst) worst = units / bound, at_t = t;
        worst_units = std::max(worst_units, units);
      }
    }
    std::printf("rope %-12s max |error| %.3f eps |v|, max error/bound %.3f (at position %lld)\n", name, worst_units, worst,
                (long long)at_t);
  }
}
