// verify: do the numerics match? Runs the chosen backend on a model and batch, compares with what is
// expected, prints one line per check and "N/M checks passed", exits 0 (all pass), 1 (a numeric check
// failed) or 2 (bad usage or input). Interface: shared/spec/contract.md.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>

#include "model/errors.hpp"
#include "model/h5util.hpp"
#include "reference/run.hpp"
#include "tools/inputs.hpp"
#include "tools/report.hpp"

using namespace gemma;
using namespace gemma::tools;

namespace {

struct Tolerances {
  double loss, grads, logits;
  std::string why;
};

// Tolerances against /expected depend on who computed it. Two float64 implementations of the same math
// differ only by rounding in different operation orders: about 1e-15 relative per reduction, amplified by
// the loss's conditioning; the bounds are the project's stated agreement targets (README, "Accuracy"), which
// the held-out HF cases meet with margin. HF as shipped computes RMSNorm, RoPE and the attention softmax in
// float32 inside a float64 model, which moves the loss by 1e-9..1e-8 relative.
Tolerances tolerances_for(const std::map<std::string, std::string>& prov) {
  auto it = prov.find("expected_kind");
  const std::string kind = it == prov.end() ? "" : it->second;
  if (kind == "hf-float64-shipped")
    return {1e-7, 1e-6, 1e-6, "HF as shipped: float32 RMSNorm, RoPE and softmax inside a float64 model"};
  if (kind == "hf-float64-patched")
    return {1e-11, 1e-9, 1e-11, "HF float64 (norm, RoPE, softmax patched to float64): float64 rounding only"};
  return {1e-11, 1e-9, 1e-11, "float64 vs float64: rounding of different operation orders only"};
}

double rel_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// Largest |a - b| over the largest |b|: a relative error that stays meaningful for logits near zero.
double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(a[i] - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return den == 0 ? num : num / den;
}

void dump_grads(const std::string& path, const TensorMap& grads) {
  h5::write_atomically(path, [&](H5::H5File& f) {
    H5::Group g = f.createGroup("grads");
    for (const auto& [n, t] : grads) h5::write_tensor(g, n, t);
  });
}

int run_verify(const InputSpec& spec, const std::optional<std::string>& softcap_flag, const std::string& backend,
               const std::optional<std::string>& json_path, const std::optional<std::string>& junit_path,
               const std::optional<std::string>& dump_path) {
  const auto t0 = std::chrono::steady_clock::now();
  if (backend != "reference" && backend != "fast" && backend != "both")
    fail("--backend", "'" + backend + "' is not one of reference, fast, both");
  if (backend != "reference") fail("--backend", "the fast CUDA backend is not built into this verify");

  Inputs in = load_inputs(spec);
  const Config& c = in.model.config;
  std::vector<Softcap> combos;
  if (softcap_flag) {
    combos.push_back(parse_softcap(*softcap_flag, "--softcap"));
  } else {
    combos.push_back(config_softcaps(c));
  }
  for (Softcap s : combos) check_softcap_available(c, s, "--softcap");
  if (dump_path && combos.size() != 1) fail("--dump-grads", "needs a single --softcap combination");

  int64_t params = 0;
  for (const auto& [n, t] : in.model.weights) params += t.numel();
  if (!in.model.adapter && params > (int64_t(1) << 28))
    fail(in.source, "full-weight gradients of " + std::to_string(params) +
                        " parameters do not fit in memory as float64; use LoRA adapters (--lora-r) or fewer layers");

  std::printf("verify: %s\n", in.description.c_str());
  std::printf("  batch %lld x %lld, %lld scored targets; %s; backend reference (float64)\n", (long long)in.batch.B,
              (long long)in.batch.T, (long long)in.batch.count_targets(),
              in.model.adapter ? ("LoRA r=" + std::to_string(in.model.adapter->r) + " on " +
                                  std::to_string(in.model.adapter->target_modules.size()) + " projections, gradients for adapters")
                                     .c_str()
                               : "gradients for every weight");
  const Tolerances tol = tolerances_for(in.provenance);
  Report report;
  nlohmann::json runs = nlohmann::json::array();
  TensorMap last_grads;
  for (Softcap sc : combos) {
    const std::string combo = softcap_combo(sc);
    ref::RunOptions opt;
    opt.softcap = sc;
    auto exp_it = in.expected.find(combo);
    const Expected* ex = exp_it == in.expected.end() ? nullptr : &exp_it->second;
    opt.keep_logits = ex && ex->logits;
    progress("reference forward + backward, softcap " + softcap_name(sc));
    ref::Output out = ref::run(in.model, in.batch, opt);
    std::printf("[softcap %s] reference loss %.17g over %lld targets\n", softcap_name(sc).c_str(), out.loss,
                (long long)out.tokens);
    const std::string pre = "[" + softcap_name(sc) + "] ";
    if (ex) {
      if (ex->loss) report.add(pre + "loss vs expected (rel)", rel_err(out.loss, *ex->loss), tol.loss, tol.why);
      if (ex->logits) report.add(pre + "logits vs expected (max rel)", max_rel(out.logits, ex->logits->to_double()), tol.logits, tol.why);
      for (const auto& [name, t] : ex->grads) {
        auto it = out.grads.find(name);
        report.add(pre + "grad " + name + " (rel L2)", rel_l2(it->second.to_double(), t.to_double()), tol.grads, tol.why);
      }
    }
    progress("directional finite-difference check (4 forward passes)");
    ref::DirectionalCheck fd = ref::directional_check(in.model, in.batch, opt, out.grads);
    // Richardson-extrapolated central differences: truncation O(h^4) ~ 1e-16 relative at h = 1e-4 of the
    // parameter scale; loss rounding (~1e-15 relative) divided by h contributes ~1e-11 / |g.u|. 1e-7 leaves
    // four orders of margin while a single tensor's gradient off by 1e-5 relative still fails it (the
    // direction weighs each of at most ~100 tensors equally).
    report.add(pre + "backward vs finite differences of forward (rel)", fd.rel_err, 1e-7,
               "directional derivative along per-tensor unit gradients, " + std::to_string(fd.tensors) + " tensors");
    nlohmann::json r = {{"softcap", {{"attn", sc.attn}, {"logits", sc.logits}}},
                        {"results", {{"reference", {{"loss", out.loss}, {"tokens", out.tokens}}}}}};
    runs.push_back(r);
    last_grads = std::move(out.grads);
  }
  report.print_summary();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("time %.1f s, peak memory %.2f GB\n", secs, peak_rss_bytes() / 1e9);

  if (dump_path) dump_grads(*dump_path, last_grads);
  if (junit_path) write_junit(*junit_path, "verify " + in.source, report);
  if (json_path) {
    nlohmann::json j = runs[0];
    j["checks"] = checks_json(report);
    j["pass"] = report.all_pass();
    j["source"] = in.source;
    j["seconds"] = secs;
    j["peak_rss_bytes"] = peak_rss_bytes();
    write_json(*json_path, j);
  }
  return report.all_pass() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"verify: Gemma 2 finetuning numerics against the float64 reference"};
  InputSpec spec;
  std::optional<std::string> softcap, json_path, junit_path, dump_path;
  std::string backend = "reference";
  std::optional<uint64_t> seed;
  app.add_option("--model", spec.model, "preset with synthetic weights (gemma2-2b, gemma2-9b, gemma2-27b, gemma2-tiny, gemma2-micro)");
  app.add_option("--case", spec.case_path, "HDF5 case file (shared/spec/contract.md)");
  app.add_option("--config", spec.config, "HF config.json");
  app.add_option("--weights", spec.weights, "safetensors file or checkpoint directory");
  app.add_option("--adapter", spec.adapter, "PEFT adapter directory or adapter_model.safetensors");
  app.add_option("--softcap", softcap, "none | attn | logits | attn,logits (values from the config)");
  app.add_option("--backend", backend, "reference | fast | both");
  app.add_option("--layers", spec.layers, "layers of a synthetic or checkpoint run");
  app.add_option("--seq", spec.seq, "sequence length T of a synthetic batch");
  app.add_option("--batch", spec.batch, "sequences B of a synthetic batch");
  app.add_option("--seed", seed, "seed of synthetic weights and batch");
  app.add_option("--lora-r", spec.lora_r, "rank of synthetic LoRA adapters on all seven projections; 0 trains every weight");
  app.add_option("--json", json_path, "write the results as JSON (- for stdout)");
  app.add_option("--junit", junit_path, "write JUnit XML, one testcase per check");
  app.add_option("--dump-grads", dump_path, "write /grads/<name> (float64) of the reference backend to an HDF5 file");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "verify: %s\n", e.what());
    return 2;
  }
  if (seed) spec.seed = *seed;
  try {
    return run_verify(spec, softcap, backend, json_path, junit_path, dump_path);
  } catch (const InputError& e) {
    std::fprintf(stderr, "verify: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "verify: out of memory (try fewer --layers, a shorter --seq or a smaller --batch)\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "verify: internal error: %s\n", e.what());
    return 3;
  }
}
