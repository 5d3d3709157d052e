// The float64 reference checked against itself: its backward pass against finite differences of its
// forward pass (every trainable tensor, all four softcap combinations, with and without LoRA), gradient
// accumulation against the single batch, and the sliding window's exact extent.
#include <gtest/gtest.h>

#include <cstdio>
#include <tuple>

#include "reference/run.hpp"
#include "tests/support.hpp"

using namespace gemma;
using namespace gemma::ref;
using namespace gemma::test;

namespace {

double mean_loss(const Model<double>& m, const Batch& b, const RunOptions& opt) {
  return forward_backward<double>(m, b, opt, 0.0, nullptr).loss_sum / double(b.count_targets());
}

}  // namespace

// ------------------------------------------------------------------------------------------------------
// Finite differences

class GradientCheck : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(GradientCheck, EveryTrainableTensorMatchesFiniteDifferences) {
  const Softcap sc = all_softcaps()[size_t(std::get<0>(GetParam()))];
  const bool adapters = std::get<1>(GetParam());
  // gemma2-tiny: grouped KV heads, query_pre_attn_scalar != head_dim, window 8 < T = 12.
  Case k = make_case(preset("gemma2-tiny"), adapters ? 4 : 0, 11, 2, 12);
  // HF's embedding drops the pad row's lookup gradient (padding_idx), which is not the loss's derivative:
  // keep the pad token out of this batch (PadRowGetsNoLookupGradient tests that rule).
  for (auto& id : k.batch.input_ids)
    if (id == k.ck.config.pad_token_id) id = 1;
  RunOptions opt;
  opt.softcap = sc;
  Model<double> m = make_model<double>(k.ck, opt.numerics.policy);
  Grads<double> g = zero_grads(m);
  step_loss_and_grads(m, {k.batch}, opt, g);

  std::printf("softcap %s, %s\n", softcap_name(sc).c_str(), adapters ? "LoRA r=4" : "all weights");
  std::printf("  %-52s %13s %13s %10s\n", "tensor", "analytic", "numeric", "err/|g|");
  double worst = 0;
  int tensors = 0;
  for_each_trainable(m, g, [&](const std::string& name, const Shape&, double* p, const double* gr, int64_t n) {
    // Direction: random signs over the whole tensor, so that an error in any element shows at first order
    // (a gradient-aligned direction would only see errors at second order).
    const uint64_t key = stream_key(5, name);
    std::vector<double> u(static_cast<size_t>(n));
    double rms = 0, analytic = 0, gnorm = 0;
    for (int64_t i = 0; i < n; ++i) {
      u[size_t(i)] = stream_uniform(key, uint64_t(i)) < 0 ? -1.0 : 1.0;
      rms += p[i] * p[i];
      analytic += gr[i] * u[size_t(i)];
      gnorm += gr[i] * gr[i];
    }
    rms = std::sqrt(rms / double(n));
    gnorm = std::sqrt(gnorm);
    auto loss_at = [&](double t) {
      std::vector<double> saved(p, p + n);
      for (int64_t i = 0; i < n; ++i) p[i] += t * u[size_t(i)];
      const double l = mean_loss(m, k.batch, opt);
      std::copy(saved.begin(), saved.end(), p);
      return l;
    };
    // Central differences at h and h/2, Richardson-extrapolated: truncation O(h^4). h = 1e-4 of the
    // tensor's rms keeps the loss's float64 rounding (~1e-15 relative of a loss ~30) divided by h well below
    // 1e-8 of |g|.
    const double h = 1e-4 * rms;
    const double d1 = (loss_at(h) - loss_at(-h)) / (2 * h);
    const double d2 = (loss_at(h / 2) - loss_at(-h / 2)) / h;
    const double numeric = (4 * d2 - d1) / 3;
    const double err = std::fabs(numeric - analytic) / gnorm;
    std::printf("  %-52s %13.6e %13.6e %10.2e\n", name.c_str(), analytic, numeric, err);
    // Measured worst case over the 8 parameter sets: 1.4e-8 (the loss's rounding amplified by 1/h). A
    // gradient wrong by one part in 1e6 in any tensor exceeds 1e-7; the missing attention-softcap
    // derivative gives 0.1.
    EXPECT_LE(err, 1e-7) << name;
    worst = std::max(worst, err);
    ++tensors;
  });
  std::printf("  %d tensors, worst err/|g| %.2e\n", tensors, worst);
  EXPECT_EQ(tensors, adapters ? 2 * 7 * 2 : 2 + 2 * 11);
}

INSTANTIATE_TEST_SUITE_P(AllCombos, GradientCheck,
                         ::testing::Combine(::testing::Values(0, 1, 2, 3), ::testing::Bool()),
                         [](const auto& info) {
                           return softcap_combo(all_softcaps()[size_t(std::get<0>(info.param))]) +
                                  (std::get<1>(info.param) ? "_lora" : "_full");
                         });

// ------------------------------------------------------------------------------------------------------
// Gradient accumulation

class Accumulation : public ::testing::TestWithParam<bool> {};

TEST_P(Accumulation, UnequalMicroBatchesEqualTheSingleBatch) {
  const bool adapters = GetParam();
  Case k = make_case(preset("gemma2-tiny"), adapters ? 4 : 0, 3, 4, 12, 0.0);
  // Scored targets per sequence: 1, 11, 6, 3 (labels[0] is never scored).
  const int keep[4] = {1, 11, 6, 3};
  for (int b = 0; b < 4; ++b)
    for (int t = 1; t < 12; ++t)
      if (t > keep[b]) k.batch.labels[size_t(b * 12 + t)] = kIgnoreIndex;
  RunOptions opt;
  Model<double> m = make_model<double>(k.ck, opt.numerics.policy);

  Grads<double> g1 = zero_grads(m);
  const double l1 = step_loss_and_grads(m, {k.batch}, opt, g1);
  Grads<double> g4 = zero_grads(m);
  const std::vector<Batch> micro = split_batch(k.batch, 1);
  ASSERT_EQ(micro.size(), 4u);
  const double l4 = step_loss_and_grads(m, micro, opt, g4);

  // Both sum the same per-token terms in a different grouping: float64 rounding only, ~1e-16 per add.
  std::printf("loss single %.17g, 4 micro-batches %.17g, rel diff %.2e\n", l1, l4, std::fabs(l1 - l4) / l1);
  EXPECT_LE(std::fabs(l1 - l4) / std::fabs(l1), 1e-12);
  double worst = 0;
  std::vector<std::vector<double>> a, b;
  for_each_trainable(m, g1, [&](const std::string&, const Shape&, const double*, const double* gr, int64_t n) {
    a.emplace_back(gr, gr + n);
  });
  for_each_trainable(m, g4, [&](const std::string&, const Shape&, const double*, const double* gr, int64_t n) {
    b.emplace_back(gr, gr + n);
  });
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, rel_l2(b[i], a[i]));
  std::printf("worst gradient rel L2 over %zu tensors: %.2e\n", a.size(), worst);
  EXPECT_LE(worst, 1e-12);

  // The mean of per-micro-batch means weighs a 1-target sequence like an 11-target one; it must differ,
  // or this test could not tell the two normalisations apart.
  double mom = 0;
  for (const Batch& mb : micro) mom += mean_loss(m, mb, opt) / double(micro.size());
  std::printf("mean of micro-batch means %.17g (differs by %.2e)\n", mom, std::fabs(mom - l1) / l1);
  EXPECT_GT(std::fabs(mom - l1) / std::fabs(l1), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(LoraAndFull, Accumulation, ::testing::Bool(),
                         [](const auto& info) { return std::string(info.param ? "lora" : "full"); });

// ------------------------------------------------------------------------------------------------------
// Sliding window

namespace {

struct AttnSetup {
  Config cfg = preset("gemma2-tiny");
  Policy policy;
  Semantics sem;
  Mat<double> q, k, v;
  int64_t B = 2, T = 20;
  Ctx<double> ctx() const {
return plain_ctx<double>(cfg, policy, sem, B, T, true, true, 50.0, 30.0, 1.0 / std::sqrt(cfg.query_pre_attn_scalar));
  }
  AttnSetup() {
    const int64_t N = B * T, hd = cfg.head_dim;
    auto fill = [&](Mat<double>& m, int64_t cols, const char* name) {
      m.resize(N, cols);
      const uint64_t key = stream_key(9, name);
      for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = 3.0 * stream_uniform(key, uint64_t(i));
    };
    fill(q, cfg.num_attention_heads * hd, "q");
    fill(k, cfg.num_key_value_heads * hd, "k");
    fill(v, cfg.num_key_value_heads * hd, "v");
  }
};

}  // namespace

TEST(SlidingWindow, EvenLayersSeeExactlyWKeysOddLayersSeeAllPastKeys) {
  AttnSetup s;
  const int64_t W = *s.cfg.sliding_window;
  ASSERT_GT(s.T, W + 2);
  for (int64_t layer : {0, 1}) {
    Mat<double> out;
    AttnCache<double> cache;
    attention_forward(s.q, s.k, s.v, layer, s.ctx(), out, cache);
    for (const auto& P : cache.P)
      for (int64_t i = 0; i < s.T; ++i) {
        int64_t nonzero = 0, first = -1;
        for (int64_t j = 0; j < s.T; ++j)
          if (P(i, j) != 0.0) {
            ++nonzero;
            if (first < 0) first = j;
          }
        const int64_t want = layer % 2 == 0 ? std::min(i + 1, W) : i + 1;
        ASSERT_EQ(nonzero, want) << "layer " << layer << " query " << i;
        ASSERT_EQ(first, i + 1 - want) << "layer " << layer << " query " << i;
      }
  }
}

TEST(SlidingWindow, AKeyJustOutsideTheWindowChangesNothingOnSlidingLayers) {
  AttnSetup s;
  const int64_t W = *s.cfg.sliding_window, hd = s.cfg.head_dim, KV = s.cfg.num_key_value_heads;
  const int64_t i = s.T - 1;
  for (int64_t layer : {0, 1}) {
    Mat<double> base, moved;
    AttnCache<double> cache;
    attention_forward(s.q, s.k, s.v, layer, s.ctx(), base, cache);
    for (int64_t offset : {W, W - 1}) {  // j = i - W is outside the window, j = i - W + 1 the oldest inside
      AttnSetup t = s;
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t e = 0; e < KV * hd; ++e) {
          t.k(b * s.T + i - offset, e) += 1.0;
          t.v(b * s.T + i - offset, e) -= 2.0;
        }
      attention_forward(t.q, t.k, t.v, layer, t.ctx(), moved, cache);
      bool identical = true;
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t e = 0; e < moved.cols(); ++e) identical &= moved(b * s.T + i, e) == base(b * s.T + i, e);
      const bool inside = layer % 2 == 1 || offset < W;
      EXPECT_EQ(identical, !inside) << "layer " << layer << ", key " << offset << " positions back";
    }
  }
}

// The fast policy's forward (Policy::attn_probs_blockwise) is what a FlashAttention-style kernel computes when it
// visits 64-key tiles in order, keeps a running max, rounds each tile's exp(z - m_b) to bf16 and rescales O and l
// when the max rises (fast/attention_sm90.cuh, fast/attention.cuh): that schedule, written out here in float64,
// gives the reference's output to float64 rounding. The tile is 64 keys because fast/'s kernels use 64.
TEST(OnePassAttention, TheBlockwiseOrderIsARunningMaxScheduleOver64KeyTiles) {
  AttnSetup s;
  s.B = 1;
  s.T = 150;  // tiles [0, 64), [64, 128), [128, 150)
  s.policy = policy_fast();
  ASSERT_TRUE(s.policy.attn_probs_blockwise);
  s.policy[Cast::attn_out] = DType::f64;  // compare O before its own rounding
  const int64_t T = s.T, H = s.cfg.num_attention_heads, hd = s.cfg.head_dim, G = s.cfg.kv_groups();
  const uint64_t key = stream_key(10, "one-pass");
  auto fill = [&](Mat<double>& m, int64_t cols, uint64_t salt) {
    m.resize(T, cols);
    for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = 3.0 * stream_uniform(key + salt, uint64_t(i));
  };
  fill(s.q, H * hd, 1);
  fill(s.k, s.cfg.num_key_value_heads * hd, 2);
  fill(s.v, s.cfg.num_key_value_heads * hd, 3);
  const int64_t layer = 1;  // global: every row sees every tile up to its own
  Mat<double> out;
  AttnCache<double> cache;
  attention_forward(s.q, s.k, s.v, layer, s.ctx(), out, cache);

  double worst = 0;
  int64_t rises = 0;  // rows whose max rose after their first tile: the rescale was exercised
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / G;
    for (int64_t i = 0; i < T; ++i) {
      double m = -INFINITY, l = 0;
      std::vector<double> o(size_t(hd), 0.0);
      for (int64_t j0 = 0; j0 <= i; j0 += 64) {
        const int64_t j1 = std::min(i + 1, j0 + 64);
        std::vector<double> z;
        for (int64_t j = j0; j < j1; ++j)
          z.push_back(round_to(DType::f32, softcap(cache.S[size_t(h)](i, j), 50.0)));
        const double mb = std::max(m, *std::max_element(z.begin(), z.end()));
        if (j0 > 0 && mb > m) ++rises;
        const double alpha = std::exp(m - mb);
        l *= alpha;
        for (double& x : o) x *= alpha;
        for (int64_t j = j0; j < j1; ++j) {
          const double e = std::exp(z[size_t(j - j0)] - mb);
          l += e;
          const double w = round_to(DType::bf16, e);
          for (int64_t d = 0; d < hd; ++d) o[size_t(d)] += w * s.v(j, g * hd + d);
        }
        m = mb;
      }
      for (int64_t d = 0; d < hd; ++d)
        worst = std::max(worst, std::fabs(o[size_t(d)] / l - out(i, h * hd + d)) / (std::fabs(o[size_t(d)] / l) + 1e-3));
    }
  }
  std::printf("rows whose max rose past their first tile: %lld; worst relative difference %.2e\n", (long long)rises,
              worst);
  EXPECT_GT(rises, 10);
  EXPECT_LE(worst, 1e-12);  // float64 rounding of two orders of the same sums (a wrong tile gives about 2^-9)

  // HF's order rounds other values: the flag must change the output, or this test could not tell them apart.
  AttnSetup hf = s;
  hf.policy.attn_probs_blockwise = false;
  Mat<double> out_hf;
  attention_forward(hf.q, hf.k, hf.v, layer, hf.ctx(), out_hf, cache);
  EXPECT_GT((out_hf - out).cwiseAbs().maxCoeff(), 1e-4);
}

TEST(SlidingWindow, OneSlidingLayerModelIgnoresTokensBeyondTheWindowEndToEnd) {
  for (LayerType type : {LayerType::sliding, LayerType::full}) {
    Config c = with_layers(preset("gemma2-tiny"), 1);
    c.layer_types = {type};
    Case k = make_case(c, 0, 21, 1, 16);
    RunOptions opt;
    opt.keep_logits = true;
    Model<double> m = make_model<double>(k.ck, opt.numerics.policy);
    const Result<double> a = forward_backward<double>(m, k.batch, opt, 0.0, nullptr);
    Batch changed = k.batch;
    changed.input_ids[0] = (changed.input_ids[0] + 1) % c.vocab_size;
    const Result<double> b = forward_backward<double>(m, changed, opt, 0.0, nullptr);
    const int64_t W = *c.sliding_window;
    for (int64_t t = 0; t < k.batch.T; ++t) {
      const bool same = a.logits.row(t) == b.logits.row(t);
      // Position t sees token 0 iff t - 0 <= W - 1 (sliding) or always (global).
      const bool sees_token0 = type == LayerType::full || t <= W - 1;
      EXPECT_EQ(same, !sees_token0) << (type == LayerType::full ? "global" : "sliding") << " position " << t;
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// Padded vocabulary

TEST(PaddedVocab, MaskedPaddingLeavesLossAndGradientsBitIdenticalAndGetsZeroGradient) {
  Case k = make_case(preset("gemma2-tiny"), 0, 4, 2, 12);
  const Config& c = k.ck.config;
  const int64_t P = 512 - c.vocab_size;  // pad 384 to a multiple of 128, like a kernel would
  std::vector<double> rows(static_cast<size_t>(P * c.hidden_size));
  const uint64_t key = stream_key(77, "pad");
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = 5.0 * stream_uniform(key, i);  // arbitrary, large
  const Tensor pad = tensor_from_doubles(DType::f32, {P, c.hidden_size}, rows);

  RunOptions opt;
  Model<double> plain = make_model<double>(k.ck, opt.numerics.policy);
  Grads<double> g0 = zero_grads(plain);
  const double l0 = step_loss_and_grads(plain, {k.batch}, opt, g0);

  Model<double> padded = make_model<double>(k.ck, opt.numerics.policy);
  pad_vocab(padded, pad);
  Grads<double> g1 = zero_grads(padded);
  const double l1 = step_loss_and_grads(padded, {k.batch}, opt, g1);
  EXPECT_EQ(l0, l1);
  EXPECT_TRUE(g0.embed_tokens == g1.embed_tokens);
  EXPECT_TRUE(g0.layers[0].proj[0] == g1.layers[0].proj[0]);
  EXPECT_TRUE(g0.norm == g1.norm);
  EXPECT_EQ(g1.embed_pad.rows(), P);
  EXPECT_EQ(g1.embed_pad.cwiseAbs().maxCoeff(), 0.0);

  // Left in the softmax (the padded-vocab-unmasked bug), the padding steals probability mass.
  RunOptions bug = opt;
  bug.numerics.semantics.padded_vocab_unmasked = true;
  Grads<double> g2 = zero_grads(padded);
  const double l2 = step_loss_and_grads(padded, {k.batch}, bug, g2);
  std::printf("loss %.17g, padded %.17g, padded unmasked %.17g\n", l0, l1, l2);
  EXPECT_GT(std::fabs(l2 - l0) / l0, 1e-3);
  EXPECT_GT(g2.embed_pad.cwiseAbs().maxCoeff(), 0.0);
}

// ------------------------------------------------------------------------------------------------------
// Embedding padding_idx

TEST(Embedding, PadRowGetsNoLookupGradientButKeepsItsLmHeadGradient) {
  // HF: nn.Embedding(vocab, hidden, padding_idx=pad_token_id). With token 0 in the batch, compare
  // pad_token_id = 0 (HF's rule drops row 0's lookup gradient) against pad_token_id = 5 (absent from the
  // batch: row 0 gets its full derivative, which finite differences confirm).
  Case k = make_case(preset("gemma2-tiny"), 0, 12, 2, 12);
  for (auto& id : k.batch.input_ids)
    if (id == 5) id = 6;
  k.batch.input_ids[3] = 0;
  k.batch.input_ids[17] = 0;
  RunOptions opt;
  auto grads_with_pad = [&](int64_t pad) {
    Checkpoint ck = k.ck;
    ck.config.pad_token_id = pad;
    Model<double> m = make_model<double>(ck, opt.numerics.policy);
    Grads<double> g = zero_grads(m);
    step_loss_and_grads(m, {k.batch}, opt, g);
    return g.embed_tokens;
  };
  const Mat<double> hf = grads_with_pad(0), full = grads_with_pad(5);
  const int64_t V = hf.rows(), D = hf.cols();
  EXPECT_TRUE(hf.bottomRows(V - 1) == full.bottomRows(V - 1)) << "only row 0 may differ";
  const double lookup_part = (full.row(0) - hf.row(0)).norm();
  std::printf("row 0: |full| %.6e, |HF (lookup dropped)| %.6e, |dropped part| %.6e\n", full.row(0).norm(), hf.row(0).norm(),
              lookup_part);
  EXPECT_GT(lookup_part, 1e-3 * full.row(0).norm());

  // The full derivative of row 0 against central differences (direction: alternating signs).
  Model<double> m = make_model<double>(k.ck, opt.numerics.policy);
  const double h = 1e-5;
  auto loss_at = [&](double t) {
    for (int64_t j = 0; j < D; ++j) m.embed_tokens.value(0, j) += (j % 2 ? t : -t);
    const double l = forward_backward<double>(m, k.batch, opt, 0.0, nullptr).loss_sum / double(k.batch.count_targets());
    for (int64_t j = 0; j < D; ++j) m.embed_tokens.value(0, j) -= (j % 2 ? t : -t);
    return l;
  };
  const double numeric = (loss_at(h) - loss_at(-h)) / (2 * h);
  double analytic = 0;
  for (int64_t j = 0; j < D; ++j) analytic += full(0, j) * (j % 2 ? 1.0 : -1.0);
  // Central differences with h = 1e-5 on weights of rms ~0.1: truncation ~h^2 ~ 1e-10 relative.
  EXPECT_NEAR(numeric, analytic, 1e-6 * full.row(0).norm() * std::sqrt(double(D)));
}
