#include "checkpoint.hpp"

#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "errors.hpp"
#include "json_brief.hpp"

namespace gemma {

using nlohmann::json;

const char* proj_name(Proj p) {
  static const char* n[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return n[int(p)];
}

const char* proj_module(Proj p) {
  static const char* n[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  return n[int(p)];
}

int64_t proj_out(const Config& c, Proj p) {
  switch (p) {
    case Proj::q_proj: return c.num_attention_heads * c.head_dim;
    case Proj::k_proj:
    case Proj::v_proj: return c.num_key_value_heads * c.head_dim;
    case Proj::o_proj: return c.hidden_size;
    case Proj::gate_proj:
    case Proj::up_proj: return c.intermediate_size;
    case Proj::down_proj: return c.hidden_size;
  }
  return 0;
}

int64_t proj_in(const Config& c, Proj p) {
  switch (p) {
    case Proj::o_proj: return c.num_attention_heads * c.head_dim;
    case Proj::down_proj: return c.intermediate_size;
    default: return c.hidden_size;
  }
}

const char* norm_name(Norm n) {
  static const char* s[] = {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                            "post_feedforward_layernorm"};
  return s[int(n)];
}

std::string proj_weight_name(int64_t layer, Proj p) {
  return "model.layers." + std::to_string(layer) + "." + proj_module(p) + ".weight";
}

std::string norm_weight_name(int64_t layer, Norm n) {
  return "model.layers." + std::to_string(layer) + "." + norm_name(n) + ".weight";
}

std::string lora_weight_name(int64_t layer, Proj p, char which) {
  return "model.layers." + std::to_string(layer) + "." + proj_module(p) + ".lora_" + which + ".weight";
}

std::vector<WeightSpec> base_weight_specs(const Config& c) {
  std::vector<WeightSpec> s;
  const int64_t D = c.hidden_size;
  s.push_back({kEmbedName, {c.vocab_size, D}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    s.push_back({norm_weight_name(l, Norm::input_layernorm), {D}});
    for (Proj p : {Proj::q_proj, Proj::k_proj, Proj::v_proj, Proj::o_proj})
      s.push_back({proj_weight_name(l, p), {proj_out(c, p), proj_in(c, p)}});
    s.push_back({norm_weight_name(l, Norm::post_attention_layernorm), {D}});
    s.push_back({norm_weight_name(l, Norm::pre_feedforward_layernorm), {D}});
    for (Proj p : {Proj::gate_proj, Proj::up_proj, Proj::down_proj})
      s.push_back({proj_weight_name(l, p), {proj_out(c, p), proj_in(c, p)}});
    s.push_back({norm_weight_name(l, Norm::post_feedforward_layernorm), {D}});
  }
  s.push_back({kFinalNormName, {D}});
  return s;
}

bool AdapterConfig::targets(Proj p) const {
  for (Proj t : target_modules)
    if (t == p) return true;
  return false;
}

double AdapterConfig::scaling() const {
  return use_rslora ? lora_alpha / std::sqrt(double(r)) : lora_alpha / double(r);
}

AdapterConfig parse_adapter_config_json(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    // parse_error for bad syntax, out_of_range for a number no double holds (1e999): both are bad files.
    fail(source, std::string("malformed JSON: ") + e.what());
  }
  if (!j.is_object()) fail(source, "adapter config is not a JSON object");
  AdapterConfig a;
  auto it = j.find("peft_type");
  if (it != j.end() && !(it->is_string() && it->get<std::string>() == "LORA"))
    fail(source, "peft_type is " + json_brief(*it) + ", only \"LORA\" is supported");
  it = j.find("r");
  if (it == j.end() || !it->is_number_integer()) fail(source, "adapter config needs an integer 'r'");
  a.r = it->get<int64_t>();
  if (a.r < 1 || a.r > 65536) fail(source, "lora rank r = " + std::to_string(a.r) + " is outside 1..65536");
  it = j.find("lora_alpha");
  if (it == j.end() || !it->is_number()) fail(source, "adapter config needs a numeric 'lora_alpha'");
  a.lora_alpha = it->get<double>();
  if (!std::isfinite(a.lora_alpha)) fail(source, "lora_alpha must be finite");
  it = j.find("use_rslora");
  if (it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) fail(source, "use_rslora must be true or false");
    a.use_rslora = it->get<bool>();
  }
  // Options that change the math in ways this project does not model are refused, not ignored.
  for (const char* key : {"use_dora", "fan_in_fan_out"}) {
    it = j.find(key);
    if (it != j.end() && !(it->is_boolean() && !it->get<bool>()) && !it->is_null())
      fail(source, std::string(key) + " is not supported");
  }
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    it = j.find(key);
    if (it != j.end() && !it->is_null() && !(it->is_object() && it->empty()))
      fail(source, std::string(key) + " (per-module ranks or alphas) is not supported");
  }
  for (const char* key : {"layers_to_transform", "modules_to_save"}) {
    it = j.find(key);
    if (it != j.end() && !it->is_null()) fail(source, std::string(key) + " is not supported");
  }
  it = j.find("bias");
  if (it != j.end() && !(it->is_string() && it->get<std::string>() == "none"))
    fail(source, "bias " + json_brief(*it) + " is not supported (only \"none\")");

  it = j.find("target_modules");
  if (it == j.end()) fail(source, "adapter config needs 'target_modules'");
  std::vector<std::string> names;
  if (it->is_string()) {
    if (it->get<std::string>() == "all-linear") {
      for (Proj p : kAllProj) names.push_back(proj_name(p));
    } else {
      names.push_back(it->get<std::string>());
    }
  } else if (it->is_array()) {
    for (const auto& e : *it) {
      if (!e.is_string()) fail(source, "target_modules entries must be strings, got " + json_brief(e));
      names.push_back(e.get<std::string>());
    }
  } else {
    fail(source, "target_modules must be a list of module names");
  }
  if (names.empty()) fail(source, "target_modules is empty");
  for (const auto& n : names) {
    bool found = false;
    for (Proj p : kAllProj)
      if (n == proj_name(p) || n == proj_module(p)) {
        if (!a.targets(p)) a.target_modules.push_back(p);
        found = true;
      }
    if (!found) fail(source, "target module '" + n + "' is not one of Gemma 2's seven projections");
  }
  return a;
}

std::string to_adapter_config_json(const AdapterConfig& a) {
  json j;
  j["peft_type"] = "LORA";
  j["r"] = a.r;
  j["lora_alpha"] = a.lora_alpha;
  j["use_rslora"] = a.use_rslora;
  j["lora_dropout"] = 0.0;
  j["bias"] = "none";
  json t = json::array();
  for (Proj p : a.target_modules) t.push_back(proj_name(p));
  j["target_modules"] = t;
  return j.dump(2);
}

std::vector<WeightSpec> adapter_weight_specs(const Config& c, const AdapterConfig& a) {
  std::vector<WeightSpec> s;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (Proj p : kAllProj)
      if (a.targets(p)) {
        s.push_back({lora_weight_name(l, p, 'A'), {a.r, proj_in(c, p)}});
        s.push_back({lora_weight_name(l, p, 'B'), {proj_out(c, p), a.r}});
      }
  return s;
}

int64_t Batch::count_targets() const {
  int64_t n = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < T; ++t) n += target(b, t) != kIgnoreIndex;
  return n;
}

std::vector<Batch> split_batch(const Batch& b, int64_t rows) {
  std::vector<Batch> out;
  for (int64_t b0 = 0; b0 < b.B; b0 += rows) {
    Batch m;
    m.B = std::min(rows, b.B - b0);
    m.T = b.T;
    m.input_ids.assign(b.input_ids.begin() + b0 * b.T, b.input_ids.begin() + (b0 + m.B) * b.T);
    m.labels.assign(b.labels.begin() + b0 * b.T, b.labels.begin() + (b0 + m.B) * b.T);
    out.push_back(std::move(m));
  }
  return out;
}

void validate_batch(const Config& c, const Batch& b, const std::string& source) {
  if (b.B < 1 || b.T < 1) fail(source, "batch shape [" + std::to_string(b.B) + ", " + std::to_string(b.T) + "] is empty");
  if (b.T > c.max_position_embeddings)
    fail(source, "sequence length " + std::to_string(b.T) + " exceeds max_position_embeddings " +
                     std::to_string(c.max_position_embeddings));
  if (int64_t(b.input_ids.size()) != b.B * b.T || int64_t(b.labels.size()) != b.B * b.T)
    fail(source, "input_ids and labels must both have B*T entries");
  for (size_t i = 0; i < b.input_ids.size(); ++i) {
    const int64_t v = b.input_ids[i];
    if (v < 0 || v >= c.vocab_size)
      fail(source, "input_ids[" + std::to_string(i / size_t(b.T)) + ", " + std::to_string(i % size_t(b.T)) +
                       "] = " + std::to_string(v) + " is outside [0, " + std::to_string(c.vocab_size) + ")");
  }
  for (size_t i = 0; i < b.labels.size(); ++i) {
    const int64_t v = b.labels[i];
    if (v != kIgnoreIndex && (v < 0 || v >= c.vocab_size))
      fail(source, "labels[" + std::to_string(i / size_t(b.T)) + ", " + std::to_string(i % size_t(b.T)) + "] = " +
                       std::to_string(v) + " is neither -100 nor in [0, " + std::to_string(c.vocab_size) + ")");
  }
}

namespace {

// Layer index of "model.layers.<i>.<rest>", or -1.
int64_t layer_of(const std::string& name) {
  const std::string pre = "model.layers.";
  if (name.rfind(pre, 0) != 0) return -1;
  size_t i = pre.size(), j = i;
  while (j < name.size() && std::isdigit(static_cast<unsigned char>(name[j]))) ++j;
  if (j == i || j >= name.size() || name[j] != '.' || j - i > 6) return -1;
  return std::stoll(name.substr(i, j - i));
}

// HF's loader gives a checkpoint of the bare Gemma2Model (no `model.` in its names) the prefix the causal-LM
// wrapper expects; a checkpoint with both kinds of names is refused, since HF would load one kind and leave the
// weights of the other at their random initialisation.
bool bare_base_name(const std::string& n) {
  return n.rfind("embed_tokens.", 0) == 0 || n.rfind("layers.", 0) == 0 || n.rfind("norm.", 0) == 0;
}

// Names that only a PEFT model's live state_dict, or an adapter kind that is not implemented, produces: each
// gets its real cause before any "missing tensor" could hide it.
void check_peft_internal_name(const std::string& n, const std::string& source) {
  for (const char* ab : {".lora_A.", ".lora_B."}) {
    const size_t at = n.find(ab);
    if (at != std::string::npos && n.compare(at + 8, std::string::npos, "weight") != 0)
      fail(source, "tensor '" + n + "' carries PEFT's adapter name ('" + n.substr(at + 8, n.rfind('.') - at - 8) +
                       "'): it is a PEFT model's raw state_dict, not an adapter file; save the adapter with "
                       "save_pretrained (or get_peft_model_state_dict), which writes '...lora_A.weight'");
  }
  if (n.find("lora_magnitude_vector") != std::string::npos)
    fail(source, "tensor '" + n + "' is a DoRA magnitude vector (use_dora): DoRA is not implemented");
  if (n.find("lora_embedding_A") != std::string::npos || n.find("lora_embedding_B") != std::string::npos)
    fail(source, "tensor '" + n + "' is a LoRA adapter on the embedding: not implemented");
  if (n.find(".base_layer.") != std::string::npos)
    fail(source, "tensor '" + n +
                     "' is a base weight inside a PEFT-wrapped layer (a PEFT model's raw state_dict): "
                     "save the base model and the adapter separately (save_pretrained), or merge_and_unload() first");
}

}  // namespace

void validate_checkpoint(Checkpoint& ck, const std::string& source, bool allow_deeper) {
  const Config& c = ck.config;
  TensorMap renamed;
  for (auto& [name, t] : ck.weights) {
    std::string n = name;
    const std::string peft = "base_model.model.";
    if (n.rfind(peft, 0) == 0) n = n.substr(peft.size());
    if (renamed.count(n)) fail(source, "tensor '" + n + "' appears twice (with and without the PEFT prefix)");
    renamed.emplace(n, t);
  }
  {
    const std::string* prefixed = nullptr;
    const std::string* bare = nullptr;
    for (const auto& [n, t] : renamed) {
      if (!prefixed && n.rfind("model.", 0) == 0) prefixed = &n;
      if (!bare && bare_base_name(n)) bare = &n;
    }
    if (prefixed && bare)
      fail(source, "mixes names with and without the 'model.' prefix ('" + *prefixed + "' and '" + *bare +
                       "'): HF would load one kind and leave the other's weights random");
    if (bare) {
      TensorMap prefixed_all;
      for (auto& [n, t] : renamed) prefixed_all.emplace(bare_base_name(n) ? "model." + n : n, t);
      renamed = std::move(prefixed_all);
    }
  }
  for (const auto& [n, t] : renamed) check_peft_internal_name(n, source);
  // Layers the config does not have: dropped when --layers asked for fewer, refused otherwise.
  {
    int64_t deepest = -1;
    std::string deepest_name;
    for (const auto& [n, t] : renamed)
      if (const int64_t l = layer_of(n); l > deepest) {
        deepest = l;
        deepest_name = n;
      }
    if (deepest >= c.num_hidden_layers && !allow_deeper)
      fail(source, "tensor '" + deepest_name + "' is of layer " + std::to_string(deepest) + ": the checkpoint has " +
                       std::to_string(deepest + 1) + " layers, the config " + std::to_string(c.num_hidden_layers) +
                       " (num_hidden_layers)");
  }
  std::vector<WeightSpec> want = base_weight_specs(c);
  if (ck.adapter) {
    auto a = adapter_weight_specs(c, *ck.adapter);
    want.insert(want.end(), a.begin(), a.end());
  }
  std::set<std::string> wanted;
  for (const auto& w : want) {
    wanted.insert(w.name);
    auto it = renamed.find(w.name);
    if (it == renamed.end()) fail(source, "missing tensor '" + w.name + "'");
    if (it->second.shape != w.shape)
      fail(source, "tensor '" + w.name + "' has shape " + shape_str(it->second.shape) + ", expected " + shape_str(w.shape));
  }
  TensorMap kept;
  for (auto& [n, t] : renamed) {
    if (wanted.count(n)) {
      kept.emplace(n, t);
      continue;
    }
    if (n == kLmHeadName) {
      const Tensor& e = renamed.at(kEmbedName);
      if (t.shape != e.shape) fail(source, "lm_head.weight has shape " + shape_str(t.shape) + ", the embedding " + shape_str(e.shape));
      const int64_t block = 1 << 16;
      std::vector<double> x(static_cast<size_t>(block)), y(static_cast<size_t>(block));
      for (int64_t i0 = 0; i0 < t.numel(); i0 += block) {
        const int64_t m = std::min(block, t.numel() - i0);
        t.to_double(i0, m, x.data());
        e.to_double(i0, m, y.data());
        for (int64_t i = 0; i < m; ++i)
          if (x[size_t(i)] != y[size_t(i)] && !(std::isnan(x[size_t(i)]) && std::isnan(y[size_t(i)])))
            fail(source, "lm_head.weight differs from model.embed_tokens.weight; Gemma 2 ties them");
      }
      continue;  // tied: the embedding serves as the head
    }
    const int64_t l = layer_of(n);
    if (allow_deeper && l >= c.num_hidden_layers) continue;
    if (!ck.adapter && n.find(".lora_") != std::string::npos)
      fail(source, "adapter tensor '" + n + "' present but no adapter config was given");
    if (ck.adapter && n.find(".lora_") != std::string::npos)
      fail(source, "adapter tensor '" + n + "' is for a module that target_modules does not list, or of a layer " +
                       "the config does not have");
    fail(source, "unexpected tensor '" + n + "'");
  }
  for (const auto& [n, t] : kept) {
    const int64_t bad = first_non_finite(t);
    if (bad >= 0)
      fail(source, "tensor '" + n + "' has a non-finite value (" + std::to_string(t.at(bad)) + ") at flat index " +
                       std::to_string(bad));
  }
  ck.weights = std::move(kept);
}

}  // namespace gemma
