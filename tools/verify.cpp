// verify: do the numerics match? Runs the chosen backend on a model and batch, compares with what is
// expected, prints one line per check and "N/M checks passed", exits 0 (all pass), 1 (a numeric check
// failed) or 2 (bad usage or input). Interface: docs/formats.md.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>

#include "model/errors.hpp"
#include "model/h5util.hpp"
#include "reference/run.hpp"
#include "check/compare.hpp"
#include "check/diagnose.hpp"
#include "check/fast_backend.hpp"
#include "check/golden.hpp"
#include "check/inputs.hpp"
#include "check/parallel.hpp"
#include "check/report.hpp"
#include "check/setting.hpp"
#include "check/torch_result.hpp"
#include "tools/cli_checks.hpp"

using namespace gemma;
using namespace gemma::check;

namespace {

void dump_grads(const std::string& path, const TensorMap& grads) {
  h5::write_atomically(path, [&](H5::H5File& f) {
    H5::Group g = f.createGroup("grads");
    for (const auto& [n, t] : grads) h5::write_tensor(g, n, t);
  });
}

// A companion's key in --json (docs/formats.md): "odd " → companion, "odd nf4 " → companion_nf4, "hd128 " →
// companion_hd128, "hd256 " → companion_hd256.
std::string companion_json_key(std::string tag) {
  tag.pop_back();
  if (tag == "odd") return "companion";
  if (tag.rfind("odd ", 0) == 0) tag.erase(0, 4);
  return "companion_" + tag;
}

int run_verify(const InputSpec& spec, const std::optional<std::string>& softcap_flag,
               const std::optional<std::string>& backend_flag,
               const std::optional<std::string>& json_path, const std::optional<std::string>& junit_path,
               const std::optional<std::string>& dump_path) {
  const auto t0 = std::chrono::steady_clock::now();
  std::string why_no_fast;
  const bool have_fast = fast_available(&why_no_fast);
  // Default (docs/formats.md): both backends where a CUDA device exists, else the reference alone.
  const std::string backend = backend_flag.value_or(have_fast ? "both" : "reference");
  if (backend != "reference" && backend != "fast" && backend != "both")
    fail("--backend", "'" + backend + "' is not one of reference, fast, both");
  const bool run_ref = backend != "fast", run_fast = backend != "reference";
  if (run_fast && !have_fast) fail("--backend " + backend, why_no_fast);
  // Output paths are checked before the run and the files written only after it, all or none: a run that
  // fails (exit 2) leaves no file for a CI step to pick up as if it were a result.
  std::vector<std::pair<std::string, std::string>> outputs;  // (flag, path)
  if (json_path && *json_path != "-") outputs.emplace_back("--json", *json_path);
  if (junit_path) outputs.emplace_back("--junit", *junit_path);
  if (dump_path) outputs.emplace_back("--dump-grads", *dump_path);
  check_output_paths(outputs, {}, input_paths(spec));

  Inputs in = load_inputs(spec);
  print_warnings("verify", in.model.warnings);
  std::vector<Softcap> combos;
  if (softcap_flag && *softcap_flag == "all") {
    combos = all_softcaps();
  } else if (softcap_flag) {
    combos.push_back(parse_softcap(*softcap_flag, "--softcap"));
  } else {
    combos.push_back(config_softcaps(in.model.config));
  }
  for (Softcap s : combos) check_softcap_available(in.model.config, s, "--softcap");
  if (!in.expected.empty() && std::none_of(combos.begin(), combos.end(),
                                           [&](Softcap s) { return in.expected.count(softcap_combo(s)) > 0; })) {
    // A case file whose results are all of combinations this run does not compute: none of them is compared, and
    // "1/1 checks passed" (the finite differences alone) would read as if they had been. Said.
    std::string have;
    for (Softcap s : all_softcaps())
      if (in.expected.count(softcap_combo(s))) have += (have.empty() ? "" : ", ") + softcap_name(s);
    print_warnings("verify", {in.source + ": its /expected results (--softcap " + have + ") are not compared: this run "
                              "computes --softcap " + (combos.size() == 1 ? softcap_name(combos[0]) : "all") +
                              "; give --softcap with one of theirs"});
  }
  if (dump_path && combos.size() != 1) fail("--dump-grads", "needs a single --softcap combination");
  if (dump_path && !run_ref) fail("--dump-grads", "writes the reference backend's gradients: not with --backend fast");

  int64_t params = 0;
  for (const auto& [n, t] : in.model.weights) params += t.numel();
  if (!in.model.adapter && params > (int64_t(1) << 28))
    fail(in.source, "full-weight gradients of " + std::to_string(params) +
                        " parameters do not fit in memory as float64; use LoRA adapters (" + in.adapters_hint +
                        ") or fewer layers");

  Report report;
  nlohmann::json runs = nlohmann::json::array();
  // A companion's runs (check/inputs.hpp gate_companions), by its --json key: each its own object, so that no run's
  // results overwrite another's of the same combination (gemma2-odd's NF4 run is of the first one).
  std::map<std::string, nlohmann::json> companion_runs;
  auto runs_for = [&](const std::string& tag) -> nlohmann::json& {
    if (tag.empty()) return runs;
    return companion_runs.try_emplace(companion_json_key(tag), nlohmann::json::array()).first->second;
  };
  TensorMap last_grads;
  // One setting's checks, every softcap combination: the main one, and for a released preset its companion.
  auto verify_setting = [&](const InputSpec& sspec, const Inputs& in, const std::string& tag,
                            const std::vector<Softcap>& combos) {
  const Config& c = in.model.config;
  std::printf("verify: %s\n", in.description.c_str());
  std::printf("  batch %lld x %lld, %lld scored targets; %s; backend %s\n", (long long)in.batch.B,
              (long long)in.batch.T, (long long)in.batch.count_targets(),
              in.model.adapter ? (in.model.adapter->describe(c.num_hidden_layers) + ", gradients for adapters").c_str()
                               : "gradients for every weight",
              backend == "both"   ? "reference (float64) and fast (CUDA)"
              : backend == "fast" ? "fast (CUDA)"
                                  : "reference (float64)");
  if (in.model.adapter && in.model.adapter->lora_dropout > 0)
    std::printf(
        "  lora_dropout %g is training-time noise: these gradients are computed without dropout (as in eval mode)\n",
        in.model.adapter->lora_dropout);
  for (const std::string& p : in.paths) std::printf("  path: %s\n", p.c_str());
  if (in.batch.packed())
    std::printf("  packed rows: documents are kept apart, as HF transformers does in training (use_cache=False); HF with\n"
                "  its config's use_cache: true does not look for packed rows and lets documents attend to each other\n");
  const Tolerances tol = tolerances_for(in.provenance);
  // A PyTorch implementation's result (tools/torch_case.py) is judged against the reference under its dtype's
  // precision policy instead (check/torch_result.hpp); an unknown torch-* kind is refused here, before any run.
  const std::optional<ref::Policy> torch_policy = torch_result_policy(in.provenance, in.source);
  if (torch_policy && !in.expected.empty())
    std::printf("  /expected: %s from %s, judged against the reference under the %s policy\n",
                in.provenance.at("expected_kind").c_str(),
                in.provenance.count("implementation") ? in.provenance.at("implementation").c_str() : "an unnamed implementation",
                torch_policy->name.c_str());
  // Each combination in three passes: what it is compared with (goldens are read here, one file at a time), the
  // heavy reference work of every combination side by side (check/parallel.hpp), then its checks in order, so the
  // output reads as if the combinations had run one after another.
  struct Combo {
    Softcap sc;
    ref::RunOptions opt;
    const Expected* ex = nullptr;
    std::optional<GoldenRecipe> recipe;
    std::optional<Golden> golden;
    std::string golden_path;
    bool standard = false;  // a recipe of standard_goldens(): the project keeps (or will keep) its golden
    bool fd = false;  // the reference's finite-difference self-check runs here
    std::string no_fd;  // else why not
    ref::Output out;
    std::optional<ref::DirectionalCheck> fd_result;
    std::shared_ptr<const GateReference> gate;
  };
  std::vector<Combo> work;
  int64_t weights = 0;
  for (const auto& [n, t] : in.model.weights) weights += t.numel();
  for (Softcap sc : combos) {
    Combo w;
    w.sc = sc;
    w.opt.softcap = sc;
    auto exp_it = in.expected.find(softcap_combo(sc));
    w.ex = exp_it == in.expected.end() ? nullptr : &exp_it->second;
    // The golden of this exact recipe, when the project keeps one; its hash is checked before it is trusted.
    w.recipe = recipe_of(sspec, sc);
    // Goldens are kept for the standard recipes only (a preset at its default shape and seed); any other shape or
    // seed has none, even where a file of the same name exists.
    const std::vector<GoldenRecipe> kept = standard_goldens();
    w.standard = w.recipe && std::find(kept.begin(), kept.end(), *w.recipe) != kept.end();
    if (w.recipe) {
      w.golden_path = std::string(kGoldenDir) + "/" + w.recipe->file_name();
      if (w.standard && std::filesystem::exists(w.golden_path)) {
        check_manifest(w.golden_path);
        w.golden = read_golden(w.golden_path);
        if (!(w.golden->recipe == *w.recipe)) fail(w.golden_path, "its recipe does not match its file name");
      }
    }
    w.opt.keep_logits = (w.ex && w.ex->logits) || w.golden || run_fast;
    // The reference's self-check costs seven or more forward passes, a minute per combination at the released widths.
    // With the fast backend the gate's time goes to the trainer's comparison, and the self-check runs on the
    // companion (gemma2-odd), whose code path is the same; `--backend reference` runs it at these widths.
    // Judging a torch result at released widths runs the reference five times already (float64, the policy, three
    // variants); the self-check would double that (gemma2-2b, 2 layers, 2 x 32: 420 of 863 s on 2 cores), and
    // the result's verdict does not depend on it. The tests and --model runs check the reference's backward.
    const bool gate_widths = run_fast && tag.empty() && sspec.model && gate_preset(*sspec.model) && !gate_companion(*sspec.model);
    const bool big_torch = w.ex && torch_policy && weights > (int64_t(50) << 20);
    w.fd = run_ref && !gate_widths && !big_torch;
    if (gate_widths)
      w.no_fd = "on the companion in this mode (--backend reference runs it here)";
    else if (big_torch)
      w.no_fd = "not run for a torch result of more than 50M weights (verify --case on the case itself runs it)";
    work.push_back(std::move(w));
  }
  {
    std::vector<std::function<void()>> tasks;
    for (Combo& combo : work)
      tasks.push_back([&, w = &combo] {
        set_progress_tag("[" + tag + softcap_name(w->sc) + "] ");
        auto reference = [&in, w] {
          progress("reference forward + backward");
          w->out = ref::run(in.model, in.batch, w->opt, in.micro_rows);
          if (w->fd) {
            progress("directional finite-difference check (7 forward passes, more where the loss is sharply curved)");
            w->fd_result = ref::directional_check(in.model, in.batch, w->opt, w->out.grads);
          }
        };
        // With the fast backend the float64 run is one more task among the gate's reference side.
        if (run_fast)
          w->gate = gate_reference(in, w->sc, run_ref ? &w->out : nullptr,
                                   run_ref ? std::function<void()>(reference) : std::function<void()>());
        else if (run_ref)
          reference();
      });
    run_tasks(std::move(tasks), workers_for_memory(working_set_bytes(in, run_fast)));
  }
  for (Combo& w : work) {
    const Softcap sc = w.sc;
    const Expected* ex = w.ex;
    const std::string pre = "[" + tag + softcap_name(sc) + "] ";
    nlohmann::json results = nlohmann::json::object();
    if (!run_ref) {
      const FastResult fr = judge_fast(report, pre, in.model, sc, *w.gate);
      std::printf("[%ssoftcap %s] fast loss %.10g (fast-policy reference %.10g) over %lld targets, %.3f s on the device\n",
                  tag.c_str(), softcap_name(sc).c_str(), fr.loss, fr.loss_fast_policy, (long long)fr.tokens, fr.seconds);
      results["fast"] = {{"loss", fr.loss}, {"tokens", fr.tokens}, {"seconds", fr.seconds}, {"peak_device_bytes", fr.peak_device_bytes}};
      runs_for(tag).push_back({{"setting", in.source}, {"softcap", {{"attn", sc.attn}, {"logits", sc.logits}}}, {"results", results}});
      continue;
    }
    ref::Output& out = w.out;
    std::printf("[%ssoftcap %s] reference loss %.17g over %lld targets\n", tag.c_str(), softcap_name(sc).c_str(), out.loss,
                (long long)out.tokens);
    std::optional<TorchJudgement> torch_judged;
    if (ex && torch_policy)
      torch_judged = judge_torch_result(report, pre, in, sc, *ex, *torch_policy, out);
    else if (ex)
      compare_expected(report, pre, out, *ex, tol, in.batch);
    if (w.golden) {
      std::printf("  golden %s (sha256 matches the manifest; %s, %s)\n", w.golden_path.c_str(),
                  w.golden->provenance["generator"].c_str(), w.golden->provenance["date"].c_str());
      compare_golden(report, pre, *w.golden, golden_from(*w.recipe, in.batch, c.vocab_size, out), GoldenTolerances{});
      results["golden"] = "compared: " + w.golden_path;
    } else if (w.recipe) {
      // Why there is none, in words that hold: run outside the repository root, a standard recipe's golden was not
      // looked for at all, and the line used to say the recipe had none (found by a probe, 2026-12-05).
      std::string why;
      if (!w.standard) {
        why = "not a standard recipe (goldens are kept for a preset at verify's default shape and seed 0)";
      } else if (!std::filesystem::exists(kManifest)) {
        why = "not found: no " + std::string(kManifest) + " under the working directory " +
              std::filesystem::current_path().string() + " (run verify from the repository root)";
        std::fprintf(stderr, "verify: warning: the golden of this standard recipe, %s, was not looked for: %s\n",
                     w.golden_path.c_str(), why.c_str());
      } else {
        why = "none kept for this standard recipe yet";
      }
      std::printf("  no golden compared (%s): %s; self-checks only\n", w.recipe->file_name().c_str(), why.c_str());
      results["golden"] = why;
    }
    if (w.fd_result)
      add_fd_check(report, pre, *w.fd_result);
    else
      std::printf("  backward vs finite differences: %s\n", w.no_fd.c_str());
    results["reference"] = {{"loss", out.loss}, {"tokens", out.tokens}};
    if (torch_judged) results["torch"] = torch_judged->json();
    if (run_fast) {
      const FastResult fr = judge_fast(report, pre, in.model, sc, *w.gate);
      std::printf("[%ssoftcap %s] fast loss %.10g over %lld targets, %.3f s on the device, peak %.2f GB\n",
                  tag.c_str(), softcap_name(sc).c_str(), fr.loss, (long long)fr.tokens, fr.seconds, fr.peak_device_bytes / 1e9);
      results["fast"] = {{"loss", fr.loss}, {"tokens", fr.tokens}, {"seconds", fr.seconds}, {"peak_device_bytes", fr.peak_device_bytes}};
    }
    runs_for(tag).push_back({{"setting", in.source}, {"softcap", {{"attn", sc.attn}, {"logits", sc.logits}}}, {"results", results}});
    if (tag.empty()) last_grads = std::move(out.grads);
  }
  };
  verify_setting(spec, in, "", combos);
  // A released preset's gate also runs its companions (check/inputs.hpp gate_companions): gemma2-odd, what the
  // released widths cannot reach; with the trainer, gemma2-odd's NF4 run and gemma2-hd128, gemma2-hd256 too.
  for (const GateCompanion& c : gate_companions(spec, run_fast)) {
    const Inputs ci = load_inputs(c.spec);
    std::printf("\n");
    verify_setting(c.spec, ci, c.tag, c.first_combination_only ? std::vector<Softcap>{combos.front()} : combos);
  }
  report.print_summary();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("time %.1f s, peak memory %.2f GB\n", secs, peak_rss_bytes() / 1e9);

  std::vector<std::string> written;  // removed again if a later output fails: all or none
  try {
    if (dump_path) {
      dump_grads(*dump_path, last_grads);
      written.push_back(*dump_path);
    }
    if (junit_path) {
      write_junit(*junit_path, "verify " + in.source, report);
      written.push_back(*junit_path);
    }
    if (json_path) {
      // One combination: the contract's shape. --softcap all: "softcap" is "all" and "results" holds one
      // entry per combination, keyed by its case-file name (none, attn, logits, attn_logits).
      // A released preset's companions have an object each, in the same shape.
      auto shaped = [](const nlohmann::json& rs) {
        nlohmann::json j = rs[0];
        if (rs.size() > 1) {
          j["softcap"] = "all";
          j["results"] = nlohmann::json::object();
          for (const auto& r : rs)
            j["results"][softcap_combo({r["softcap"]["attn"].get<bool>(), r["softcap"]["logits"].get<bool>()})] = r["results"];
        }
        return j;
      };
      nlohmann::json j = shaped(runs);
      for (const auto& [key, rs] : companion_runs) j[key] = shaped(rs);
      j["checks"] = checks_json(report);
      j["pass"] = report.all_pass();
      j["source"] = in.source;
      j["seconds"] = secs;
      j["peak_rss_bytes"] = peak_rss_bytes();
      write_json(*json_path, j);
    }
  } catch (...) {
    std::error_code ec;
    for (const auto& p : written) std::filesystem::remove(p, ec);
    throw;
  }
  return report.all_pass() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"verify: Gemma 2 finetuning numerics against the float64 reference"};
  InputSpec spec;
  std::optional<std::string> softcap, json_path, junit_path, dump_path;
  std::optional<std::string> backend;
  std::optional<uint64_t> seed;
  app.add_option("--model", spec.model, "preset with synthetic weights (gemma2-2b, gemma2-9b, gemma2-27b, gemma2-tiny, gemma2-micro, gemma2-odd, gemma2-hd128, gemma2-hd256)");
  app.add_option("--case", spec.case_path, "HDF5 case file (docs/formats.md)");
  app.add_option("--config", spec.config, "HF config.json");
  app.add_option("--weights", spec.weights, "safetensors file or checkpoint directory");
  app.add_option("--adapter", spec.adapter, "PEFT adapter directory or adapter_model.safetensors");
  app.add_option("--softcap", softcap, "none | attn | logits | attn,logits | all (values from the config)");
  app.add_option("--backend", backend, "reference | fast | both (default: both where a CUDA device exists)");
  app.add_option("--layers", spec.layers, "layers of a synthetic or checkpoint run");
  app.add_option("--seq", spec.seq, "sequence length T of a synthetic batch");
  app.add_option("--batch", spec.batch, "sequences B of a synthetic batch");
  app.add_option("--seed", seed, "seed of synthetic weights and batch")->check(kNonNegativeSeed);
  app.add_option("--lora-r", spec.lora_r,
                 "rank of synthetic LoRA adapters on all seven projections, on a preset (default 8) or a checkpoint "
                 "without --adapter (default none); 0 trains every weight");
  app.add_option("--quantize", spec.quantize,
                 "nf4: base projections quantized as QLoRA does (bitsandbytes nf4, blocksize 64, double quantization), "
                 "then used dequantized");
  app.add_option("--json", json_path, "write the results as JSON (- for stdout)");
  app.add_option("--junit", junit_path, "write JUnit XML, one testcase per check");
  app.add_option("--dump-grads", dump_path, "write /grads/<name> (float64) of the reference backend to an HDF5 file");

  CLI::App* diag = app.add_subcommand("diagnose", "the bug-impact table: every known variant vs the correct bf16 policy and f64");
  InputSpec dspec;
  DiagnoseOptions dopt;
  std::optional<uint64_t> dseed;
  diag->add_option("--model", dspec.model, "preset with synthetic weights");
  diag->add_option("--case", dspec.case_path, "HDF5 case file");
  diag->add_option("--config", dspec.config, "HF config.json");
  diag->add_option("--weights", dspec.weights, "safetensors file or checkpoint directory");
  diag->add_option("--adapter", dspec.adapter, "PEFT adapter directory or adapter_model.safetensors");
  diag->add_option("--softcap", dopt.softcap, "none | attn | logits | attn,logits");
  diag->add_option("--layers", dspec.layers, "layers of a synthetic run");
  diag->add_option("--seq", dspec.seq, "sequence length of a synthetic batch (default 40)");
  diag->add_option("--batch", dspec.batch, "sequences of a synthetic batch (default 2, one per micro-batch)");
  diag->add_option("--seed", dseed, "seed of synthetic weights and batch")->check(kNonNegativeSeed);
  diag->add_option("--lora-r", dspec.lora_r, "rank of synthetic LoRA adapters");
  diag->add_option("--quantize", dspec.quantize, "nf4: base projections NF4-quantized as QLoRA does, used dequantized");
  diag->add_option("--window", dopt.window, "sliding window of a synthetic run (default: shrunk below the sequence)");
  diag->add_option("--position-offset", dopt.position_offset,
                   "first position: of the trained-like setting of a synthetic run (default: the batch ends at position 4095), or of a case file's batch (default 0)");
  diag->add_option("--policy", dopt.policy, "the correct bf16 policy the variants deviate from (hf-bf16, fast)");
  diag->add_option("--variants", dopt.variants, "comma-separated variant ids to diagnose (default: all)")->delimiter(',');
  diag->add_option("--noise-seeds", dopt.noise_seeds, "jitter seeds for the bf16 noise estimate (default 3)");
  diag->add_option("--json", dopt.json_path, "write the table as JSON (- for stdout)");
  if (const std::string e = empty_value_error(argc, argv); !e.empty()) {
    std::fprintf(stderr, "verify: %s\n", e.c_str());
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "verify: %s\n", e.what());
    return 2;
  }
  if (seed) spec.seed = *seed;
  if (dseed) dspec.seed = *dseed;
  try {
    // CLI11 reads an empty list as no option at all; asking for no rows is a mistake, not "all rows".
    if (diag->count("--variants") && !dopt.variants) fail("--variants", "names no variant");
    // A case file fixes its weights and batch: a seed would be accepted and change nothing.
    if ((*diag ? dseed && dspec.case_path : seed && spec.case_path))
      fail("--seed", "does not apply to --case (the case file fixes the weights and the batch)");
    if (*diag) return run_diagnose(dspec, dopt);
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
