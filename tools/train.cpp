// train: LoRA (or full-weight) finetuning with AdamW, HF Trainer's learning-rate schedules, gradient clipping by
// global norm and gradient accumulation normalised by the step's scored targets; on synthetic batches or on a JSONL
// dataset (train/data.hpp); writing PEFT adapters (or an HF checkpoint) and a state it resumes from bit-exactly
// (train/save.hpp). The reference backend is float64 and deterministic: the same inputs and seed give the same
// bits, with or without a stop and --resume in between. docs/train.md has the options and a worked example.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "model/atomic_file.hpp"
#include "model/errors.hpp"
#include "model/safetensors.hpp"
#include "model/synthetic.hpp"
#include "reference/adamw.hpp"
#ifdef GEMMA_HAVE_FAST
#include "fast/data_parallel.hpp"
#include "fast/fast.hpp"
#endif
#include "check/fast_backend.hpp"
#include "check/inputs.hpp"
#include "check/report.hpp"
#include "train/data.hpp"
#include "train/html_report.hpp"
#include "train/save.hpp"
#include "train/schedule.hpp"
#include "model/json_text.hpp"
#include "tools/cli_checks.hpp"

using namespace gemma;
using namespace gemma::check;
using namespace gemma::train;
using nlohmann::json;

namespace {

struct TrainOptions {
  std::optional<int64_t> max_steps;  // --max-steps (--steps): optimizer steps; overrides --epochs
  std::optional<int64_t> epochs;     // --epochs: passes over --data (default 1)
  int64_t micro_batches = 1;         // gradient accumulation: micro-batches per step
  ref::AdamWConfig adamw;
  std::string lr_scheduler = "linear";  // HF's default
  int64_t warmup_steps = 0;
  double max_grad_norm = 1.0;           // HF's default; 0: no clipping
  std::set<std::string> given;          // every option on the command line, by its first long name
  std::optional<std::string> softcap, log_path, report_path;
  std::string backend = "reference";
  int gpus = 1;  // --gpus: data parallel over this many GPUs (fast backend)
  // The fast backend's activation memory (fast::TrainerOptions; every mode gives the same bits, test_fast_model).
  bool no_recompute = false, recompute_mlp_only = false, offload = false;
  // --recompute-num-layers: only the first N layers checkpointed (EngineOptions), or "auto": the fewest that fit.
  std::optional<std::string> recompute_num_layers;
  std::optional<std::string> data;
  bool packing = false;
  TokenizerOptions tokenizer;
  std::optional<std::string> output_dir, save_adapter, resume, eval_data, save_base;
  int64_t save_steps = 0;
  std::vector<std::string> report_with;
};

// --recompute-num-layers as a number of layers (nullopt: not given, or auto; exit 2 naming the flag otherwise).
std::optional<int64_t> recompute_layers_of(const TrainOptions& o) {
  if (!o.recompute_num_layers) return std::nullopt;
  return parse_recompute_num_layers(*o.recompute_num_layers, "--recompute-num-layers");
}

// Stops with a message naming where a non-finite value first appeared.
void check_finite(int64_t step, size_t micro, const std::string& what, double v) {
  if (!std::isfinite(v)) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "non-finite %s (%g) at step %lld, micro-batch %zu", what.c_str(), v,
                  (long long)step, micro);
    throw std::runtime_error(buf);
  }
}

std::string hms(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const long long t = (long long)std::llround(s);
  char b[32];
  if (t >= 3600) std::snprintf(b, sizeof b, "%lld:%02lld:%02lld", t / 3600, t / 60 % 60, t % 60);
  else std::snprintf(b, sizeof b, "%lld:%02lld", t / 60, t % 60);
  return b;
}

// The one progress line on stderr: rewritten in place on a terminal, one line per step otherwise (a log file).
class Progress {
 public:
  explicit Progress(int64_t total) : total_(total), tty_(::isatty(2) != 0), t0_(std::chrono::steady_clock::now()) {}
  void update(int64_t step, int64_t done, double loss, double lr, std::optional<double> grad_norm, int64_t tokens) {
    tokens_ += tokens;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    const double eta = done > 0 ? secs / double(done) * double(total_ - step) : NAN;
    char gn[32] = "n/a";
    if (grad_norm) std::snprintf(gn, sizeof gn, "%.4g", *grad_norm);
    std::fprintf(stderr, "%sstep %lld/%lld  loss %.6f  lr %.3e  grad_norm %s  %.0f tokens/s  ETA %s%s", tty_ ? "\r\033[K" : "",
                 (long long)step, (long long)total_, loss, lr, gn, secs > 0 ? double(tokens_) / secs : 0.0,
                 hms(eta).c_str(), tty_ ? "" : "\n");
    std::fflush(stderr);
  }
  void finish() {
    if (tty_) std::fputc('\n', stderr);
  }
  double tokens_per_second() const {
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    return secs > 0 ? double(tokens_) / secs : 0.0;
  }

 private:
  int64_t total_, tokens_ = 0;
  bool tty_;
  std::chrono::steady_clock::time_point t0_;
};

// The step's tokens that are not padding: a padded row's masked tail and a packed row's tail of pad tokens both
// left out, so that the per-step figures of an epoch sum to the data line's "real tokens" in either mode (the
// packed tail used to be counted, 736 against 548 on examples/tiny.jsonl).
int64_t real_tokens(const Batch& b) {
  if (b.attention_mask.empty()) return b.B * b.T - b.unmasked_padding;
  int64_t n = 0;
  for (uint8_t m : b.attention_mask) n += m;
  return n;
}

// A running 64-bit digest (splitmix64 from FNV-1a's offset basis), for telling a resumed run's inputs from
// another's: not a cryptographic hash.
struct Digest {
  uint64_t h = 0xcbf29ce484222325ull;
  void mix(uint64_t v) { h = splitmix64(h ^ v); }
  void bytes(const void* p, size_t n) {  // 8 bytes at a time, the last word zero-padded, then the length
    for (size_t i = 0; i < n; i += 8) {
      uint64_t w = 0;
      std::memcpy(&w, static_cast<const char*>(p) + i, std::min<size_t>(8, n - i));
      mix(w);
    }
    mix(n);
  }
  std::string hex() const {
    char b[20];
    std::snprintf(b, sizeof b, "%016llx", (unsigned long long)h);
    return b;
  }
};

// A digest of the rows the run trains on (ids, labels, positions, mask): a resumed run must see the same rows,
// whatever tokenizer, template or flags made them.
std::string rows_digest(const Dataset& d) {
  Digest g;
  for (const Row& r : d.rows) {
    for (int64_t v : r.input_ids) g.mix(uint64_t(v));
    for (int64_t v : r.labels) g.mix(uint64_t(v));
    for (int64_t v : r.position_ids) g.mix(uint64_t(v));
    for (uint8_t v : r.attention_mask) g.mix(v);
    g.mix(uint64_t(-1));
  }
  return g.hex();
}

// The tensors an adapter adds (PEFT's lora_A / lora_B); the rest are the base model's.
bool adapter_tensor(const std::string& name) { return name.find(".lora_") != std::string::npos; }

// A digest of the model the run starts from: its config.json as the run reads it and every base tensor (name, dtype,
// shape, bytes). A resumed run must start from the same model: its path alone let an edited config.json through
// (caps 50/30 changed in place to 5/3 resumed without a word, and the next step's loss moved from 6.2074 to 6.0317).
json model_digest(const Inputs& in) {
  Digest config, base;
  const std::string cfg = to_config_json(in.model.config);
  config.bytes(cfg.data(), cfg.size());
  for (const auto& [name, t] : in.model.weights) {  // a std::map: name order
    if (adapter_tensor(name)) continue;
    base.bytes(name.data(), name.size());
    base.mix(uint64_t(t.dtype));
    for (int64_t d : t.shape) base.mix(uint64_t(d));
    base.bytes(t.bytes.get(), size_t(t.numel()) * dtype_size(t.dtype));
  }
  return {{"config", config.hex()}, {"base_weights", base.hex()}};
}

struct Plan {
  Inputs in;
  std::string adapter_base;  // a saved adapter's base_model_name_or_path: --save-base's base when given, else in.source
  Softcap sc;
  std::optional<Dataset> data;
  std::optional<Dataset> eval;
  int64_t batch = 0;        // rows per optimizer step
  int64_t micro_rows = 0;   // rows per micro-batch
  int64_t total_steps = 0;
  int64_t steps_per_epoch = 0;  // with data
  Schedule schedule;
  std::string out_dir;      // --output-dir or --save-adapter
  json run;                 // the settings that change the math (recorded, checked on --resume)
  uint64_t seed = 0;
  bool synthetic_data = false;
  std::vector<std::pair<std::string, json>> report_with;  // other runs' logs for the report
};

Batch batch_of_step(const Plan& p, int64_t step) {
  if (p.data) return step_batch(*p.data, p.batch, p.seed, true, step);
  // Synthetic runs draw a fresh batch per step (seeded by seed and step); a case file's batch repeats.
  if (p.synthetic_data && step > 1)
    return synthetic_batch(p.in.model.config, p.in.batch.B, p.in.batch.T, p.seed + uint64_t(step) * 7919);
  return p.in.batch;
}

double epoch_of(const Plan& p, int64_t step) {
  return p.data ? double(step) / double(p.steps_per_epoch) : 0.0;
}

json trainer_state_json(const Plan& p, int64_t step, const json& history) {
  return {{"global_step", step}, {"max_steps", p.total_steps}, {"epoch", epoch_of(p, step)}, {"log_history", history},
          {"gemma_train", {{"run", p.run}}}};
}

void write_log(const Plan& p, const TrainOptions& o, const json& history, const json& extra) {
  if (!o.log_path) return;
  json j = {{"source", p.in.source}, {"backend", o.backend}, {"softcap", softcap_name(p.sc)}, {"steps", history},
            {"run", p.run}};
  for (const auto& [k, v] : extra.items()) j[k] = v;
  write_json(*o.log_path, j);
}

void write_report(const Plan& p, const TrainOptions& o, const json& history) {
  if (!o.report_path) return;
  std::vector<ReportSeries> series{{o.backend, history}};
  for (const auto& [label, steps] : p.report_with) series.push_back({label, steps});
  write_html_report(*o.report_path, "train: " + p.in.description, series, p.run);
}

// A run stopped by a non-finite value (exit 1) keeps the steps it took in --log and --report, with the reason: they
// were written only at the end, so a diverged run left neither, though its checkpoints were saved (found by a
// probe, 2026-12-05). Not under --softcap all / --backend both, whose caller writes one log for every run.
void write_outputs_of_stopped_run(const Plan& p, const TrainOptions& o, const json& history, const std::string& why,
                                  const json* curve) {
  if (curve) return;
  write_log(p, o, history, {{"stopped", why}});
  write_report(p, o, history);
}

// SIGINT or SIGTERM during a run's steps: the handler only records the signal, and the step loop looks at it between
// steps, stopping as a non-finite value stops it (--log and --report written with the steps taken and the reason;
// they were lost with the process, found by a probe) and exiting 128 + the signal. A second signal does not wait for
// the step in progress: the default action, at once. Outside a step loop, and under --softcap all / --backend both
// (whose caller writes one log for every run), the signals keep their default action.
volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void record_stop_signal(int sig) {
  if (g_stop_signal) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  g_stop_signal = sig;
}

// Thrown out of a step loop once the stopped run's outputs are written; main turns it into the exit status.
struct Interrupted {
  int sig;
  std::string why;
};

// The handler for one step loop, the previous dispositions restored after it.
class StopBetweenSteps {
 public:
  explicit StopBetweenSteps(bool active) : active_(active) {
    if (!active_) return;
    struct sigaction sa {};
    sa.sa_handler = record_stop_signal;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, &old_int_);
    ::sigaction(SIGTERM, &sa, &old_term_);
  }
  ~StopBetweenSteps() {
    if (!active_) return;
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }
  StopBetweenSteps(const StopBetweenSteps&) = delete;
  StopBetweenSteps& operator=(const StopBetweenSteps&) = delete;

  // Called before each step: after a signal, writes the outputs of the steps up to `done` and throws Interrupted.
  void check(const Plan& p, const TrainOptions& o, const json& history, int64_t done) const {
    if (!active_ || !g_stop_signal) return;
    const int sig = g_stop_signal;
    const std::string why = std::string("interrupted by ") + (sig == SIGINT ? "SIGINT" : "SIGTERM") + " after step " +
                            std::to_string(done) + " of " + std::to_string(p.total_steps);
    if (::isatty(2)) std::fputc('\n', stderr);  // past the progress line rewritten in place
    write_outputs_of_stopped_run(p, o, history, why, nullptr);
    throw Interrupted{sig, why};
  }

 private:
  bool active_;
  struct sigaction old_int_ {}, old_term_ {};
};

// Another run's --log, to be plotted beside this one (e.g. the fast backend's curve beside the reference's).
std::pair<std::string, json> read_log(const std::string& path) {
  json j;
  try {
    j = parse_json(read_text_file(path));
  } catch (const json::exception& e) {
    fail(path, std::string("malformed JSON: ") + e.what());
  }
  if (!j.is_object() || !j.contains("steps") || !j["steps"].is_array()) fail(path, "is not a train --log file (no 'steps' list)");
  return {j.value("backend", std::string("?")) + " (" + path + ")", j["steps"]};
}

// The same steps on the CUDA trainer: its loss per step, device time, peak device memory. With `curve`, the run's
// log entries are returned there (train --backend both, --softcap all) and nothing is saved or written.
int train_fast(const Plan& p, const TrainOptions& o, json* curve = nullptr) {
#ifdef GEMMA_HAVE_FAST
  const Inputs& in = p.in;
  if (!in.model.adapter)
    fail("--backend fast", "the fast trainer trains LoRA adapters: give adapters (" + in.adapters_hint + ")");
  // One GPU: fast::Trainer; several: the data-parallel trainer (each GPU takes batch / gpus sequences, in
  // micro-batches of the same rows; the loss normalised by the whole batch's scored targets, as on one GPU).
  const std::optional<int64_t> recompute_layers = recompute_layers_of(o);  // nullopt: every layer, or auto
  const bool fit_layers = o.recompute_num_layers == "auto";
  if (recompute_layers && *recompute_layers > in.model.config.num_hidden_layers)
    fail("--recompute-num-layers", std::to_string(*recompute_layers) + " is more than the model's " +
                                       std::to_string(in.model.config.num_hidden_layers) + " layers");
  if (p.batch % o.gpus != 0)
    fail("--gpus", "the batch's " + std::to_string(p.batch) + " sequences do not split evenly over " +
                       std::to_string(o.gpus) + " GPUs");
  fast::TrainerOptions topt;
  topt.recompute = !o.no_recompute;
  topt.recompute_mlp_only = o.recompute_mlp_only;
  topt.recompute_num_layers = recompute_layers.value_or(-1);
  topt.offload = o.offload;
  fast::DataParallelTrainer trainer(in.model, o.gpus, o.adamw, p.sc, topt);
  if (fit_layers) {
    // The rows of the largest micro-batch a step makes: step() splits a GPU's sequences into ceil(per / micro_rows)
    // micro-batches of ceil(per / micro) rows.
    const int64_t per = p.batch / o.gpus, micro = (per + p.micro_rows - 1) / p.micro_rows;
    const int64_t rows = (per + micro - 1) / micro, T = p.data ? p.data->seq_len : in.batch.T;
    const int64_t n = trainer.fit_recompute_num_layers(rows, T);
    std::printf("--recompute-num-layers auto: %lld of %lld layers recomputed (the fewest with which micro-batches of "
                "%lld x %lld tokens fit)\n",
                (long long)n, (long long)in.model.config.num_hidden_layers, (long long)rows, (long long)T);
  }
  std::printf("train (fast, CUDA%s): %s; softcap %s; %lld steps of %lld x %lld tokens in micro-batches of %lld rows; AdamW lr %g wd %g\n",
              o.gpus > 1 ? (", " + std::to_string(o.gpus) + " GPUs").c_str() : "", in.description.c_str(),
              softcap_name(p.sc).c_str(), (long long)p.total_steps, (long long)p.batch,
              (long long)(p.data ? p.data->seq_len : in.batch.T), (long long)p.micro_rows, o.adamw.lr, o.adamw.weight_decay);
  json history = json::array();
  Progress progress(p.total_steps);
  const StopBetweenSteps stop(curve == nullptr);
  for (int64_t step = 1; step <= p.total_steps; ++step) {
    stop.check(p, o, history, step - 1);
    const Batch batch = batch_of_step(p, step);
    const int64_t per_gpu = batch.B / o.gpus, micro = (per_gpu + p.micro_rows - 1) / p.micro_rows;
    const double lr = lr_at(p.schedule, step);
    const fast::DataParallelTrainer::Step st = trainer.step(batch, micro, {lr, o.max_grad_norm});
    try {
      check_finite(step, 0, "loss", st.loss);
    } catch (const std::runtime_error& e) {
      write_outputs_of_stopped_run(p, o, history, e.what(), curve);
      throw;
    }
    std::printf("step %4lld  loss %.12f  targets %lld  lr %.6e  grad_norm %.6e  %.3f s on the device\n",
                (long long)step, st.loss, (long long)st.tokens, lr, st.grad_norm, st.seconds);
    std::fflush(stdout);
    progress.update(step, step, st.loss, lr, st.grad_norm, real_tokens(batch));
    history.push_back({{"step", step}, {"loss", st.loss}, {"targets", st.tokens}, {"seconds", st.seconds},
                       {"learning_rate", lr}, {"grad_norm", st.grad_norm}, {"epoch", epoch_of(p, step)},
                       {"tokens", real_tokens(batch)}});
  }
  progress.finish();
  std::printf("peak device memory %.2f GB\n", double(trainer.peak_device_bytes()) / 1e9);
  if (curve) {
    *curve = history;
    return 0;
  }
  if (!p.out_dir.empty()) {
    TensorMap w = trainer.adapters();
    save_dir(p.out_dir, in.model.config, in.model.adapter, p.adapter_base, w, nullptr, trainer_state_json(p, p.total_steps, history));
    std::printf("saved %s (adapter; no optimizer state: the fast trainer keeps it on the device)\n", p.out_dir.c_str());
  }
  write_log(p, o, history, {{"peak_device_bytes", trainer.peak_device_bytes()}});
  write_report(p, o, history);
  return 0;
#else
  (void)p, (void)o, (void)curve;
  fail("--backend fast", "this build has no CUDA backend");
#endif
}

// The trainable tensors' values (float64) and AdamW moments, by name.
TrainState capture(ref::Model<double>& m, ref::Grads<double>& g, const ref::AdamWState<double>& s) {
  TrainState t;
  t.step = s.step;
  size_t k = 0;
  ref::for_each_trainable(m, g, [&](const std::string& name, const Shape& shape, const double* p, const double*, int64_t n) {
    t.params[name].assign(p, p + n);
    t.shapes[name] = shape;
    t.exp_avg[name] = k < s.m.size() ? s.m[k] : std::vector<double>(size_t(n), 0.0);
    t.exp_avg_sq[name] = k < s.v.size() ? s.v[k] : std::vector<double>(size_t(n), 0.0);
    ++k;
  });
  return t;
}

TensorMap trained_weights(const TrainState& t) {
  TensorMap w;
  for (const auto& [name, p] : t.params) w.emplace(name, tensor_from_doubles(DType::f64, t.shapes.at(name), p));
  return w;
}

void restore(ref::Model<double>& m, ref::Grads<double>& g, ref::AdamWState<double>& s, const TrainState& t, const std::string& dir) {
  s = {};
  s.step = t.step;
  size_t seen = 0;
  ref::for_each_trainable(m, g, [&](const std::string& name, const Shape& shape, double* p, const double*, int64_t n) {
    auto it = t.params.find(name);
    if (it == t.params.end()) fail("--resume " + dir, "the saved state has no tensor '" + name + "' that this run trains");
    if (t.shapes.at(name) != shape)
      fail("--resume " + dir, "tensor '" + name + "' is " + shape_str(t.shapes.at(name)) + " in the saved state, " +
                                  shape_str(shape) + " here");
    std::copy(it->second.begin(), it->second.end(), p);
    s.m.push_back(t.exp_avg.at(name));
    s.v.push_back(t.exp_avg_sq.at(name));
    ++seen;
    (void)n;
  });
  if (seen != t.params.size()) fail("--resume " + dir, "the saved state holds tensors this run does not train");
}

double eval_loss(const ref::Model<double>& m, const Dataset& d, int64_t batch, const ref::RunOptions& opt) {
  double sum = 0;
  int64_t n = 0;
  for (const Batch& b : all_batches(d, batch)) {
    sum += ref::forward_backward<double>(m, b, opt, 0.0, nullptr).loss_sum;
    n += b.count_targets();
  }
  return sum / double(n);
}

// One optimizer step of the reference trainer: the step's micro-batches, each scaled by 1 / (the step's scored
// targets), clipping by global norm after accumulation, AdamW at the schedule's learning rate under opt's policy.
struct RefStep {
  double loss, lr, grad_norm;
  int64_t targets;
};
RefStep reference_step(ref::Model<double>& m, ref::Grads<double>& g, ref::AdamWState<double>& state, const Plan& p,
                       const TrainOptions& o, const ref::RunOptions& opt, int64_t step, const Batch& batch) {
  const std::vector<Batch> micro = split_batch(batch, p.micro_rows);
  int64_t total = 0;
  for (const Batch& b : micro) total += b.count_targets();
  if (total == 0) fail("step " + std::to_string(step), "every label is ignored");
  g = ref::zero_grads(m);
  double loss_sum = 0;
  // lora_dropout's masks are drawn per row of the step's batch (RunOptions::LoraDropout), so a micro-batch says
  // where its rows start.
  ref::RunOptions mo = opt;
  if (p.in.model.adapter) mo.lora_dropout = {p.in.model.adapter->lora_dropout, p.seed, step, 0};
  for (size_t k = 0; k < micro.size(); ++k) {
    const double l = ref::forward_backward<double>(m, micro[k], mo, 1.0 / double(total), &g).loss_sum;
    mo.lora_dropout.row_offset += micro[k].B;
    check_finite(step, k, "loss", l);
    loss_sum += l;
    ref::for_each_trainable(m, g, [&](const std::string& name, const Shape&, const double*, const double* gr, int64_t n) {
      for (int64_t i = 0; i < n; ++i) check_finite(step, k, "gradient of " + name, gr[i]);
    });
  }
  // Clipping sees the accumulated gradient of the whole step, as HF's Trainer clips after accumulation.
  std::vector<std::pair<double*, int64_t>> grads;
  ref::for_each_trainable(m, g, [&](const std::string&, const Shape&, double*, double* gr, int64_t n) { grads.push_back({gr, n}); });
  RefStep r;
  r.grad_norm = clip_grad_norm(grads, o.max_grad_norm);
  ref::AdamWConfig h = o.adamw;
  h.lr = r.lr = lr_at(p.schedule, step);
  ref::adamw_step(m, g, state, h, opt.numerics.policy);
  r.loss = loss_sum / double(total);
  r.targets = total;
  return r;
}

// With `curve`, the run's log entries are returned there (train --softcap all) and nothing is saved or written.
int train_reference(const Plan& p, const TrainOptions& o, json* curve = nullptr) {
  const Inputs& in = p.in;
  ref::RunOptions opt;
  opt.softcap = p.sc;
  ref::Model<double> m = ref::make_model<double>(in.model, opt.numerics.policy);
  ref::AdamWState<double> state;
  json history = json::array();
  int64_t start = 0;
  {
    ref::Grads<double> g0 = ref::zero_grads(m);
    if (o.resume) {
      Resumed r = read_resume_dir(*o.resume);
      check_same_run(r.trainer_state["gemma_train"]["run"], p.run, *o.resume);
      restore(m, g0, state, r.state, *o.resume);
      start = r.state.step;
      if (start >= p.total_steps)
        fail("--resume " + *o.resume, "the saved run is at step " + std::to_string(start) + " of " +
                                          std::to_string(p.total_steps) + ": nothing is left to train");
      if (r.trainer_state.contains("log_history")) history = r.trainer_state["log_history"];
    }
  }
  if (p.total_steps == 0)
    std::printf("train: %s; softcap %s; --max-steps 0: evaluating only\n", in.description.c_str(), softcap_name(p.sc).c_str());
  else
    std::printf("train: %s; softcap %s; steps %lld..%lld of %lld x %lld tokens in micro-batches of %lld rows; AdamW lr %g (%s, "
                "warmup %lld) wd %g; max_grad_norm %g\n",
                in.description.c_str(), softcap_name(p.sc).c_str(), (long long)start + 1, (long long)p.total_steps,
                (long long)p.batch, (long long)(p.data ? p.data->seq_len : in.batch.T), (long long)p.micro_rows, o.adamw.lr,
                o.lr_scheduler.c_str(), (long long)o.warmup_steps, o.adamw.weight_decay, o.max_grad_norm);
  const auto t0 = std::chrono::steady_clock::now();
  Progress progress(p.total_steps);
  ref::Grads<double> g;
  const StopBetweenSteps stop(curve == nullptr);
  for (int64_t step = start + 1; step <= p.total_steps; ++step) {
    stop.check(p, o, history, step - 1);
    const Batch batch = batch_of_step(p, step);
    RefStep r{};
    try {
      r = reference_step(m, g, state, p, o, opt, step, batch);
    } catch (const InputError&) {
      throw;
    } catch (const std::runtime_error& e) {
      write_outputs_of_stopped_run(p, o, history, e.what(), curve);
      throw;
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("step %4lld  loss %.12f  targets %lld  lr %.6e  grad_norm %.6e  %.1f s\n", (long long)step, r.loss,
                (long long)r.targets, r.lr, r.grad_norm, secs);
    std::fflush(stdout);
    progress.update(step, step - start, r.loss, r.lr, r.grad_norm, real_tokens(batch));
    history.push_back({{"step", step}, {"loss", r.loss}, {"targets", r.targets}, {"seconds", secs}, {"learning_rate", r.lr},
                       {"grad_norm", r.grad_norm}, {"epoch", epoch_of(p, step)}, {"tokens", real_tokens(batch)}});
    const bool last = step == p.total_steps;
    if (!p.out_dir.empty() && (o.save_steps > 0 && step % o.save_steps == 0 && !last)) {
      const TrainState ts = capture(m, g, state);
      std::vector<std::string> save_warnings;
      const std::string d = save_checkpoint(p.out_dir, in.model.config, in.model.adapter, p.adapter_base, trained_weights(ts), ts,
                                            trainer_state_json(p, step, history), &save_warnings);
      if (::isatty(2)) std::fputc('\n', stderr);
      print_warnings("train", save_warnings);
      std::printf("saved %s\n", d.c_str());
    }
    if (last && !p.out_dir.empty()) {
      const TrainState ts = capture(m, g, state);
      std::vector<std::string> save_warnings;
      save_dir(p.out_dir, in.model.config, in.model.adapter, p.adapter_base, trained_weights(ts), &ts,
               trainer_state_json(p, step, history), &save_warnings);
      print_warnings("train", save_warnings);
    }
  }
  progress.finish();
  if (!p.out_dir.empty())
    std::printf("saved %s (%s and the training state)\n", p.out_dir.c_str(),
                in.model.adapter ? "PEFT adapter" : "HF checkpoint");
  json extra = {{"tokens_per_second", progress.tokens_per_second()}};
  if (p.eval) {
    const double el = eval_loss(m, *p.eval, p.micro_rows, opt);
    std::printf("eval_loss %.17g  (%s, %lld rows, %lld scored targets)\n", el, p.eval->path.c_str(),
                (long long)p.eval->rows.size(), (long long)p.eval->scored);
    extra["eval_loss"] = el;
  }
  if (curve) {
    *curve = history;
    return 0;
  }
  write_log(p, o, history, extra);
  write_report(p, o, history);
  return 0;
}

// train --softcap all: the same rows, schedule and seed under the four softcap combinations, one after the other
// (the seed's softcapping experiment), on the reference or the CUDA trainer; one log with a run per combination,
// one report with the four loss curves.
int train_all_softcaps(Plan& p, const TrainOptions& o) {
  const Softcap combos[4] = {{false, false}, {true, false}, {false, true}, {true, true}};
  json runs = json::object();
  std::vector<ReportSeries> series;
  for (const Softcap sc : combos) {
    p.sc = sc;
    p.run["softcap"] = softcap_name(sc);
    std::printf("-- softcap %s\n", softcap_name(sc).c_str());
    json history;
    if (o.backend == "fast")
      train_fast(p, o, &history);
    else
      train_reference(p, o, &history);
    const double first = history.front()["loss"], last = history.back()["loss"];
    std::printf("-- softcap %s: loss %.9f at step 1, %.9f at step %lld\n", softcap_name(sc).c_str(), first, last,
                (long long)p.total_steps);
    runs[softcap_name(sc)] = history;
    series.push_back({"softcap " + softcap_name(sc), history});
  }
  p.run["softcap"] = "all";
  if (o.log_path)
    write_json(*o.log_path, {{"source", p.in.source}, {"backend", o.backend}, {"softcap", "all"}, {"runs", runs},
                             {"run", p.run}});
  if (o.report_path) {
    for (const auto& [label, steps] : p.report_with) series.push_back({label, steps});
    write_html_report(*o.report_path, "train --softcap all: " + p.in.description, series, p.run);
  }
  return 0;
}

// train --backend both: the CUDA trainer and the reference trainer under the `fast` policy (the same cast points,
// emulated in float64) and under no rounding (float64), on the same rows, schedule and clipping; the fast curve must
// stay inside the band that bf16 rounding itself opens.
//
// Why this band. Over many steps the rounding histories of any two bf16 trainers diverge, so their losses drift
// apart however correct both are. The `fast` policy's distance from the float64 run, d_policy(t), measures how far
// bf16 rounding moves this run's trajectory by step t. The CUDA trainer is another bf16 trajectory whose rounding
// differs from the policy's only in fp32 summation orders, so a correct one sits at most that far from the policy
// run; the band at step s is kBandFactor times the largest d_policy(t), t <= s (running, because a rounding history
// once diverged stays diverged), and never below kStepBound, the bound one step's loss must meet before any history
// exists (tests/test_fast_model.cpp: one step's fast loss within 1e-5 of the policy's). kBandFactor 3 is the gate's
// margin (docs/verification.md): a bug must move the loss by three times what rounding alone does to be flagged.
constexpr double kBandFactor = 3.0, kStepBound = 1e-5;

int train_both(const Plan& p, const TrainOptions& o) {
  std::vector<double> fast_curve;
  std::printf("-- the CUDA trainer\n");
  {
    json h;
    train_fast(p, o, &h);
    for (const json& e : h) fast_curve.push_back(e["loss"].get<double>());
  }
  std::vector<double> curves[2];
  const char* names[2] = {"fast policy", "float64"};
  for (int k = 0; k < 2; ++k) {
    std::printf("-- the reference trainer, %s\n", names[k]);
    ref::RunOptions opt;
    opt.softcap = p.sc;
    opt.numerics.policy = k == 0 ? ref::policy_fast() : ref::policy_f64();
    ref::Model<double> m = ref::make_model<double>(p.in.model, opt.numerics.policy);
    ref::AdamWState<double> state;
    ref::Grads<double> g;
    Progress progress(p.total_steps);
    for (int64_t step = 1; step <= p.total_steps; ++step) {
      const Batch batch = batch_of_step(p, step);
      const RefStep r = reference_step(m, g, state, p, o, opt, step, batch);
      curves[k].push_back(r.loss);
      progress.update(step, step, r.loss, r.lr, r.grad_norm, real_tokens(batch));
    }
    progress.finish();
  }
  const std::vector<double>& pol = curves[0];
  const std::vector<double>& f64 = curves[1];
  json history = json::array();
  double running = 0, worst_ratio = 0;
  int64_t outside = 0, worst_step = 0;
  std::printf("%6s %18s %18s %18s %11s %11s %11s\n", "step", "fast", "fast policy", "float64", "|fast-pol|", "|pol-f64|",
              "band");
  for (size_t i = 0; i < fast_curve.size(); ++i) {
    const double d_fast = std::fabs(fast_curve[i] - pol[i]) / std::fabs(pol[i]);
    const double d_pol = std::fabs(pol[i] - f64[i]) / std::fabs(f64[i]);
    running = std::max(running, d_pol);
    const double band = std::max(kStepBound, kBandFactor * running);
    const bool in = d_fast <= band;
    outside += !in;
    if (d_fast / band > worst_ratio) worst_ratio = d_fast / band, worst_step = int64_t(i) + 1;
    if (!in || i < 3 || (i + 1) % 10 == 0 || i + 1 == fast_curve.size())
      std::printf("%6zu %18.12f %18.12f %18.12f %11.3e %11.3e %11.3e%s\n", i + 1, fast_curve[i], pol[i], f64[i], d_fast,
                  d_pol, band, in ? "" : "  OUTSIDE");
    history.push_back({{"step", i + 1}, {"loss_fast", fast_curve[i]}, {"loss_fast_policy", pol[i]}, {"loss_float64", f64[i]},
                       {"rel_fast_vs_policy", d_fast}, {"rel_policy_vs_float64", d_pol}, {"band", band}, {"inside", in}});
  }
  std::printf("%s: %lld of %lld steps outside the band; worst |fast-policy| / band %.3f at step %lld\n",
              outside ? "FAIL" : "PASS", (long long)outside, (long long)fast_curve.size(), worst_ratio,
              (long long)worst_step);
  write_log(p, o, history, {{"band_factor", kBandFactor}, {"step_bound", kStepBound}, {"steps_outside", outside},
                            {"worst_ratio", worst_ratio}, {"worst_step", worst_step}});
  if (o.report_path) {
    std::vector<ReportSeries> series;
    const char* labels[3] = {"fast", "reference, fast policy", "reference, float64"};
    const std::vector<double>* ys[3] = {&fast_curve, &pol, &f64};
    for (int k = 0; k < 3; ++k) {
      json steps = json::array();
      for (size_t i = 0; i < ys[k]->size(); ++i) steps.push_back({{"step", i + 1}, {"loss", (*ys[k])[i]}});
      series.push_back({labels[k], steps});
    }
    for (const auto& [label, steps] : p.report_with) series.push_back({label, steps});
    write_html_report(*o.report_path, "train --backend both: " + p.in.description, series, p.run);
  }
  return outside ? 1 : 0;
}

int run_train(const InputSpec& spec, const TrainOptions& o) {
  if (o.backend != "reference" && o.backend != "fast" && o.backend != "both")
    fail("--backend", "'" + o.backend + "' is not one of reference, fast, both");
  // Flag combinations first: they are wrong on any machine, with or without a GPU.
  if (o.softcap && *o.softcap == "all" && o.backend == "both")
    fail("--softcap all", "runs one backend (reference or fast): --backend both with one combination at a time");
  if (o.recompute_mlp_only && o.no_recompute)
    fail("--recompute-mlp-only", "chooses what activation checkpointing recomputes; --no-recompute turns it off");
  if (o.recompute_mlp_only && o.offload)
    fail("--recompute-mlp-only", "keeps the attention block's outputs on the device; --offload moves the layers' "
                                 "checkpoints to host memory: one or the other");
  (void)recompute_layers_of(o);  // a malformed value first
  if (o.recompute_num_layers && o.no_recompute)
    fail("--recompute-num-layers", "chooses how many layers activation checkpointing recomputes; --no-recompute turns "
                                   "it off");
  if (o.offload && o.no_recompute)
    fail("--offload", "moves the activation checkpoints to host memory; with --no-recompute there are none");
  const bool on_gpu = o.backend != "reference";
  std::string why;
  if (on_gpu && !fast_available(&why)) fail("--backend " + o.backend, why);
  if (o.gpus != 1 && !on_gpu) fail("--gpus", "only the fast backend runs on GPUs; the reference runs on the CPU");
  for (const auto& [set, flag] : {std::pair{o.no_recompute, "--no-recompute"},
                                  std::pair{o.recompute_mlp_only, "--recompute-mlp-only"}, std::pair{o.offload, "--offload"},
                                  std::pair{o.recompute_num_layers.has_value(), "--recompute-num-layers"}})
    if (set && !on_gpu)
      fail(flag, "sets the fast backend's activation memory; the reference keeps every activation in host memory");
  if (o.max_steps && *o.max_steps < (o.eval_data ? 0 : 1))
    fail("--max-steps", "must be at least 1 (0 only with --eval-data: evaluate without training)");
  if (o.max_steps == 0 && (o.output_dir || o.save_adapter || o.resume || o.save_steps))
    fail("--max-steps", "0 trains nothing: there is nothing to save or resume");
  // --max-steps 0 evaluates --eval-data and trains nothing, so the flags of training change nothing; accepted, they
  // let a user believe a run with --lr or --epochs had trained (found by a probe, 2026-12-06: exit 0, the same
  // eval_loss with and without them). --batch and --micro-batches only split the evaluation's rows.
  if (o.max_steps == 0)
    for (const char* f : {"--data", "--epochs", "--batch", "--micro-batches", "--lr", "--weight-decay", "--adam-beta1",
                          "--adam-beta2", "--adam-epsilon", "--lr-scheduler", "--warmup-steps", "--max-grad-norm"})
      if (o.given.count(f)) fail(f, "changes nothing with --max-steps 0, which only evaluates --eval-data");
  if (o.epochs && *o.epochs < 1) fail("--epochs", "must be at least 1");
  if (o.epochs && !o.data) fail("--epochs", "counts passes over --data; synthetic batches have no epochs (give --max-steps)");
  if (o.micro_batches < 1) fail("--micro-batches", "must be at least 1");
  if (!(o.adamw.lr >= 0) || !std::isfinite(o.adamw.lr)) fail("--lr", "must be 0 or a positive number");
  // torch.optim.AdamW's own checks (its __init__): a value it refuses would train a run no peer can.
  if (!(o.adamw.beta1 >= 0 && o.adamw.beta1 < 1)) fail("--adam-beta1", "must be in [0, 1) (torch.optim.AdamW)");
  if (!(o.adamw.beta2 >= 0 && o.adamw.beta2 < 1)) fail("--adam-beta2", "must be in [0, 1) (torch.optim.AdamW)");
  if (!(o.adamw.eps >= 0) || !std::isfinite(o.adamw.eps)) fail("--adam-epsilon", "must be 0 or positive (torch.optim.AdamW)");
  if (!(o.adamw.weight_decay >= 0) || !std::isfinite(o.adamw.weight_decay))
    fail("--weight-decay", "must be 0 or positive (torch.optim.AdamW)");
  if (!(o.max_grad_norm >= 0) || !std::isfinite(o.max_grad_norm)) fail("--max-grad-norm", "must be 0 (no clipping) or positive");
  if (o.warmup_steps < 0) fail("--warmup-steps", "must be 0 or more");
  if (o.save_steps < 0) fail("--save-steps", "must be 0 (only the end) or more");
  const Scheduler sched = parse_scheduler(o.lr_scheduler);
  // HF's "constant" ignores warmup; asking for warmup and not getting it would train another run than asked for.
  if (sched == Scheduler::constant && o.warmup_steps > 0)
    fail("--warmup-steps", "'constant' has no warmup (HF ignores it): use --lr-scheduler constant_with_warmup");
  // --eval-data's rows are packed too, so that rows carrying their own position_ids can be evaluated alone
  // (--max-steps 0 refuses --data).
  if (o.packing && !o.data && !o.eval_data) fail("--packing", "packs --data or --eval-data rows; give one");
  // The tokenizer's flags act on --data text rows only; each is refused where it would change nothing.
  const char* tok_flag = o.tokenizer.model_path ? "--tokenizer" : o.tokenizer.config_path ? "--tokenizer-config"
                         : o.tokenizer.bos_id ? "--bos-id" : o.tokenizer.eos_id ? "--eos-id" : nullptr;
  if (tok_flag && !o.data && !o.eval_data) fail(tok_flag, "acts on --data text rows; give --data");
  if (o.tokenizer.config_path && !o.tokenizer.model_path) fail("--tokenizer-config", "goes with --tokenizer");
  if ((o.tokenizer.bos_id || o.tokenizer.eos_id) && !o.tokenizer.model_path)
    fail(o.tokenizer.bos_id ? "--bos-id" : "--eos-id", "frames the text rows --tokenizer tokenizes; give --tokenizer");
  if (o.output_dir && o.save_adapter) fail("--save-adapter", "conflicts with --output-dir (they name the same directory)");
  if (o.save_steps > 0 && !o.output_dir && !o.save_adapter) fail("--save-steps", "writes checkpoints into --output-dir; give it");
  if (on_gpu) {
    // The CUDA trainer's AdamW moments stay on the device: nothing to resume from or checkpoint yet.
    if (o.resume) fail("--resume", "the fast trainer cannot load AdamW moments yet: resume with --backend reference");
    if (o.save_steps > 0) fail("--save-steps", "the fast trainer cannot save its AdamW moments yet");
    if (o.eval_data) fail("--eval-data", "evaluates with the reference: use --backend reference");
  }
  if (o.backend == "both") {
    // Three runs compared step by step: which one's adapter would be saved is not a question to guess.
    if (o.output_dir || o.save_adapter) fail(o.output_dir ? "--output-dir" : "--save-adapter",
                                             "--backend both compares curves; save from --backend fast or reference");
  }

  if (!o.report_with.empty() && !o.report_path) fail("--report-with", "adds curves to --report; give --report");
  // Output paths are checked before the run, as verify's are: a log or report that cannot be written would
  // otherwise be found out after the last step, and two outputs naming one file would silently keep the last.
  {
    std::vector<std::pair<std::string, std::string>> files, dirs;  // (flag, path)
    if (o.log_path) files.emplace_back("--log", *o.log_path);
    if (o.report_path) files.emplace_back("--report", *o.report_path);
    if (o.output_dir) dirs.emplace_back("--output-dir", *o.output_dir);
    if (o.save_adapter) dirs.emplace_back("--save-adapter", *o.save_adapter);
    if (o.save_base) dirs.emplace_back("--save-base", *o.save_base);
    std::vector<std::pair<std::string, std::string>> inputs = input_paths(spec);
    for (const auto& [flag, path] : {std::pair{"--data", o.data}, std::pair{"--eval-data", o.eval_data},
                                     std::pair{"--tokenizer", o.tokenizer.model_path},
                                     std::pair{"--tokenizer-config", o.tokenizer.config_path}})
      if (path) inputs.emplace_back(flag, *path);
    for (const std::string& f : o.report_with) inputs.emplace_back("--report-with", f);
    check::check_output_paths(files, dirs, inputs);
  }
  Plan p;
  p.seed = spec.seed;
  for (const std::string& f : o.report_with) p.report_with.push_back(read_log(f));
  InputSpec loaded = spec;
  loaded.reference_runs = o.backend != "fast";
  p.in = load_inputs(loaded);
  print_warnings("train", p.in.model.warnings);
  const Inputs& in = p.in;
  // LoRA dropout changes every step's gradients; until train applies it, training without it would be
  // training another model than the adapter config describes.
  if (in.model.adapter && in.model.adapter->lora_dropout > 0 && o.backend != "reference") {
    char s[32];
    std::snprintf(s, sizeof s, "%g", in.model.adapter->lora_dropout);
    fail(spec.case_path ? *spec.case_path : spec.adapter.value_or(in.source),
         std::string("lora_dropout ") + s + " is applied by the reference backend only (the CUDA trainer has no "
         "dropout yet): refused rather than trained without it");
  }
  // With a case file the seed reaches only LoRA dropout's masks (the weights and the batch are the file's, and
  // --data is refused with --case): without dropout it would change no bit, and a user varying it would be
  // misled into thinking the runs differ.
  if (o.given.count("--seed") && spec.case_path && !(in.model.adapter && in.model.adapter->lora_dropout > 0))
    fail("--seed", "changes nothing here: the case file fixes the weights and the batch, and there is no "
                   "lora_dropout for it to seed");
  // Evaluating only, the seed reaches synthetic weights (a preset) or synthetic adapters (--lora-r on a checkpoint)
  // and nothing else: no batch is drawn, no row is shuffled, dropout is off in evaluation.
  if (o.given.count("--seed") && o.max_steps == 0 && !spec.model && !(spec.lora_r && *spec.lora_r > 0 && !spec.adapter))
    fail("--seed", "changes nothing with --max-steps 0 here: no synthetic weights or adapters are drawn, and "
                   "evaluation draws nothing else");
  if (o.save_adapter && !in.model.adapter)
    fail("--save-adapter", "this run trains every weight (no adapters): use --output-dir, which writes model.safetensors");
  p.out_dir = o.output_dir ? *o.output_dir : o.save_adapter.value_or("");
  p.adapter_base = in.source;
  // --layers N on a checkpoint trains its first N layers, a model of N layers. A full-weight save writes that
  // model (its config.json says N), but an adapter names its base by path, and PEFT puts it on the whole depth of
  // the checkpoint there (the missing layers' lora_B left 0): another model than the one trained. The adapter is
  // therefore written only beside the N-layer base it belongs to (--save-base), and names that as its base.
  if (spec.config && spec.layers && in.model.adapter && !p.out_dir.empty()) {
    const int64_t depth = parse_config_json(read_text_file(*spec.config), *spec.config, nullptr).num_hidden_layers;
    if (*spec.layers < depth) {
      if (!o.save_base)
        fail("--layers", std::to_string(*spec.layers) + " of the checkpoint's " + std::to_string(depth) +
                             " layers: the adapter in " + p.out_dir + " would belong to that " +
                             std::to_string(*spec.layers) + "-layer model, which its base " + in.source +
                             " is not; add --save-base DIR to write the base it belongs to");
      p.adapter_base = *o.save_base;
    }
  }
  // With --save-base the adapter belongs to the base written beside it in every case: a preset's base was named
  // "preset:gemma2-tiny", which no loader finds, and a cap the run turns off is off in that base's config.json
  // only (found by a probe, 2026-12-05).
  if (o.save_base && in.model.adapter) p.adapter_base = *o.save_base;
  const Config& c = in.model.config;
  std::vector<std::string> warnings;
  const bool all_softcaps = o.softcap && *o.softcap == "all";
  if (all_softcaps) {
    // Four runs compared: what one of them would save or resume is not a question to guess.
    if (!p.out_dir.empty() || o.resume || o.save_steps > 0 || o.eval_data)
      fail("--softcap all", "compares four runs' curves: save, resume or evaluate one combination at a time");
    check_softcap_available(c, {true, true}, "--softcap all");
    p.sc = {true, true};
  } else {
    const Softcap in_config = config_softcaps(c);
    p.sc = o.softcap ? parse_softcap(*o.softcap, "--softcap") : in_config;
    check_softcap_available(c, p.sc, "--softcap");
    // A cap the run turns off is off in the model it trains, and so in every config.json it writes (--save-base,
    // a full-weight --output-dir): HF loading that file must compute what was trained. An adapter's config has no
    // place for it, so a saved adapter gets a warning instead.
    if (!p.sc.attn) p.in.model.config.attn_logit_softcapping.reset();
    if (!p.sc.logits) p.in.model.config.final_logit_softcapping.reset();
    if (!(p.sc == in_config) && in.model.adapter && !p.out_dir.empty() && !o.save_base)
      warnings.push_back("--softcap " + softcap_name(p.sc) +
                         ": the adapter is trained with a cap off that the base's config.json has on; load it on a "
                         "base whose config sets that cap to null");
  }
  p.synthetic_data = !spec.case_path;
  std::unique_ptr<Tokenizer> tok;
  if (o.tokenizer.model_path) {
    tok = Tokenizer::load(o.tokenizer, c.vocab_size);
    warnings.insert(warnings.end(), tok->warnings.begin(), tok->warnings.end());
  }
  if (o.data) {
    if (spec.case_path) fail("--data", "conflicts with --case (the case file fixes the batch)");
    p.data = load_dataset({*o.data, in.batch.T, o.packing}, c, tok.get(), &warnings);
    p.batch = in.batch.B;
    p.steps_per_epoch = steps_per_epoch(int64_t(p.data->rows.size()), p.batch);
    p.total_steps = o.max_steps.value_or(o.epochs.value_or(1) * p.steps_per_epoch);
    std::printf("data: %s: %lld examples in %lld rows of %lld tokens (%s), %lld real tokens, %lld scored targets; %lld steps per epoch\n",
                p.data->path.c_str(), (long long)p.data->examples, (long long)p.data->rows.size(), (long long)p.data->seq_len,
                o.packing ? "packed" : "padded", (long long)p.data->tokens, (long long)p.data->scored,
                (long long)p.steps_per_epoch);
  } else {
    p.batch = in.batch.B;
    p.total_steps = o.max_steps.value_or(10);
  }
  if (o.eval_data) p.eval = load_dataset({*o.eval_data, in.batch.T, o.packing, "--eval-data"}, c, tok.get(), &warnings);
  if (tok && (p.data ? p.data->text_examples : 0) + (p.eval ? p.eval->text_examples : 0) == 0)
    fail(tok_flag, "every row of the data is tokenized already (input_ids): the tokenizer and its BOS / EOS would "
                   "change nothing");
  print_warnings("train", warnings);
  if (p.batch % o.micro_batches != 0)
    fail("--micro-batches", std::to_string(o.micro_batches) + " does not divide the batch of " + std::to_string(p.batch));
  p.micro_rows = p.batch / o.micro_batches;
  // Written once every input and flag has been checked: a run refused with exit 2 leaves nothing behind.
  if (o.save_base) {
    // The base the run starts from, as HF loads it: for a preset's synthetic weights the only way to get them
    // into HF + PEFT (tools/peft_roundtrip.py). Frozen weights are written as stored (bf16).
    if (in.model.weights.count(kEmbedPaddingName))
      fail("--save-base", "this run's head is padded in memory (the gate setting of a released preset), which no HF "
                          "checkpoint has: use gemma2-tiny, gemma2-odd or a checkpoint");
    TensorMap base;
    for (const auto& [n, t] : in.model.weights)
      if (!adapter_tensor(n)) base.emplace(n, t);
    std::error_code ec;
    std::filesystem::create_directories(*o.save_base, ec);
    write_safetensors(*o.save_base + "/model.safetensors", base, {{"format", "pt"}});
    write_text_file_atomically(*o.save_base + "/config.json", to_config_json(in.model.config) + "\n");
    std::printf("saved the base model to %s (config.json, model.safetensors)\n", o.save_base->c_str());
  }
  p.schedule = {sched, o.adamw.lr, o.warmup_steps, p.total_steps};
  p.run = {{"source", in.source},
           {"description", in.description},
           {"seed", spec.seed},
           {"backend", o.backend},
           {"softcap", softcap_name(p.sc)},
           {"batch", p.batch},
           {"micro_batches", o.micro_batches},
           {"seq_len", p.data ? p.data->seq_len : in.batch.T},
           {"data", p.data ? json{{"sha256", p.data->sha256}, {"rows", rows_digest(*p.data)}, {"packing", o.packing}}
                           : json(spec.case_path ? "case" : "synthetic")},
           {"learning_rate", o.adamw.lr},
           {"lr_scheduler_type", scheduler_name(sched)},
           {"warmup_steps", o.warmup_steps},
           {"max_steps", p.total_steps},
           {"max_grad_norm", o.max_grad_norm},
           {"weight_decay", o.adamw.weight_decay},
           {"adam_beta1", o.adamw.beta1},
           {"adam_beta2", o.adamw.beta2},
           {"adam_epsilon", o.adamw.eps},
           {"adapter", in.model.adapter ? json::parse(to_adapter_config_json(*in.model.adapter)) : json(nullptr)}};
  // Only where a run is saved or resumed: the digest reads every base weight once.
  if (o.output_dir || o.save_adapter || o.resume) p.run["model"] = model_digest(in);
  if (all_softcaps) return train_all_softcaps(p, o);  // either backend: before the backends' own runs
  if (o.backend == "fast") return train_fast(p, o);
  if (o.backend == "both") return train_both(p, o);
  return train_reference(p, o);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"train: finetune Gemma 2 (LoRA or full weights) with AdamW and gradient accumulation"};
  InputSpec spec;
  TrainOptions o;
  std::optional<uint64_t> seed;
  app.add_option("--model", spec.model, "preset with synthetic weights and batches");
  app.add_option("--case", spec.case_path, "HDF5 case file (its batch is used every step)");
  app.add_option("--config", spec.config, "HF config.json");
  app.add_option("--weights", spec.weights, "safetensors file or checkpoint directory");
  app.add_option("--adapter", spec.adapter, "PEFT adapter directory or adapter_model.safetensors to train on");
  app.add_option("--layers", spec.layers, "layers of a synthetic or checkpoint run");
  app.add_option("--seq,--seq-len", spec.seq, "tokens per row: of synthetic batches, or what --data rows are padded or packed to");
  app.add_option("--batch", spec.batch, "rows per optimizer step (all micro-batches together)");
  app.add_option("--seed", seed, "seed of synthetic weights and batches, and of the data order")->check(kNonNegativeSeed);
  app.add_option("--quantize", spec.quantize,
                 "nf4: base projections quantized as QLoRA does (bitsandbytes nf4, blocksize 64, double quantization), "
                 "then used dequantized");
  app.add_option("--lora-r", spec.lora_r,
                 "rank of synthetic LoRA adapters, on a preset (default 8) or a checkpoint without --adapter (default "
                 "none); 0 trains every weight");
  app.add_option("--max-steps,--steps", o.max_steps, "optimizer steps (default: --epochs over --data, or 10)");
  app.add_option("--epochs", o.epochs, "passes over --data (default 1), reshuffled each epoch");
  app.add_option("--micro-batches", o.micro_batches, "micro-batches per step (gradient accumulation)");
  app.add_option("--lr", o.adamw.lr, "AdamW peak learning rate (HF's learning_rate)");
  app.add_option("--weight-decay", o.adamw.weight_decay, "AdamW decoupled weight decay");
  app.add_option("--adam-beta1", o.adamw.beta1, "AdamW beta1 (0.9)");
  app.add_option("--adam-beta2", o.adamw.beta2, "AdamW beta2 (0.999)");
  app.add_option("--adam-epsilon", o.adamw.eps, "AdamW epsilon (1e-8)");
  app.add_option("--lr-scheduler", o.lr_scheduler, "linear (default) | cosine | constant | constant_with_warmup, as HF's");
  app.add_option("--warmup-steps", o.warmup_steps, "steps of linear warmup from 0");
  app.add_option("--max-grad-norm", o.max_grad_norm, "clip the global gradient norm to this (default 1.0; 0: off)");
  app.add_option("--softcap", o.softcap, "none | attn | logits | attn,logits | all (the four in turn, one report)");
  app.add_option("--backend", o.backend,
                 "reference | fast | both (fast beside the reference, per-step band; exit 1 outside it)");
  app.add_option("--gpus", o.gpus, "fast backend: data parallel over the first N GPUs (NCCL)");
  app.add_flag("--no-recompute", o.no_recompute, "fast backend: keep every layer's activations (no activation checkpointing)");
  app.add_flag("--recompute-mlp-only", o.recompute_mlp_only,
               "fast backend: also keep each layer's attention-block and down_proj outputs; recompute only the MLP");
  app.add_option("--recompute-num-layers", o.recompute_num_layers,
                 "fast backend: N: checkpoint and recompute only the first N layers, the rest keep every activation "
                 "(with --recompute-mlp-only gate|up's output) (default: all); auto: the fewest that fit the GPU");
  app.add_flag("--offload", o.offload, "fast backend: the layers' activation checkpoints in pinned host memory");
  app.add_option("--data", o.data, "JSONL training data (input_ids[/labels], or text / Alpaca rows with --tokenizer)");
  app.add_flag("--packing", o.packing, "pack --data examples into rows (position_ids restart per example)");
  app.add_option("--tokenizer", o.tokenizer.model_path, "SentencePiece tokenizer.model for text rows");
  app.add_option("--tokenizer-config", o.tokenizer.config_path, "HF tokenizer_config.json (add_bos_token, bos_token, eos_token)");
  app.add_option("--bos-id", o.tokenizer.bos_id, "BOS id (default: the tokenizer's; Gemma 2)");
  app.add_option("--eos-id", o.tokenizer.eos_id, "EOS id (default: the tokenizer's; Gemma 1)");
  app.add_option("--eval-data", o.eval_data, "JSONL rows whose mean loss is printed after training (held-out check)");
  app.add_option("--output-dir", o.output_dir, "write the trained adapter (or model), and the state to resume from");
  app.add_option("--save-adapter", o.save_adapter, "the same as --output-dir, for a LoRA run");
  app.add_option("--save-steps", o.save_steps, "also write --output-dir/checkpoint-N every N steps");
  app.add_option("--resume", o.resume, "continue a saved run (an --output-dir or a checkpoint-N) bit-exactly");
  app.add_option("--save-base", o.save_base, "write the base model the run starts from (config.json + model.safetensors)");
  app.add_option("--log", o.log_path, "write the per-step log as JSON");
  app.add_option("--report", o.report_path, "write an HTML page with the loss, learning rate and grad norm curves");
  app.add_option("--report-with", o.report_with, "other runs' --log files to plot beside this run's (repeatable)");
  if (const std::string e = empty_value_error(argc, argv); !e.empty()) {
    std::fprintf(stderr, "train: %s\n", e.c_str());
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "train: %s\n", e.what());
    return 2;
  }
  if (seed) spec.seed = *seed;
  for (const CLI::Option* opt : app.get_options())
    if (opt->count() > 0) o.given.insert(opt->get_name());
  try {
    return run_train(spec, o);
  } catch (const Interrupted& e) {
    const std::string kept = o.log_path && o.report_path ? " (--log and --report hold the steps taken)"
                             : o.log_path                ? " (--log holds the steps taken)"
                             : o.report_path             ? " (--report holds the steps taken)"
                                                         : "";
    std::fprintf(stderr, "train: %s%s\n", e.why.c_str(), kept.c_str());
    return 128 + e.sig;
  } catch (const InputError& e) {
    std::fprintf(stderr, "train: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "train: out of memory (try fewer --layers, a shorter --seq or a smaller --batch)\n");
    return 2;
  } catch (const std::runtime_error& e) {
    std::fprintf(stderr, "train: stopped: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    // As in verify: a bug, but reported as one line and a status, never as an abort.
    std::fprintf(stderr, "train: internal error: %s\n", e.what());
    return 3;
  }
}
