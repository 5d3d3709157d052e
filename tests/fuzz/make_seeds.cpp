// Writes the fuzzers' seed corpora: valid inputs of every shape the readers accept, so that mutations start
// deep inside the format instead of at its first magic number.
//   make_seeds DIR  ->  DIR/config/*.json, DIR/safetensors/*.safetensors, DIR/case/*.h5
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "model/safetensors.hpp"
#include "tests/tiny_case.hpp"

using namespace gemma;
namespace fs = std::filesystem;

namespace {

void text(const fs::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary) << s;
}

// The released 2b config.json in HF's old key style (hidden_act, top-level rope_theta, token-id lists).
const char* kOldStyle = R"({
  "architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
  "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": 256,
  "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
  "initializer_range": 0.02, "intermediate_size": 9216, "max_position_embeddings": 8192,
  "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
  "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
  "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": true,
  "vocab_size": 256000})";

const char* kPeft = R"({"alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "google/gemma-2-2b",
  "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
  "layers_to_transform": null, "lora_alpha": 16, "lora_dropout": 0.05, "modules_to_save": null,
  "peft_type": "LORA", "r": 8, "rank_pattern": {}, "revision": null,
  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "task_type": "CAUSAL_LM", "use_dora": false,
  "use_rslora": false})";

// The tiny model's weights with a mix of storage formats, so every dtype branch has a seed.
TensorMap mixed_dtypes(const TensorMap& w) {
  TensorMap m;
  int i = 0;
  for (const auto& [n, t] : w) {
    const DType d = std::array{DType::bf16, DType::f16, DType::f32, DType::f64}[size_t(i++ % 4)];
    m[n] = tensor_from_doubles(d, t.shape, t.to_double());
  }
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds DIR\n");
    return 2;
  }
  const fs::path dir = argv[1];
  for (const char* sub : {"config", "safetensors", "case"}) fs::create_directories(dir / sub);

  for (const auto& name : preset_names()) text(dir / "config" / (name + ".json"), to_config_json(preset(name)));
  text(dir / "config" / "tiny.json", to_config_json(test::tiny_config()));
  text(dir / "config" / "old-style-2b.json", kOldStyle);
  text(dir / "config" / "adapter-peft.json", kPeft);
  text(dir / "config" / "adapter-tiny.json", to_adapter_config_json(test::tiny_adapter()));
  text(dir / "config" / "adapter-all-linear.json", R"({"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": true})");
  // PEFT's per-module forms (resolved against the tiny model by the harness).
  text(dir / "config" / "adapter-regex.json", R"J({"r": 4, "lora_alpha": 8, "target_modules": ".*\\.(q_proj|v_proj)"})J");
  text(dir / "config" / "adapter-layers.json",
       R"({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1],
           "layers_pattern": "layers", "exclude_modules": ["model.layers.1.mlp.down_proj"]})");
  text(dir / "config" / "adapter-patterns.json",
       R"({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 2},
           "alpha_pattern": {"layers\\.1\\.self_attn\\.v_proj": 3}})");
  text(dir / "config" / "rope-scaling.json",
       R"({"vocab_size": 8, "hidden_size": 4, "intermediate_size": 6, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 2, "query_pre_attn_scalar": 3, "sliding_window": 2,
           "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6,
           "rope_scaling": {"type": "default", "rope_theta": 10000.0}, "pad_token_id": null})");

  const CaseFile plain = test::tiny_case(false), lora = test::tiny_case(true);
  write_safetensors((dir / "safetensors" / "tiny-bf16.safetensors").string(), plain.model.weights);
  write_safetensors((dir / "safetensors" / "tiny-mixed.safetensors").string(), mixed_dtypes(plain.model.weights));
  TensorMap head = plain.model.weights;
  head[kLmHeadName] = head.at(kEmbedName);  // a stored, tied LM head
  write_safetensors((dir / "safetensors" / "tiny-lm-head.safetensors").string(), head);

  write_case((dir / "case" / "tiny.h5").string(), plain);
  write_case((dir / "case" / "tiny-lora.h5").string(), lora);
  CaseFile ex = plain;
  ex.provenance["expected_kind"] = "reference-float64";
  Expected e;
  e.loss = 2.0;
  e.grads[kFinalNormName] = tensor_from_doubles(DType::f64, {4}, {0.1, 0.2, 0.3, 0.4});
  ex.expected["attn_logits"] = e;
  write_case((dir / "case" / "tiny-expected.h5").string(), ex);
  std::printf("seeds written to %s\n", dir.c_str());
  return 0;
}
