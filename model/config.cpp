#include "config.hpp"

#include <cmath>
#include <nlohmann/json.hpp>

#include "errors.hpp"
#include "json_brief.hpp"

namespace gemma {

using nlohmann::json;

Softcap parse_softcap(const std::string& text, const std::string& flag) {
  if (text == "none") return {false, false};
  if (text == "attn") return {true, false};
  if (text == "logits") return {false, true};
  if (text == "attn,logits" || text == "logits,attn") return {true, true};
  fail(flag, "'" + text + "' is not one of none, attn, logits, attn,logits");
}

std::string softcap_name(Softcap s) {
  if (s.attn && s.logits) return "attn,logits";
  if (s.attn) return "attn";
  if (s.logits) return "logits";
  return "none";
}

std::string softcap_combo(Softcap s) {
  if (s.attn && s.logits) return "attn_logits";
  return softcap_name(s);
}

std::vector<Softcap> all_softcaps() { return {{false, false}, {true, false}, {false, true}, {true, true}}; }

Softcap config_softcaps(const Config& c) {
  return {c.attn_logit_softcapping.has_value(), c.final_logit_softcapping.has_value()};
}

void check_softcap_available(const Config& c, Softcap s, const std::string& source) {
  if (s.attn && !c.attn_logit_softcapping)
    fail(source, "attention softcap requested but attn_logit_softcapping is null in the config");
  if (s.logits && !c.final_logit_softcapping)
    fail(source, "final softcap requested but final_logit_softcapping is null in the config");
}

namespace {

std::vector<LayerType> alternating(int64_t n) {
  // Gemma 2: even layers (0, 2, ...) slide, odd layers are global.
  std::vector<LayerType> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = (i % 2 == 0) ? LayerType::sliding : LayerType::full;
  return t;
}

Config released(int64_t D, int64_t I, int64_t L, int64_t H, int64_t KV, int64_t hd, double qpas) {
  Config c;
  c.vocab_size = 256000;
  c.hidden_size = D;
  c.intermediate_size = I;
  c.num_hidden_layers = L;
  c.num_attention_heads = H;
  c.num_key_value_heads = KV;
  c.head_dim = hd;
  c.query_pre_attn_scalar = qpas;
  c.sliding_window = 4096;
  c.attn_logit_softcapping = 50.0;
  c.final_logit_softcapping = 30.0;
  c.layer_types = alternating(L);
  return c;
}

}  // namespace

std::vector<std::string> preset_names() {
  return {"gemma2-2b", "gemma2-9b", "gemma2-27b", "gemma2-tiny", "gemma2-micro", "gemma2-odd"};
}

bool is_preset(const std::string& name) {
  for (const auto& n : preset_names())
    if (n == name) return true;
  return false;
}

Config preset(const std::string& name) {
  if (name == "gemma2-2b") return released(2304, 9216, 26, 8, 4, 256, 256);
  if (name == "gemma2-9b") return released(3584, 14336, 42, 16, 8, 256, 256);
  // 27b: head_dim 128 is not hidden/heads (144); the query scale uses 144 = hidden/heads.
  if (name == "gemma2-27b") return released(4608, 36864, 46, 32, 16, 128, 144);
  if (name == "gemma2-tiny") {
    // Test-sized but with every feature that can hide a bug: grouped KV (2 queries per KV head),
    // query_pre_attn_scalar != head_dim, and a window short enough that test sequences exceed it.
    Config c = released(64, 160, 2, 4, 2, 16, 24);
    c.vocab_size = 384;
    c.sliding_window = 8;
    c.max_position_embeddings = 256;
    return c;
  }
  if (name == "gemma2-micro") {
    // Small enough for 50-digit arithmetic, same feature coverage as tiny.
    Config c = released(12, 20, 2, 2, 1, 6, 8);
    c.vocab_size = 40;
    c.sliding_window = 3;
    c.max_position_embeddings = 64;
    return c;
  }
  if (name == "gemma2-odd") {
    // The gate's companion to the released widths: what they cannot reach. A vocabulary that is no multiple of 64
    // or 128 (a kernel pads its head), sqrt(hidden_size) = sqrt(72) not a bf16 number (8.49 rounds to 8.5), a head_dim
    // of 18 (no 16-byte rows), query_pre_attn_scalar 20 (neither head_dim nor hidden/heads), three layers.
    Config c = released(72, 176, 3, 4, 2, 18, 20);
    c.vocab_size = 389;
    c.sliding_window = 8;
    c.max_position_embeddings = 256;
    return c;
  }
  std::string known;
  for (const auto& n : preset_names()) known += (known.empty() ? "" : ", ") + n;
  fail("--model", "unknown model '" + name + "' (known: " + known + ")");
}

Config with_layers(const Config& c, int64_t n) {
  if (n < 1 || n > c.num_hidden_layers)
    fail("--layers", std::to_string(n) + " is outside 1.." + std::to_string(c.num_hidden_layers));
  Config r = c;
  r.num_hidden_layers = n;
  r.layer_types.resize(size_t(n));
  return r;
}

namespace {

// Typed field access with errors that name the file and the key.
struct Reader {
  const json& j;
  const std::string& source;

  const json* find(const char* key) const {
    auto it = j.find(key);
    return it == j.end() ? nullptr : &*it;
  }
  int64_t integer(const char* key) const {
    const json* v = find(key);
    if (!v) fail(source, std::string("missing key '") + key + "'");
    return as_integer(*v, key);
  }
  int64_t as_integer(const json& v, const std::string& key) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    // Some writers emit 4096.0; accept a float only when it is an exact integer.
    if (v.is_number_float()) {
      double d = v.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return int64_t(d);
    }
    fail(source, "key '" + key + "' must be an integer, got " + json_brief(v));
  }
  double number(const json& v, const std::string& key) const {
    if (!v.is_number()) fail(source, "key '" + key + "' must be a number, got " + json_brief(v));
    return v.get<double>();
  }
  double number(const char* key) const {
    const json* v = find(key);
    if (!v) fail(source, std::string("missing key '") + key + "'");
    return number(*v, key);
  }
  std::optional<double> nullable_number(const char* key) const {
    const json* v = find(key);
    if (!v) fail(source, std::string("missing key '") + key + "' (write null to switch it off)");
    if (v->is_null()) return std::nullopt;
    return number(*v, key);
  }
  // Token ids: HF writes an int or a list of ints (eos_token_id: [1, 107]); only the first is kept.
  int64_t token_id(const char* key, int64_t dflt) const {
    const json* v = find(key);
    if (!v || v->is_null()) return dflt;
    if (v->is_array()) {
      if (v->empty()) fail(source, std::string("key '") + key + "' is an empty list");
      return as_integer((*v)[0], key);
    }
    return as_integer(*v, key);
  }
};

}  // namespace

Config parse_config_json(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    // parse_error for bad syntax, out_of_range for a number no double holds (1e999): both are bad files.
    fail(source, std::string("malformed JSON: ") + e.what());
  }
  if (!j.is_object()) fail(source, "config is not a JSON object");
  Reader r{j, source};
  if (const json* mt = r.find("model_type")) {
    if (!mt->is_string() || mt->get<std::string>() != "gemma2")
      fail(source, "model_type is " + json_brief(*mt) + ", expected \"gemma2\"");
  }
  Config c;
  c.vocab_size = r.integer("vocab_size");
  c.hidden_size = r.integer("hidden_size");
  c.intermediate_size = r.integer("intermediate_size");
  c.num_hidden_layers = r.integer("num_hidden_layers");
  c.num_attention_heads = r.integer("num_attention_heads");
  c.num_key_value_heads = r.integer("num_key_value_heads");
  c.head_dim = r.integer("head_dim");
  c.query_pre_attn_scalar = r.number("query_pre_attn_scalar");
  {
    const json* w = r.find("sliding_window");
    if (!w) fail(source, "missing key 'sliding_window'");
    if (!w->is_null()) c.sliding_window = r.as_integer(*w, "sliding_window");
  }
  c.attn_logit_softcapping = r.nullable_number("attn_logit_softcapping");
  c.final_logit_softcapping = r.nullable_number("final_logit_softcapping");
  c.rms_norm_eps = r.number("rms_norm_eps");

  // rope_theta: top level in old configs, inside rope_parameters in new ones.
  const json* rp = r.find("rope_parameters");
  if (rp && !rp->is_null()) {
    if (!rp->is_object()) fail(source, "rope_parameters must be an object");
    Reader rr{*rp, source};
    if (const json* rt = rr.find("rope_type")) {
      if (!rt->is_string() || rt->get<std::string>() != "default")
        fail(source, "rope_parameters.rope_type " + json_brief(*rt) + " is not supported (only \"default\")");
    }
    c.rope_theta = rr.number("rope_theta");
  } else if (r.find("rope_theta")) {
    c.rope_theta = r.number("rope_theta");
  } else {
    fail(source, "missing key 'rope_theta' (or 'rope_parameters.rope_theta')");
  }
  if (const json* rs = r.find("rope_scaling"); rs && !rs->is_null())
    fail(source, "rope_scaling is not supported by Gemma 2 (got " + json_brief(*rs) + ")");

  // Old configs say hidden_act; new ones hidden_activation. Gemma 2 uses the tanh approximation.
  const json* act = r.find("hidden_activation");
  if (!act || act->is_null()) act = r.find("hidden_act");
  if (act && !act->is_null()) {
    if (!act->is_string()) fail(source, "hidden_activation must be a string");
    c.hidden_activation = act->get<std::string>();
  }
  if (const json* m = r.find("max_position_embeddings")) c.max_position_embeddings = r.as_integer(*m, "max_position_embeddings");
  if (const json* t = r.find("tie_word_embeddings")) {
    if (!t->is_boolean()) fail(source, "tie_word_embeddings must be true or false");
    if (!t->get<bool>()) fail(source, "tie_word_embeddings is false; Gemma 2's LM head is the embedding");
  }
  if (const json* b = r.find("attention_bias")) {
    if (!b->is_boolean()) fail(source, "attention_bias must be true or false");
    if (b->get<bool>()) fail(source, "attention_bias is true; Gemma 2 has no biases");
  }
  c.pad_token_id = r.token_id("pad_token_id", 0);
  c.eos_token_id = r.token_id("eos_token_id", 1);
  c.bos_token_id = r.token_id("bos_token_id", 2);

  if (const json* lt = r.find("layer_types"); lt && !lt->is_null()) {
    if (!lt->is_array()) fail(source, "layer_types must be a list");
    for (const auto& e : *lt) {
      if (!e.is_string()) fail(source, "layer_types entries must be strings, got " + json_brief(e));
      const auto s = e.get<std::string>();
      if (s == "sliding_attention") c.layer_types.push_back(LayerType::sliding);
      else if (s == "full_attention") c.layer_types.push_back(LayerType::full);
      else fail(source, "layer_types entry '" + s + "' is neither sliding_attention nor full_attention");
    }
  } else if (c.num_hidden_layers > 0 && c.num_hidden_layers < 100000) {
    c.layer_types = alternating(c.num_hidden_layers);
  }
  validate(c, source);
  return c;
}

std::string to_config_json(const Config& c) {
  json j;
  j["architectures"] = {"Gemma2ForCausalLM"};
  j["model_type"] = "gemma2";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["query_pre_attn_scalar"] = c.query_pre_attn_scalar;
  j["sliding_window"] = c.sliding_window ? json(*c.sliding_window) : json(nullptr);
  j["attn_logit_softcapping"] = c.attn_logit_softcapping ? json(*c.attn_logit_softcapping) : json(nullptr);
  j["final_logit_softcapping"] = c.final_logit_softcapping ? json(*c.final_logit_softcapping) : json(nullptr);
  j["rope_parameters"] = {{"rope_theta", c.rope_theta}, {"rope_type", "default"}};
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["hidden_activation"] = c.hidden_activation;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = true;
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["pad_token_id"] = c.pad_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["bos_token_id"] = c.bos_token_id;
  json lt = json::array();
  for (auto t : c.layer_types) lt.push_back(t == LayerType::sliding ? "sliding_attention" : "full_attention");
  j["layer_types"] = lt;
  return j.dump(2);
}

void validate(const Config& c, const std::string& source) {
  auto positive = [&](int64_t v, const char* key) {
    if (v <= 0) fail(source, std::string(key) + " must be positive, got " + std::to_string(v));
  };
  positive(c.vocab_size, "vocab_size");
  positive(c.hidden_size, "hidden_size");
  positive(c.intermediate_size, "intermediate_size");
  positive(c.num_hidden_layers, "num_hidden_layers");
  positive(c.num_attention_heads, "num_attention_heads");
  positive(c.num_key_value_heads, "num_key_value_heads");
  positive(c.head_dim, "head_dim");
  positive(c.max_position_embeddings, "max_position_embeddings");
  // Sizes beyond these are certainly corrupt and would overflow index arithmetic.
  const int64_t big = int64_t(1) << 24;
  if (c.vocab_size > big || c.hidden_size > big || c.intermediate_size > big || c.num_hidden_layers > 4096 ||
      c.num_attention_heads > 4096 || c.head_dim > 65536)
    fail(source, "a dimension is implausibly large (vocab, hidden, intermediate <= 2^24, layers and heads <= 4096)");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail(source, "num_attention_heads (" + std::to_string(c.num_attention_heads) +
                     ") is not a multiple of num_key_value_heads (" + std::to_string(c.num_key_value_heads) + ")");
  if (c.head_dim % 2 != 0) fail(source, "head_dim must be even for rotary embeddings, got " + std::to_string(c.head_dim));
  if (!(std::isfinite(c.query_pre_attn_scalar) && c.query_pre_attn_scalar > 0))
    fail(source, "query_pre_attn_scalar must be positive");
  if (!(std::isfinite(c.rms_norm_eps) && c.rms_norm_eps > 0)) fail(source, "rms_norm_eps must be positive");
  if (!(std::isfinite(c.rope_theta) && c.rope_theta > 1)) fail(source, "rope_theta must be greater than 1");
  for (auto cap : {c.attn_logit_softcapping, c.final_logit_softcapping})
    if (cap && !(std::isfinite(*cap) && *cap > 0)) fail(source, "a softcap must be positive or null");
  if (c.hidden_activation != "gelu_pytorch_tanh")
    fail(source, "hidden_activation '" + c.hidden_activation + "' is not Gemma 2's gelu_pytorch_tanh");
  if (int64_t(c.layer_types.size()) != c.num_hidden_layers)
    fail(source, "layer_types has " + std::to_string(c.layer_types.size()) + " entries for " +
                     std::to_string(c.num_hidden_layers) + " layers");
  bool any_sliding = false;
  for (auto t : c.layer_types) any_sliding |= (t == LayerType::sliding);
  if (any_sliding && !c.sliding_window) fail(source, "sliding layers need a sliding_window");
  if (c.sliding_window && *c.sliding_window < 1) fail(source, "sliding_window must be at least 1");
}

}  // namespace gemma
