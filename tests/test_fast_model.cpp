// The whole fast trainer against the float64 reference: fast::run (loss, adapter gradients, logits) against
// ref::run under the `fast` policy and under f64, in all four softcap combinations, with grouped KV heads, a
// sliding window shorter than the sequence, a sequence length that is a multiple of no tile, and a sequence
// whose labels are all ignored; micro-batches; determinism; the checkpointing options; the Trainer's loss curve
// over 50 AdamW steps against the reference trainer; out-of-memory handling.
//
// Tolerances. The `fast` policy reproduces every rounding the trainer does; what separates the two is fp32
// arithmetic (accumulation order, fp32 exp/tanh/division), which now and then tips a bf16 rounding the other way
// (a flip: one ulp). In a whole model a flip does not stay small: the next product spreads the one-ulp change over
// every output of its row, where it tips further roundings, so that row ends up about as far from its emulation
// as a different rounding history, i.e. as far as the f64 reference, while rows without a flip agree to fp32
// precision. Measured on the H200 (2026-11-28): in the attn case no row flipped and the gradients agreed to
// 1.5e-6; in the other softcap cases one or two rows cascaded and the gradients differed by 0.8e-3 to 3.3e-3,
// against a fast-policy-vs-f64 difference of 2.6e-2 to 3.9e-2; gemma2-9b widths, one layer: 5.5e-3 against
// 2.9e-2 (ratios 0.03 to 0.19). A trainer that rounds where its policy does not say lands near that difference:
// before lora_add_kernel, cuBLAS's bf16 epilogue (beta = 1) gave 1.1e-2 to 2.8e-2 (ratios 0.4 to 1). So the
// gradient bound is a quarter of the measured policy-vs-f64 difference. The loss, a mean over tokens, is bounded
// by the same quarter, but not below 1e-5 (a cascaded row moves its own loss by ~1e-3 and the mean by that over
// the row count; the policy-vs-f64 loss difference itself can cancel by chance, 4.6e-6 in one case) and never
// above the 1e-4 target. The targets set for this trainer (1e-4 on the loss, 1e-3 on the gradients) are printed
// as met or not: the loss meets it everywhere, the gradients wherever no row cascaded.
// Without a CUDA device every test skips with the reason.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "check/fast_backend.hpp"
#include "check/inputs.hpp"
#include "fast/fast.hpp"
#include "fast/testing.hpp"
#include "model/nf4.hpp"
#include "reference/adamw.hpp"
#include "reference/run.hpp"
#include "tests/support.hpp"

using namespace gemma;
using namespace gemma::test;

namespace {

class FastModel : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!gemma::fast::device_available(&why)) GTEST_SKIP() << why;
  }
};

std::vector<double> all_grads(const TensorMap& g, const TensorMap& names) {
  std::vector<double> v;
  for (const auto& [name, t] : names) {
    const std::vector<double> x = g.at(name).to_double();
    v.insert(v.end(), x.begin(), x.end());
  }
  return v;
}

struct Errors {
  double loss = 0, grads = 0, worst_tensor = 0;
  std::string worst_name;
};

Errors errors(const fast::Output& f, const ref::Output& r) {
  Errors e;
  e.loss = std::fabs(f.loss - r.loss) / std::fabs(r.loss);
  e.grads = rel_l2(all_grads(f.grads, r.grads), all_grads(r.grads, r.grads));
  for (const auto& [name, t] : r.grads) {
    const double x = rel_l2(f.grads.at(name).to_double(), t.to_double());
    if (x > e.worst_tensor) {
      e.worst_tensor = x;
      e.worst_name = name;
    }
  }
  return e;
}

Errors errors(const ref::Output& a, const ref::Output& r) {
  fast::Output f;
  f.loss = a.loss;
  f.grads = a.grads;
  return errors(f, r);
}

ref::Output reference(const Case& k, Softcap sc, const ref::Policy& p, int64_t micro_rows = 0, bool logits = false) {
  ref::RunOptions o;
  o.softcap = sc;
  o.numerics.policy = p;
  o.keep_logits = logits;
  return ref::run(k.ck, k.batch, o, micro_rows);
}

// Checks fast against the fast-policy reference with bounds derived from the policy-vs-f64 difference.
void check_against_reference(const fast::Output& f, const ref::Output& rf, const ref::Output& r64, const char* what) {
  const Errors e = errors(f, rf), e64 = errors(f, r64), pol = errors(rf, r64);
  const double loss_bound = std::min(1e-4, std::max(1e-5, 0.25 * pol.loss)), grad_bound = 0.25 * pol.grads;
  std::printf("%s: loss fast %.9f, fast-policy ref %.9f, f64 ref %.9f; %lld targets\n", what, f.loss, rf.loss, r64.loss,
              (long long)f.tokens);
  std::printf("  vs fast policy: loss rel %.2e (bound %.2e), grads rel L2 %.2e (bound %.2e), worst tensor %.2e (%s)\n",
              e.loss, loss_bound, e.grads, grad_bound, e.worst_tensor, e.worst_name.c_str());
  std::printf("  vs f64:         loss rel %.2e, grads rel L2 %.2e; fast policy vs f64: loss %.2e, grads %.2e\n", e64.loss,
              e64.grads, pol.loss, pol.grads);
  std::printf("  targets: loss 1e-4 %s, gradients 1e-3 %s; %.3f s on the device, peak %.1f MiB\n",
              e.loss <= 1e-4 ? "met" : "NOT met", e.grads <= 1e-3 ? "met" : "not met (a cascaded row, see above)",
              f.seconds, double(f.peak_device_bytes) / (1 << 20));
  EXPECT_EQ(f.tokens, rf.tokens);
  EXPECT_EQ(f.grads.size(), rf.grads.size());
  EXPECT_LE(e.loss, loss_bound) << what;
  EXPECT_LE(e.grads, grad_bound) << what;
  EXPECT_TRUE(std::isfinite(f.loss));
}

Case tiny_case(uint64_t seed, int64_t B, int64_t T) {
  // gemma2-tiny: 2 query heads per KV head, query_pre_attn_scalar 24 != head_dim 16, window 8 < T.
  Case k = make_case(preset("gemma2-tiny"), 4, seed, B, T);
  // Sequence 1 has every label ignored: it contributes nothing, and must not poison the rest.
  for (int64_t t = 0; t < T; ++t) k.batch.labels[size_t(T + t)] = kIgnoreIndex;
  return k;
}

void expect_identical(const fast::Output& a, const fast::Output& b, const char* what) {
  EXPECT_EQ(a.loss, b.loss) << what;
  int64_t differ = 0;
  for (const auto& [name, t] : a.grads) {
    const std::vector<double> x = t.to_double(), y = b.grads.at(name).to_double();
    for (size_t i = 0; i < x.size(); ++i) differ += x[i] != y[i];
  }
  EXPECT_EQ(differ, 0) << what << ": gradient elements differ";
}

}  // namespace

// ------------------------------------------------------------------------------------------------------

class FastRun : public FastModel, public ::testing::WithParamInterface<int> {};

TEST_P(FastRun, LossGradientsAndLogitsMatchTheReference) {
  const Softcap sc = all_softcaps()[size_t(GetParam())];
  // T = 37: more than the window (8), a multiple of no tile (64 query rows, 32 keys).
  Case k = tiny_case(100 + uint64_t(GetParam()), 3, 37);
  fast::Options o;
  o.softcap = sc;
  o.logit_rows = {0, 36, 2 * 37 + 5};
  const fast::Output f = fast::run(k.ck, k.batch, o);
  const ref::Output rf = reference(k, sc, ref::policy_fast(), 0, true), r64 = reference(k, sc, ref::policy_f64(), 0, true);
  check_against_reference(f, rf, r64, ("softcap " + softcap_name(sc)).c_str());
  const int64_t V = k.ck.config.vocab_size;
  for (int64_t row : o.logit_rows) {
    ASSERT_EQ(f.logits.count(row), 1u);
    std::vector<double> want(rf.logits.begin() + row * V, rf.logits.begin() + (row + 1) * V);
    std::vector<double> want64(r64.logits.begin() + row * V, r64.logits.begin() + (row + 1) * V);
    const gemma::fast::testing::Diff d = gemma::fast::testing::compare(f.logits.at(row), want);
    std::vector<float> wantf(want.begin(), want.end());
    const double policy = gemma::fast::testing::compare(wantf, want64).rel_l2;
    std::printf("  capped logits row %lld: %s; fast policy vs f64 %.2e\n", (long long)row,
                gemma::fast::testing::describe(d).c_str(), policy);
    // A row agrees to fp32 precision unless a flip cascaded through it (file comment); then it is another
    // rounding history, as far as the f64 row, give or take: twice that distance, or 1e-6 (fp32) if larger.
    // A missing cap moves logits spread over half the cap by ~10%.
    EXPECT_EQ(d.nan, 0);
    EXPECT_LE(d.rel_l2, std::max(1e-6, 2 * policy));
  }
}

INSTANTIATE_TEST_SUITE_P(AllSoftcaps, FastRun, ::testing::Values(0, 1, 2, 3),
                         [](const auto& info) { return softcap_combo(all_softcaps()[size_t(info.param)]); });

TEST_F(FastModel, Gemma2_9bWidthsOneLayer) {
  // The released 9b widths: D 3584, 16 query and 8 kv heads of 256, the 256000 vocabulary, normalizer 59.75.
  const Config c = with_layers(preset("gemma2-9b"), 1);
  Case k = make_case(c, 8, 9, 1, 33);
  const Softcap sc{true, true};
  fast::Options o;
  o.softcap = sc;
  const fast::Output f = fast::run(k.ck, k.batch, o);
  check_against_reference(f, reference(k, sc, ref::policy_fast()), reference(k, sc, ref::policy_f64()), "gemma2-9b, 1 layer");
}

TEST_F(FastModel, MicroBatchesNormaliseByTheWholeStep) {
  // Unequal micro-batches (3 sequences as 2 + 1, one with every label ignored): each is scaled by 1 / (targets
  // of the whole step), so the result is the single batch's up to fp32 order.
  Case k = tiny_case(7, 3, 37);
  const Softcap sc{true, true};
  fast::Options o1, o2;
  o1.softcap = o2.softcap = sc;
  o2.micro_batches = 2;
  const fast::Output a = fast::run(k.ck, k.batch, o1), b = fast::run(k.ck, k.batch, o2);
  const ref::Output rf = reference(k, sc, ref::policy_fast(), 2), r64 = reference(k, sc, ref::policy_f64(), 2);
  check_against_reference(b, rf, r64, "2 micro-batches");
  const double dl = std::fabs(a.loss - b.loss) / a.loss;
  const double dg = rel_l2(all_grads(b.grads, a.grads), all_grads(a.grads, a.grads));
  std::printf("one batch vs 2 micro-batches: loss rel %.2e, grads rel L2 %.2e\n", dl, dg);
  // The same per-token terms summed in another grouping, in fp32.
  EXPECT_LE(dl, 1e-6);
  EXPECT_LE(dg, 1e-5);
}

TEST_F(FastModel, TwoRunsAreBitIdentical) {
  // Wide enough that cuBLAS picks real tiled algorithms and the attention kernels run many blocks.
  const Config c = with_layers(preset("gemma2-2b"), 2);
  Case k = make_case(c, 16, 3, 2, 200);
  fast::Options o;
  o.micro_batches = 2;
  const fast::Output a = fast::run(k.ck, k.batch, o), b = fast::run(k.ck, k.batch, o);
  std::printf("loss %.9f and %.9f, %.3f s and %.3f s\n", a.loss, b.loss, a.seconds, b.seconds);
  expect_identical(a, b, "second run");
}

TEST_F(FastModel, CheckpointOffloadAndNoRecomputeGiveTheSameBits) {
  Case k = tiny_case(11, 3, 37);
  fast::Options base;
  base.micro_batches = 3;
  fast::Options off = base, keep = base, mlp = base;
  off.offload = true;
  keep.recompute = false;
  mlp.recompute_mlp_only = true;
  const fast::Output a = fast::run(k.ck, k.batch, base), b = fast::run(k.ck, k.batch, off),
                     c = fast::run(k.ck, k.batch, keep), d = fast::run(k.ck, k.batch, mlp);
  expect_identical(a, b, "checkpoints offloaded to host memory");
  expect_identical(a, c, "every activation kept (no recompute)");
  expect_identical(a, d, "the attention block's outputs kept (recompute_mlp_only)");
  EXPECT_GT(d.peak_device_bytes, a.peak_device_bytes);
  EXPECT_LT(d.peak_device_bytes, c.peak_device_bytes);
  // Keeping activations beside offloaded checkpoints, or without checkpoints, is a contradiction: refused.
  for (bool recompute : {false, true}) {
    fast::Options bad = mlp;
    bad.recompute = recompute;
    bad.offload = recompute;
    EXPECT_THROW(fast::run(k.ck, k.batch, bad), InputError) << "recompute " << recompute;
  }
}

// recompute_num_layers: the first n layers checkpointed and recomputed, the others keeping everything (with the
// MLP recomputed alone: their gate|up output, from which the backward rebuilds the norms and GeGLU). Four
// layers with n = 2, so that each wrong layout shows: two kept layers sharing a buffer would read each other's
// activations, and a layer whose recomputation were skipped would read the other recomputed layer's (with two
// layers and n = 1 neither would change a bit). Every combination gives the bits of the full recompute.
TEST_F(FastModel, RecomputingOnlySomeLayersGivesTheSameBits) {
  Config c = preset("gemma2-tiny");  // its two layers, twice
  c.num_hidden_layers = 4;
  c.layer_types = {c.layer_types[0], c.layer_types[1], c.layer_types[0], c.layer_types[1]};
  Case k = make_case(c, 4, 23, 3, 37);
  fast::Options base;
  base.micro_batches = 3;
  const fast::Output a = fast::run(k.ck, k.batch, base);
  fast::Options none = base;
  none.recompute = false;
  const fast::Output all_kept = fast::run(k.ck, k.batch, none);
  expect_identical(a, all_kept, "no recompute");
  // The last recomputed layer's shared buffers still hold its forward's activations: the backward rebuilds the
  // others only (3 layers of 4 in each of the 3 micro-batches; none without recompute).
  EXPECT_EQ(a.layers_rebuilt, 3 * 3);
  EXPECT_EQ(all_kept.layers_rebuilt, 0);
  for (bool mlp_only : {false, true})
    for (bool offload : {false, true}) {
      if (mlp_only && offload) continue;  // refused (CheckpointOffloadAndNoRecomputeGiveTheSameBits)
      fast::Options o = base;
      o.recompute_mlp_only = mlp_only;
      o.offload = offload;
      const fast::Output every = fast::run(k.ck, k.batch, o);
      size_t last_peak = every.peak_device_bytes;
      for (int64_t n : {3, 2, 0}) {
        o.recompute_num_layers = n;
        const fast::Output b = fast::run(k.ck, k.batch, o);
        const std::string what = "recompute_num_layers " + std::to_string(n) + (mlp_only ? ", MLP only" : "") +
                                 (offload ? ", offloaded" : "");
        std::printf("%s: loss %.9f, peak %zu bytes\n", what.c_str(), b.loss, b.peak_device_bytes);
        expect_identical(a, b, what.c_str());
        // Each layer kept whole holds more than its share of the shared buffers.
        EXPECT_GT(b.peak_device_bytes, last_peak) << what;
        last_peak = b.peak_device_bytes;
        // A kept layer recomputed anyway would give the same bits and memory: the count shows it. With the MLP
        // recomputed alone every layer but the last shares the norms' and GeGLU's buffers and is rebuilt, those
        // past n and the last recomputed one (whose shared gate|up output is still its own) without their
        // products, which the count leaves out.
        EXPECT_EQ(b.layers_rebuilt, 3 * std::max<int64_t>(n - 1, 0)) << what;
        // Past n a layer keeps only gate|up's output with the MLP recomputed alone: less than every activation.
        if (mlp_only && n == 0) {
          EXPECT_LT(b.peak_device_bytes, all_kept.peak_device_bytes) << what;
        }
      }
    }
  for (int64_t n : {int64_t(-2), int64_t(5)}) {
    fast::Options bad = base;
    bad.recompute_num_layers = n;
    EXPECT_THROW(fast::run(k.ck, k.batch, bad), InputError) << n;
  }
  fast::Options contradiction = none;
  contradiction.recompute_num_layers = 2;
  EXPECT_THROW(fast::run(k.ck, k.batch, contradiction), InputError);
}

// recompute_num_layers auto (Trainer::fit_recompute_num_layers): the fewest recomputed layers that fit. On the
// four-layer model, a memory limit halfway between what n = 1 and n = 2 reserve must give 2, and the step must then
// run within the limit (it allocates nothing reserve did not) with the full recompute's bits; the device's whole
// memory gives 0; below what n = 4 needs, the fit refuses.
TEST_F(FastModel, FitRecomputeNumLayersTakesTheFewestThatFit) {
  Config c = preset("gemma2-tiny");
  c.num_hidden_layers = 4;
  c.layer_types = {c.layer_types[0], c.layer_types[1], c.layer_types[0], c.layer_types[1]};
  Case k = make_case(c, 4, 29, 2, 37);
  const AdamWConfig h;
  const Softcap sc{true, true};
  const int64_t B = k.batch.B, T = k.batch.T;
  auto reserved = [&](int64_t n) {
    fast::TrainerOptions o;
    o.recompute_num_layers = n;
    fast::Trainer t(k.ck, h, sc, o);
    EXPECT_TRUE(t.reserve(B, T)) << n;
    return t.peak_device_bytes();
  };
  const size_t m1 = reserved(1), m2 = reserved(2), m4 = reserved(4);
  std::printf("reserved with 1, 2, 4 layers recomputed: %zu, %zu, %zu bytes\n", m1, m2, m4);
  ASSERT_GT(m1, m2);
  ASSERT_GT(m2, m4);

  fast::Trainer plain(k.ck, h, sc);
  const fast::Trainer::Step a = plain.step(k.batch, 1);
  fast::Trainer fit(k.ck, h, sc);
  const size_t limit = (m1 + m2) / 2;
  fit.set_memory_limit(limit);
  EXPECT_EQ(fit.fit_recompute_num_layers(B, T), 2);
  const fast::Trainer::Step b = fit.step(k.batch, 1);
  EXPECT_LE(fit.peak_device_bytes(), limit);
  EXPECT_EQ(a.loss, b.loss);
  const TensorMap pa = plain.adapters(), pb = fit.adapters();
  int64_t differ = 0;
  for (const auto& [name, t] : pa) {
    const std::vector<double> x = t.to_double(), y = pb.at(name).to_double();
    for (size_t i = 0; i < x.size(); ++i) differ += x[i] != y[i];
  }
  EXPECT_EQ(differ, 0) << "adapter values differ after one step";

  fast::Trainer roomy(k.ck, h, sc);
  EXPECT_EQ(roomy.fit_recompute_num_layers(B, T), 0);
  fast::Trainer tight(k.ck, h, sc);
  tight.set_memory_limit(m4 - 1);
  EXPECT_THROW(tight.fit_recompute_num_layers(B, T), fast::OutOfMemory);
  fast::TrainerOptions none;
  none.recompute = false;
  fast::Trainer keep_all(k.ck, h, sc, none);
  EXPECT_THROW(keep_all.fit_recompute_num_layers(B, T), InputError);
}

// QLoRA on the device: projections kept in NF4 and dequantized a layer at a time must give exactly the run of the
// same dequantized weights uploaded as bf16 (staging changes where the bits live, not what they are), with every
// checkpointing option; a form that no longer matches its weight is refused at load, naming the weight.
TEST_F(FastModel, Nf4BaseGivesTheBitsOfItsDequantizedWeights) {
  Case k = tiny_case(13, 3, 29);
  quantize_base_projections(k.ck);
  ASSERT_FALSE(k.ck.nf4.empty());
  Checkpoint plain = k.ck;
  plain.nf4.clear();
  fast::Options base;
  base.micro_batches = 3;
  fast::Options off = base, keep = base, mlp = base;
  off.offload = true;
  keep.recompute = false;
  mlp.recompute_mlp_only = true;
  for (const auto& [o, what] :
       {std::pair{base, "recompute"}, {off, "offload"}, {keep, "no recompute"}, {mlp, "recompute_mlp_only"}}) {
    const fast::Output a = fast::run(k.ck, k.batch, o), b = fast::run(plain, k.batch, o);
    std::printf("%s: NF4 base loss %.9f, peak %zu bytes; bf16 base loss %.9f, peak %zu bytes\n", what, a.loss,
                a.peak_device_bytes, b.loss, b.peak_device_bytes);
    expect_identical(a, b, what);
  }

  Checkpoint stale = k.ck;
  const std::string name = proj_weight_name(1, Proj::up_proj);
  std::vector<double> v = stale.weights.at(name).to_double();
  v[7] = -v[7] + 0.5;  // any other value
  stale.weights[name] = tensor_from_doubles(DType::bf16, stale.weights.at(name).shape, v);
  try {
    (void)fast::run(stale, k.batch, base);
    FAIL() << "a stale NF4 form was used";
  } catch (const std::logic_error& e) {
    std::printf("stale form: %s\n", e.what());
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("1 of"), std::string::npos) << e.what();
  }
}

// The synthetic QLoRA trainer (fast_bench --quantize nf4) quantizes on the device: its step must be the step of
// the host-quantized synthetic checkpoint, bit for bit (loss and the adapters after AdamW).
TEST_F(FastModel, DeviceQuantizedSyntheticBaseIsTheHostQuantizedOne) {
  const Config c = preset("gemma2-tiny");
  Case k = make_case(c, 4, 17, 2, 24);
  quantize_base_projections(k.ck);
  AdamWConfig h;
  fast::TrainerOptions o;
  o.quantize_nf4 = true;
  fast::Trainer dev(c, *k.ck.adapter, 17, h, Softcap{true, true}, o);
  fast::Trainer host(k.ck, h, Softcap{true, true});
  const fast::Trainer::Step a = dev.step(k.batch, 1), b = host.step(k.batch, 1);
  EXPECT_EQ(a.loss, b.loss);
  const TensorMap pa = dev.adapters(), pb = host.adapters();
  int64_t differ = 0;
  for (const auto& [name, t] : pb) {
    const std::vector<double> x = t.to_double(), y = pa.at(name).to_double();
    for (size_t i = 0; i < x.size(); ++i) differ += x[i] != y[i];
  }
  EXPECT_EQ(differ, 0) << "adapter values differ after one step";
}

TEST_F(FastModel, TrainerFollowsTheReferenceTrainerFor50Steps) {
  Case k = make_case(preset("gemma2-tiny"), 4, 21, 4, 24);
  const Softcap sc{true, true};
  ref::AdamWConfig h;
  h.lr = 3e-3;  // large enough that 50 steps move the loss clearly
  h.weight_decay = 0.01;
  const int steps = 50;
  fast::Trainer tr(k.ck, h, sc);
  std::vector<double> fast_loss, ref_loss, f64_loss;
  for (int s = 0; s < steps; ++s) fast_loss.push_back(tr.step(k.batch, 2).loss);
  for (int pass = 0; pass < 2; ++pass) {
    ref::RunOptions o;
    o.softcap = sc;
    o.numerics.policy = pass == 0 ? ref::policy_fast() : ref::policy_f64();
    ref::Model<double> m = ref::make_model<double>(k.ck, o.numerics.policy);
    ref::AdamWState<double> st;
    const std::vector<Batch> micro = split_batch(k.batch, 2);
    for (int s = 0; s < steps; ++s) {
      ref::Grads<double> g = ref::zero_grads(m);
      (pass == 0 ? ref_loss : f64_loss).push_back(ref::step_loss_and_grads(m, micro, o, g));
      ref::adamw_step(m, g, st, h, o.numerics.policy);
    }
  }
  double worst = 0, worst_policy = 0;
  for (int s = 0; s < steps; ++s) {
    worst = std::max(worst, std::fabs(fast_loss[size_t(s)] - ref_loss[size_t(s)]) / ref_loss[size_t(s)]);
    worst_policy = std::max(worst_policy, std::fabs(ref_loss[size_t(s)] - f64_loss[size_t(s)]) / f64_loss[size_t(s)]);
    if (s % 10 == 0 || s == steps - 1)
      std::printf("step %2d: fast %.7f  fast-policy ref %.7f  f64 ref %.7f\n", s, fast_loss[size_t(s)],
                  ref_loss[size_t(s)], f64_loss[size_t(s)]);
  }
  // Over 50 optimizer steps the rounding histories of the three runs diverge (file comment): the fast curve
  // must stay inside the band that bf16 rounding itself opens around the exact curve (the largest fast-policy vs
  // f64 difference over the run), and within 1e-3 everywhere; at step 0 there is no history yet, so it must
  // agree to the single-run loss bound (1e-5).
  const double first = std::fabs(fast_loss[0] - ref_loss[0]) / ref_loss[0];
  const double bound = std::min(1e-3, worst_policy);
  std::printf("worst step: fast vs fast-policy ref %.2e (bound %.2e); fast-policy ref vs f64 %.2e; step 0 %.2e\n", worst,
              bound, worst_policy, first);
  EXPECT_LE(first, 1e-5);
  EXPECT_LE(worst, bound);
  EXPECT_LT(fast_loss.back(), 0.9 * fast_loss.front()) << "50 steps should train";

  // The same trainer with its weights generated on the device: the same bits as the host generator.
  fast::Trainer dev(k.ck.config, *k.ck.adapter, 21, h, sc);
  fast::Trainer host(k.ck, h, sc);
  for (int s = 0; s < 3; ++s) EXPECT_EQ(dev.step(k.batch, 1).loss, host.step(k.batch, 1).loss) << "step " << s;
  const TensorMap a = dev.adapters(), b = host.adapters();
  int64_t differ = 0;
  for (const auto& [name, t] : a) {
    const std::vector<double> x = t.to_double(), y = b.at(name).to_double();
    for (size_t i = 0; i < x.size(); ++i) differ += x[i] != y[i];
  }
  EXPECT_EQ(differ, 0);
}

TEST_F(FastModel, OutOfMemoryNamesTheSizeAndIsAnInputError) {
  Config c = preset("gemma2-27b");
  c.num_hidden_layers = 400;  // about 470 GB of bf16 weights
  c.layer_types.assign(400, LayerType::full);
  ref::AdamWConfig h;
  try {
    fast::Trainer t(c, check::synthetic_adapter_config(8), 1, h, Softcap{});
    FAIL() << "a 470 GB model fitted";
  } catch (const fast::OutOfMemory& e) {
    std::printf("message: %s\n", e.what());
    EXPECT_NE(std::string(e.what()).find("GiB"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("hint"), std::string::npos);
  }
  // Everything allocated before the failure was freed: a small model still fits.
  Case k = tiny_case(1, 2, 16);
  EXPECT_NO_THROW(fast::run(k.ck, k.batch, fast::Options{}));
}

// A step that runs out of memory must leave the trainer as it was: the next, smaller step allocates its buffers
// again (it once found the larger capacity recorded and ran on freed ones) and gives the bits of a trainer that
// never tried.
TEST_F(FastModel, AStepOutOfMemoryLeavesTheTrainerUsable) {
  Case k = tiny_case(5, 2, 16);
  const Case big = make_case(preset("gemma2-tiny"), 4, 5, 8, 2048);
  ref::AdamWConfig h;
  fast::Trainer tried(k.ck, h, Softcap{}), fresh(k.ck, h, Softcap{});
  const double first = tried.step(k.batch, 1).loss;
  EXPECT_EQ(first, fresh.step(k.batch, 1).loss);
  // Room for twice the small step, far from the 512 times more tokens of `big`.
  tried.set_memory_limit(2 * tried.peak_device_bytes());
  EXPECT_THROW(tried.step(big.batch, 1), fast::OutOfMemory);
  EXPECT_EQ(tried.step(k.batch, 1).loss, fresh.step(k.batch, 1).loss);
  EXPECT_EQ(tried.adapters().size(), fresh.adapters().size());
  for (const auto& [name, t] : tried.adapters()) EXPECT_EQ(t.to_double(), fresh.adapters().at(name).to_double()) << name;
}

TEST_F(FastModel, InputErrorsAreReported) {
  Case k = tiny_case(2, 2, 16);
  Checkpoint no_adapter = k.ck;
  no_adapter.adapter.reset();
  EXPECT_THROW(fast::run(no_adapter, k.batch, fast::Options{}), InputError);
  Batch all_ignored = k.batch;
  for (auto& l : all_ignored.labels) l = kIgnoreIndex;
  EXPECT_THROW(fast::run(k.ck, all_ignored, fast::Options{}), InputError);
  fast::Options bad;
  bad.micro_batches = 3;  // the batch has 2 sequences
  EXPECT_THROW(fast::run(k.ck, k.batch, bad), InputError);
}

// The gate on the real trainer: gemma2-odd's gate setting (padding masks, an odd vocabulary padded by the trainer,
// head_dim 18, two micro-batches) and a gemma2-2b-wide setting cut to one layer (packed documents, positions near
// 4096, the JAX-padded head, fp32 adapters, trained-like weights): every check of verify's fast comparison passes,
// layer by layer, the whole step, the AdamW update and (odd) the fingerprints.
TEST_F(FastModel, TheGatePassesTheTrainerOnItsSettings) {
  for (const auto& [model, layers] : std::vector<std::pair<std::string, int64_t>>{{"gemma2-odd", 3}, {"gemma2-2b", 1}}) {
    check::InputSpec s;
    s.model = model;
    s.layers = layers;
    const check::Inputs in = check::load_inputs(s);
    // gemma2-odd in every combination; the 2b widths (whose reference side takes a minute) with both caps.
    const std::vector<Softcap> combos = model == "gemma2-odd" ? all_softcaps() : std::vector<Softcap>{{true, true}};
    for (Softcap sc : combos) {
      ref::RunOptions o;
      o.softcap = sc;
      o.keep_logits = true;
      const ref::Output f64 = ref::run(in.model, in.batch, o, in.micro_rows);
      check::Report r;
      const check::FastResult fr = check::compare_fast(r, "", in, sc, &f64);
      for (const check::Check& c : r.checks)
        if (!c.pass) ADD_FAILURE() << model << " [" << softcap_name(sc) << "] " << c.name << ": " << c.value << " > "
                                   << c.tolerance << " (" << c.why << ")";
      std::printf("%s [%s]: %d/%zu checks pass; layer by layer worst %.3g of tolerance (%s)\n", model.c_str(),
                  softcap_name(sc).c_str(), r.passed(), r.checks.size(), fr.worst_probe, fr.worst_probe_where.c_str());
    }
  }
}

// The CUDA trainer takes one rank and scaling on the same projections of every layer. A PEFT adapter with
// per-module ranks or layers without adapters is refused naming the difference, before the device is touched
// (so this runs without one), rather than computed as something else.
TEST(FastRefusal, AdaptersTheKernelsDoNotSupportAreRefused) {
  const Config c = preset("gemma2-tiny");
  auto refused = [&](const std::string& adapter_json, const std::string& needle) {
    Checkpoint ck;
    ck.config = c;
    ck.weights = synthetic_weights(c, 1);
    ck.adapter = parse_adapter_config_json(adapter_json, c, "adapter_config.json", nullptr);
    ASSERT_FALSE(ck.adapter->per_layer.empty());
    TensorMap a = synthetic_adapters(c, *ck.adapter, 1);
    ck.weights.insert(a.begin(), a.end());
    try {
      fast::run(ck, synthetic_batch(c, 1, 8, 1), fast::Options{});
      ADD_FAILURE() << "not refused: " << adapter_json;
    } catch (const InputError& e) {
      const std::string m = e.what();
      std::printf("  InputError: %s\n", m.c_str());
      EXPECT_EQ(m.rfind("fast: ", 0), 0u) << m;
      EXPECT_NE(m.find(needle), std::string::npos) << m;
    }
  };
  refused(R"({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]})",
          "model.layers.1.self_attn.q_proj is adapted but model.layers.0.self_attn.q_proj is not");
  refused(R"({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}})",
          "per-module rank or alpha");
}
