// train as people use it: JSONL data (tokenized, and text through a SentencePiece model trained here), padding
// and packing, HF's learning-rate schedules, clipping by global norm, PEFT adapters out and back in through the
// project's own reader, full-weight checkpoints, bit-exact --resume, the HTML report, and bad data refused with
// exit 2 naming FILE:LINE.
#include <gtest/gtest.h>
#include <png.h>
#include <sentencepiece_trainer.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <unordered_map>
#include <nlohmann/json.hpp>

#include "model/safetensors.hpp"
#include "model/synthetic.hpp"
#include "reference/adamw.hpp"
#include "reference/gemma2.hpp"
#include "reference/policy.hpp"
#include "tests/badinput_support.hpp"
#include "train/data.hpp"
#include "train/html_report.hpp"
#include "train/save.hpp"
#include "train/schedule.hpp"

using namespace gemma;
using namespace gemma::test;
using namespace gemma::train;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kTrain = GEMMA_TRAIN_BIN;
const std::string kExamples = GEMMA_EXAMPLES_DIR;

// ---------------------------------------------------------------------------------------------------------------
// Schedules and clipping

TEST(TrainSchedule, LinearWithWarmupIsHFs) {
  // transformers' get_linear_schedule_with_warmup(opt, 2, 10); optimizer step k runs at lambda(k - 1).
  const Schedule s{Scheduler::linear, 1e-3, 2, 10};
  EXPECT_EQ(lr_at(s, 1), 0.0);  // HF's first warmup step has learning rate 0
  EXPECT_EQ(lr_at(s, 2), 1e-3 * 0.5);
  EXPECT_EQ(lr_at(s, 3), 1e-3 * (8.0 / 8.0));
  EXPECT_EQ(lr_at(s, 10), 1e-3 * (1.0 / 8.0));
  EXPECT_EQ(lr_at(s, 11), 0.0);
}

TEST(TrainSchedule, CosineAndConstant) {
  const Schedule c{Scheduler::cosine, 2e-4, 1, 5};
  EXPECT_EQ(lr_at(c, 1), 0.0);
  EXPECT_EQ(lr_at(c, 2), 2e-4);  // progress 0: cos(0) = 1
  EXPECT_DOUBLE_EQ(lr_at(c, 4), 2e-4 * 0.5);  // progress 0.5: half way down
  EXPECT_DOUBLE_EQ(lr_at(c, 5), 2e-4 * 0.5 * (1 + std::cos(M_PI * 0.75)));
  const Schedule k{Scheduler::constant, 3e-4, 0, 5};
  for (int64_t i = 1; i <= 6; ++i) EXPECT_EQ(lr_at(k, i), 3e-4);
  const Schedule kw{Scheduler::constant_with_warmup, 3e-4, 4, 9};
  EXPECT_EQ(lr_at(kw, 3), 3e-4 * 0.5);
  EXPECT_EQ(lr_at(kw, 5), 3e-4);
}

TEST(TrainSchedule, ClipGradNormIsTorchs) {
  std::vector<double> a{3, 0}, b{0, 4, 0};
  std::vector<std::pair<double*, int64_t>> t{{a.data(), 2}, {b.data(), 3}};
  const double n = clip_grad_norm(t, 1.0);
  EXPECT_EQ(n, 5.0);
  const double coef = 1.0 / (5.0 + 1e-6);  // torch: max_norm / (total + 1e-6)
  EXPECT_EQ(a[0], 3 * coef);
  EXPECT_EQ(b[1], 4 * coef);
  // Below the limit nothing changes; 0 only measures.
  std::vector<double> c{0.3, 0.4};
  std::vector<std::pair<double*, int64_t>> u{{c.data(), 2}};
  EXPECT_DOUBLE_EQ(clip_grad_norm(u, 1.0), 0.5);
  EXPECT_EQ(c[0], 0.3);
  std::vector<double> d{30, 40};
  std::vector<std::pair<double*, int64_t>> w{{d.data(), 2}};
  EXPECT_EQ(clip_grad_norm(w, 0.0), 50.0);
  EXPECT_EQ(d[0], 30.0);
}

// HF's Trainer decays neither biases nor norms (get_decay_parameter_names' patterns). A full-weight step with
// weight decay moved Gemma 2's RMSNorm weights by lr * weight_decay where HF's would not have moved them; now one
// step with and without decay leaves every norm bit-identical and moves the embedding and projections by exactly
// the decay factor. LoRA's A and B are decayed, as HF's Trainer decays a PEFT model's.
TEST(TrainOptimizer, WeightDecaySparesNormsAsHFsTrainerDoes) {
  for (const char* n : {"model.layers.0.input_layernorm.weight", "model.layers.3.post_feedforward_layernorm.weight",
                        "model.norm.weight", "model.layers.0.self_attn.q_proj.bias", "x.q_norm.weight", "model.norm",
                        "norm.weight", "Model.LayerNorm.Weight", "a.RMSNorm.w"})
    EXPECT_FALSE(weight_decay_applies(n)) << n;
  // Names near the patterns that match none of them: "norm" inside a word, or not at a name boundary.
  for (const char* n : {"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
                        "model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.1.self_attn.o_proj.lora_B.weight",
                        "model.normalizer.weight", "x.enorm.weight", "x.q_norms.weight", "abnormal"})
    EXPECT_TRUE(weight_decay_applies(n)) << n;

  Checkpoint ck;
  ck.config = preset("gemma2-tiny");
  ck.weights = synthetic_weights(ck.config, 3);
  const ref::Policy policy = ref::policy_named("f64");
  std::map<std::string, std::vector<double>> after[2];
  for (int decayed = 0; decayed < 2; ++decayed) {
    ref::Model<double> m = ref::make_model<double>(ck, policy);
    ref::Grads<double> g = ref::zero_grads(m);
    uint64_t k = 0;
    ref::for_each_trainable(m, g, [&](const std::string&, const Shape&, double*, double* gr, int64_t n) {
      for (int64_t i = 0; i < n; ++i) gr[i] = std::sin(double(++k));  // a gradient of every sign, never 0
    });
    ref::AdamWState<double> st;
    AdamWConfig h;
    h.lr = 1e-2;
    h.weight_decay = decayed ? 0.5 : 0.0;
    ref::adamw_step(m, g, st, h, policy);
    ref::for_each_trainable(m, g, [&](const std::string& name, const Shape&, double* p, double*, int64_t n) {
      after[decayed][name].assign(p, p + n);
    });
  }
  int norms = 0, decayed_tensors = 0;
  for (const auto& [name, plain] : after[0]) {
    const std::vector<double>& wd = after[1].at(name);
    if (name.find("norm") != std::string::npos) {
      ++norms;
      EXPECT_EQ(plain, wd) << name << " was decayed";
    } else {
      ++decayed_tensors;
      EXPECT_NE(plain, wd) << name << " was not decayed";
    }
  }
  EXPECT_EQ(norms, 4 * ck.config.num_hidden_layers + 1);
  EXPECT_GT(decayed_tensors, 0);
}

// ---------------------------------------------------------------------------------------------------------------
// Data

Config tiny() { return preset("gemma2-tiny"); }

std::string write(const TempDir& d, const std::string& name, const std::string& text) {
  spit(d / name, text);
  return d / name;
}

TEST(TrainData, PaddedRowsHaveMaskAndIgnoredLabels) {
  TempDir d;
  const std::string p = write(d, "a.jsonl", "{\"input_ids\": [2, 10, 11, 12]}\n\n{\"input_ids\": [2, 20, 21], \"labels\": [-100, -100, 21]}\n");
  const Dataset ds = load_dataset({p, 6, false}, tiny(), nullptr, nullptr);
  ASSERT_EQ(ds.rows.size(), 2u);
  EXPECT_EQ(ds.examples, 2);
  EXPECT_EQ(ds.rows[0].input_ids, (std::vector<int64_t>{2, 10, 11, 12, 0, 0}));
  EXPECT_EQ(ds.rows[0].labels, (std::vector<int64_t>{2, 10, 11, 12, -100, -100}));
  EXPECT_EQ(ds.rows[0].attention_mask, (std::vector<uint8_t>{1, 1, 1, 1, 0, 0}));
  EXPECT_TRUE(ds.rows[0].position_ids.empty());
  EXPECT_EQ(ds.rows[1].labels, (std::vector<int64_t>{-100, -100, 21, -100, -100, -100}));
  EXPECT_EQ(ds.scored, 3 + 1);
  const Batch b = step_batch(ds, 2, 0, false, 1);
  EXPECT_EQ(b.B, 2);
  EXPECT_FALSE(b.packed());
  validate_batch(tiny(), b, "test");
}

TEST(TrainData, PackedRowsRestartPositionsAndDoNotScoreAcrossExamples) {
  TempDir d;
  const std::string p =
      write(d, "a.jsonl", "{\"input_ids\": [2, 10, 11]}\n{\"input_ids\": [2, 20, 21, 22]}\n{\"input_ids\": [2, 30, 31, 32, 33]}\n");
  const Dataset ds = load_dataset({p, 8, true}, tiny(), nullptr, nullptr);
  ASSERT_EQ(ds.rows.size(), 2u);  // 3 + 4 fit in 8; 5 starts the next row
  EXPECT_EQ(ds.rows[0].input_ids, (std::vector<int64_t>{2, 10, 11, 2, 20, 21, 22, 0}));
  EXPECT_EQ(ds.rows[0].position_ids, (std::vector<int64_t>{0, 1, 2, 0, 1, 2, 3, 0}));
  // The second example's first token is not a target of the first example's last.
  EXPECT_EQ(ds.rows[0].labels, (std::vector<int64_t>{-100, 10, 11, -100, 20, 21, 22, -100}));
  EXPECT_EQ(ds.rows[1].position_ids, (std::vector<int64_t>{0, 1, 2, 3, 4, 0, 1, 2}));
  EXPECT_TRUE(ds.rows[1].attention_mask.empty());
  const Batch b = step_batch(ds, 2, 0, false, 1);
  EXPECT_TRUE(b.packed());
  validate_batch(tiny(), b, "test");
}

// A row's own position_ids (documents packed into one example, positions restarting at 0) are its positions in the
// packed row, so the documents stay apart (Batch::document_ids); TRL's completion_mask unscores the prompt; keys
// train does not use are named in one warning. position_ids without --packing would sit under an attention mask,
// where HF separates nothing: refused, as is an example whose positions do not start at 0 (it would merge with the
// one before it).
TEST(TrainData, RowPositionIdsCompletionMaskAndUnusedKeys) {
  TempDir d;
  const std::string p = write(d, "a.jsonl",
                              "{\"input_ids\": [2, 10, 11, 2, 20], \"position_ids\": [0, 1, 2, 0, 1], \"token_type_ids\": [0, 0, 0, 0, 0]}\n"
                              "{\"input_ids\": [2, 30, 31], \"completion_mask\": [0, 0, 1]}\n");
  std::vector<std::string> warnings;
  const Dataset ds = load_dataset({p, 8, true}, tiny(), nullptr, &warnings);
  ASSERT_EQ(ds.rows.size(), 1u);
  EXPECT_EQ(ds.rows[0].input_ids, (std::vector<int64_t>{2, 10, 11, 2, 20, 2, 30, 31}));
  EXPECT_EQ(ds.rows[0].position_ids, (std::vector<int64_t>{0, 1, 2, 0, 1, 0, 1, 2}));
  // Within the first example the labels are as given (HF scores 11 -> 2 across its own boundary); the second
  // example's first label is -100 as packing makes it, its second by the completion mask.
  EXPECT_EQ(ds.rows[0].labels, (std::vector<int64_t>{-100, 10, 11, 2, 20, -100, -100, 31}));
  const Batch b = step_batch(ds, 1, 0, false, 1);
  EXPECT_EQ(b.document_ids(), (std::vector<int32_t>{0, 0, 0, 1, 1, 2, 2, 2}));
  validate_batch(tiny(), b, "test");
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("'token_type_ids'"), std::string::npos) << warnings[0];
  // Without the packing the same rows are refused, naming the key.
  expect_input_error([&] { load_dataset({p, 8, false}, tiny(), nullptr, nullptr); }, {"a.jsonl:1", "position_ids", "--packing"});
  const std::string late = write(d, "b.jsonl", "{\"input_ids\": [2, 10, 11], \"position_ids\": [5, 6, 7]}\n");
  expect_input_error([&] { load_dataset({late, 8, true}, tiny(), nullptr, nullptr); }, {"b.jsonl:1", "position_ids[0] is 5"});
  const std::string mask2 = write(d, "c.jsonl", "{\"input_ids\": [2, 10, 11], \"completion_mask\": [0, 2, 1]}\n");
  expect_input_error([&] { load_dataset({mask2, 8, false}, tiny(), nullptr, nullptr); }, {"c.jsonl:1", "completion_mask[1] is 2"});
  const std::string text = write(d, "e.jsonl", "{\"text\": \"hello\", \"labels\": [1, 2]}\n");
  expect_input_error([&] { load_dataset({text, 8, false}, tiny(), nullptr, nullptr); }, {"e.jsonl:1", "'labels' belongs to a tokenized row"});
}

// TRL's other per-token columns, each against the row written out as it means (the expected rows are given, not
// computed by the code under test): assistant_masks unscores where it is 0 as completion_mask does (TRL's collator
// sets labels to -100 under either), and seq_lengths are packed documents' lengths, positions restarting at each.
// Both were named as unused and dropped (found by a probe, 2026-12-06), as was an integer beyond int64 read as
// wrapped: a label 2^64 - 100 became -100.
TEST(TrainData, TrlAssistantMasksSeqLengthsAndIntegersBeyondInt64) {
  TempDir d;
  const auto rows_of = [&](const std::string& name, const std::string& text, bool packing) {
    return load_dataset({write(d, name, text), 8, packing}, tiny(), nullptr, nullptr).rows;
  };
  const auto same = [](const std::vector<Row>& a, const std::vector<Row>& b) {
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(a[i].input_ids, b[i].input_ids);
      EXPECT_EQ(a[i].labels, b[i].labels);
      EXPECT_EQ(a[i].position_ids, b[i].position_ids);
      EXPECT_EQ(a[i].attention_mask, b[i].attention_mask);
    }
  };
  same(rows_of("a1.jsonl", "{\"input_ids\": [2, 10, 11, 12], \"assistant_masks\": [0, 0, 1, 1]}\n", false),
       rows_of("a2.jsonl", "{\"input_ids\": [2, 10, 11, 12], \"labels\": [-100, -100, 11, 12]}\n", false));
  same(rows_of("b1.jsonl", "{\"input_ids\": [2, 10, 11, 12], \"completion_mask\": [0, 1, 1, 1], \"assistant_masks\": [1, 1, 0, 1]}\n", false),
       rows_of("b2.jsonl", "{\"input_ids\": [2, 10, 11, 12], \"labels\": [-100, 10, -100, 12]}\n", false));
  same(rows_of("c1.jsonl", "{\"input_ids\": [2, 10, 11, 2, 20], \"seq_lengths\": [3, 2]}\n{\"input_ids\": [2, 30], \"seq_lengths\": [2]}\n", true),
       rows_of("c2.jsonl", "{\"input_ids\": [2, 10, 11, 2, 20], \"position_ids\": [0, 1, 2, 0, 1]}\n{\"input_ids\": [2, 30]}\n", true));
  const std::vector<Row> packed = rows_of("c3.jsonl", "{\"input_ids\": [2, 10, 11, 2, 20], \"seq_lengths\": [3, 2]}\n", true);
  EXPECT_EQ(packed[0].position_ids, (std::vector<int64_t>{0, 1, 2, 0, 1, 0, 1, 2}));
  const auto refused = [&](const std::string& name, const std::string& text, bool packing, std::vector<std::string> says) {
    const std::string p = write(d, name, text);
    says.insert(says.begin(), name + ":1");
    expect_input_error([&] { load_dataset({p, 8, packing}, tiny(), nullptr, nullptr); }, says);
  };
  refused("e1.jsonl", "{\"input_ids\": [2, 10, 11], \"assistant_masks\": [0, 2, 1]}\n", false, {"assistant_masks[1] is 2"});
  refused("e2.jsonl", "{\"input_ids\": [2, 10, 11], \"seq_lengths\": [3]}\n", false, {"seq_lengths", "--packing"});
  refused("e3.jsonl", "{\"input_ids\": [2, 10, 11], \"seq_lengths\": [2, 2]}\n", true, {"seq_lengths add up to more"});
  refused("e4.jsonl", "{\"input_ids\": [2, 10, 11], \"seq_lengths\": [2]}\n", true, {"seq_lengths add up to 2"});
  refused("e5.jsonl", "{\"input_ids\": [2, 10, 11], \"seq_lengths\": [3, 0]}\n", true, {"seq_lengths[1] is 0"});
  refused("e6.jsonl", "{\"input_ids\": [2, 10, 11], \"seq_lengths\": [3], \"position_ids\": [0, 1, 2]}\n", true,
          {"both seq_lengths and position_ids"});
  refused("e7.jsonl", "{\"text\": \"hello\", \"assistant_masks\": [1]}\n", false, {"'assistant_masks' belongs to a tokenized row"});
  refused("e8.jsonl", "{\"input_ids\": [2, 10, 11], \"labels\": [2, 18446744073709551516, 11]}\n", false,
          {"labels[1] is 18446744073709551516, out of range"});
  refused("e9.jsonl", "{\"input_ids\": [2, 18446744073709551615, 11]}\n", false, {"input_ids[1] is 18446744073709551615"});
}

// ---------------------------------------------------------------------------------------------------------------
// lora_dropout (PEFT: result + lora_B(lora_A(dropout(x))) * scaling), in the reference trainer

namespace {
// gemma2-tiny's synthetic weights (seed 3) with r = 2 adapters on all seven projections.
Checkpoint tiny_lora_checkpoint() {
  const Config c = tiny();
  Checkpoint ck;
  ck.config = c;
  ck.weights = synthetic_weights(c, 3);
  ck.adapter = AdapterConfig{};
  ck.adapter->r = 2;
  ck.adapter->lora_alpha = 4;
  ck.adapter->target_modules.assign(kAllProj.begin(), kAllProj.end());
  const TensorMap a = synthetic_adapters(c, *ck.adapter, 3);
  ck.weights.insert(a.begin(), a.end());
  return ck;
}
}  // namespace

// The mask is a draw with probability 1 - p of keeping: over 2^17 draws the kept share is within 5 standard
// deviations of it, and the draws depend on every part of the key.
TEST(TrainDropout, MaskKeepsOneMinusPAndDependsOnEveryKeyPart) {
  const ref::RunOptions::LoraDropout d{0.3, 7, 4, 0};
  int64_t kept = 0, n = 0;
  for (int64_t row = 0; row < 4; ++row)
    for (int64_t t = 0; t < 32; ++t)
      for (int64_t f = 0; f < 1024; ++f, ++n) kept += ref::lora_dropout_keep(d, 1, Proj::v_proj, row, t, f);
  const double share = double(kept) / double(n), sd = std::sqrt(0.3 * 0.7 / double(n));
  EXPECT_NEAR(share, 0.7, 5 * sd);
  auto differs = [&](auto change) {
    int64_t diff = 0;
    for (int64_t f = 0; f < 256; ++f) diff += ref::lora_dropout_keep(d, 1, Proj::v_proj, 2, 3, f) != change(f);
    return diff;
  };
  ref::RunOptions::LoraDropout d2 = d;
  d2.seed = 8;
  EXPECT_GT(differs([&](int64_t f) { return ref::lora_dropout_keep(d2, 1, Proj::v_proj, 2, 3, f); }), 30);
  d2 = d;
  d2.step = 5;
  EXPECT_GT(differs([&](int64_t f) { return ref::lora_dropout_keep(d2, 1, Proj::v_proj, 2, 3, f); }), 30);
  EXPECT_GT(differs([&](int64_t f) { return ref::lora_dropout_keep(d, 0, Proj::v_proj, 2, 3, f); }), 30);
  EXPECT_GT(differs([&](int64_t f) { return ref::lora_dropout_keep(d, 1, Proj::k_proj, 2, 3, f); }), 30);
  EXPECT_GT(differs([&](int64_t f) { return ref::lora_dropout_keep(d, 1, Proj::v_proj, 1, 3, f); }), 30);
  EXPECT_GT(differs([&](int64_t f) { return ref::lora_dropout_keep(d, 1, Proj::v_proj, 2, 4, f); }), 30);
}

// With the masks fixed by their key, the loss is a smooth function of the adapters: the backward through the masked
// adapter inputs (their A gradients and the input gradients they pass down to earlier layers) must equal central
// differences along a direction through every adapter tensor. The synthetic head sits near the final cap, where the
// loss curves hard: central differences at h = 1e-4 were 3.1e-6 off the backward, at 1e-5 3.1e-8, at 1e-6 1.2e-9
// (measured: O(h^2), converging to the backward's value). One Richardson step, (4 D(h/2) - D(h)) / 3, cancels the
// h^2 term; what remains at h = 1e-4 is O(h^4) and the rounding, ~1e-16 x 27 / 1e-4 / 0.7 = 4e-11 relative:
// tolerance 1e-8.
TEST(TrainDropout, GradientsMatchCentralDifferencesWithTheMasksFixed) {
  const Checkpoint ck = tiny_lora_checkpoint();
  const Batch b = synthetic_batch(ck.config, 2, 12, 5, 0.1);
  ref::RunOptions opt;
  opt.softcap = {true, true};
  opt.lora_dropout = {0.4, 11, 3, 0};
  ref::Model<double> m = ref::make_model<double>(ck, opt.numerics.policy);
  ref::Grads<double> g = ref::zero_grads(m);
  const double total = double(b.count_targets());
  ref::forward_backward<double>(m, b, opt, 1.0 / total, &g);
  std::vector<double*> params;
  std::vector<double> dir, grad;
  uint64_t k = 1;
  ref::for_each_trainable(m, g, [&](const std::string&, const Shape&, double* p, const double* gr, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      params.push_back(p + i);
      dir.push_back(stream_uniform(99, k++));
      grad.push_back(gr[i]);
    }
  });
  double analytic = 0;
  for (size_t i = 0; i < dir.size(); ++i) analytic += grad[i] * dir[i];
  const double h = 1e-4;
  auto loss_at = [&](double t, const ref::RunOptions& o) {
    std::vector<double> keep(params.size());
    for (size_t i = 0; i < params.size(); ++i) keep[i] = *params[i], *params[i] += t * dir[i];
    const double l = ref::forward_backward<double>(m, b, o, 1.0 / total, nullptr).loss_sum / total;
    for (size_t i = 0; i < params.size(); ++i) *params[i] = keep[i];
    return l;
  };
  auto central = [&](double step) { return (loss_at(step, opt) - loss_at(-step, opt)) / (2 * step); };
  const double numeric = (4 * central(h / 2) - central(h)) / 3;
  std::printf("directional derivative: backward %.12e, central differences %.12e (rel %.2e)\n", analytic, numeric,
              std::fabs(analytic - numeric) / std::fabs(numeric));
  EXPECT_NEAR(analytic, numeric, 1e-8 * std::fabs(numeric));
  // And dropout is on: the same step without it gives another loss.
  ref::RunOptions off = opt;
  off.lora_dropout.p = 0;
  EXPECT_GT(std::fabs(loss_at(0, opt) - loss_at(0, off)), 1e-9);
}

// The masks are drawn per row of the step's batch: one batch and the same rows in two micro-batches (row_offset
// 0 and 2) train with the same masks, so loss and gradients agree to the float64 rounding of the two groupings.
TEST(TrainDropout, MicroBatchesSeeTheMasksOfTheWholeBatch) {
  const Checkpoint ck = tiny_lora_checkpoint();
  const Batch b = synthetic_batch(ck.config, 4, 10, 6, 0.2);
  ref::RunOptions opt;
  opt.lora_dropout = {0.25, 2, 7, 0};
  const double total = double(b.count_targets());
  auto run = [&](const std::vector<Batch>& micro, bool offsets, std::vector<double>* grads) {
    ref::Model<double> m = ref::make_model<double>(ck, opt.numerics.policy);
    ref::Grads<double> g = ref::zero_grads(m);
    ref::RunOptions o = opt;
    double sum = 0;
    for (const Batch& mb : micro) {
      sum += ref::forward_backward<double>(m, mb, o, 1.0 / total, &g).loss_sum;
      if (offsets) o.lora_dropout.row_offset += mb.B;
    }
    ref::for_each_trainable(m, g, [&](const std::string&, const Shape&, const double*, const double* gr, int64_t n) {
      grads->insert(grads->end(), gr, gr + n);
    });
    return sum / total;
  };
  std::vector<double> g1, g2, g3;
  const double l1 = run({b}, true, &g1), l2 = run(split_batch(b, 2), true, &g2);
  double num = 0, den = 0;
  for (size_t i = 0; i < g1.size(); ++i) num += (g1[i] - g2[i]) * (g1[i] - g2[i]), den += g1[i] * g1[i];
  std::printf("one batch vs two micro-batches: loss %.17g vs %.17g, gradients rel L2 %.2e\n", l1, l2,
              std::sqrt(num / den));
  EXPECT_NEAR(l1, l2, 1e-13 * l1);
  EXPECT_LT(std::sqrt(num / den), 1e-12);
  // Numbering the second micro-batch's rows from 0 instead draws other masks: the test can tell.
  EXPECT_GT(std::fabs(run(split_batch(b, 2), false, &g3) - l1), 1e-9);
}

// The strongest check of packing: a packed batch has the same summed loss and the same gradients as the same
// examples one per padded row (every example sees only itself either way).
TEST(TrainData, PackedEqualsPadded) {
  const Config c = tiny();
  TempDir d;
  std::string text;
  for (int i = 0; i < 5; ++i) {
    json row;
    std::vector<int64_t> ids{2};
    for (int k = 0; k < 4 + 3 * i; ++k) ids.push_back(5 + (i * 37 + k * 11) % 300);
    row["input_ids"] = ids;
    text += row.dump() + "\n";
  }
  const std::string p = write(d, "a.jsonl", text);
  const Dataset padded = load_dataset({p, 24, false}, c, nullptr, nullptr);
  const Dataset packed = load_dataset({p, 24, true}, c, nullptr, nullptr);
  ASSERT_LT(packed.rows.size(), padded.rows.size());
  const Checkpoint ck = tiny_lora_checkpoint();
  ref::RunOptions opt;
  auto run = [&](const Dataset& ds, std::vector<double>* grads) {
    ref::Model<double> m = ref::make_model<double>(ck, opt.numerics.policy);
    ref::Grads<double> g = ref::zero_grads(m);
    double sum = 0;
    for (const Batch& b : all_batches(ds, 8)) sum += ref::forward_backward<double>(m, b, opt, 1.0, &g).loss_sum;
    ref::for_each_trainable(m, g, [&](const std::string&, const Shape&, const double*, const double* gr, int64_t n) {
      grads->insert(grads->end(), gr, gr + n);
    });
    return sum;
  };
  std::vector<double> g1, g2;
  const double l1 = run(padded, &g1), l2 = run(packed, &g2);
  EXPECT_NEAR(l1, l2, 1e-12 * std::fabs(l1));
  double diff = 0, norm = 0;
  for (size_t i = 0; i < g1.size(); ++i) diff += (g1[i] - g2[i]) * (g1[i] - g2[i]), norm += g1[i] * g1[i];
  EXPECT_LT(std::sqrt(diff / norm), 1e-12);
  EXPECT_EQ(padded.scored, packed.scored);
}

TEST(TrainData, EpochOrderIsASeededPermutation) {
  const std::vector<int64_t> a = epoch_order(50, 7, 0, true), b = epoch_order(50, 7, 0, true), c = epoch_order(50, 7, 1, true);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::vector<int64_t> s = a;
  std::sort(s.begin(), s.end());
  for (int64_t i = 0; i < 50; ++i) EXPECT_EQ(s[size_t(i)], i);
  EXPECT_EQ(steps_per_epoch(50, 8), 7);
}

void expect_data_error(const std::string& line, const std::vector<std::string>& needles, const Tokenizer* tok = nullptr) {
  TempDir d;
  const std::string p = write(d, "bad.jsonl", "{\"input_ids\": [2, 3, 4]}\n" + line + "\n");
  std::vector<std::string> n = needles;
  n.push_back(p + ":2: ");
  expect_input_error([&] { load_dataset({p, 8, false}, tiny(), tok, nullptr); }, n);
}

TEST(TrainData, BadLinesAreNamed) {
  expect_data_error("{\"input_ids\": [2, 3", {"not valid JSON"});
  expect_data_error("[1, 2]", {"one JSON object"});
  expect_data_error("{\"input_ids\": [2, 384]}", {"input_ids[1] = 384 is outside the vocabulary [0, 384)"});
  expect_data_error("{\"input_ids\": [2, -1]}", {"outside the vocabulary"});
  expect_data_error("{\"input_ids\": [2, 3.5]}", {"input_ids[1] is 3.5, not an integer"});
  expect_data_error("{\"input_ids\": []}", {"input_ids is empty"});
  expect_data_error("{\"input_ids\": [2, 3], \"labels\": [3]}", {"labels has 1 entries, input_ids 2"});
  expect_data_error("{\"input_ids\": [2, 3], \"labels\": [-100, -7]}", {"labels[1] = -7 is neither -100"});
  expect_data_error("{\"input_ids\": [2, 3], \"labels\": [2, -100]}", {"no token is scored"});
  expect_data_error("{\"input_ids\": [2, 3], \"attention_mask\": [1, 0]}", {"attention_mask[1] is 0"});
  expect_data_error("{\"instruction\": \"hi\", \"output\": \"yo\"}", {"needs a tokenizer"});
  expect_data_error("{\"prompt\": \"hi\"}", {"needs input_ids, text, or instruction and output"});
  expect_data_error("{\"input_ids\": [2, 3], \"text\": \"x\"}", {"give one form per row"});
  // Alpaca's "input" beside "text" was dropped without a word; alone it is an instruction row without an instruction.
  expect_data_error("{\"text\": \"x\", \"input\": \"y\"}", {"has both 'text' and instruction fields"});
  expect_data_error("{\"input\": \"y\"}", {"needs a tokenizer"});
  // A NUL byte ended the JSON parser's input: the line's second record was dropped without a word.
  expect_data_error(std::string("{\"input_ids\": [2, 3]}") + '\0' + "{\"input_ids\": [4, 5]}",
                    {"not valid JSON", "a NUL byte"});
}

// ---------------------------------------------------------------------------------------------------------------
// SentencePiece: a tiny model trained here (no tokenizer is downloaded), with Gemma's special ids.

// `extra`: more spm_train flags (--user_defined_symbols=...).
std::string train_sentencepiece(const TempDir& d, const std::string& extra = "") {
  std::string corpus;
  const char* lines[] = {"Below is an instruction that describes a task.", "Write a response that appropriately completes the request.",
                         "### Instruction:", "### Input:", "### Response:", "Add two and three.", "The answer is five.",
                         "Name a colour of the sky.", "Blue.", "Count to four: one two three four.", "Say hello.", "Hello!"};
  for (int rep = 0; rep < 20; ++rep)
    for (const char* l : lines) corpus += std::string(l) + "\n";
  spit(d / "corpus.txt", corpus);
  const std::string prefix = d / "tok";
  const auto st = sentencepiece::SentencePieceTrainer::Train(
      "--input=" + (d / "corpus.txt") + " --model_prefix=" + prefix +
      " --vocab_size=120 --model_type=bpe --character_coverage=1.0 --pad_id=0 --eos_id=1 --bos_id=2 --unk_id=3"
      " --hard_vocab_limit=false --minloglevel=2" + extra);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return prefix + ".model";
}

// Stanford Alpaca's two prompts, character for character (tatsu-lab/stanford_alpaca, train.py, PROMPT_DICT): they end
// at "### Response:", and the output follows directly. The trainer's ended "### Response:\n" (found by a probe).
TEST(TrainTokenizer, AlpacaPromptsAreStanfordAlpacas) {
  EXPECT_EQ(alpaca_prompt("Add two and three.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nAdd two and three.\n\n### Response:");
  EXPECT_EQ(alpaca_prompt("Add.", "two and three"),
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
            "response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\ntwo and three"
            "\n\n### Response:");
}

// A special token's text inside a row (a chat template rendered to a string starts with "<bos>") was spelled out
// as ordinary pieces, where HF's tokenizer gives the token (found by a probe, 2026-12-05): refused, naming the
// field and the token. Ordinary text with angle brackets is not.
TEST(TrainTokenizer, TextHoldingASpecialTokensTextIsRefused) {
  TempDir d;
  const std::string model = train_sentencepiece(d);
  const auto tok = Tokenizer::load({model, std::nullopt, std::nullopt, std::nullopt}, 384);
  for (const auto& [row, needle] : std::vector<std::pair<std::string, std::string>>{
           {"{\"text\": \"Say </s> hello.\"}", "'text' contains '</s>'"},
           {"{\"instruction\": \"<s>Say hello.\", \"output\": \"Hello!\"}", "'instruction' contains '<s>'"},
           {"{\"instruction\": \"Say hello.\", \"output\": \"Hello!<pad>\"}", "'output' contains '<pad>'"}}) {
    const std::string p = write(d, "s.jsonl", row + "\n");
    try {
      load_dataset({p, 64, false}, tiny(), tok.get(), nullptr);
      ADD_FAILURE() << "accepted: " << row;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
  const std::string ok = write(d, "ok.jsonl", "{\"text\": \"a < b and c > d, <tag>\"}\n");
  EXPECT_EQ(load_dataset({ok, 64, false}, tiny(), tok.get(), nullptr).rows.size(), 1u);
  // Messages that said the wrong thing (the same probe): a null text was "an instruction row needs 'text'", and
  // /dev/null given to --eval-data was "no such file (--data wants a JSONL file)".
  const std::string null_text = write(d, "n.jsonl", "{\"text\": null}\n");
  expect_input_error([&] { load_dataset({null_text, 64, false}, tiny(), tok.get(), nullptr); },
                     {"a text row needs 'text' as a string, not null"});
  expect_input_error([&] { load_dataset({"/dev/null", 64, false, "--eval-data"}, tiny(), tok.get(), nullptr); },
                     {"/dev/null: is not a regular file (--eval-data wants a JSONL file)"});
}

// An added token of tokenizer_config.json that the SentencePiece model lacks ("<extra>" at id 200, as
// tokenizer.add_tokens leaves it) was spelled as characters where HF gives its one id (found by a probe, 2026-12-06):
// a row holding it is refused. One the model has as a user-defined piece of the same id is read as that id, as HF
// reads it. The same piece declared at another id is refused.
TEST(TrainTokenizer, AddedTokensSentencePieceDoesNotReadAsOneIdAreRefused) {
  TempDir d;
  // Gemma's normalization (none, no dummy prefix): with a dummy prefix "<start_of_turn>" alone encodes as "▁" and
  // the piece, two ids, and the token is refused.
  const std::string model = train_sentencepiece(d, " --user_defined_symbols=<start_of_turn> --add_dummy_prefix=false"
                                                   " --normalization_rule_name=identity --remove_extra_whitespaces=false");
  const auto load = [&](const std::string& cfg) {
    return Tokenizer::load({model, write(d, "tokenizer_config.json", cfg), std::nullopt, std::nullopt}, 384);
  };
  const std::string row = write(d, "r.jsonl", "{\"text\": \"Say<start_of_turn>hello <extra> x\"}\n");
  const std::string turn = write(d, "t.jsonl", "{\"text\": \"Say<start_of_turn>hello.\"}\n");
  const auto extra = load(R"({"added_tokens_decoder": {"200": {"content": "<extra>", "special": true}}})");
  expect_input_error([&] { load_dataset({row, 64, false}, tiny(), extra.get(), nullptr); },
                     {"'text' contains '<extra>', an added token (added_tokens_decoder, id 200)"});
  const auto listed = load(R"({"additional_special_tokens": ["<extra>"]})");
  expect_input_error([&] { load_dataset({row, 64, false}, tiny(), listed.get(), nullptr); },
                     {"'text' contains '<extra>', an added token (additional_special_tokens)"});
  const auto mask = load(R"({"mask_token": {"content": "<extra>"}})");
  expect_input_error([&] { load_dataset({row, 64, false}, tiny(), mask.get(), nullptr); },
                     {"'text' contains '<extra>', an added token (mask_token)"});
  expect_input_error([&] { load(R"({"additional_special_tokens": [7]})"); },
                     {"additional_special_tokens has an entry that is neither a string nor an object"});
  const auto own = load(R"({"added_tokens_decoder": {"4": {"content": "<start_of_turn>", "special": true}}})");
  ASSERT_EQ(own->encode("<start_of_turn>"), std::vector<int64_t>{4});  // spm_train puts it after the four specials
  const Dataset ok = load_dataset({turn, 64, false}, tiny(), own.get(), nullptr);
  ASSERT_EQ(ok.rows.size(), 1u);
  EXPECT_EQ(std::count(ok.rows[0].input_ids.begin(), ok.rows[0].input_ids.end(), 4), 1);
  const auto wrong_id = load(R"({"added_tokens_decoder": {"5": {"content": "<start_of_turn>", "special": true}}})");
  expect_input_error([&] { load_dataset({turn, 64, false}, tiny(), wrong_id.get(), nullptr); },
                     {"'text' contains '<start_of_turn>', an added token (added_tokens_decoder, id 5)"});
  expect_input_error([&] { load(R"({"added_tokens_decoder": {"x": {"content": "<extra>"}}})"); },
                     {"added_tokens_decoder key 'x' is not a token id"});
}

// Gemma's model has user-defined runs of newlines ("\n", "\n\n", ...), listed as added tokens. Beside another
// newline both tokenizers read the longer run, so a check of the token next to "\n" refused every row with a blank
// line (found by a review, 2026-12-06): rows with newlines and blank lines load, each run as its one id.
TEST(TrainTokenizer, UserDefinedNewlineRunsAreReadAsTheirIds) {
  TempDir d;
  std::string corpus;
  for (int rep = 0; rep < 20; ++rep) corpus += "Say hello.\nHello!\n\nCount to four: one two three four.\n";
  spit(d / "corpus.txt", corpus);
  const std::string prefix = d / "nl";
  // The map overload: the flag string is split at whitespace, which these pieces are.
  const auto st = sentencepiece::SentencePieceTrainer::Train(std::unordered_map<std::string, std::string>{
      {"input", d / "corpus.txt"}, {"model_prefix", prefix}, {"vocab_size", "100"}, {"model_type", "bpe"},
      {"character_coverage", "1.0"}, {"pad_id", "0"}, {"eos_id", "1"}, {"bos_id", "2"}, {"unk_id", "3"},
      {"hard_vocab_limit", "false"}, {"minloglevel", "2"}, {"add_dummy_prefix", "false"},
      {"normalization_rule_name", "identity"}, {"remove_extra_whitespaces", "false"},
      {"user_defined_symbols", "\n,\n\n,\n\n\n"}});
  ASSERT_TRUE(st.ok()) << st.ToString();
  const auto tok = Tokenizer::load(
      {prefix + ".model",
       write(d, "tokenizer_config.json",
             R"({"added_tokens_decoder": {"4": {"content": "\n"}, "5": {"content": "\n\n"}, "6": {"content": "\n\n\n"}}})"),
       std::nullopt, std::nullopt},
      384);
  ASSERT_EQ(tok->encode("\n\n"), std::vector<int64_t>{5});
  const std::string p = write(d, "r.jsonl", "{\"text\": \"Say hello.\\nHello!\\n\\nOne.\\n\\n\\nTwo\\n\"}\n");
  const Dataset ds = load_dataset({p, 64, false}, tiny(), tok.get(), nullptr);
  ASSERT_EQ(ds.rows.size(), 1u);
  const auto& ids = ds.rows[0].input_ids;
  for (int64_t id : {4, 5, 6}) EXPECT_EQ(std::count(ids.begin(), ids.end(), id), id == 4 ? 2 : 1) << id;
}

// Stanford Alpaca formats "input": null as the text "None" (train.py tests `!= ""`); other loaders read no input.
// It was read as no input without a word (found by a probe, 2026-12-06): refused.
TEST(TrainTokenizer, AlpacaNullInputIsRefused) {
  TempDir d;
  const std::string model = train_sentencepiece(d);
  const auto tok = Tokenizer::load({model, std::nullopt, std::nullopt, std::nullopt}, 384);
  const std::string p = write(d, "a.jsonl", "{\"instruction\": \"Say hello.\", \"input\": null, \"output\": \"Hello!\"}\n");
  expect_input_error([&] { load_dataset({p, 64, false}, tiny(), tok.get(), nullptr); },
                     {"'input' is null, which Stanford Alpaca's recipe formats as the text \"None\""});
  const std::string empty = write(d, "e.jsonl", "{\"instruction\": \"Say hello.\", \"input\": \"\", \"output\": \"Hello!\"}\n");
  EXPECT_EQ(load_dataset({empty, 64, false}, tiny(), tok.get(), nullptr).rows.size(), 1u);
}

TEST(TrainTokenizer, AlpacaRowsMaskThePromptAndEndWithEos) {
  TempDir d;
  const std::string model = train_sentencepiece(d);
  const auto tok = Tokenizer::load({model, std::nullopt, std::nullopt, std::nullopt}, 384);
  EXPECT_EQ(tok->bos_id, 2);
  EXPECT_EQ(tok->eos_id, 1);
  const std::string p = write(d, "a.jsonl",
                              "{\"instruction\": \"Add two and three.\", \"output\": \"The answer is five.\"}\n"
                              "{\"instruction\": \"Say hello.\", \"input\": \"\", \"output\": \"Hello!\"}\n"
                              "{\"text\": \"Blue.\"}\n");
  const Dataset ds = load_dataset({p, 128, false}, tiny(), tok.get(), nullptr);
  ASSERT_EQ(ds.rows.size(), 3u);
  const Row& r = ds.rows[0];
  const std::vector<int64_t> prompt = tok->encode(alpaca_prompt("Add two and three.", ""));
  const std::vector<int64_t> full = tok->encode(alpaca_prompt("Add two and three.", "") + "The answer is five.");
  const size_t n = 1 + full.size() + 1;  // BOS + text + EOS
  EXPECT_EQ(r.input_ids[0], 2);
  EXPECT_EQ(r.input_ids[n - 1], 1);
  for (size_t i = 0; i < n; ++i) {
    const bool in_prompt = i < 1 + prompt.size();
    EXPECT_EQ(r.labels[i], in_prompt ? kIgnoreIndex : r.input_ids[i]) << i;
  }
  EXPECT_EQ(r.attention_mask[n - 1], 1);
  EXPECT_EQ(r.attention_mask[n], 0);
  // A plain text row: every token scored, BOS ... EOS.
  EXPECT_EQ(ds.rows[2].labels[0], 2);
  // tokenizer_config.json's tokens and add_bos_token win over the model's ids; --bos-id over both.
  spit(d / "tokenizer_config.json", "{\"add_bos_token\": false, \"eos_token\": {\"content\": \"<s>\"}}");
  const auto t2 = Tokenizer::load({model, d / "tokenizer_config.json", std::nullopt, std::nullopt}, 384);
  EXPECT_FALSE(t2->add_bos_token);
  EXPECT_EQ(t2->eos_id, 2);
  // --bos-id where add_bos_token is false would change nothing: refused.
  expect_input_error([&] { Tokenizer::load({model, d / "tokenizer_config.json", int64_t(5), std::nullopt}, 384); },
                     {"--bos-id", "changes nothing: add_bos_token is false"});
  spit(d / "tokenizer_config.json", "{\"eos_token\": {\"content\": \"<s>\"}}");
  const auto t3 = Tokenizer::load({model, d / "tokenizer_config.json", int64_t(5), std::nullopt}, 384);
  EXPECT_EQ(t3->bos_id, 5);
  EXPECT_TRUE(t3->warnings.empty());
  // Keys not read were dropped without a word (found by a probe, 2026-12-05): those not known to leave the ids
  // alone are named in one warning; the chat template (never applied) and the like are not.
  spit(d / "tc.json", "{\"eos_token\": \"</s>\", \"chat_template\": \"{{ x }}\", \"legacy\": false, \"add_prefix_space\": true}");
  const auto t4 = Tokenizer::load({model, d / "tc.json", std::nullopt, std::nullopt}, 384);
  ASSERT_EQ(t4->warnings.size(), 1u);
  EXPECT_NE(t4->warnings[0].find("not read: 'add_prefix_space', 'legacy'"), std::string::npos) << t4->warnings[0];
  EXPECT_EQ(t4->warnings[0].find("chat_template"), std::string::npos) << t4->warnings[0];
  expect_input_error([&] { Tokenizer::load({model, std::nullopt, std::nullopt, std::nullopt}, 50); }, {"pieces, more than"});
  expect_input_error([&] { Tokenizer::load({model, std::nullopt, int64_t(400), std::nullopt}, 384); }, {"--bos-id", "400"});
  // A flag's id out of range is said to be so; "give --bos-id" is advice for an id the tokenizer supplied (a probe
  // saw it answer --bos-id -1).
  for (const auto& [bos, eos, flag] : {std::tuple{int64_t(-1), std::optional<int64_t>(), "--bos-id"},
                                       std::tuple{int64_t(2), std::optional<int64_t>(-1), "--eos-id"}}) {
    try {
      Tokenizer::load({model, std::nullopt, bos, eos}, 384);
      ADD_FAILURE() << flag << " -1 was accepted";
    } catch (const InputError& e) {
      const std::string m = e.what();
      EXPECT_EQ(m.rfind(std::string(flag) + ": -1 is out of range: not in the vocabulary [0, 384)", 0), 0u) << m;
      EXPECT_EQ(m.find("give"), std::string::npos) << m;
    }
  }
  spit(d / "bad.model", "not a model");
  expect_input_error([&] { Tokenizer::load({d / "bad.model", std::nullopt, std::nullopt, std::nullopt}, 384); },
                     {"not a SentencePiece model"});
  // add_eos_token: false is the recipe's own one EOS; true (a second EOS, or the same one?) is refused, not read past.
  spit(d / "eos.json", "{\"add_eos_token\": false}");
  EXPECT_NO_THROW(Tokenizer::load({model, d / "eos.json", std::nullopt, std::nullopt}, 384));
  spit(d / "eos.json", "{\"add_eos_token\": true}");
  expect_input_error([&] { Tokenizer::load({model, d / "eos.json", std::nullopt, std::nullopt}, 384); },
                     {"eos.json", "add_eos_token = true is not implemented"});
  spit(d / "eos.json", "{\"add_eos_token\": \"yes\"}");
  expect_input_error([&] { Tokenizer::load({model, d / "eos.json", std::nullopt, std::nullopt}, 384); },
                     {"add_eos_token is not true or false"});
}

// ---------------------------------------------------------------------------------------------------------------
// The binary: adapters out and back in, resume, full weights, refusals

// A base checkpoint on disk (config.json + model.safetensors) with gemma2-tiny's synthetic weights.
std::string write_base(const TempDir& d) {
  const Config c = tiny();
  fs::create_directories(d / "base");
  spit(d / "base/config.json", to_config_json(c));
  write_safetensors(d / "base/model.safetensors", synthetic_weights(c, 5));
  return d / "base";
}

std::vector<std::string> common_args(const std::string& base) {
  return {"--config", base + "/config.json", "--weights", base, "--data", kExamples + "/tiny.jsonl", "--seq-len", "32",
          "--batch", "4", "--micro-batches", "2", "--lr", "1e-2", "--warmup-steps", "2", "--max-grad-norm", "0.5",
          "--seed", "11"};
}

std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(TrainBinary, AdapterLoadsBackThroughTheReaderBitExactly) {
  TempDir d;
  const std::string base = write_base(d);
  const ToolRun r = run_tool(kTrain, common_args(base) + std::vector<std::string>{"--lora-r", "4", "--max-steps", "3",
                                                                                   "--save-adapter", d / "out", "--log", d / "log.json"}, d);
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  // PEFT's file names, tensor names and config keys.
  const TensorMap raw = read_safetensors(d / "out/adapter_model.safetensors");
  ASSERT_TRUE(raw.count("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
  ASSERT_TRUE(raw.count("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
  for (const auto& [n, t] : raw) EXPECT_EQ(t.dtype, DType::f32) << n;
  const json cfg = json::parse(slurp(d / "out/adapter_config.json"));
  EXPECT_EQ(cfg["peft_type"], "LORA");
  EXPECT_EQ(cfg["task_type"], "CAUSAL_LM");
  EXPECT_EQ(cfg["r"], 4);
  EXPECT_EQ(cfg["lora_alpha"], 8.0);
  EXPECT_EQ(cfg["bias"], "none");
  EXPECT_EQ(cfg["use_rslora"], false);
  EXPECT_EQ(cfg["target_modules"].size(), 7u);
  // The project's reader takes it back without a warning, and the tensors are the trained float64 values rounded
  // to float32, bit for bit.
  const Checkpoint ck = load_hf_checkpoint(base + "/config.json", base, d / "out", std::nullopt);
  EXPECT_TRUE(ck.warnings.empty()) << ck.warnings.front();
  ASSERT_TRUE(ck.adapter);
  EXPECT_EQ(ck.adapter->r, 4);
  EXPECT_EQ(ck.adapter->scaling(), 2.0);
  const TensorMap st = read_safetensors(d / "out/training_state.safetensors");
  int64_t n = 0;
  for (const auto& [name, t] : ck.weights) {
    if (name.find("lora_") == std::string::npos) continue;
    const std::vector<double> exact = st.at(name).to_double();
    std::vector<double> loaded = t.to_double();
    ASSERT_EQ(exact.size(), loaded.size());
    for (size_t i = 0; i < exact.size(); ++i) ASSERT_EQ(loaded[i], double(float(exact[i]))) << name << "[" << i << "]";
    ++n;
  }
  EXPECT_EQ(n, 2 * 7 * tiny().num_hidden_layers);
  // The log has HF's fields per step.
  const json log = json::parse(slurp(d / "log.json"));
  ASSERT_EQ(log["steps"].size(), 3u);
  EXPECT_EQ(log["steps"][0]["learning_rate"], 0.0);
  EXPECT_GT(log["steps"][1]["grad_norm"].get<double>(), 0.0);
  // And training goes on from the saved adapter (--adapter DIR).
  const ToolRun r2 = run_tool(kTrain, common_args(base) + std::vector<std::string>{"--adapter", d / "out", "--max-steps", "1"}, d);
  EXPECT_EQ(r2.status, 0) << r2.err;
}

// --layers N on a checkpoint trains an N-layer model. Its adapter named the full checkpoint as its base (PEFT would
// run every layer, the missing ones' lora_B at 0) with target_modules on all layers: another model than the one
// trained. It is refused unless --save-base writes the N-layer base beside it, which the adapter then names.
TEST(TrainBinary, AnAdapterOfFewerLayersNamesTheBaseItBelongsTo) {
  TempDir d;
  const std::string base = write_base(d);
  const auto args = common_args(base) + std::vector<std::string>{"--lora-r", "4", "--max-steps", "1", "--layers", "1"};
  expect_rejected(run_tool(kTrain, args + std::vector<std::string>{"--output-dir", d / "out"}, d), "train",
                  {"--layers: 1 of the checkpoint's 2 layers", "--save-base"});
  EXPECT_FALSE(fs::exists(d / "out"));
  const ToolRun r =
      run_tool(kTrain, args + std::vector<std::string>{"--output-dir", d / "out", "--save-base", d / "base1"}, d);
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  EXPECT_EQ(json::parse(slurp(d / "out/adapter_config.json"))["base_model_name_or_path"], d / "base1");
  // Adapter and base load together, as HF + PEFT would load them.
  const Checkpoint ck = load_hf_checkpoint(d / "base1/config.json", d / "base1", d / "out", std::nullopt);
  EXPECT_EQ(ck.config.num_hidden_layers, 1);
  // Without --layers, or with all of them, the adapter's base is the checkpoint itself.
  const ToolRun all = run_tool(kTrain, common_args(base) + std::vector<std::string>{"--lora-r", "4", "--max-steps", "1",
                                                                                     "--layers", "2", "--output-dir", d / "out2"}, d);
  ASSERT_EQ(all.status, 0) << all.err;
  EXPECT_EQ(json::parse(slurp(d / "out2/adapter_config.json"))["base_model_name_or_path"], base);
  // With --save-base the adapter names the base written beside it whatever the depth: a preset was named
  // "preset:gemma2-tiny", and a cap turned off is null in that base's config.json only (found by a probe).
  const ToolRun pre = run_tool(kTrain, {"--model", "gemma2-tiny", "--lora-r", "2", "--max-steps", "1", "--softcap", "attn",
                                        "--output-dir", d / "out3", "--save-base", d / "base3"}, d);
  ASSERT_EQ(pre.status, 0) << pre.err;
  EXPECT_EQ(json::parse(slurp(d / "out3/adapter_config.json"))["base_model_name_or_path"], d / "base3");
  EXPECT_TRUE(json::parse(slurp(d / "base3/config.json"))["final_logit_softcapping"].is_null());
  EXPECT_EQ(pre.err.find("load it on a base whose config sets that cap to null"), std::string::npos) << pre.err;
}

// The log's per-step "tokens" are the step's real tokens, packed or padded: over one epoch they sum to the data
// line's count. A packed row's tail of pad tokens (no attention mask marks it) was counted: 736 against 548.
TEST(TrainBinary, StepTokensLeaveOutPaddingPackedOrNot) {
  TempDir d;
  for (const bool packing : {false, true}) {
    std::vector<std::string> args = {"--model", "gemma2-tiny", "--lora-r", "4", "--data", kExamples + "/tiny.jsonl",
                                     "--seq-len", "32", "--batch", "4", "--epochs", "1", "--log", d / "log.json"};
    if (packing) args.push_back("--packing");
    const ToolRun r = run_tool(kTrain, args, d);
    ASSERT_EQ(r.status, 0) << r.err;
    const size_t at = r.out.find(" real tokens");
    ASSERT_NE(at, std::string::npos) << r.out;
    const int64_t data_tokens = std::stoll(r.out.substr(r.out.rfind(' ', at - 1) + 1));
    const json log = json::parse(slurp(d / "log.json"));
    int64_t sum = 0;
    for (const json& step : log["steps"]) sum += step["tokens"].get<int64_t>();
    EXPECT_EQ(sum, data_tokens) << (packing ? "packed" : "padded");
  }
}

// k steps, a stop, --resume, n - k steps: the same bits as n steps without a stop. Data over two epochs
// (reshuffled), warmup and linear decay, clipping that bites, two micro-batches, packing.
TEST(TrainBinary, ResumeIsBitExact) {
  TempDir d;
  const std::string base = write_base(d);
  const std::vector<std::string> args =
      common_args(base) + std::vector<std::string>{"--lora-r", "4", "--max-steps", "7", "--packing", "--weight-decay", "0.01"};
  const ToolRun full = run_tool(kTrain, args + std::vector<std::string>{"--output-dir", d / "full", "--save-steps", "3"}, d);
  ASSERT_EQ(full.status, 0) << full.err << full.out;
  ASSERT_TRUE(fs::exists(d / "full/checkpoint-3/trainer_state.json"));
  ASSERT_TRUE(fs::exists(d / "full/checkpoint-6/training_state.safetensors"));
  const json st3 = json::parse(slurp(d / "full/checkpoint-3/trainer_state.json"));
  EXPECT_EQ(st3["global_step"], 3);
  const ToolRun resumed =
      run_tool(kTrain, args + std::vector<std::string>{"--output-dir", d / "resumed", "--resume", d / "full/checkpoint-3"}, d);
  ASSERT_EQ(resumed.status, 0) << resumed.err << resumed.out;
  // Compared as booleans: a failure would otherwise print 200 kB of bytes.
  EXPECT_TRUE(slurp(d / "full/training_state.safetensors") == slurp(d / "resumed/training_state.safetensors"))
      << "the float64 state after 7 steps differs with a stop after 3";
  EXPECT_TRUE(slurp(d / "full/adapter_model.safetensors") == slurp(d / "resumed/adapter_model.safetensors"))
      << "the saved adapter after 7 steps differs with a stop after 3";
  const json a = json::parse(slurp(d / "full/trainer_state.json")), b = json::parse(slurp(d / "resumed/trainer_state.json"));
  ASSERT_EQ(a["log_history"].size(), 7u);
  ASSERT_EQ(b["log_history"].size(), 7u);
  for (size_t i = 0; i < 7; ++i) {
    EXPECT_EQ(a["log_history"][i]["loss"].get<double>(), b["log_history"][i]["loss"].get<double>()) << i;
    EXPECT_EQ(a["log_history"][i]["grad_norm"].get<double>(), b["log_history"][i]["grad_norm"].get<double>()) << i;
  }
  // Clipping bit at some step (so the test covers it), and the data ran into a second epoch.
  bool clipped = false;
  for (const json& e : a["log_history"]) clipped |= e["grad_norm"].get<double>() > 0.5;
  EXPECT_TRUE(clipped);
  EXPECT_GT(a["epoch"].get<double>(), 1.0);

  // Another learning rate is another run: refused, naming the setting.
  std::vector<std::string> other = args;
  other[std::find(other.begin(), other.end(), "--lr") - other.begin() + 1] = "2e-2";
  expect_rejected(run_tool(kTrain, other + std::vector<std::string>{"--resume", d / "full/checkpoint-3"}, d), "train",
                  {"learning_rate was 0.01 in the saved run"});
  // Another model at the same path is another run: its config.json edited in place (a cap changed), or a base
  // weight changed, is refused (once resumed without a word: the config was recorded by its path only).
  const std::string cfg = slurp(base + "/config.json");
  Config c2 = tiny();
  c2.final_logit_softcapping = 3.0;
  spit(base + "/config.json", to_config_json(c2));
  expect_rejected(run_tool(kTrain, args + std::vector<std::string>{"--resume", d / "full/checkpoint-3"}, d), "train",
                  {"model was", "in the saved run"});
  spit(base + "/config.json", cfg);
  TensorMap w2 = synthetic_weights(tiny(), 5);
  w2.at("model.norm.weight") = synthetic_weights(tiny(), 6).at("model.norm.weight");
  write_safetensors(base + "/model.safetensors", w2);
  expect_rejected(run_tool(kTrain, args + std::vector<std::string>{"--resume", d / "full/checkpoint-3"}, d), "train",
                  {"model was", "base_weights"});
  write_safetensors(base + "/model.safetensors", synthetic_weights(tiny(), 5));
  // A modified save is refused.
  spit(d / "full/checkpoint-6/adapter_config.json", "{}");
  expect_rejected(run_tool(kTrain, args + std::vector<std::string>{"--resume", d / "full/checkpoint-6"}, d), "train",
                  {"adapter_config.json: does not match the sha256"});
}

TEST(TrainBinary, FullWeightTrainingWritesAnHFCheckpoint) {
  TempDir d;
  const std::string base = write_base(d);
  const ToolRun r = run_tool(kTrain, common_args(base) + std::vector<std::string>{"--max-steps", "2", "--output-dir", d / "out"}, d);
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  ASSERT_TRUE(fs::exists(d / "out/config.json"));
  EXPECT_FALSE(fs::exists(d / "out/adapter_config.json"));
  const Checkpoint ck = load_hf_checkpoint(d / "out/config.json", d / "out", std::nullopt, std::nullopt);
  EXPECT_FALSE(ck.adapter);
  const TensorMap st = read_safetensors(d / "out/training_state.safetensors");
  const std::vector<double> e = st.at(kEmbedName).to_double(), l = ck.weights.at(kEmbedName).to_double();
  for (size_t i = 0; i < e.size(); ++i) ASSERT_EQ(l[i], double(float(e[i])));
  expect_rejected(run_tool(kTrain, common_args(base) + std::vector<std::string>{"--save-adapter", d / "x"}, d), "train",
                  {"--save-adapter", "use --output-dir"});
}

// --softcap turning a cap off once left it on in the config.json train wrote (--save-base, a full-weight
// --output-dir): HF loading the result computed another model than the one trained.
TEST(TrainBinary, ACapTurnedOffIsOffInTheConfigsWritten) {
  TempDir d;
  const std::string base = write_base(d);
  const ToolRun r = run_tool(kTrain, common_args(base) + std::vector<std::string>{"--max-steps", "1", "--softcap", "logits",
                                                                                   "--output-dir", d / "out",
                                                                                   "--save-base", d / "saved"},
                             d);
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  for (const std::string& f : {d / "out/config.json", d / "saved/config.json"}) {
    const Config c = parse_config_json(slurp(f), f, nullptr);
    EXPECT_FALSE(c.attn_logit_softcapping) << f;
    EXPECT_TRUE(c.final_logit_softcapping) << f;
  }
  // An adapter cannot carry it: saving one says so.
  const ToolRun a = run_tool(kTrain, common_args(base) + std::vector<std::string>{"--max-steps", "1", "--softcap", "none",
                                                                                   "--lora-r", "2", "--save-adapter",
                                                                                   d / "ad"},
                             d);
  ASSERT_EQ(a.status, 0) << a.err << a.out;
  EXPECT_NE(a.err.find("--softcap none: the adapter is trained with a cap off"), std::string::npos) << a.err;
}

TEST(TrainBinary, TextRowsWithTheShippedTokenizer) {
  TempDir d;
  const ToolRun r = run_tool(kTrain, {"--model", "gemma2-tiny", "--data", kExamples + "/alpaca-tiny.jsonl", "--tokenizer",
                                      kExamples + "/tiny-tokenizer.model", "--seq-len", "96", "--batch", "2", "--epochs", "1",
                                      "--report", d / "r.html"},
                             d);
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  EXPECT_NE(r.out.find("padded"), std::string::npos) << r.out;
  const std::string html = slurp(d / "r.html");
  EXPECT_NE(html.find("<svg"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("src="), std::string::npos);
  EXPECT_EQ(html.find("href="), std::string::npos);
}

// The seed's softcapping experiment as one command: the four combinations on the same rows, one log, one report.
TEST(TrainBinary, SoftcapAllTrainsTheFourCombinationsIntoOneReport) {
  TempDir d;
  const ToolRun r = run_tool(kTrain, {"--model", "gemma2-tiny", "--data", kExamples + "/tiny.jsonl", "--seq-len", "32",
                                      "--batch", "4", "--max-steps", "3", "--softcap", "all", "--log", d / "all.json",
                                      "--report", d / "all.html"},
                             d);
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  const json log = json::parse(slurp(d / "all.json"));
  std::map<std::string, double> last;
  for (const char* sc : {"none", "attn", "logits", "attn,logits"}) {
    ASSERT_TRUE(log["runs"].contains(sc)) << sc;
    ASSERT_EQ(log["runs"][sc].size(), 3u) << sc;
    last[sc] = log["runs"][sc][2]["loss"];
  }
  // gemma2-tiny's synthetic head puts the logits near the final cap, so that cap changes the loss at once; the
  // attention cap moves it too, less.
  EXPECT_NE(last["none"], last["logits"]);
  EXPECT_NE(last["none"], last["attn"]);
  EXPECT_NE(last["logits"], last["attn,logits"]);
  const std::string html = slurp(d / "all.html");
  for (const char* label : {"softcap none", "softcap attn", "softcap logits", "softcap attn,logits"})
    EXPECT_NE(html.find(label), std::string::npos) << label;
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--softcap", "all", "--save-adapter", d / "x"}, d), "train",
                  {"--softcap all", "one combination at a time"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--softcap", "all", "--backend", "both"}, d), "train",
                  {"--softcap all", "runs one backend"});
}

// The report as a browser shows it: Debian's Chromium, headless, takes a screenshot, and the picture must hold the
// curves (pixels of the first series' blue, #0072b2 with antialiasing) and text (dark pixels). A page that did not
// render (broken markup, an SVG the browser rejects) leaves neither; the same check on the page with its SVG
// elements renamed finds no blue. Skips, saying why, without chromium.
namespace {
struct Pixels {
  int64_t blue = 0, dark = 0;
  uint32_t width = 0, height = 0;
};
Pixels screenshot_pixels(const std::string& html, const TempDir& d) {
  const std::string png = d / "shot.png";
  std::filesystem::remove(png);
  const ToolRun r = run_tool("/usr/bin/chromium", {"--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                                   "--window-size=1200,1600", "--screenshot=" + png, "file://" + html},
                             d);
  EXPECT_EQ(r.status, 0) << r.err;
  png_image img{};
  img.version = PNG_IMAGE_VERSION;
  Pixels p;
  if (!png_image_begin_read_from_file(&img, png.c_str())) {
    ADD_FAILURE() << "no screenshot: " << img.message;
    return p;
  }
  img.format = PNG_FORMAT_RGB;
  std::vector<uint8_t> rgb(PNG_IMAGE_SIZE(img));
  EXPECT_TRUE(png_image_finish_read(&img, nullptr, rgb.data(), 0, nullptr)) << img.message;
  p.width = img.width, p.height = img.height;
  for (size_t i = 0; i + 2 < rgb.size(); i += 3) {
    const int r8 = rgb[i], g8 = rgb[i + 1], b8 = rgb[i + 2];
    p.blue += b8 > 120 && b8 > r8 + 80 && b8 > g8 + 20;
    p.dark += r8 < 80 && g8 < 80 && b8 < 80;
  }
  return p;
}
}  // namespace

TEST(TrainReport, RendersInHeadlessChromium) {
  if (!std::filesystem::exists("/usr/bin/chromium")) GTEST_SKIP() << "no /usr/bin/chromium (Debian package chromium)";
  TempDir d;
  const ToolRun r = run_tool(kTrain, {"--model", "gemma2-tiny", "--data", kExamples + "/tiny.jsonl", "--seq-len", "32",
                                      "--batch", "4", "--max-steps", "4", "--report", d / "r.html"},
                             d);
  ASSERT_EQ(r.status, 0) << r.err;
  const Pixels good = screenshot_pixels(d / "r.html", d);
  std::printf("screenshot %ux%u: %lld curve pixels, %lld text pixels\n", good.width, good.height, (long long)good.blue,
              (long long)good.dark);
  EXPECT_EQ(good.width, 1200u);
  // Three plots of one series each, polylines across ~440 px plus markers: thousands of blue pixels (measured
  // 2026-11-30: see the printout); text and axes: more dark ones.
  EXPECT_GT(good.blue, 1000);
  EXPECT_GT(good.dark, 2000);
  std::string html = slurp(d / "r.html");
  for (size_t at = 0; (at = html.find("<svg", at)) != std::string::npos;) html.replace(at, 4, "<xvg");
  spit(d / "broken.html", html);
  const Pixels broken = screenshot_pixels(d / "broken.html", d);
  EXPECT_LT(broken.blue, 50) << "with no SVG element the curves cannot be drawn";
}

TEST(TrainBinary, BadDataAndOptionsExit2) {
  TempDir d;
  spit(d / "bad.jsonl", "{\"input_ids\": [2, 3, 4]}\n{\"input_ids\": [2, 999]}\n");
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--data", d / "bad.jsonl"}, d), "train",
                  {d / "bad.jsonl" + ":2: input_ids[1] = 999 is outside the vocabulary"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--data", d / "none.jsonl"}, d), "train", {"none.jsonl: no such file"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--lr-scheduler", "polynomial"}, d), "train",
                  {"--lr-scheduler: 'polynomial' is not one of"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--lr-scheduler", "constant", "--warmup-steps", "3"}, d), "train",
                  {"--warmup-steps", "constant_with_warmup"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--max-grad-norm", "-1"}, d), "train", {"--max-grad-norm"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--epochs", "2"}, d), "train", {"--epochs", "synthetic"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--packing"}, d), "train", {"--packing", "give one"});
  // --max-steps 0 only evaluates: the flags of training were accepted and changed nothing (found by a probe,
  // 2026-12-06: exit 0, the same eval_loss with --lr 5 and without). Refused, each naming itself; --seed with it is
  // refused only where nothing synthetic is drawn.
  const std::vector<std::string> eval_only = {"--model", "gemma2-tiny", "--lora-r", "2", "--max-steps", "0",
                                              "--eval-data", kExamples + "/tiny.jsonl", "--seq-len", "32"};
  for (const std::vector<std::string>& f : std::vector<std::vector<std::string>>{
           {"--lr", "5"}, {"--batch", "4"}, {"--micro-batches", "2"}, {"--data", kExamples + "/tiny.jsonl"},
           {"--adam-beta1", "0.5"}, {"--weight-decay", "0.3"}, {"--lr-scheduler", "cosine"}, {"--warmup-steps", "3"},
           {"--max-grad-norm", "0.5"}, {"--adam-beta2", "0.9"}, {"--adam-epsilon", "1"}})
    expect_rejected(run_tool(kTrain, eval_only + f, d), "train", {f[0] + ": changes nothing with --max-steps 0"});
  const ToolRun seeded = run_tool(kTrain, eval_only + std::vector<std::string>{"--seed", "5"}, d);
  EXPECT_EQ(seeded.status, 0) << seeded.err;  // the preset's synthetic weights follow the seed
  // --eval-data's rows packed, with no --data (rows with their own position_ids need it; found by a review).
  const ToolRun packed = run_tool(kTrain, eval_only + std::vector<std::string>{"--packing"}, d);
  EXPECT_EQ(packed.status, 0) << packed.err;
  const std::string base = write_base(d);
  const std::vector<std::string> on_checkpoint = {"--config", base + "/config.json", "--weights", base, "--max-steps",
                                                  "0", "--eval-data", kExamples + "/tiny.jsonl", "--seq-len", "32",
                                                  "--seed", "5"};
  expect_rejected(run_tool(kTrain, on_checkpoint, d), "train", {"--seed: changes nothing with --max-steps 0 here"});
  const ToolRun adapters = run_tool(kTrain, on_checkpoint + std::vector<std::string>{"--lora-r", "2"}, d);
  EXPECT_EQ(adapters.status, 0) << adapters.err;  // synthetic adapters follow the seed
  // The tokenizer's flags act only on text rows: each is refused where it would change nothing, naming itself.
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--bos-id", "5"}, d), "train", {"--bos-id", "give --data"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--data", kExamples + "/tiny.jsonl", "--eos-id", "7"}, d),
                  "train", {"--eos-id", "give --tokenizer"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--data", kExamples + "/tiny.jsonl", "--tokenizer",
                                    kExamples + "/tiny-tokenizer.model"}, d),
                  "train", {"--tokenizer", "tokenized already"});
  // The fast backend's activation-memory modes: not for the reference, and not in the combinations the engine
  // has no layout for (checked before any GPU is looked for).
  for (const char* flag : {"--no-recompute", "--recompute-mlp-only", "--offload"})
    expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", flag}, d), "train", {flag, "the fast backend"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--recompute-num-layers", "1"}, d), "train",
                  {"--recompute-num-layers", "the fast backend"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--backend", "fast", "--recompute-num-layers", "1",
                                    "--no-recompute"}, d),
                  "train", {"--recompute-num-layers", "--no-recompute turns it off"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--backend", "fast", "--recompute-num-layers", "-1"}, d),
                  "train", {"--recompute-num-layers", "'-1' is neither a number of layers (0 or more) nor auto"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--backend", "fast", "--recompute-num-layers", "some"}, d),
                  "train", {"--recompute-num-layers", "'some' is neither a number of layers (0 or more) nor auto"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--backend", "fast", "--recompute-num-layers", "+3"}, d),
                  "train", {"--recompute-num-layers", "'+3' is neither"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--backend", "fast", "--recompute-num-layers", "auto",
                                    "--no-recompute"}, d),
                  "train", {"--recompute-num-layers", "--no-recompute turns it off"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--backend", "fast", "--recompute-mlp-only", "--offload"}, d),
                  "train", {"--recompute-mlp-only", "one or the other"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--backend", "fast", "--recompute-mlp-only", "--no-recompute"}, d),
                  "train", {"--recompute-mlp-only", "--no-recompute turns it off"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--backend", "fast", "--offload", "--no-recompute"}, d),
                  "train", {"--offload", "there are none"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--save-steps", "2"}, d), "train", {"--save-steps"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--resume", d / "nothing"}, d), "train", {"no such directory"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--data", kExamples + "/alpaca-tiny.jsonl"}, d), "train",
                  {"alpaca-tiny.jsonl:1: a text row needs a tokenizer"});
}

TEST(TrainReport, PlotsEverySeries) {
  const json a = json::array({{{"step", 1}, {"loss", 5.0}, {"learning_rate", 0.0}, {"grad_norm", 2.0}},
                              {{"step", 2}, {"loss", 4.0}, {"learning_rate", 1e-3}, {"grad_norm", 1.0}}});
  const json b = json::array({{{"step", 1}, {"loss", 5.1}}, {{"step", 2}, {"loss", 4.2}}});
  const std::string h = html_report("t <x>", {{"reference", a}, {"fast", b}}, {{"lr", 1e-3}});
  EXPECT_NE(h.find("t &lt;x&gt;"), std::string::npos);
  EXPECT_EQ(std::count(h.begin(), h.end(), '\n') > 3, true);
  size_t svgs = 0;
  for (size_t p = h.find("<svg"); p != std::string::npos; p = h.find("<svg", p + 1)) ++svgs;
  EXPECT_EQ(svgs, 3u);
  EXPECT_NE(h.find(">fast<"), std::string::npos);
}

}  // namespace
