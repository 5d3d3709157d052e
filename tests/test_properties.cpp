// Properties of the reference's numerics, checked on generated inputs (RapidCheck): each failure is
// shrunk to a small case and printed with an RC_PARAMS="reproduce=..." line that replays it
// (docs/oracle.md). Sizes stay small so that the default 100 cases per property run in seconds.
#include <gtest/gtest.h>
#include <omp.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "model/synthetic.hpp"
#include "oracle/oracle.hpp"
#include "tests/oracle_bounds.hpp"
#include "tests/support.hpp"

// The soak build (GEMMA_SOAK, label `soak`) runs the same properties with 2000 cases each, unless RC_PARAMS
// already sets max_success, under suite names ending in Soak so that ctest tells the two runs apart. The
// environment is set during static initialisation, before RapidCheck first reads RC_PARAMS.
#ifdef GEMMA_SOAK
#define GEMMA_PROP(Suite, Name) RC_GTEST_PROP(Suite##Soak, Name, ())
namespace {
const bool kSoakParams = [] {
  const char* given = std::getenv("RC_PARAMS");
  std::string params = given ? given : "";
  if (params.find("max_success") == std::string::npos) params = "max_success=2000 " + params;
  return setenv("RC_PARAMS", params.c_str(), 1) == 0;
}();
}  // namespace
#else
#define GEMMA_PROP(Suite, Name) RC_GTEST_PROP(Suite, Name, ())
#endif

using namespace gemma;
using namespace gemma::ref;
using namespace gemma::test;
using gemma::oracle::Mp;
using gemma::oracle::ulp_error;

namespace {

// Tiny matrices: OpenMP's fork and join per call cost more than the work, and on a loaded 2-core machine its
// spinning threads made these tests 10x slower; one thread keeps their run time independent of other load.
[[maybe_unused]] const bool kOneThread = (omp_set_num_threads(1), true);

// |x| from 1e-300 to 2^12 (80 caps of 50), both signs: sign, binary exponent, 52-bit mantissa.
rc::Gen<double> gen_wide_double() {
  return rc::gen::apply(
      [](bool neg, int e, int64_t m) {
        const double x = std::ldexp(1.0 + double(m) * 0x1p-52, e);
        return neg ? -x : x;
      },
      rc::gen::arbitrary<bool>(), rc::gen::inRange(-996, 12), rc::gen::inRange<int64_t>(0, int64_t(1) << 52));
}

// Caps: the two of Gemma 2, or any in [0.5, 100).
rc::Gen<double> gen_cap() {
  return rc::gen::oneOf(rc::gen::element(30.0, 50.0),
                        rc::gen::map(rc::gen::inRange(50, 10000), [](int i) { return double(i) / 100; }));
}

// Uniform in [-r, r) on a grid fine enough to look continuous (2^-20 of r).
rc::Gen<double> gen_in(double r) {
  return rc::gen::map(rc::gen::inRange(-(1 << 20), 1 << 20), [r](int i) { return r * double(i) * 0x1p-20; });
}

Ctx<double> make_ctx(const Config& cfg, const Policy& p, const Semantics& s, int64_t B, int64_t T, bool attn_on,
                     bool final_on, double final_cap) {
  return plain_ctx<double>(cfg, p, s, B, T, attn_on, final_on, cfg.attn_logit_softcapping.value_or(50.0), final_cap,
                           1.0 / std::sqrt(cfg.query_pre_attn_scalar));
}

std::vector<std::vector<double>> all_grads(Model<double>& m, Grads<double>& g) {
  std::vector<std::vector<double>> out;
  for_each_trainable(m, g, [&](const std::string&, const Shape&, const double*, const double* gr, int64_t n) {
    out.emplace_back(gr, gr + n);
  });
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------------------------
// Softcap

GEMMA_PROP(SoftcapProperty, IsOddAndItsDerivativeEvenBitForBit) {
  const double x = *gen_wide_double(), c = *gen_cap();
  RC_ASSERT(softcap(-x, c) == -softcap(x, c));
  RC_ASSERT(softcap_grad(-x, c) == softcap_grad(x, c));
}

// Near pairs (1 to 2^20 ulps apart, adjacent doubles included), where a non-monotone rounding would show.
GEMMA_PROP(SoftcapProperty, IsMonotone) {
  const double c = *gen_cap(), x = *gen_wide_double();
  const int64_t steps = *rc::gen::inRange<int64_t>(1, int64_t(1) << 20);
  const double y = x + double(steps) * oracle::ulp_of(x);
  RC_ASSERT(softcap(x, c) <= softcap(y, c));
}

// |softcap| <= c always; strictly below for |x|/c < 18, where tanh stays a double below 1 by 4e-16 (more
// than an ulp of c); beyond ~19.06 tanh rounds to 1 and c tanh = c exactly.
GEMMA_PROP(SoftcapProperty, StaysWithinTheCap) {
  const double x = *gen_wide_double(), c = *gen_cap();
  const double y = softcap(x, c);
  RC_ASSERT(std::fabs(y) <= c);
  if (std::fabs(x) / c < 18) RC_ASSERT(std::fabs(y) < c);
}

// sech^2 is in (0, 1]; its float64 value is 0 only where the true value (< 4 e^{-2|x|/c}) is below half the
// smallest subnormal, |x|/c > 372.6.
GEMMA_PROP(SoftcapProperty, DerivativeIsInZeroOne) {
  const double x = *gen_wide_double(), c = *gen_cap();
  const double d = softcap_grad(x, c);
  RC_ASSERT(d <= 1.0);
  RC_ASSERT(d >= 0.0);
  if (std::fabs(x) / c < 372) RC_ASSERT(d > 0.0);
}

GEMMA_PROP(SoftcapProperty, EqualsTheOracleWithinItsBound) {
  const double x = *gen_wide_double(), c = *gen_cap();
  const double e = ulp_error(softcap(x, c), oracle::softcap(Mp(x), Mp(c)));
  const double eg = ulp_error(softcap_grad(x, c), oracle::softcap_grad(Mp(x), Mp(c)));
  RC_LOG() << "softcap " << e << " ulp, softcap_grad " << eg << " ulp\n";
  RC_ASSERT(e <= kSoftcapUlp);
  RC_ASSERT(eg <= kSoftcapGradUlp);
}

// ------------------------------------------------------------------------------------------------------
// Cross-entropy (loss_forward_backward on B = 2 sequences of T = 2: rows 0 and 2 are scored unless
// ignored, rows 1 and 3 never are)

namespace {

struct CeCase {
  int64_t V;
  double c;
  bool capped;
  std::vector<double> logits;  // (4, V)
  int64_t y0, y1;               // labels of rows 0 and 2; kIgnoreIndex for ignored
};

rc::Gen<CeCase> gen_ce(double spread_in_caps) {
  return rc::gen::mapcat(rc::gen::pair(rc::gen::inRange<int64_t>(2, 65), gen_cap()), [spread_in_caps](std::pair<int64_t, double> vc) {
    const auto [V, c] = vc;
    return rc::gen::build<CeCase>(
        rc::gen::set(&CeCase::V, rc::gen::just(V)), rc::gen::set(&CeCase::c, rc::gen::just(c)),
        rc::gen::set(&CeCase::capped, rc::gen::arbitrary<bool>()),
        rc::gen::set(&CeCase::logits, rc::gen::container<std::vector<double>>(size_t(4 * V), gen_in(spread_in_caps * c))),
        rc::gen::set(&CeCase::y0, rc::gen::oneOf(rc::gen::inRange<int64_t>(0, V), rc::gen::just(kIgnoreIndex))),
        rc::gen::set(&CeCase::y1, rc::gen::oneOf(rc::gen::inRange<int64_t>(0, V), rc::gen::just(kIgnoreIndex))));
  });
}

struct CeRun {
  double loss;
  Mat<double> grad;  // (4, V)
};

CeRun run_ce(const CeCase& k, double scale, bool capped) {
  static const Config cfg = preset("gemma2-micro");
  static const Policy policy;
  static const Semantics sem;
  const Ctx<double> ctx = make_ctx(cfg, policy, sem, 2, 2, true, capped, k.c);
  Batch b;
  b.B = 2;
  b.T = 2;
  b.input_ids.assign(4, 0);
  b.labels = {kIgnoreIndex, k.y0, kIgnoreIndex, k.y1};
  CeRun r;
  r.grad = Eigen::Map<const Mat<double>>(k.logits.data(), 4, k.V);
  Mat<double> pad(4, 0);
  r.loss = loss_forward_backward<double>(r.grad, pad, b, ctx, scale, nullptr);
  return r;
}

}  // namespace

// d loss / d z = softmax(z) - onehot sums to 0, so the gradient over the real vocabulary divided by the cap
// derivative does. Bound, with Z = max |z_j|: the computed lse errs by eps (|lse| + 2|log s| + V +
// max|z - max| + 2) <= eps (3Z + 3 ln V + V + 2) and shifts every p_j by that relative; each p_j adds
// eps |z_j - lse| + 2 eps <= eps (2Z + ln V + 2); dividing back by sech^2 and the scale, 3 eps of each |d_j|
// (sum <= 2: 6 eps); the V-term sum here 2V eps. Total eps (5Z + 4 ln V + 3V + 10).
GEMMA_PROP(CrossEntropyProperty, GradientRowsSumToZeroOverTheVocabulary) {
  const CeCase k = *gen_ce(3.0);
  RC_PRE(k.y0 != kIgnoreIndex);
  const CeRun r = run_ce(k, 1.0, k.capped);
  double s = 0, Z = 0;
  for (int64_t j = 0; j < k.V; ++j) {
    const double l = k.logits[size_t(j)];
    const double sg = k.capped ? softcap_grad(l, k.c) : 1.0;
    s += r.grad(0, j) / sg;
    Z = std::max(Z, std::fabs(k.capped ? softcap(l, k.c) : l));
  }
  const double bound = kEps * (5 * Z + 4 * std::log(double(k.V)) + 3 * double(k.V) + 10);
  RC_LOG() << "row sum " << s << ", bound " << bound << "\n";
  RC_ASSERT(std::fabs(s) <= bound);
}

GEMMA_PROP(CrossEntropyProperty, GradientIsSoftmaxMinusOnehotTimesTheCapDerivative) {
  const CeCase k = *gen_ce(3.0);
  RC_PRE(k.y0 != kIgnoreIndex);
  const double scale = 0.125;
  const CeRun r = run_ce(k, scale, k.capped);
  const auto b = cross_entropy_bound(std::vector<double>(k.logits.begin(), k.logits.begin() + k.V), k.y0, k.capped, k.c);
  for (int64_t j = 0; j < k.V; ++j) {
    const Mp err = abs(Mp(r.grad(0, j)) - b.grad[size_t(j)] * Mp(scale));
    RC_ASSERT(err <= b.grad_err[size_t(j)] * Mp(scale) + Mp(0x1p-1073));
  }
}

// An ignored row contributes exactly nothing: zero gradient, and its logits (here replaced by wild values)
// cannot move the loss by a single bit; with every row ignored the loss is exactly 0.
GEMMA_PROP(CrossEntropyProperty, IgnoredRowsGiveZeroLossAndZeroGradient) {
  CeCase k = *gen_ce(3.0);
  const CeRun r = run_ce(k, 0.5, k.capped);
  for (int64_t row : {1, 3}) RC_ASSERT(r.grad.row(row).cwiseAbs().maxCoeff() == 0.0);
  if (k.y0 == kIgnoreIndex) RC_ASSERT(r.grad.row(0).cwiseAbs().maxCoeff() == 0.0);
  if (k.y1 == kIgnoreIndex) RC_ASSERT(r.grad.row(2).cwiseAbs().maxCoeff() == 0.0);
  CeCase wild = k;
  const double w = *rc::gen::element(1e300, -1e300, 0.0, 1e-300, std::numeric_limits<double>::infinity());
  for (int64_t j = 0; j < k.V; ++j) {
    wild.logits[size_t(1 * k.V + j)] = w;
    wild.logits[size_t(3 * k.V + j)] = -w;
    if (k.y0 == kIgnoreIndex) wild.logits[size_t(j)] = w;
  }
  const CeRun rw = run_ce(wild, 0.5, k.capped);
  RC_ASSERT(rw.loss == r.loss);
  CeCase none = k;
  none.y0 = none.y1 = kIgnoreIndex;
  const CeRun rn = run_ce(none, 0.5, k.capped);
  RC_ASSERT(rn.loss == 0.0);
  RC_ASSERT(rn.grad.cwiseAbs().maxCoeff() == 0.0);
}

// ------------------------------------------------------------------------------------------------------
// Softcap switch (final cap), one row, then the whole model.
//
// With delta_j = x_j - c tanh(x_j / c) (what switching the cap off adds to z_j), logsumexp moves by a
// softmax-weighted mean of the delta_j, so loss = lse - z_y moves by mean(delta) - delta_y, whose absolute
// value is at most max(delta) - min(delta). delta is odd and increasing with 0 <= delta(x) <= x^3 / (3 c^2)
// for x >= 0 (tanh a >= a - a^3 / 3), so |change| <= (max(x)^3 - min(x)^3) / (3 c^2) (only the positive
// part of max(x)^3 and the negative part of min(x)^3 count): the Taylor bound, at most doubled. A mean over
// rows obeys the bound of its worst row. Rounding: each of the two losses errs by its cross_entropy_bound.

GEMMA_PROP(SoftcapSwitchProperty, FarBelowTheCapTheLossMovesLessThanTheTaylorBound) {
  CeCase k = *gen_ce(*rc::gen::element(0.001, 0.01, 0.1));
  RC_PRE(k.y0 != kIgnoreIndex);
  k.y1 = kIgnoreIndex;
  const double on = run_ce(k, 1.0, true).loss, off = run_ce(k, 1.0, false).loss;
  const std::vector<double> row(k.logits.begin(), k.logits.begin() + k.V);
  const double hi = std::max(0.0, *std::max_element(row.begin(), row.end()));
  const double lo = std::min(0.0, *std::min_element(row.begin(), row.end()));
  const double taylor = (hi * hi * hi - lo * lo * lo) / (3 * k.c * k.c);
  const double rounding = static_cast<double>(cross_entropy_bound(row, k.y0, true, k.c).loss_err +
                                              cross_entropy_bound(row, k.y0, false, k.c).loss_err);
  RC_LOG() << "change " << std::fabs(on - off) << ", Taylor " << taylor << ", rounding " << rounding << "\n";
  RC_ASSERT(std::fabs(on - off) <= taylor + rounding);
}

// Every |x_j| in [2c, 3c], one logit positive, the label's negative: uncapped, loss >= max x - x_y >= 4c;
// capped, loss <= c + ln V - (-c) = 2c + ln V. The change is at least 2c - ln V.
GEMMA_PROP(SoftcapSwitchProperty, AboveTheCapTheLossChangesByAtLeast2cMinusLnV) {
  CeCase k = *gen_ce(1.0);
  RC_PRE(k.c >= 3.0);
  k.y0 = *rc::gen::inRange<int64_t>(0, k.V);
  k.y1 = kIgnoreIndex;
  const int64_t top = (k.y0 + 1 + *rc::gen::inRange<int64_t>(0, k.V - 1)) % k.V;  // any column but the label
  for (int64_t j = 0; j < k.V; ++j) {
    double& x = k.logits[size_t(j)];
    x = std::copysign(2 * k.c + std::fabs(x), x);  // |x| in [2c, 3c]
  }
  k.logits[size_t(top)] = std::fabs(k.logits[size_t(top)]);
  k.logits[size_t(k.y0)] = -std::fabs(k.logits[size_t(k.y0)]);
  const double on = run_ce(k, 1.0, true).loss, off = run_ce(k, 1.0, false).loss;
  RC_LOG() << "capped " << on << ", uncapped " << off << "\n";
  RC_ASSERT(off - on >= 2 * k.c - std::log(double(k.V)));
}

// The whole model, final cap only: a cap far above the largest logit moves the mean loss by at most the
// bound above over all logits (each row's own bound is smaller), plus the two losses' rounding, which the
// Float64VsFiftyDigits test measures below 1e-15 relative (2e-14 absolute allowed here).
GEMMA_PROP(SoftcapSwitchProperty, WholeModelFarBelowTheFinalCapMovesLessThanTheTaylorBound) {
  const uint64_t seed = *rc::gen::inRange<uint64_t>(0, 1000000);
  const int64_t B = *rc::gen::inRange<int64_t>(1, 3), T = *rc::gen::inRange<int64_t>(2, 7);
  const double factor = *rc::gen::element(10.0, 100.0, 1000.0);
  Case k = make_case(preset("gemma2-micro"), 0, seed, B, T);
  RC_PRE(k.batch.count_targets() > 0);
  RunOptions off;
  off.softcap = Softcap{true, false};
  off.keep_logits = true;
  Model<double> m = make_model<double>(k.ck, off.numerics.policy);
  const Result<double> r_off = forward_backward<double>(m, k.batch, off, 0.0, nullptr);
  const double hi = std::max(0.0, r_off.logits.maxCoeff()), lo = std::min(0.0, r_off.logits.minCoeff());
  const double c = factor * std::max(hi, -lo);
  m.config.final_logit_softcapping = c;
  RunOptions on = off;
  on.softcap = Softcap{true, true};
  const Result<double> r_on = forward_backward<double>(m, k.batch, on, 0.0, nullptr);
  const double n = double(k.batch.count_targets());
  const double change = std::fabs(r_on.loss_sum - r_off.loss_sum) / n;
  const double taylor = (hi * hi * hi - lo * lo * lo) / (3 * c * c);
  RC_LOG() << "change " << change << ", Taylor " << taylor << "\n";
  RC_ASSERT(change <= taylor + 2e-14);
}

// ------------------------------------------------------------------------------------------------------
// Attention

namespace {

struct AttnCase {
  Config cfg;
  int64_t B, T, layer;
  bool capped;
  Mat<double> q, k, v;
};

rc::Gen<AttnCase> gen_attn() {
  return rc::gen::exec([] {
    AttnCase a;
    a.cfg = preset("gemma2-micro");
    const int64_t KV = *rc::gen::inRange<int64_t>(1, 3);
    a.cfg.num_key_value_heads = KV;
    a.cfg.num_attention_heads = KV * *rc::gen::inRange<int64_t>(1, 3);
    a.cfg.head_dim = 2 * *rc::gen::inRange<int64_t>(1, 5);
    a.cfg.sliding_window = *rc::gen::inRange<int64_t>(1, 9);
    a.B = *rc::gen::inRange<int64_t>(1, 3);
    a.T = *rc::gen::inRange<int64_t>(1, 13);
    a.layer = *rc::gen::inRange<int64_t>(0, 2);  // 0 sliding, 1 global
    a.capped = *rc::gen::arbitrary<bool>();
    const double scale = *rc::gen::element(0.1, 1.0, 10.0, 30.0);
    const uint64_t seed = *rc::gen::inRange<uint64_t>(0, 1000000);
    const int64_t N = a.B * a.T, hd = a.cfg.head_dim;
    auto fill = [&](Mat<double>& m, int64_t cols, const char* name) {
      m.resize(N, cols);
      const uint64_t key = stream_key(seed, name);
      for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = scale * stream_uniform(key, uint64_t(i));
    };
    fill(a.q, a.cfg.num_attention_heads * hd, "q");
    fill(a.k, KV * hd, "k");
    fill(a.v, KV * hd, "v");
    return a;
  });
}

}  // namespace

// Each visible probability is e_j / sum: the (i+1)-term sum errs by i eps relative, the division by eps,
// and summing the probabilities again here by i eps: |sum - 1| <= (2T + 1) eps.
GEMMA_PROP(AttentionProperty, ProbabilityRowsSumToOneAndMaskedEntriesAreExactlyZero) {
  const AttnCase a = *gen_attn();
  const Policy p;
  const Semantics s;
  const Ctx<double> ctx = make_ctx(a.cfg, p, s, a.B, a.T, a.capped, true, 30.0);
  Mat<double> out;
  AttnCache<double> cache;
  attention_forward(a.q, a.k, a.v, a.layer, ctx, out, cache);
  for (const auto& P : cache.P)
    for (int64_t i = 0; i < a.T; ++i) {
      double sum = 0;
      for (int64_t j = 0; j < a.T; ++j) {
        if (!ctx.visible(a.layer, 0, i, j)) {
          RC_ASSERT(P(i, j) == 0.0);
        } else {
          RC_ASSERT(P(i, j) >= 0.0);
          sum += P(i, j);
        }
      }
      RC_ASSERT(std::fabs(sum - 1.0) <= double(2 * a.T + 1) * kEps);
    }
}

// A key in the future, or (sliding layer) W or more positions back, is invisible: its key and value may be
// anything and query i's output does not change by a bit.
GEMMA_PROP(AttentionProperty, AnInvisibleKeyChangesNothing) {
  const AttnCase a = *gen_attn();
  RC_PRE(a.T >= 2);
  const int64_t W = *a.cfg.sliding_window;
  const int64_t i = *rc::gen::inRange<int64_t>(0, a.T);
  std::vector<int64_t> hidden;
  for (int64_t j = 0; j < a.T; ++j)
    if (j > i || (a.layer % 2 == 0 && i - j >= W)) hidden.push_back(j);
  RC_PRE(!hidden.empty());
  const int64_t j = *rc::gen::elementOf(hidden);
  const double w = *rc::gen::element(1e6, -1e6, 0.0, 3.0);
  const Policy p;
  const Semantics s;
  const Ctx<double> ctx = make_ctx(a.cfg, p, s, a.B, a.T, a.capped, true, 30.0);
  Mat<double> base, moved;
  AttnCache<double> cache;
  attention_forward(a.q, a.k, a.v, a.layer, ctx, base, cache);
  Mat<double> k2 = a.k, v2 = a.v;
  for (int64_t b = 0; b < a.B; ++b) {
    k2.row(b * a.T + j).setConstant(w);
    v2.row(b * a.T + j).setConstant(-w);
  }
  attention_forward(a.q, k2, v2, a.layer, ctx, moved, cache);
  for (int64_t b = 0; b < a.B; ++b) RC_ASSERT(moved.row(b * a.T + i) == base.row(b * a.T + i));
}

// ------------------------------------------------------------------------------------------------------
// RoPE (rope_tables + rope_apply)

namespace {

struct RopeCase {
  Config cfg;
  int64_t T;
  std::vector<double> q, k;  // one head each
};

rc::Gen<RopeCase> gen_rope() {
  return rc::gen::exec([] {
    RopeCase r;
    r.cfg = preset("gemma2-micro");
    r.cfg.head_dim = 2 * *rc::gen::inRange<int64_t>(1, 9);
    r.cfg.rope_theta = *rc::gen::element(10000.0, 1e6, 500.0);
    r.T = *rc::gen::inRange<int64_t>(1, 65);
    r.q = *rc::gen::container<std::vector<double>>(size_t(r.cfg.head_dim), gen_in(4.0));
    r.k = *rc::gen::container<std::vector<double>>(size_t(r.cfg.head_dim), gen_in(4.0));
    return r;
  });
}

// The vector x placed at position t of a (T, hd) matrix, rotated.
std::vector<double> rotated(const RopeCase& r, const std::vector<double>& x, int64_t t) {
  const Policy p;
  const Semantics s;
  const Ctx<double> ctx = make_ctx(r.cfg, p, s, 1, r.T, true, true, 30.0);
  Mat<double> m = Mat<double>::Zero(r.T, r.cfg.head_dim);
  for (int64_t e = 0; e < r.cfg.head_dim; ++e) m(t, e) = x[size_t(e)];
  rope_apply(m, 1, ctx, false);
  return std::vector<double>(m.row(t).data(), m.row(t).data() + r.cfg.head_dim);
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

// Per pair, cos^2 + sin^2 = 1 within 4 eps (cos, sin 1 ulp each) and the rotation's products and add
// 3 eps: |x'| = |x| (1 +- 7 eps), squared 14 eps; the two hd-term sums of squares here hd eps each.
GEMMA_PROP(RopeProperty, PreservesTheNorm) {
  const RopeCase r = *gen_rope();
  const int64_t t = *rc::gen::inRange<int64_t>(0, r.T);
  const std::vector<double> x = rotated(r, r.q, t);
  const double n0 = dot(r.q, r.q), n1 = dot(x, x);
  RC_ASSERT(std::fabs(n1 - n0) <= (14 + 2 * double(r.cfg.head_dim)) * kEps * n0);
}

// Both dot products are float64 values of the same exact number. Each rotated pair errs by
// (13 |angle| + 8) eps |pair| (OracleRows.RopeRotation derives it), angles are at most T; each dot then
// errs by (2 (13 T + 8) + hd) eps sum |q_p| |k_p|, and the two differ by at most twice that.
GEMMA_PROP(RopeProperty, QueryKeyDotDependsOnlyOnTheOffset) {
  const RopeCase r = *gen_rope();
  RC_PRE(r.T >= 2);
  const int64_t m = *rc::gen::inRange<int64_t>(0, r.T), n = *rc::gen::inRange<int64_t>(0, r.T);
  RC_PRE(std::max(m, n) + 1 < r.T);
  const int64_t shift = *rc::gen::inRange<int64_t>(1, r.T - std::max(m, n));
  const double d1 = dot(rotated(r, r.q, m), rotated(r, r.k, n));
  const double d2 = dot(rotated(r, r.q, m + shift), rotated(r, r.k, n + shift));
  const int64_t half = r.cfg.head_dim / 2;
  double mag = 0;
  for (int64_t p = 0; p < half; ++p)
    mag += std::hypot(r.q[size_t(p)], r.q[size_t(p + half)]) * std::hypot(r.k[size_t(p)], r.k[size_t(p + half)]);
  const double bound = 2 * (2 * (13 * double(r.T) + 8) + double(r.cfg.head_dim)) * kEps * mag;
  RC_LOG() << "d1 " << d1 << ", d2 " << d2 << ", bound " << bound << "\n";
  RC_ASSERT(std::fabs(d1 - d2) <= bound);
}

// ------------------------------------------------------------------------------------------------------
// Padded vocabulary

// Padding the LM head to a multiple of 128 with any values (huge, tiny, even inf and NaN: masked columns
// are never read into the softmax) changes neither the loss nor any real gradient by a bit, and the padded
// rows get exactly zero gradient.
GEMMA_PROP(PaddedVocabProperty, PaddingLeavesLossAndGradientsBitIdenticalWithZeroPadGradient) {
  const uint64_t seed = *rc::gen::inRange<uint64_t>(0, 1000000);
  const int64_t B = *rc::gen::inRange<int64_t>(1, 3), T = *rc::gen::inRange<int64_t>(2, 7);
  const Config c = preset("gemma2-micro");
  const int64_t P = 128 * *rc::gen::inRange<int64_t>(1, 3) - c.vocab_size;
  const double mag = *rc::gen::element(1e-300, 1e-3, 1.0, 1e3, 1e30);
  const int nonfinite = *rc::gen::inRange(0, 3);  // 0: finite; 1: some inf; 2: some NaN
  Case k = make_case(c, 0, seed, B, T);
  RC_PRE(k.batch.count_targets() > 0);
  std::vector<double> rows(static_cast<size_t>(P * c.hidden_size));
  const uint64_t key = stream_key(seed, "pad");
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = mag * stream_uniform(key, i);
  if (nonfinite) rows[size_t(seed % rows.size())] = nonfinite == 1 ? -std::numeric_limits<double>::infinity() : NAN;
  const Tensor pad = tensor_from_doubles(DType::f64, {P, c.hidden_size}, rows);

  RunOptions opt;
  opt.softcap = all_softcaps()[size_t(*rc::gen::inRange(0, 4))];
  Model<double> plain = make_model<double>(k.ck, opt.numerics.policy);
  Grads<double> g0 = zero_grads(plain);
  const double l0 = step_loss_and_grads(plain, {k.batch}, opt, g0);
  Model<double> padded = make_model<double>(k.ck, opt.numerics.policy);
  pad_vocab(padded, pad);
  Grads<double> g1 = zero_grads(padded);
  const double l1 = step_loss_and_grads(padded, {k.batch}, opt, g1);
  RC_ASSERT(l0 == l1);
  const auto a = all_grads(plain, g0), b = all_grads(padded, g1);
  // The padded model reports one more tensor, the padding's, right after the embedding.
  RC_ASSERT(b.size() == a.size() + 1);
  RC_ASSERT(a[0] == b[0]);
  for (size_t i = 1; i < a.size(); ++i) RC_ASSERT(a[i] == b[i + 1]);
  RC_ASSERT(int64_t(b[1].size()) == P * c.hidden_size);
  for (double v : b[1]) RC_ASSERT(v == 0.0);
}

// A label (or input id) that points into the padding is an input error: no token maps there.
GEMMA_PROP(PaddedVocabProperty, ALabelInThePaddingIsRejected) {
  const Config c = preset("gemma2-micro");
  const int64_t P = 128 - c.vocab_size;
  const int64_t B = *rc::gen::inRange<int64_t>(1, 3), T = *rc::gen::inRange<int64_t>(2, 7);
  Batch b = synthetic_batch(c, B, T, *rc::gen::inRange<uint64_t>(0, 1000000));
  validate_batch(c, b, "batch");  // valid as made
  const size_t at = size_t(*rc::gen::inRange<int64_t>(0, B * T));
  const int64_t bad = c.vocab_size + *rc::gen::inRange<int64_t>(0, P);
  Batch lab = b;
  lab.labels[at] = bad;
  RC_ASSERT_THROWS_AS(validate_batch(c, lab, "batch"), InputError);
  Batch ids = b;
  ids.input_ids[at] = bad;
  RC_ASSERT_THROWS_AS(validate_batch(c, ids, "batch"), InputError);
}

// ------------------------------------------------------------------------------------------------------
// Gradient accumulation

// Any split into micro-batches gives the single batch's loss and gradients. Both are float64 evaluations
// of the same exact numbers that differ in two ways. (1) The sum over the N scored rows is regrouped:
// 2(N - 1) eps of the sum of |terms| (the loss's terms are positive, so that is its value). (2) Eigen's GEMM
// rounds a row differently by its position in the block, so each side carries its own float64 error.
// A row's loss is lse - z_y, a difference of numbers of size Z = max |logit| that may cancel, so that error
// is absolute, ~eps Z: Float64VsFiftyDigits measures it at 70 eps for Z ~ 30 (2.3 eps Z); two evaluations
// differ by twice that; 16 eps Z keeps a margin of 3.5. The gradients: <= 1.31e-14 rel L2 against 50 digits
// there, so 3e-14 for two evaluations. Each gradient tensor's difference is taken relative to the norm of
// the whole gradient: a tensor whose gradient is tiny beside the others (q/k of a layer whose attention is
// nearly one-hot: 1e-8 of the rest) is made of backpropagated activation gradients whose rounding is
// relative to their size, not its own (float64 itself is only 8e-8 accurate there against 50 digits;
// docs/oracle.md). The mean-of-means bug moves both by ~1e-3.
GEMMA_PROP(AccumulationProperty, AnySplitGivesTheSingleBatchLossAndGradients) {
  const uint64_t seed = *rc::gen::inRange<uint64_t>(0, 1000000);
  const bool adapters = *rc::gen::arbitrary<bool>();
  const int64_t B = *rc::gen::inRange<int64_t>(2, 6), T = *rc::gen::inRange<int64_t>(2, 8);
  const int64_t rows = *rc::gen::inRange<int64_t>(1, B);
  const double ignore = *rc::gen::element(0.0, 0.25, 0.75);
  Case k = make_case(preset("gemma2-micro"), adapters ? 2 : 0, seed, B, T, ignore);
  RC_PRE(k.batch.count_targets() > 0);
  RunOptions opt;
  opt.softcap = all_softcaps()[size_t(*rc::gen::inRange(0, 4))];
  Model<double> m = make_model<double>(k.ck, opt.numerics.policy);
  Grads<double> g1 = zero_grads(m), gs = zero_grads(m);
  const double l1 = step_loss_and_grads(m, {k.batch}, opt, g1);
  const double ls = step_loss_and_grads(m, split_batch(k.batch, rows), opt, gs);
  RunOptions fwd = opt;
  fwd.keep_logits = true;
  const double Z = forward_backward<double>(m, k.batch, fwd, 0.0, nullptr).logits.cwiseAbs().maxCoeff();
  const double regroup = 4 * (double(k.batch.count_targets()) + 1) * kEps;
  const double tol_loss = regroup * std::fabs(l1) + 16 * kEps * Z, tol_grad = regroup + 3e-14;
  RC_LOG() << "loss " << l1 << " vs " << ls << ", diff " << std::fabs(ls - l1) << ", tolerance " << tol_loss << "\n";
  RC_ASSERT(std::fabs(ls - l1) <= tol_loss);
  const auto a = all_grads(m, g1), b = all_grads(m, gs);
  double all = 0;
  for (const auto& t : a) all += l2(t) * l2(t);
  all = std::sqrt(all);
  for (size_t i = 0; i < a.size(); ++i) {
    std::vector<double> d(a[i].size());
    for (size_t j = 0; j < d.size(); ++j) d[j] = b[i][j] - a[i][j];
    RC_LOG() << "tensor " << i << ": |diff| / |all grads| " << l2(d) / all << ", own rel L2 " << rel_l2(b[i], a[i]) << "\n";
    RC_ASSERT(l2(d) <= tol_grad * all);
  }
}
