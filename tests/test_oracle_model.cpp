// The whole reference (forward, backward, LoRA) run twice on gemma2-micro: in float64 and at 50 digits.
// The 50-digit run is the same code without rounding, so the differences printed here are the float64
// reference's accumulated rounding error; and the 50-digit gradients against 50-digit central differences
// check the backward pass itself, with no float64 rounding to hide behind.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstdio>
#include <tuple>

#include "oracle/oracle.hpp"
#include "tests/support.hpp"

using namespace gemma;
using namespace gemma::ref;
using namespace gemma::test;
using gemma::oracle::Mp;

namespace {

// Tiny matrices: OpenMP's fork and join per call cost more than the work, and on a loaded 2-core machine its
// spinning threads made these tests 10x slower; one thread keeps their run time independent of other load.
[[maybe_unused]] const bool kOneThread = (omp_set_num_threads(1), true);

// gemma2-micro: grouped KV heads (2 queries, 1 kv head), query_pre_attn_scalar 8 != head_dim 6, window 3 < T.
constexpr int64_t kB = 2, kT = 7, kRank = 2;

Case micro_case(bool adapters) { return make_case(preset("gemma2-micro"), adapters ? kRank : 0, 17, kB, kT); }

template <class Real>
std::vector<std::pair<std::string, std::vector<double>>> named_grads(Model<Real>& m, Grads<Real>& g) {
  std::vector<std::pair<std::string, std::vector<double>>> out;
  for_each_trainable(m, g, [&](const std::string& name, const Shape&, const Real*, const Real* gr, int64_t n) {
    std::vector<double> v;
    for (int64_t i = 0; i < n; ++i) v.push_back(static_cast<double>(gr[i]));
    out.emplace_back(name, std::move(v));
  });
  return out;
}

std::string combo_name(const std::tuple<int, bool>& p) {
  return softcap_combo(all_softcaps()[size_t(std::get<0>(p))]) + (std::get<1>(p) ? "_lora" : "_full");
}

}  // namespace

class Float64VsFiftyDigits : public ::testing::TestWithParam<std::tuple<int, bool>> {};

// Bounds from the brief (loss 1e-13 relative, gradients 1e-11 relative L2), well above what a float64
// computation of this depth should lose: each value passes through ~10^2 roundings per layer, and
// cancellation in the softmax and RMSNorm backward amplifies some by ~10^2 (measured values are printed).
TEST_P(Float64VsFiftyDigits, LossAndEveryGradientAgree) {
  const Softcap sc = all_softcaps()[size_t(std::get<0>(GetParam()))];
  const bool adapters = std::get<1>(GetParam());
  Case k = micro_case(adapters);
  RunOptions opt;
  opt.softcap = sc;

  Model<double> m64 = make_model<double>(k.ck, opt.numerics.policy);
  Grads<double> g64 = zero_grads(m64);
  const double l64 = step_loss_and_grads(m64, {k.batch}, opt, g64);
  Model<Mp> m50 = make_model<Mp>(k.ck, opt.numerics.policy);
  Grads<Mp> g50 = zero_grads(m50);
  const Mp l50 = step_loss_and_grads(m50, {k.batch}, opt, g50);

  const double loss_rel = static_cast<double>(abs((Mp(l64) - l50) / l50));
  std::printf("softcap %-11s %-11s loss f64 %.17g, 50-digit %.20g, rel diff %.2e\n", softcap_name(sc).c_str(),
              adapters ? "LoRA r=2" : "all weights", l64, static_cast<double>(l50), loss_rel);
  EXPECT_LE(loss_rel, 1e-13);

  const auto a = named_grads(m64, g64);
  const auto b = named_grads(m50, g50);
  ASSERT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].first, b[i].first);
    const double e = rel_l2(a[i].second, b[i].second);
    std::printf("  %-52s |g| %10.4e  rel L2 %.2e\n", a[i].first.c_str(), l2(b[i].second), e);
    EXPECT_LE(e, 1e-11) << a[i].first;
    worst = std::max(worst, e);
  }
  std::printf("  %zu tensors, worst gradient rel L2 %.2e\n", a.size(), worst);
}

INSTANTIATE_TEST_SUITE_P(AllCombos, Float64VsFiftyDigits,
                         ::testing::Combine(::testing::Values(0, 1, 2, 3), ::testing::Bool()),
                         [](const auto& info) { return combo_name(info.param); });

class FiftyDigitGradientCheck : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(FiftyDigitGradientCheck, BackwardMatchesCentralDifferencesAt50Digits) {
  const Softcap sc = all_softcaps()[size_t(std::get<0>(GetParam()))];
  const bool adapters = std::get<1>(GetParam());
  Case k = micro_case(adapters);
  RunOptions opt;
  opt.softcap = sc;
  Model<Mp> m = make_model<Mp>(k.ck, opt.numerics.policy);
  Grads<Mp> g = zero_grads(m);
  step_loss_and_grads(m, {k.batch}, opt, g);
  const Mp tokens(k.batch.count_targets());

  std::printf("softcap %s, %s: 50-digit analytic vs central differences, h = 1e-20\n", softcap_name(sc).c_str(),
              adapters ? "LoRA r=2" : "all weights");
  double worst = 0;
  for_each_trainable(m, g, [&](const std::string& name, const Shape&, Mp* p, const Mp* gr, int64_t n) {
    // Random signs over the whole tensor: an error in any element shows at first order.
    const uint64_t key = stream_key(5, name);
    std::vector<int> u(static_cast<size_t>(n));
    Mp analytic = 0, gnorm = 0;
    for (int64_t i = 0; i < n; ++i) {
      u[size_t(i)] = stream_uniform(key, uint64_t(i)) < 0 ? -1 : 1;
      analytic += gr[i] * u[size_t(i)];
      gnorm += gr[i] * gr[i];
    }
    gnorm = sqrt(gnorm);
    auto loss_at = [&](const Mp& t) {
      std::vector<Mp> saved(p, p + n);
      for (int64_t i = 0; i < n; ++i) p[i] += t * u[size_t(i)];
      const Mp l = forward_backward<Mp>(m, k.batch, opt, Mp(0), nullptr).loss_sum / tokens;
      std::copy(saved.begin(), saved.end(), p);
      return l;
    };
    // Truncation h^2 |L'''| / 6 ~ 1e-40 and rounding 1e-50 |L| / h ~ 1e-30: the difference is exact to
    // ~1e-30 of |g|, so 1e-15 leaves fifteen orders for the check to be meaningful and still fail on any
    // backward error above the float64 level.
    const Mp h("1e-20");
    const Mp numeric = (loss_at(h) - loss_at(-h)) / (2 * h);
    const double err = static_cast<double>(abs(numeric - analytic) / gnorm);
    std::printf("  %-52s %13.6e %10.2e\n", name.c_str(), static_cast<double>(analytic), err);
    EXPECT_LE(err, 1e-15) << name;
    worst = std::max(worst, err);
  });
  std::printf("  worst err/|g| %.2e\n", worst);
}

INSTANTIATE_TEST_SUITE_P(AllCombos, FiftyDigitGradientCheck,
                         ::testing::Combine(::testing::Values(0, 1, 2, 3), ::testing::Bool()),
                         [](const auto& info) { return combo_name(info.param); });
