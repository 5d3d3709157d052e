// train: LoRA (or full-weight) finetuning steps with AdamW and gradient accumulation, logging the loss per
// step. The reference backend is float64 and deterministic: the same inputs and seed give the same bits.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "model/errors.hpp"
#include "model/synthetic.hpp"
#include "reference/adamw.hpp"
#ifdef GEMMA_HAVE_FAST
#include "fast/fast.hpp"
#endif
#include "check/fast_backend.hpp"
#include "check/inputs.hpp"
#include "check/report.hpp"

using namespace gemma;
using namespace gemma::check;

namespace {

struct TrainOptions {
  int64_t steps = 10;
  int64_t micro_batches = 1;  // gradient accumulation: micro-batches per step
  ref::AdamWConfig adamw;
  std::optional<std::string> softcap, log_path;
  std::string backend = "reference";
};

// Stops with a message naming where a non-finite value first appeared.
void check_finite(int64_t step, size_t micro, const std::string& what, double v) {
  if (!std::isfinite(v)) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "non-finite %s (%g) at step %lld, micro-batch %zu", what.c_str(), v,
                  (long long)step, micro);
    throw std::runtime_error(buf);
  }
}

// The same steps on the CUDA trainer: its loss per step, device time, peak device memory.
int train_fast(const Inputs& in, Softcap sc, const TrainOptions& o, bool synthetic_data, uint64_t seed) {
#ifdef GEMMA_HAVE_FAST
  if (!in.model.adapter)
    fail("--backend fast", "the fast trainer trains LoRA adapters: give adapters (" + in.adapters_hint + ")");
  const Config& c = in.model.config;
  fast::Trainer trainer(in.model, o.adamw, sc);
  std::printf("train (fast, CUDA): %s; softcap %s; %lld steps of %lld x %lld tokens in %lld micro-batches; AdamW lr %g wd %g\n",
              in.description.c_str(), softcap_name(sc).c_str(), (long long)o.steps, (long long)in.batch.B,
              (long long)in.batch.T, (long long)o.micro_batches, o.adamw.lr, o.adamw.weight_decay);
  nlohmann::json log = nlohmann::json::array();
  for (int64_t step = 1; step <= o.steps; ++step) {
    const Batch batch =
        synthetic_data && step > 1 ? synthetic_batch(c, in.batch.B, in.batch.T, seed + uint64_t(step) * 7919) : in.batch;
    const fast::Trainer::Step st = trainer.step(batch, o.micro_batches);
    check_finite(step, 0, "loss", st.loss);
    std::printf("step %4lld  loss %.12f  targets %lld  %.3f s on the device\n", (long long)step, st.loss,
                (long long)st.tokens, st.seconds);
    std::fflush(stdout);
    log.push_back({{"step", step}, {"loss", st.loss}, {"targets", st.tokens}, {"seconds", st.seconds}});
  }
  std::printf("peak device memory %.2f GB\n", double(trainer.peak_device_bytes()) / 1e9);
  if (o.log_path)
    write_json(*o.log_path, {{"source", in.source}, {"backend", "fast"}, {"softcap", softcap_name(sc)}, {"steps", log},
                             {"peak_device_bytes", trainer.peak_device_bytes()}});
  return 0;
#else
  (void)in, (void)sc, (void)o, (void)synthetic_data, (void)seed;
  fail("--backend fast", "this build has no CUDA backend");
#endif
}

int run_train(const InputSpec& spec, const TrainOptions& o) {
  if (o.backend != "reference" && o.backend != "fast") fail("--backend", "'" + o.backend + "' is not one of reference, fast");
  std::string why;
  if (o.backend == "fast" && !fast_available(&why)) fail("--backend fast", why);
  if (o.steps < 1) fail("--steps", "must be at least 1");
  if (o.micro_batches < 1) fail("--micro-batches", "must be at least 1");
  if (!(o.adamw.lr > 0) || !std::isfinite(o.adamw.lr)) fail("--lr", "must be a positive number");
  Inputs in = load_inputs(spec);
  print_warnings("train", in.model.warnings);
  // LoRA dropout changes every step's gradients; until train applies it, training without it would be
  // training another model than the adapter config describes.
  if (in.model.adapter && in.model.adapter->lora_dropout > 0) {
    char p[32];
    std::snprintf(p, sizeof p, "%g", in.model.adapter->lora_dropout);
    fail(spec.case_path ? *spec.case_path : spec.adapter.value_or(in.source),
         std::string("lora_dropout ") + p + " is not applied by train yet: refused rather than trained without it");
  }
  const Config& c = in.model.config;
  const Softcap sc = o.softcap ? parse_softcap(*o.softcap, "--softcap") : config_softcaps(c);
  check_softcap_available(c, sc, "--softcap");
  if (in.batch.B % o.micro_batches != 0)
    fail("--micro-batches", std::to_string(o.micro_batches) + " does not divide the batch of " + std::to_string(in.batch.B));
  const bool synthetic_data = !spec.case_path;

  if (o.backend == "fast") return train_fast(in, sc, o, synthetic_data, spec.seed);
  ref::RunOptions opt;
  opt.softcap = sc;
  ref::Model<double> m = ref::make_model<double>(in.model, opt.numerics.policy);
  ref::AdamWState<double> state;
  std::printf("train: %s; softcap %s; %lld steps of %lld x %lld tokens in %lld micro-batches; AdamW lr %g wd %g\n",
              in.description.c_str(), softcap_name(sc).c_str(), (long long)o.steps, (long long)in.batch.B,
              (long long)in.batch.T, (long long)o.micro_batches, o.adamw.lr, o.adamw.weight_decay);
  nlohmann::json log = nlohmann::json::array();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= o.steps; ++step) {
    // Synthetic runs draw a fresh batch per step (seeded by seed and step); a case file's batch repeats.
    const Batch batch =
        synthetic_data && step > 1 ? synthetic_batch(c, in.batch.B, in.batch.T, spec.seed + uint64_t(step) * 7919) : in.batch;
    const std::vector<Batch> micro = split_batch(batch, batch.B / o.micro_batches);
    int64_t total = 0;
    for (const Batch& b : micro) total += b.count_targets();
    if (total == 0) fail("step " + std::to_string(step), "every label is ignored");
    ref::Grads<double> g = ref::zero_grads(m);
    double loss_sum = 0;
    for (size_t k = 0; k < micro.size(); ++k) {
      const double l = ref::forward_backward<double>(m, micro[k], opt, 1.0 / double(total), &g).loss_sum;
      check_finite(step, k, "loss", l);
      loss_sum += l;
      ref::for_each_trainable(m, g, [&](const std::string& name, const Shape&, const double*, const double* gr, int64_t n) {
        for (int64_t i = 0; i < n; ++i) check_finite(step, k, "gradient of " + name, gr[i]);
      });
    }
    const double loss = loss_sum / double(total);
    ref::adamw_step(m, g, state, o.adamw, opt.numerics.policy);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("step %4lld  loss %.12f  targets %lld  %.1f s\n", (long long)step, loss, (long long)total, secs);
    std::fflush(stdout);
    log.push_back({{"step", step}, {"loss", loss}, {"targets", total}, {"seconds", secs}});
  }
  if (o.log_path)
    write_json(*o.log_path, {{"source", in.source}, {"backend", o.backend}, {"softcap", softcap_name(sc)}, {"steps", log}});
  return 0;
}

}  // namespace

// CLI11 reads "-1" into an unsigned seed as 2^64 - 1 without a word; a user who typed it meant something else.
const CLI::Validator kNonNegativeSeed(
    [](std::string& v) { return v.find('-') != std::string::npos ? "a seed is a non-negative integer, got " + v : std::string(); },
    "SEED");

int main(int argc, char** argv) {
  CLI::App app{"train: finetune Gemma 2 (LoRA or full weights) with AdamW and gradient accumulation"};
  InputSpec spec;
  TrainOptions o;
  std::optional<uint64_t> seed;
  app.add_option("--model", spec.model, "preset with synthetic weights and batches");
  app.add_option("--case", spec.case_path, "HDF5 case file (its batch is used every step)");
  app.add_option("--config", spec.config, "HF config.json");
  app.add_option("--weights", spec.weights, "safetensors file or checkpoint directory");
  app.add_option("--adapter", spec.adapter, "PEFT adapter directory or adapter_model.safetensors");
  app.add_option("--layers", spec.layers, "layers of a synthetic or checkpoint run");
  app.add_option("--seq", spec.seq, "sequence length of synthetic batches");
  app.add_option("--batch", spec.batch, "sequences per step of synthetic batches");
  app.add_option("--seed", seed, "seed of synthetic weights and batches")->check(kNonNegativeSeed);
  app.add_option("--lora-r", spec.lora_r,
                 "rank of synthetic LoRA adapters, on a preset (default 8) or a checkpoint without --adapter (default "
                 "none); 0 trains every weight");
  app.add_option("--steps", o.steps, "optimizer steps");
  app.add_option("--micro-batches", o.micro_batches, "micro-batches per step (gradient accumulation)");
  app.add_option("--lr", o.adamw.lr, "AdamW learning rate");
  app.add_option("--weight-decay", o.adamw.weight_decay, "AdamW decoupled weight decay");
  app.add_option("--softcap", o.softcap, "none | attn | logits | attn,logits");
  app.add_option("--backend", o.backend, "reference | fast");
  app.add_option("--log", o.log_path, "write the per-step losses as JSON");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "train: %s\n", e.what());
    return 2;
  }
  if (seed) spec.seed = *seed;
  try {
    return run_train(spec, o);
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
