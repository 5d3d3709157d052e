// make-case: writes a case file (docs/formats.md) with seeded synthetic weights and batch, for the
// HF cross-check (tools/hf_crosscheck.py fills its /expected) and for goldens. Shape knobs override a preset
// so that cases cover grouped-KV ratios, rank-stabilised LoRA and windows shorter than the sequence.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <new>
#include <optional>
#include <sstream>

#include "model/casefile.hpp"
#include "model/errors.hpp"
#include "model/synthetic.hpp"
#include "check/inputs.hpp"
#include "tools/cli_checks.hpp"

using namespace gemma;

int main(int argc, char** argv) {
  CLI::App app{"make-case: a case file with synthetic weights and batch"};
  std::string model = "gemma2-tiny", out;
  std::optional<int64_t> layers, kv_heads, window, pad_token_uses;
  std::optional<double> qpas;
  int64_t B = 2, T = 20, lora_r = 0;
  uint64_t seed = 0;
  bool rslora = false;
  app.add_option("--model", model, "preset the case starts from");
  app.add_option("--out", out, "case file to write")->required();
  app.add_option("--layers", layers, "number of layers");
  app.add_option("--kv-heads", kv_heads, "num_key_value_heads (query heads per KV head = heads / this)");
  app.add_option("--window", window, "sliding_window");
  app.add_option("--qpas", qpas, "query_pre_attn_scalar");
  app.add_option("--batch", B, "sequences");
  app.add_option("--seq", T, "sequence length");
  app.add_option("--seed", seed, "seed of weights and batch")->check(kNonNegativeSeed);
  app.add_option("--lora-r", lora_r, "LoRA rank on all seven projections (0: no adapters, every weight trains)");
  app.add_flag("--rslora", rslora, "rank-stabilised LoRA scaling alpha / sqrt(r)");
  app.add_option("--pad-token-uses", pad_token_uses, "put the pad token (id 0) at this many positions");
  if (const std::string e = empty_value_error(argc, argv); !e.empty()) {
    std::fprintf(stderr, "make-case: %s\n", e.c_str());
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "make-case: %s\n", e.what());
    return 2;
  }
  try {
    Config c = preset(model);
    if (layers) {
      // Deeper than the preset is allowed here: the layer types keep alternating, sliding first.
      if (*layers < 1 || *layers > 64) fail("--layers", "must be in 1..64");
      c.num_hidden_layers = *layers;
      c.layer_types.clear();
      for (int64_t l = 0; l < *layers; ++l) c.layer_types.push_back(l % 2 == 0 ? LayerType::sliding : LayerType::full);
    }
    if (kv_heads) c.num_key_value_heads = *kv_heads;
    if (window) c.sliding_window = *window;
    if (qpas) c.query_pre_attn_scalar = *qpas;
    // A config error here is the shape flags' (the presets are valid): named by them, where "make-case" as the
    // source printed "make-case: make-case: ..." and named none.
    std::ostringstream shape;
    shape << "--model " << model;
    if (layers) shape << " --layers " << *layers;
    if (kv_heads) shape << " --kv-heads " << *kv_heads;
    if (window) shape << " --window " << *window;
    if (qpas) shape << " --qpas " << *qpas;
    validate(c, shape.str());
    // The batch a case holds is read whole by verify; these bounds are what it runs (T >= 2: one target at least)
    // and keep B * T far from memory the synthetic batch cannot have (--batch 0 crashed, 1e11 aborted).
    if (B < 1 || B > 4096) fail("--batch", "must be in 1..4096, got " + std::to_string(B));
    if (T < 2 || T > 1 << 20) fail("--seq", "must be in 2..1048576, got " + std::to_string(T));
    if (B * T > int64_t(1) << 24) fail("--batch", std::to_string(B) + " x --seq " + std::to_string(T) + " is more than 2^24 tokens");
    if (lora_r < 0) fail("--lora-r", "must be 0 (no adapters) or positive, got " + std::to_string(lora_r));
    // Before the weights are drawn: synthetic_adapter_config bounds the rank.
    std::optional<AdapterConfig> adapter;
    if (lora_r > 0) adapter = check::synthetic_adapter_config(lora_r);
    CaseFile cf;
    cf.model.config = c;
    cf.model.weights = synthetic_weights(c, seed);
    if (adapter) {
      adapter->use_rslora = rslora;
      cf.model.adapter = adapter;
      TensorMap t = synthetic_adapters(c, *adapter, seed);
      cf.model.weights.insert(t.begin(), t.end());
    }
    cf.batch = synthetic_batch(c, B, T, seed);
    if (pad_token_uses && !c.pad_token_id) fail("--pad-token-uses", "the config has no pad token (pad_token_id null)");
    for (int64_t i = 0; pad_token_uses && i < *pad_token_uses && i < B * T; ++i)
      cf.batch.input_ids[size_t((i * 7 + 3) % (B * T))] = *c.pad_token_id;
    validate_batch(c, cf.batch, out);
    write_case(out, cf);
    std::printf("%s: %s, %lld x %lld, %s\n", out.c_str(), model.c_str(), (long long)B, (long long)T,
                lora_r > 0 ? ("LoRA r=" + std::to_string(lora_r) + (rslora ? " rslora" : "")).c_str() : "full weights");
    return 0;
  } catch (const InputError& e) {
    std::fprintf(stderr, "make-case: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    // Within the bounds above a released preset's full depth and a large rank can still outgrow memory: a message
    // naming the flags that size the case, not an abort.
    std::fprintf(stderr, "make-case: out of memory (try fewer --layers, a smaller --lora-r, --batch or --seq)\n");
    return 2;
  }
}
