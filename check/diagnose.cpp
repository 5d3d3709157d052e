#include "check/diagnose.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>

#include "model/nf4.hpp"
#include "model/bugs.hpp"
#include "model/errors.hpp"
#include "model/synthetic.hpp"
#include "reference/gemma2.hpp"
#include "check/compare.hpp"
#include "check/report.hpp"
#include "check/setting.hpp"

namespace gemma::check {

namespace {

// The model and batch every variant runs on, so that differences come from the variant alone.
struct Setting {
  Checkpoint ck;
  std::vector<Batch> micro;  // one optimizer step's micro-batches
  Batch whole;               // the same sequences as one batch
  Tensor pad_rows;           // LM-head padding rows (zeros), P x D
  int64_t position_offset = 0;
  std::vector<std::string> notes;
  // With --quantize: the weights before quantization, from which the trained-like setting is made and then
  // quantized in turn (QLoRA quantizes the pretrained base as it is, as verify's order has it).
  std::optional<TensorMap> unquantized;
};

struct Outcome {
  double loss = 0;
  std::vector<double> grads;        // every trainable tensor, concatenated in state-dict order
  std::vector<std::string> names;   // those tensors' names
  std::vector<size_t> offsets;      // tensor i is grads[offsets[i], offsets[i + 1])
  std::vector<double> logits;       // capped logits of every position, micro-batch after micro-batch
  std::vector<double> gate_mean, gate_std;  // per layer, over the whole step: the GELU's inputs
};

Outcome run_once(const Setting& s, ref::RunOptions opt) {
  opt.position_offset = s.position_offset;
  ref::Model<double> m = ref::make_model<double>(s.ck, opt.numerics.policy);
  m.train_norms = !m.train_all;  // norm-weight gradients are what the rmsnorm-no-weight-grad bug drops
  if (s.pad_rows.numel() > 0) ref::pad_vocab(m, s.pad_rows);
  ref::Grads<double> g = ref::zero_grads(m);
  Outcome o;
  opt.keep_logits = opt.keep_gate_stats = true;
  std::vector<ref::Result<double>> micro;
  o.loss = ref::step_loss_and_grads(m, s.micro, opt, g, &micro);
  const size_t L = size_t(m.config.num_hidden_layers);
  std::vector<double> n(L, 0.0), sum(L, 0.0), sq(L, 0.0);
  for (ref::Result<double>& r : micro) {
    const double k = double(r.logits.rows());  // positions: each layer's gate output has k x intermediate_size
    o.logits.insert(o.logits.end(), r.logits.data(), r.logits.data() + r.logits.size());
    r.logits = ref::Mat<double>();  // 27b: 82 MB per micro-batch of 40 positions
    for (size_t l = 0; l < L; ++l) {
      n[l] += k;
      sum[l] += k * r.gate_mean[l];
      sq[l] += k * (r.gate_std[l] * r.gate_std[l] + r.gate_mean[l] * r.gate_mean[l]);
    }
  }
  for (size_t l = 0; l < L; ++l) {
    o.gate_mean.push_back(sum[l] / n[l]);
    o.gate_std.push_back(std::sqrt(std::max(0.0, sq[l] / n[l] - o.gate_mean[l] * o.gate_mean[l])));
  }
  ref::for_each_trainable(m, g, [&](const std::string& name, const Shape&, const double*, const double* gr, int64_t n) {
    o.names.push_back(name);
    o.offsets.push_back(o.grads.size());
    o.grads.insert(o.grads.end(), gr, gr + n);
  });
  o.offsets.push_back(o.grads.size());
  return o;
}

double l2_norm(const std::vector<double>& a) {
  double s = 0;
  for (double x : a) s += x * x;
  return std::sqrt(s);
}

// Relative L2 distance of each tensor of a to the same tensor of b (NaN where b's tensor is all zero).
std::vector<double> rel_l2_per_tensor(const Outcome& a, const Outcome& b) {
  std::vector<double> r(b.names.size());
  for (size_t i = 0; i < r.size(); ++i) {
    double num = 0, den = 0;
    for (size_t k = b.offsets[i]; k < b.offsets[i + 1]; ++k) {
      num += (a.grads[k] - b.grads[k]) * (a.grads[k] - b.grads[k]);
      den += b.grads[k] * b.grads[k];
    }
    r[i] = den > 0 ? std::sqrt(num / den) : std::nan("");
  }
  return r;
}

double cosine(const std::vector<double>& a, const std::vector<double>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ab += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  return (aa == 0 || bb == 0) ? 0.0 : ab / std::sqrt(aa * bb);
}

struct Variant {
  std::string id, source;
  bool trained_like = false;  // synthetic runs: measured on weights shaped like a trained model (else as drawn)
  // Applies the deviation to the correct run's options; returns why it cannot act here, or "".
  std::function<std::string(ref::RunOptions&, const Config&, const Setting&)> apply;
};

// One row per bug of model/bugs.hpp. The bug itself is the reference's switch (ref::apply_bug, which also says
// when the model cannot show it); what depends on the setting (sequences longer than the window, micro-batches
// with unequal target counts, a padded head) is judged here. Precision bugs, and those whose effect a cool
// attention and trained-like logits bring out, are measured on the trained-like weights of a synthetic run.
std::vector<Variant> variants() {
  auto longer_than_window = [](const Config& c, const Setting& s) {
    return c.sliding_window && s.micro[0].T > *c.sliding_window ? std::string() : "sequence not longer than the window";
  };
  std::vector<Variant> v;
  for (const BugInfo& info : bug_table()) {
    const Bug bug = info.bug;
    const bool trained = bug == Bug::rmsnorm_early_downcast || bug == Bug::rope_bf16 || bug == Bug::gelu_exact ||
                         bug == Bug::qpas_head_dim || bug == Bug::padded_vocab_unmasked;
    v.push_back({std::string(info.id), std::string(info.where), trained,
                 [bug, longer_than_window](ref::RunOptions& o, const Config& c, const Setting& s) {
                   std::string na = ref::apply_bug(bug, c, o.numerics, o.softcap);
                   if (!na.empty()) return na;
                   switch (bug) {
                     case Bug::sliding_odd_layers:
                     case Bug::sliding_off_by_one:
                     case Bug::no_sliding_window:
                       return longer_than_window(c, s);
                     case Bug::padded_vocab_unmasked:
                       return s.pad_rows.numel() > 0 ? std::string() : "head not padded";
                     case Bug::grad_accum_mean_of_means: {
                       std::vector<int64_t> n;
                       for (const Batch& b : s.micro) n.push_back(b.count_targets());
                       bool unequal = false;
                       for (int64_t x : n) unequal |= x != n[0];
                       return unequal ? std::string() : "micro-batches have equal target counts";
                     }
                     case Bug::loss_normalised_by_tokens: {
                       int64_t positions = 0, targets = 0;
                       for (const Batch& b : s.micro) positions += b.B * b.T, targets += b.count_targets();
                       return positions != targets ? std::string() : "every position is a scored target";
                     }
                     default:
                       return std::string();
                   }
                 }});
  }
  return v;
}

// The diagnosis setting for a synthetic run: a short window so that sequences exceed it, two micro-batches
// with very different target counts, and a head padded like the original JAX checkpoints (256128 rows).
Setting synthetic_setting(const InputSpec& spec, const DiagnoseOptions& d, uint64_t seed) {
  Config c = preset(*spec.model);
  const bool released = c.vocab_size == 256000;
  const int64_t full_depth = c.num_hidden_layers;
  c = with_layers(c, spec.layers.value_or(released ? kDefaultPresetLayers : c.num_hidden_layers));
  const int64_t B = spec.batch.value_or(2), T = spec.seq.value_or(40);
  if (B < 2) fail("--batch", "diagnose needs at least 2 sequences (micro-batches with unequal target counts)");
  if (T < 4 || T > c.max_position_embeddings) fail("--seq", "must be between 4 and max_position_embeddings");
  Setting s;
  const int64_t W = d.window.value_or(c.sliding_window && T <= *c.sliding_window ? std::max<int64_t>(2, 2 * T / 5)
                                                                                   : c.sliding_window.value_or(T));
  if (W < 1) fail("--window", "must be at least 1");
  if (c.sliding_window && W != *c.sliding_window)
    s.notes.push_back("sliding window shrunk from " + std::to_string(*c.sliding_window) + " to " + std::to_string(W) +
                      " so that sequences of " + std::to_string(T) + " exceed it");
  c.sliding_window = W;
  s.ck.config = c;
  s.ck.weights = synthetic_weights(c, seed);
  if (spec.quantize && *spec.quantize != "nf4") fail("--quantize", "'" + *spec.quantize + "' is not nf4 (the one quantization implemented)");
  if (spec.quantize) s.unquantized = s.ck.weights;
  const std::string quantized = spec.quantize ? "; " + quantize_base_projections(s.ck) : "";
  const int64_t r = spec.lora_r.value_or(kDefaultPresetLoraR);
  // The diagnosis compares adapter gradients (a full-weight run at true widths does not fit as float64).
  if (r < 1) fail("--lora-r", "diagnose needs LoRA adapters: a rank >= 1");
  refuse_adapter_outside_checkpoint(spec);
  s.ck.adapter = synthetic_adapter_config(r);
  TensorMap a = synthetic_adapters(c, *s.ck.adapter, seed);
  s.ck.weights.insert(a.begin(), a.end());
  Batch batch = synthetic_batch(c, B, T, seed);
  // Sequence 0 keeps only its last quarter of targets: micro-batch target counts differ by about 4x.
  for (int64_t t = 1; t < 3 * T / 4; ++t) batch.labels[size_t(t)] = kIgnoreIndex;
  s.micro = split_batch(batch, 1);
  s.whole = batch;
  const int64_t padded = (c.vocab_size / 128 + 1) * 128;
  s.pad_rows = make_tensor(DType::bf16, {padded - c.vocab_size, c.hidden_size}).t;
  s.notes.insert(s.notes.begin(),
                 *spec.model + " (synthetic bf16 weights, " + std::to_string(c.num_hidden_layers) + " of " +
                     std::to_string(full_depth) + " layers, true widths, vocab " + std::to_string(c.vocab_size) +
                     quantized + ")");
  s.notes.push_back("LM head padded to " + std::to_string(padded) + " rows with zero rows (masked except in padded-vocab-unmasked)");
  return s;
}

// Finetuning sequences are hundreds to thousands of tokens long, and most tokens sit far from position 0, where
// rounding a position or an angle costs most. Exact RoPE sees only position differences, so placing the batch
// at the end of a 4096-token sequence changes nothing but that rounding.
int64_t checked_offset(int64_t off, int64_t T, const Config& c) {
  if (off < 0 || off + T > c.max_position_embeddings)
    fail("--position-offset", "positions must stay within 0 .. max_position_embeddings - 1");
  return off;
}

int64_t trained_like_offset(const Config& c, int64_t T, const DiagnoseOptions& d) {
  return checked_offset(d.position_offset.value_or(std::max<int64_t>(0, std::min<int64_t>(4096, c.max_position_embeddings) - T)),
                        T, c);
}

Setting case_setting(const Inputs& in, const DiagnoseOptions& d) {
  Setting s;
  s.ck = in.model;
  s.position_offset = checked_offset(d.position_offset.value_or(0), in.batch.T, s.ck.config);
  s.micro = in.batch.B >= 2 ? split_batch(in.batch, (in.batch.B + 1) / 2) : std::vector<Batch>{in.batch};
  s.whole = in.batch;
  const Config& c = s.ck.config;
  const int64_t padded = (c.vocab_size / 128 + 1) * 128;
  s.pad_rows = make_tensor(DType::bf16, {padded - c.vocab_size, c.hidden_size}).t;
  print_warnings("verify", in.model.warnings);
  s.notes.push_back(in.description);
  s.notes.push_back("LM head padded to " + std::to_string(padded) + " rows with zero rows (masked except in padded-vocab-unmasked)");
  return s;
}

std::string sci(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2e", v);
  return b;
}

}  // namespace

namespace {

// The reference points of one setting: float64, the correct policy, and the correct policy's spread when only
// fp32-level details change (jitter seeds): the bf16 noise two equally correct bf16 trainers show.
struct Baseline {
  Outcome f64, pol;
  double noise_loss = 0, noise_grad = 0;
  std::vector<double> noise_tensor;  // per trainable tensor: its relative L2 spread over the jitter seeds
  std::vector<std::vector<double>> jitter_grads;  // each jitter seed's gradients, for projections on a fingerprint
  std::vector<std::vector<double>> jitter_logits;  // and its logits
};

Baseline baseline(const Setting& s, const ref::RunOptions& exact, const ref::RunOptions& correct, int64_t seeds,
                  const std::string& what) {
  Baseline b;
  progress("float64 and " + correct.numerics.policy.name + " runs (" + what + ")");
  b.f64 = run_once(s, exact);
  b.pol = run_once(s, correct);
  for (int64_t k = 1; k <= seeds; ++k) {
    progress("noise: " + correct.numerics.policy.name + " with jitter seed " + std::to_string(k) + " (" + what + ")");
    ref::RunOptions o = correct;
    o.numerics.policy.jitter = ref::kFp32Jitter;
    o.numerics.policy.jitter_seed = uint64_t(k);
    const Outcome r = run_once(s, o);
    b.jitter_grads.push_back(r.grads);
    b.jitter_logits.push_back(r.logits);
    b.noise_loss = std::max(b.noise_loss, rel_err(r.loss, b.pol.loss));
    b.noise_grad = std::max(b.noise_grad, rel_l2(r.grads, b.pol.grads));
    const std::vector<double> t = rel_l2_per_tensor(r, b.pol);
    if (b.noise_tensor.empty()) b.noise_tensor.assign(t.size(), 0.0);
    for (size_t i = 0; i < t.size(); ++i) b.noise_tensor[i] = std::max(b.noise_tensor[i], t[i]);
  }
  return b;
}

}  // namespace

int run_diagnose(const InputSpec& spec, const DiagnoseOptions& d) {
  const auto t0 = std::chrono::steady_clock::now();
  if (d.noise_seeds < 1) fail("--noise-seeds", "must be at least 1");
  const ref::Policy policy = ref::policy_named(d.policy);
  if (policy.exact()) fail("--policy", "the correct policy must round somewhere (f64 is what it is compared with)");
  const bool synthetic = spec.model.has_value();
  if (!synthetic && d.window) fail("--window", "applies to synthetic runs (--model) only");
  // Before the run, as verify does: at 27b widths the table takes minutes, and a bad --json path found only when
  // writing it lost them.
  if (d.json_path && *d.json_path != "-") check_output_paths({{"--json", *d.json_path}});

  Setting s = synthetic ? synthetic_setting(spec, d, spec.seed) : case_setting(load_inputs(spec), d);
  const Config& c = s.ck.config;
  const Softcap sc = d.softcap ? parse_softcap(*d.softcap, "--softcap") : config_softcaps(c);
  check_softcap_available(c, sc, "--softcap");
  std::vector<Variant> vs = variants();
  if (d.variants) {
    // A chosen subset, in the table's order; only the settings those rows need are built and measured.
    const std::vector<std::string>& want = *d.variants;
    std::string known;
    for (const Variant& v : vs) known += (known.empty() ? "" : ", ") + v.id;
    for (const std::string& w : want)
      if (std::none_of(vs.begin(), vs.end(), [&](const Variant& v) { return v.id == w; }))
        fail("--variants", "unknown variant '" + w + "' (known: " + known + ")");
    std::erase_if(vs, [&](const Variant& v) { return std::find(want.begin(), want.end(), v.id) == want.end(); });
  }
  auto in_trained_setting = [&](const Variant& v) { return synthetic && v.trained_like; };
  const int64_t trained_offset = synthetic ? trained_like_offset(c, s.micro[0].T, d) : 0;  // checked before any run

  std::printf("verify diagnose: %s\n", s.notes[0].c_str());
  for (size_t i = 1; i < s.notes.size(); ++i) std::printf("  %s\n", s.notes[i].c_str());
  std::string counts;
  for (const Batch& b : s.micro) counts += (counts.empty() ? "" : ", ") + std::to_string(b.count_targets());
  std::printf("  %zu micro-batches of %lld x %lld (scored targets %s); softcap %s; gradients of LoRA r=%lld + RMSNorm weights\n",
              s.micro.size(), (long long)s.micro[0].B, (long long)s.micro[0].T, counts.c_str(), softcap_name(sc).c_str(),
              (long long)(s.ck.adapter ? s.ck.adapter->r : 0));

  ref::RunOptions exact, correct;
  exact.softcap = correct.softcap = sc;
  correct.numerics.policy = policy;
  const double factor = 3.0;
  const char* main_name = synthetic ? "weights as drawn" : "case file";
  std::optional<Baseline> main_b;
  if (std::any_of(vs.begin(), vs.end(), [&](const Variant& v) { return !in_trained_setting(v); }))
    main_b = baseline(s, exact, correct, d.noise_seeds, main_name);

  // The trained-like setting, for the variants measured there.
  std::optional<Setting> trained;
  std::optional<Baseline> trained_b;
  if (std::any_of(vs.begin(), vs.end(), in_trained_setting)) {
    trained = s;
    trained->notes.clear();
    // Edited from the unquantized weights and quantized after: editing the dequantized projections (what this did)
    // left a base that was no NF4 dequantization while the table called it NF4 (found by a probe, 2026-12-05).
    if (s.unquantized) {
      for (const auto& [n, t] : *s.unquantized) trained->ck.weights.insert_or_assign(n, t);
      trained->ck.nf4.clear();
      trained->ck.quantization.reset();
    }
    trained->notes.push_back(make_trained_like(trained->ck, 6.0, 0.25, -2.7, 0.5));
    if (s.unquantized) trained->notes[0] += "; then " + quantize_base_projections(trained->ck);
    // No variant measured here is about micro-batches (grad-accum-mean-of-means runs on the drawn weights), and
    // each micro-batch pays for the 256000-row LM head again: one batch.
    trained->micro = {trained->whole};
    const int64_t T = trained->whole.T;
    trained->notes[0] += "; one batch of " + std::to_string(trained->whole.B) + " x " + std::to_string(T);
    trained->position_offset = trained_offset;
    if (trained_offset > 0)
      trained->notes[0] += "; positions " + std::to_string(trained_offset) + " .. " + std::to_string(trained_offset + T - 1) +
                           " (the end of a " + std::to_string(trained_offset + T) + "-token sequence)";
    trained_b = baseline(*trained, exact, correct, d.noise_seeds, "trained-like weights");
  }

  auto print_noise = [&](const char* what, const Baseline& b) {
    std::printf("  %s: float64 loss %.10g, %s loss %.10g (bf16 error %s); noise = %s's spread over %lld jitter seeds: "
                "loss %s rel, gradients %s rel L2\n",
                what, b.f64.loss, policy.name.c_str(), b.pol.loss, sci(rel_err(b.pol.loss, b.f64.loss)).c_str(),
                policy.name.c_str(), (long long)d.noise_seeds, sci(b.noise_loss).c_str(), sci(b.noise_grad).c_str());
    std::string g;
    for (size_t l = 0; l < b.f64.gate_mean.size(); ++l) {
      char t[64];
      std::snprintf(t, sizeof t, "%s%.2f +- %.2f", l ? ", " : "", b.f64.gate_mean[l], b.f64.gate_std[l]);
      g += t;
    }
    std::printf("    gate inputs (GELU's x) in the float64 run, layer by layer: %s\n", g.c_str());
  };
  if (main_b) print_noise(main_name, *main_b);
  if (trained) {
    std::printf("  %s\n", trained->notes[0].c_str());
    print_noise("trained-like weights", *trained_b);
  }
  std::printf("  detectable: the loss, or the gradient of some tensor, moves further from %s than %gx its own noise\n"
              "  (jitter %.1e, fp32-sized; each tensor's noise is its own spread, so a bug confined to a few tensors is\n"
              "  not drowned by the rest); the control row is %s itself under jitter seed %lld, which must come out \"no\"\n",
              policy.name.c_str(), factor, ref::kFp32Jitter, policy.name.c_str(), (long long)(d.noise_seeds + 1));
  std::printf("\n%-25s %-41s %-7s %9s %9s %9s %9s %9s %8s %8s  %s\n", "variant", "where it happened", "weights", "dL f64", "rel",
              "dL policy", "rel", "grad L2", "cosine", "x noise", "detectable (largest move)");

  // How far an outcome is from the correct policy, in units of the noise: the loss, and the tensor that moved most.
  struct Assessment {
    double ratio = 0;          // largest of the loss's and every tensor's move / noise
    std::string where;         // "loss" or the tensor's name
    double where_move = 0, where_noise = 0;
  };
  auto assess = [&](const Outcome& r, const Baseline& b) {
    Assessment a;
    const double rl = rel_err(r.loss, b.pol.loss);
    a.ratio = b.noise_loss > 0 ? rl / b.noise_loss : (rl > 0 ? INFINITY : 0.0);
    a.where = "loss";
    a.where_move = rl;
    a.where_noise = b.noise_loss;
    const std::vector<double> t = rel_l2_per_tensor(r, b.pol);
    for (size_t i = 0; i < t.size(); ++i) {
      if (std::isnan(t[i])) continue;  // the correct policy's gradient of this tensor is zero
      const double q = b.noise_tensor[i] > 0 ? t[i] / b.noise_tensor[i] : (t[i] > 0 ? INFINITY : 0.0);
      if (q > a.ratio) a = {q, r.names[i], t[i], b.noise_tensor[i]};
    }
    return a;
  };

  nlohmann::json jv = nlohmann::json::array();
  int detected = 0, applicable = 0;
  auto report_row = [&](const std::string& id, const std::string& source, const Outcome& r, const Baseline& b,
                        const std::string& na, bool use_trained) {
    const double dl_f64 = r.loss - b.f64.loss, dl_pol = r.loss - b.pol.loss;
    const double rl_f64 = rel_err(r.loss, b.f64.loss), rl_pol = rel_err(r.loss, b.pol.loss);
    const double g_l2 = rel_l2(r.grads, b.pol.grads), g_cos = cosine(r.grads, b.pol.grads);
    const Assessment a = assess(r, b);
    const bool detectable = na.empty() && a.ratio > factor;
    char where[160];
    std::snprintf(where, sizeof where, "%s %s vs noise %s", a.where.c_str(), sci(a.where_move).c_str(),
                  sci(a.where_noise).c_str());
    const std::string verdict =
        !na.empty() ? "n/a: " + na : std::string(detectable ? "yes" : "no") + " (" + where + ")";
    std::printf("%-25s %-41s %-7s %9.2e %9.2e %9.2e %9.2e %9.2e %8.5f %8.2f  %s\n", id.c_str(), source.c_str(),
                !synthetic ? "case" : use_trained ? "trained" : "drawn", dl_f64, rl_f64, dl_pol, rl_pol, g_l2, g_cos, a.ratio,
                verdict.c_str());
    std::fflush(stdout);
    nlohmann::json j = {{"id", id},
                        {"source", source},
                        {"setting", !synthetic ? "case file" : use_trained ? "trained-like weights" : "weights as drawn"},
                        {"loss", r.loss},
                        {"loss_abs_diff_vs_f64", dl_f64},
                        {"loss_rel_diff_vs_f64", rl_f64},
                        {"loss_abs_diff_vs_policy", dl_pol},
                        {"loss_rel_diff_vs_policy", rl_pol},
                        {"grad_rel_l2_vs_policy", g_l2},
                        {"grad_cosine_vs_policy", g_cos},
                        {"noise_ratio", a.ratio},
                        {"largest_move", {{"where", a.where}, {"rel", a.where_move}, {"noise", a.where_noise}}},
                        {"detectable", detectable}};
    if (!na.empty()) j["not_applicable"] = na;
    return std::pair{j, detectable};
  };

  // A bug's fingerprint: the change it makes in exact arithmetic, e = x(float64 + bug) - x(float64 + the correct
  // policy's choice at the same place), for two observables x: the gradient and the logits. Where a variant's
  // move is lost in bf16 noise as a whole, the question becomes a matched filter's: does the bf16 run move along
  // e, and further than the jitter runs move along e? Noise spread over many independent directions projects
  // onto one with a small fraction of its size, while a systematic effect keeps its own. The test is one-sided
  // (the move must point the bug's way) and uses the same factor and max-over-seeds noise; the control rows are
  // projected on every fingerprint too. It costs one or two float64 runs per variant, so it runs only where the
  // direct test fails.
  // Why the logits as well: LoRA gradients are sums over the batch's tokens of rank-r outer products, so their
  // noise lives in few directions (measured at 27b widths with the gates as drawn: the jitter runs' gradient
  // moves kept about 5% of their norm along gelu-exact's fingerprint, as if spread over only ~400 directions).
  // Each logit is rounded on its own, and each position's logits span the hidden width. Neither wins everywhere
  // (docs/diagnose.md): either finding the bug counts, and the controls are held to both.
  struct Observable {
    const char* name;
    std::vector<double> Outcome::*of;
    std::vector<std::vector<double>> Baseline::*jitter;
  };
  const std::array<Observable, 2> observables = {
      {{"gradient", &Outcome::grads, &Baseline::jitter_grads}, {"logits", &Outcome::logits, &Baseline::jitter_logits}}};
  struct Fingerprint {
    std::string id;
    bool in_trained = false;
    std::array<std::vector<double>, 2> unit;  // e / |e| per observable (empty where e = 0)
  };
  std::vector<Fingerprint> fingerprints;
  auto project = [](const std::vector<double>& x, const std::vector<double>& ref_x, const std::vector<double>& unit) {
    double p = 0;
    for (size_t i = 0; i < unit.size(); ++i) p += (x[i] - ref_x[i]) * unit[i];
    return p;
  };
  // The one-sided ratio of an outcome's move along a fingerprint to the largest jitter run's.
  auto projection_ratio = [&](const Outcome& r, const Baseline& b, const Observable& ob, const std::vector<double>& unit) {
    const double seen = project(r.*ob.of, b.pol.*ob.of, unit);
    double noise = 0;
    for (const auto& j : b.*ob.jitter) noise = std::max(noise, std::abs(project(j, b.pol.*ob.of, unit)));
    return std::pair{seen, seen > 0 ? (noise > 0 ? seen / noise : INFINITY) : 0.0};
  };
  auto is_exact = [&](const ref::RunOptions& o) {
    return o.numerics.policy.exact() && o.numerics.semantics == ref::Semantics{} && o.softcap == exact.softcap;
  };
  // The float64 runs a fingerprint compares: the bug's and the correct policy's choice, each in exact arithmetic.
  auto exact_pair_options = [&](const ref::RunOptions& o) {
    ref::RunOptions ev = exact, ec = exact;
    ev.softcap = o.softcap;
    ev.numerics.semantics = o.numerics.semantics;
    // Where the correct policy keeps a value in fp32 and the bug rounds it coarser, the float64 side stands in
    // for the fp32 one: the fingerprint's direction changes by about 2^-24 / 2^-9 = 3e-5 relative, and a run
    // is saved (rmsnorm-early-downcast at 27b widths: 20 s).
    for (int i = 0; i < ref::kNumCasts; ++i)
      if (o.numerics.policy.fmt[size_t(i)] != correct.numerics.policy.fmt[size_t(i)]) {
        ev.numerics.policy.fmt[size_t(i)] = o.numerics.policy.fmt[size_t(i)];
        const DType cf = correct.numerics.policy.fmt[size_t(i)];
        ec.numerics.policy.fmt[size_t(i)] = cf == DType::f32 ? DType::f64 : cf;
      }
    return std::pair{ev, ec};
  };
  auto unit_of = [](const std::vector<double>& a, const std::vector<double>& b) {
    std::vector<double> e(a.size());
    double n2 = 0;
    for (size_t i = 0; i < e.size(); ++i) {
      e[i] = a[i] - b[i];
      n2 += e[i] * e[i];
    }
    const double n = std::sqrt(n2);
    if (n == 0) return std::pair{std::vector<double>{}, 0.0};
    for (double& x : e) x /= n;
    return std::pair{e, n};
  };

  for (const Variant& v : vs) {
    const bool use_trained = in_trained_setting(v);
    const Setting& vs_setting = use_trained ? *trained : s;
    const Baseline& b = use_trained ? *trained_b : *main_b;
    ref::RunOptions o = correct;
    const std::string na = v.apply(o, c, vs_setting);
    progress("variant " + v.id);
    const Outcome r = run_once(vs_setting, o);
    auto [j, detectable] = report_row(v.id, v.source, r, b, na, use_trained);
    if (na.empty() && !detectable) {
      const auto [ev, ec] = exact_pair_options(o);
      progress("fingerprint of " + v.id + " in float64");
      // An exact side is the setting's float64 run itself, used in place rather than copied (27b: its logits alone are 164 MB).
      std::optional<Outcome> own_v, own_c;
      const Outcome& fv = is_exact(ev) ? b.f64 : own_v.emplace(run_once(vs_setting, ev));
      const Outcome& fc = is_exact(ec) ? b.f64 : own_c.emplace(run_once(vs_setting, ec));
      Fingerprint f{v.id, use_trained, {}};
      nlohmann::json jf;
      bool fp_detectable = false;
      for (size_t k = 0; k < observables.size(); ++k) {
        const Observable& ob = observables[k];
        auto [unit, size] = unit_of(fv.*ob.of, fc.*ob.of);
        if (size == 0) continue;
        const double rel_size = size / l2_norm(b.f64.*ob.of);
        // Within float64's rounding: no direction to project on (kNegligibleFingerprint, diagnose.hpp).
        if (!(rel_size > kNegligibleFingerprint)) {
          std::printf("%-25s fingerprint on the %s: float64 effect %s of it, within float64 rounding: no direction to "
                      "project on\n",
                      "", ob.name, sci(rel_size).c_str());
          jf[ob.name] = {{"exact_effect_rel_l2", rel_size}, {"negligible", true}};
          continue;
        }
        const auto [seen, ratio] = projection_ratio(r, b, ob, unit);
        fp_detectable |= ratio > factor;
        std::printf("%-25s fingerprint on the %s: float64 effect %s of it; the %s run moves %.2f of it along it, %.2fx the "
                    "jitter runs' projection: %s\n",
                    "", ob.name, sci(rel_size).c_str(), policy.name.c_str(), seen / size, ratio, ratio > factor ? "yes" : "no");
        std::fflush(stdout);
        jf[ob.name] = {{"exact_effect_rel_l2", rel_size},
                       {"fraction_seen", seen / size},
                       {"noise_ratio", ratio},
                       {"detectable", ratio > factor}};
        f.unit[k] = std::move(unit);
      }
      if (!jf.empty()) {
        jf["detectable"] = fp_detectable;
        // A negligible observable leaves its unit empty, so the controls are not projected on it either.
        j["fingerprint"] = jf;
        detectable = fp_detectable;
        j["detectable"] = detectable;
        fingerprints.push_back(std::move(f));
      }
    }
    if (na.empty()) {
      ++applicable;
      detected += detectable;
    }
    jv.push_back(j);
  }
  // The criterion's own check, in each setting: an equally correct run must not be called a bug.
  nlohmann::json jcontrol = nlohmann::json::array();
  bool control_flagged = false;
  for (bool in_trained : {false, true}) {
    if (in_trained ? !trained : !main_b) continue;
    ref::RunOptions o = correct;
    o.numerics.policy.jitter = ref::kFp32Jitter;
    o.numerics.policy.jitter_seed = uint64_t(d.noise_seeds + 1);
    progress(std::string("control: ") + policy.name + " with jitter seed " + std::to_string(d.noise_seeds + 1));
    const Outcome r = run_once(in_trained ? *trained : s, o);
    const Baseline& b = in_trained ? *trained_b : *main_b;
    auto [j, flagged] = report_row("control", policy.name + ", jitter seed " + std::to_string(d.noise_seeds + 1), r, b, "",
                                   in_trained);
    // The control projected on each fingerprint of its setting, as the variants were.
    double worst = 0;
    std::string worst_id;
    for (const Fingerprint& f : fingerprints) {
      if (f.in_trained != in_trained) continue;
      for (size_t k = 0; k < observables.size(); ++k) {
        if (f.unit[k].empty()) continue;
        const double ratio = projection_ratio(r, b, observables[k], f.unit[k]).second;
        if (ratio >= worst) {
          worst = ratio;
          worst_id = f.id + " (" + observables[k].name + ")";
        }
      }
    }
    if (!worst_id.empty()) {
      std::printf("%-25s on the fingerprints: at most %.2fx the jitter runs' projection (%s): %s\n", "", worst,
                  worst_id.c_str(), worst > factor ? "yes" : "no");
      j["fingerprint_noise_ratio"] = worst;
      j["fingerprint_worst"] = worst_id;
      if (worst > factor) {
        flagged = true;
        j["detectable"] = true;
      }
    }
    control_flagged |= flagged;
    jcontrol.push_back(j);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("\n%d/%d applicable variants stand above bf16 noise (control: %s); %.1f s, peak memory %.2f GB\n", detected,
              applicable, control_flagged ? "DETECTED, the noise estimate is too small" : "not detected", secs,
              peak_rss_bytes() / 1e9);
  if (d.json_path) {
    auto noise = [&](const Baseline& b) {
      nlohmann::json per_tensor;
      for (size_t i = 0; i < b.noise_tensor.size(); ++i) per_tensor[b.pol.names[i]] = b.noise_tensor[i];
      return nlohmann::json{{"loss_rel", b.noise_loss},      {"grad_rel_l2", b.noise_grad},
                            {"grad_rel_l2_per_tensor", per_tensor},
                            {"loss_f64", b.f64.loss},         {"loss_policy", b.pol.loss},
                            {"bf16_error_loss_rel", rel_err(b.pol.loss, b.f64.loss)},
                            {"bf16_error_grad_rel_l2", rel_l2(b.pol.grads, b.f64.grads)},
                            {"bf16_error_logits_rel_l2", rel_l2(b.pol.logits, b.f64.logits)},
                            {"gate_input_mean_f64", b.f64.gate_mean},
                            {"gate_input_std_f64", b.f64.gate_std}};
    };
    nlohmann::json j;
    j["setting"] = s.notes;
    j["policy"] = policy.name;
    j["softcap"] = {{"attn", sc.attn}, {"logits", sc.logits}};
    if (main_b) j["noise"] = noise(*main_b);
    j["noise"]["seeds"] = d.noise_seeds;
    j["noise"]["jitter"] = ref::kFp32Jitter;
    j["noise"]["factor"] = factor;
    j["noise"]["definition"] =
        "spread (max over jitter seeds) of the correct policy when every value it rounds is first perturbed by +-jitter "
        "(an fp32-sized difference), for the loss and for each gradient tensor; detectable = the loss or some tensor moves "
        "from the correct policy by more than factor x its own spread (noise_ratio = the largest move / noise), or, where "
        "that fails, the move projected on the bug's float64 effect on the gradient or the logits (its fingerprint) "
        "exceeds factor x the largest jitter run's projection";
    if (trained) {
      j["noise"]["trained_like"] = noise(*trained_b);
      j["trained_like"] = trained->notes;
    }
    j["variants"] = jv;
    j["control"] = jcontrol;
    j["seconds"] = secs;
    write_json(*d.json_path, j);
  }
  return 0;
}

}  // namespace gemma::check
