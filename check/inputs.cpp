#include "check/inputs.hpp"

#include <unistd.h>

#include <cstdio>

#include "model/errors.hpp"
#include "model/nf4.hpp"
#include "model/safetensors.hpp"
#include "model/synthetic.hpp"
#include "check/setting.hpp"

namespace gemma::check {

AdapterConfig synthetic_adapter_config(int64_t r) {
  // Every caller's rank is --lora-r's. Past the bound an adapter config reads back nowhere, and the adapters were
  // allocated before anything said so (make-case aborted on std::bad_alloc at 2147483648).
  if (r > kMaxLoraRank)
    fail("--lora-r", "must be at most " + std::to_string(kMaxLoraRank) + " (the largest rank an adapter config may " +
                         "give), got " + std::to_string(r));
  AdapterConfig a;
  a.r = r;
  a.lora_alpha = 2.0 * double(r);
  a.target_modules.assign(kAllProj.begin(), kAllProj.end());
  return a;
}

namespace {

// Refusing a batch that cannot fit up front beats being killed by the kernel's OOM killer (a signal, no message)
// half an hour into the run. Two terms grow past any machine: the float64 logits, B * T * V * 8 bytes, and one
// sequence's attention caches, which the float64 reference keeps for every layer (scores and weights, (T, T) per
// head: L * H * 2 * T^2 * 8 bytes). The second used to be found by std::bad_alloc inside an OpenMP region, which
// cannot reach main's handler: train and verify aborted (SIGABRT) at --seq 100000 on gemma2-tiny, and the OOM
// killer took them at 40000 (found by a probe, 2026-12-05).
void refuse_beyond_memory(const Config& c, int64_t B, int64_t T, bool reference_runs, const std::string& batch_flag,
                          const std::string& seq_flag) {
  const double memory = double(::sysconf(_SC_PHYS_PAGES)) * double(::sysconf(_SC_PAGE_SIZE));
  if (!(memory > 0)) return;
  const double logits_bytes = double(B) * double(T) * double(c.vocab_size) * 8.0;
  const double attention_bytes = !reference_runs ? 0.0 :
      double(c.num_hidden_layers) * double(c.num_attention_heads) * 2.0 * double(T) * double(T) * 8.0;
  char msg[320];
  if (logits_bytes > memory) {
    std::snprintf(msg, sizeof msg, "%lld x %lld tokens need %.3g GB for the float64 logits alone; this machine has %.3g GB",
                  (long long)B, (long long)T, logits_bytes / 1e9, memory / 1e9);
    // Both flags make the product: --seq 99999999999 alone was blamed on --batch (found by a probe, 2026-12-06).
    fail(batch_flag == seq_flag ? batch_flag : batch_flag + " and " + seq_flag, msg);
  }
  if (logits_bytes + attention_bytes > memory) {
    std::snprintf(msg, sizeof msg,
                  "a sequence of %lld tokens needs %.3g GB for the float64 reference's attention caches alone (every "
                  "layer's scores and weights: %lld x %lld heads x 2 x T^2 x 8 bytes); this machine has %.3g GB",
                  (long long)T, attention_bytes / 1e9, (long long)c.num_hidden_layers, (long long)c.num_attention_heads,
                  memory / 1e9);
    fail(seq_flag, msg);
  }
}

Batch batch_for(const Config& c, const InputSpec& s, int64_t dflt_b, int64_t dflt_t) {
  const int64_t B = s.batch.value_or(dflt_b), T = s.seq.value_or(dflt_t);
  if (B < 1) fail("--batch", "must be at least 1, got " + std::to_string(B));
  if (T < 2) fail("--seq", "must be at least 2 (position t is scored against token t + 1), got " + std::to_string(T));
  refuse_beyond_memory(c, B, T, s.reference_runs, "--batch", "--seq");
  return synthetic_batch(c, B, T, s.seed);
}

}  // namespace

PresetShape preset_shape(const std::string& name) {
  const Config c = preset(name);
  if (c.vocab_size == 256000) return {kDefaultPresetLayers, 2, 48};
  if (name == "gemma2-odd") return {c.num_hidden_layers, 3, 40};
  // Several of the Hopper attention's 128-query and 64-key tiles, the last one cut by T.
  if (name == "gemma2-hd128" || name == "gemma2-hd256") return {c.num_hidden_layers, 2, 150};
  return {c.num_hidden_layers, 2, 20};
}

void refuse_adapter_outside_checkpoint(const InputSpec& s) {
  if (s.adapter && !s.config && !s.weights)
    fail("--adapter", std::string("applies to --config/--weights only (") +
                          (s.case_path ? "the case file fixes the adapters, or their absence)"
                                       : "a preset's synthetic base takes synthetic adapters: --lora-r R)"));
}

std::vector<std::pair<std::string, std::string>> input_paths(const InputSpec& spec) {
  std::vector<std::pair<std::string, std::string>> r;
  for (const auto& [flag, path] : {std::pair{"--case", spec.case_path}, std::pair{"--config", spec.config},
                                   std::pair{"--weights", spec.weights}, std::pair{"--adapter", spec.adapter}})
    if (path) r.emplace_back(flag, *path);
  return r;
}

Inputs load_inputs(const InputSpec& s) {
  const int given = int(s.model.has_value()) + int(s.case_path.has_value()) + int(s.weights.has_value() || s.config.has_value());
  if (given != 1) fail("--model/--case/--config", "give exactly one of --model, --case, or --config with --weights");
  if (s.lora_r && *s.lora_r < 0) fail("--lora-r", "must be 0 (train every weight) or a rank >= 1");
  if (s.quantize && *s.quantize != "nf4") fail("--quantize", "'" + *s.quantize + "' is not nf4 (the one quantization implemented)");
  if (s.quantize && s.case_path)
    fail("--quantize", "does not apply to --case (the case file fixes the weights its expected values were computed with)");
  refuse_adapter_outside_checkpoint(s);
  Inputs in;
  if (s.case_path) {
    const char* fixed = "does not apply to --case (the case file fixes the model and the batch)";
    if (s.layers) fail("--layers", fixed);
    if (s.seq) fail("--seq", fixed);
    if (s.batch) fail("--batch", fixed);
    if (s.lora_r) fail("--lora-r", "conflicts with --case: the case file fixes the adapters (or their absence)");
    CaseFile cf = read_case(*s.case_path);
    refuse_beyond_memory(cf.model.config, cf.batch.B, cf.batch.T, s.reference_runs, *s.case_path, *s.case_path);
    in.model = std::move(cf.model);
    in.batch = std::move(cf.batch);
    in.expected = std::move(cf.expected);
    in.provenance = std::move(cf.provenance);
    in.source = *s.case_path;
    in.description = "case " + *s.case_path;
    in.adapters_hint = "a case file with adapters (make-case --lora-r R)";
  } else if (s.model) {
    Config c = preset(*s.model);
    const PresetShape shape = preset_shape(*s.model);
    const int64_t L = s.layers.value_or(shape.layers);
    const int64_t full_depth = c.num_hidden_layers;
    c = with_layers(c, L);
    in.model.config = c;
    in.model.weights = synthetic_weights(c, s.seed);
    if (const int64_t r = s.lora_r.value_or(kDefaultPresetLoraR); r > 0) {
      in.model.adapter = synthetic_adapter_config(r);
      TensorMap a = synthetic_adapters(c, *in.model.adapter, s.seed);
      in.model.weights.insert(a.begin(), a.end());
    }
    in.adapters_hint = "--lora-r R";
    in.batch = batch_for(c, s, shape.batch, shape.seq);
    if (auto w = beyond_max_positions(c, in.batch.T, "--seq")) in.model.warnings.push_back(*w);
    if (gate_preset(*s.model)) make_gate_setting(in, *s.model, s.seed);
    // After the gate's setting, which shapes the projections like a trained model's: QLoRA quantizes the pretrained
    // base as it is.
    const std::string quantized = s.quantize ? "; " + quantize_base_projections(in.model) : "";
    in.source = "preset:" + *s.model;
    in.description = *s.model + " (synthetic bf16 weights, seed " + std::to_string(s.seed) + "; " + std::to_string(L) +
                     " of " + std::to_string(full_depth) + " layers, true widths, vocab " + std::to_string(c.vocab_size) +
                     quantized + ")";
  } else {
    if (!s.config || !s.weights) fail("--config/--weights", "--config and --weights go together");
    if (s.lora_r && s.adapter)
      fail("--lora-r",
           "conflicts with --adapter: the adapter fixes the LoRA modules and ranks (--lora-r puts synthetic "
           "adapters on a checkpoint that has none)");
    in.model = load_hf_checkpoint(*s.config, *s.weights, s.adapter, s.layers);
    const std::string quantized = s.quantize ? "; " + quantize_base_projections(in.model)
                                  : in.model.quantization ? "; base projections " + *in.model.quantization +
                                                                ", dequantized on load"
                                                          : "";
    if (s.lora_r && *s.lora_r > 0) {
      // Synthetic adapters (seeded by --seed) on the real base weights, exactly as on a preset.
      in.model.adapter = synthetic_adapter_config(*s.lora_r);
      TensorMap a = synthetic_adapters(in.model.config, *in.model.adapter, s.seed);
      in.model.weights.insert(a.begin(), a.end());
    }
    in.adapters_hint = "--lora-r R";
    in.batch = batch_for(in.model.config, s, 1, 32);
    validate_batch(in.model.config, in.batch, "synthetic batch", &in.model.warnings);
    in.source = *s.weights;
    in.description = "checkpoint " + *s.weights + " (" + std::to_string(in.model.config.num_hidden_layers) + " layers" +
                     (s.lora_r && *s.lora_r > 0 ? "; synthetic LoRA adapters, seed " + std::to_string(s.seed) : "") +
                     quantized + ")";
  }
  // Gradients of 4-bit weights are not defined (QLoRA trains adapters on a frozen quantized base; HF's Trainer
  // refuses "purely quantized models"), so a quantized base needs adapters.
  if ((s.quantize || in.model.quantization) && !in.model.adapter)
    fail(s.lora_r ? "--lora-r" : in.source,
         "a 4-bit quantized base trains only LoRA adapters: give --lora-r R >= 1 or --adapter (--lora-r 0 would ask "
         "for gradients of the quantized weights)");
  if (in.batch.count_targets() == 0) fail(in.source, "every label is ignored (-100): the mean loss is undefined (0/0)");
  return in;
}

std::vector<GateCompanion> gate_companions(const InputSpec& main, bool trainer) {
  std::vector<GateCompanion> out;
  if (!main.model || !gate_preset(*main.model) || gate_companion(*main.model)) return out;
  InputSpec odd;
  odd.model = "gemma2-odd";
  odd.seed = main.seed;
  odd.lora_r = main.lora_r;
  odd.quantize = main.quantize;
  if (trainer) odd.seq = kOddTrainerSeq;
  out.push_back({"odd ", odd});
  if (!trainer) return out;
  if (!main.quantize) {
    InputSpec q = odd;
    q.quantize = "nf4";
    out.push_back({"odd nf4 ", q, true});
  }
  for (const char* hd : {"128", "256"}) {
    InputSpec h = odd;
    h.seq.reset();
    h.model = std::string("gemma2-hd") + hd;
    out.push_back({std::string("hd") + hd + " ", h});
  }
  return out;
}

}  // namespace gemma::check
