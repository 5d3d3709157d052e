// The fast trainer on several GPUs (fast/data_parallel.hpp) against itself on one: the same global batch must give
// the one-GPU loss and gradients up to the order of the fp32 additions, the GPUs must hold the same adapters after
// every step, and two runs must give the same bits. Each test skips, with the reason, on a machine with fewer than
// two CUDA devices (CI's, and the one-GPU host).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>

#include "fast/data_parallel.hpp"
#include "model/errors.hpp"
#include "model/config.hpp"
#include "model/synthetic.hpp"

using namespace gemma;

namespace {

#define NEED_TWO_GPUS()                                                                                \
  do {                                                                                                 \
    std::string why;                                                                                   \
    if (!fast::device_available(&why)) GTEST_SKIP() << why;                                            \
    if (fast::device_count() < 2)                                                                      \
      GTEST_SKIP() << "needs 2 CUDA devices, found " << fast::device_count() << " (nvidia-h200-x2 host)"; \
  } while (0)

struct Setting {
  Config c = preset("gemma2-tiny");
  AdapterConfig a;
  AdamWConfig h;
  Batch batch;
  Setting() {
    a.r = 8;
    a.lora_alpha = 16;
    a.target_modules.assign(kAllProj.begin(), kAllProj.end());
    // Four sequences longer than the window, a fifth of the labels ignored: the two GPUs' halves score different
    // numbers of targets, so a per-GPU normalisation would show.
    batch = synthetic_batch(c, 4, 40, 7, 0.2);
  }
};

std::vector<float> values(const Tensor& t) {
  std::vector<float> v(size_t(t.numel()));
  std::memcpy(v.data(), t.bytes.get(), v.size() * 4);  // the trainer's gradients and adapters are fp32
  return v;
}

bool same_bits(const TensorMap& x, const TensorMap& y) {
  if (x.size() != y.size()) return false;
  for (const auto& [name, t] : x) {
    auto it = y.find(name);
    if (it == y.end() || t.numel() != it->second.numel()) return false;
    if (std::memcmp(t.bytes.get(), it->second.bytes.get(), size_t(t.numel()) * 4) != 0) return false;
  }
  return true;
}

}  // namespace

// One GPU takes the four sequences as two micro-batches of two; two GPUs take two sequences each. Every partial
// gradient is then computed by the same kernels on the same rows, and only the last addition differs: on one GPU
// micro-batch 1's product is added into micro-batch 0's sums, on two GPUs NCCL adds the two GPUs' sums. One fp32
// addition rounds to half an ulp of its result, and the two orders differ by at most one ulp of the larger
// partial, which the tensor's largest value bounds: 2^-23 max|g| per element. The loss is a float64 sum of fp32
// per-token losses in another association: 1e-12 relative has four orders of margin.
TEST(FastMulti, TwoGpusGiveTheOneGpuStepUpToTheOrderOfFp32Additions) {
  NEED_TWO_GPUS();
  const Setting s;
  fast::DataParallelTrainer one(s.c, s.a, 11, 1, s.h, {true, true});
  fast::DataParallelTrainer two(s.c, s.a, 11, 2, s.h, {true, true});
  TensorMap g1, g2;
  const auto r1 = one.gradients(s.batch, 2, &g1);
  const auto r2 = two.gradients(s.batch, 1, &g2);
  EXPECT_EQ(r1.tokens, r2.tokens);
  EXPECT_LE(std::abs(r1.loss - r2.loss), 1e-12 * std::abs(r1.loss)) << r1.loss << " vs " << r2.loss;
  double worst = 0;
  int64_t identical = 0, n = 0;
  for (const auto& [name, t] : g1) {
    ASSERT_TRUE(g2.count(name)) << name;
    const std::vector<float> a = values(t), b = values(g2.at(name));
    float mx = 0;
    for (float v : a) mx = std::max(mx, std::abs(v));
    ASSERT_GT(mx, 0.0f) << name << ": an all-zero gradient proves nothing";
    for (size_t i = 0; i < a.size(); ++i) {
      const double d = std::abs(double(a[i]) - double(b[i]));
      worst = std::max(worst, d / (0x1p-23 * mx));
      identical += a[i] == b[i];
      ++n;
    }
  }
  std::printf("2 GPUs vs 1: loss %.17g vs %.17g; gradients: %lld of %lld values identical, worst %.3g of the "
              "one-ulp bound\n",
              r1.loss, r2.loss, (long long)identical, (long long)n, worst);
  EXPECT_LE(worst, 1.0);
}

// Three AdamW steps, twice: the same bits, and after every step the same adapters on both GPUs (they are never
// broadcast, so a GPU that drifted would stay drifted).
TEST(FastMulti, TwoGpuRunsAreDeterministicAndTheGpusStayInStep) {
  NEED_TWO_GPUS();
  const Setting s;
  std::vector<TensorMap> runs;
  std::vector<double> losses[2];
  for (int run = 0; run < 2; ++run) {
    fast::DataParallelTrainer tr(s.c, s.a, 11, 2, s.h, {true, true});
    for (int step = 0; step < 3; ++step) {
      losses[run].push_back(tr.step(s.batch, 1).loss);
      EXPECT_TRUE(same_bits(tr.adapters(0), tr.adapters(1))) << "run " << run << ", step " << step;
    }
    runs.push_back(tr.adapters(0));
  }
  EXPECT_TRUE(same_bits(runs[0], runs[1]));
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_NE(losses[0][0], losses[0][2]) << "the steps must train";
}

TEST(FastMulti, ABatchThatDoesNotSplitIsAnInputError) {
  NEED_TWO_GPUS();
  const Setting s;
  fast::DataParallelTrainer tr(s.c, s.a, 11, 2, s.h, {true, true});
  const Batch three = synthetic_batch(s.c, 3, 40, 7, 0.0);
  EXPECT_THROW(tr.step(three, 1), InputError);
  EXPECT_THROW(fast::DataParallelTrainer(s.c, s.a, 11, fast::device_count() + 1, s.h, {true, true}), InputError);
}

// recompute_num_layers auto on two GPUs (DataParallelTrainer::fit_recompute_num_layers): each GPU's fit, the
// largest of them on both; here both GPUs hold the whole model's activations with room to spare, so nothing is
// recomputed, and three steps give the default trainer's bits with the GPUs in step.
TEST(FastMulti, FitRecomputeNumLayersOnTwoGpusTrainsTheDefaultsBits) {
  NEED_TWO_GPUS();
  const Setting s;
  fast::DataParallelTrainer plain(s.c, s.a, 11, 2, s.h, {true, true});
  fast::DataParallelTrainer fit(s.c, s.a, 11, 2, s.h, {true, true});
  EXPECT_EQ(fit.fit_recompute_num_layers(s.batch.B / 2, s.batch.T), 0);
  for (int step = 0; step < 3; ++step) {
    EXPECT_EQ(plain.step(s.batch, 1).loss, fit.step(s.batch, 1).loss) << "step " << step;
    EXPECT_TRUE(same_bits(fit.adapters(0), fit.adapters(1))) << "step " << step;
  }
  EXPECT_TRUE(same_bits(plain.adapters(0), fit.adapters(0)));
}
