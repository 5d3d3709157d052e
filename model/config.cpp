#include "config.hpp"

#include <cmath>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>

#include "errors.hpp"
#include "json_brief.hpp"
#include "nf4.hpp"
#include "json_text.hpp"

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

std::optional<int64_t> parse_recompute_num_layers(const std::string& text, const std::string& flag) {
  if (text == "auto") return std::nullopt;
  const bool digits = !text.empty() && text.size() <= 9 &&
                      text.find_first_not_of("0123456789") == std::string::npos;
  if (!digits) fail(flag, "'" + text + "' is neither a number of layers (0 or more) nor auto");
  return std::stoll(text);
}

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
  return {"gemma2-2b", "gemma2-9b", "gemma2-27b", "gemma2-tiny", "gemma2-micro", "gemma2-odd", "gemma2-hd128", "gemma2-hd256"};
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
  if (name == "gemma2-hd128") {
    // The gate's second companion: gemma2-odd with head_dim 128, the released models' attention path on the GPU
    // (fast/attention_sm90.cuh takes head_dim 128 and 256; gemma2-odd's 18 takes the mma.sync kernels), at widths
    // small enough that the gate's tolerances stay tight (at released widths a broken rounding of P inside those
    // kernels was caught at only 1.9 times its tolerance).
    Config c = preset("gemma2-odd");
    c.head_dim = 128;
    return c;
  }
  if (name == "gemma2-hd256") {
    // The third companion: the same with head_dim 256, gemma2-2b's and gemma2-9b's attention path on the GPU, whose
    // kernels (the head_dim 256 dK, dV kernel above all) no other gate setting of gemma2-27b reaches.
    Config c = preset("gemma2-odd");
    c.head_dim = 256;
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

// Typed field access with errors that name the file and the key. A key the file leaves out takes the default the
// caller gives (Gemma2Config's), with a warning naming the key and the value, as HF's loader fills it in.
struct Reader {
  const json& j;
  const std::string& source;
  const std::function<void(const std::string&)>& warn;

  const json* find(const char* key) const {
    auto it = j.find(key);
    return it == j.end() ? nullptr : &*it;
  }
  // The key's value, or null after warning that `dflt` stands in for it.
  const json* find_or_default(const char* key, const std::string& dflt) const {
    const json* v = find(key);
    if (!v) warn("key '" + std::string(key) + "' " + kDefaultedKeyNote + " " + dflt + " is used, as HF does");
    return v;
  }
  int64_t integer(const char* key, int64_t dflt) const {
    const json* v = find_or_default(key, std::to_string(dflt));
    return v ? as_integer(*v, key) : dflt;
  }
  int64_t as_integer(const json& v, const std::string& key) const {
    // One beyond uint64 is stored as a float (below); one beyond int64 would wrap 2^64 - 384 to -384, a
    // valid-looking padding row.
    if (beyond_int64(v))
      fail(source, "key '" + key + "' is " + std::to_string(v.get<uint64_t>()) + ", out of range (at most " +
                       std::to_string(std::numeric_limits<int64_t>::max()) + ")");
    if (v.is_number_integer()) return v.get<int64_t>();
    // Some writers emit 4096.0; accept a float only when it is an exact integer.
    if (v.is_number_float()) {
      double d = v.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return int64_t(d);
      if (std::isfinite(d) && d == std::floor(d))
        fail(source, "key '" + key + "' is " + json_brief(v) + ", out of range (at most 9.0e15 as a float)");
    }
    fail(source, "key '" + key + "' must be an integer, got " + json_brief(v));
  }
  double number(const json& v, const std::string& key) const {
    if (!v.is_number()) fail(source, "key '" + key + "' must be a number, got " + json_brief(v));
    return v.get<double>();
  }
  double number(const char* key, double dflt) const {
    const json* v = find_or_default(key, json(dflt).dump());
    return v ? number(*v, key) : dflt;
  }
  // null is off; a missing key is `dflt`, never off.
  std::optional<double> nullable_number(const char* key, double dflt) const {
    const json* v = find_or_default(key, json(dflt).dump());
    if (!v) return dflt;
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

namespace {

// The key table. `implemented` decides, for a `math` key, whether its value is the one the reference computes.
struct KeyRule {
  ConfigKey key;
  bool (*implemented)(const json& v) = nullptr;
  // A math key whose refusals need their own words (which quantization it is): throws, or accepts.
  void (*check)(const json& v, const std::string& source, std::vector<std::string>* warnings) = nullptr;
};

void bnb_nf4_or_null(const json& v, const std::string& source, std::vector<std::string>* warnings) {
  parse_quantization_config(v, source, warnings);
}

bool is_null_or(const json& v, bool b) { return v.is_null() || (v.is_boolean() && v.get<bool>() == b); }
bool null_or_false(const json& v) { return is_null_or(v, false); }
bool is_true(const json& v) { return v.is_boolean() && v.get<bool>(); }
bool null_or_zero(const json& v) { return v.is_null() || (v.is_number() && v.get<double>() == 0.0); }
bool null_or_one(const json& v) { return v.is_null() || (v.is_number() && v.get<double>() == 1.0); }
bool null_or_empty(const json& v) { return v.is_null() || (v.is_structured() && v.empty()); }
bool null_or_eager(const json& v) { return v.is_null() || (v.is_string() && v.get<std::string>() == "eager"); }
bool is_gemma2(const json& v) { return v.is_string() && v.get<std::string>() == "gemma2"; }
bool tanh_gelu(const json& v) { return v.is_null() || (v.is_string() && v.get<std::string>() == "gelu_pytorch_tanh"); }

constexpr KeyKind U = KeyKind::used, H = KeyKind::harmless, M = KeyKind::math, W = KeyKind::warned;

// Sources: transformers' Gemma2Config (configuration_gemma2.py, 4.42 to 5.x) and PretrainedConfig
// (configuration_utils.py: common attributes and the generation parameters it pops), and keys found in real
// Gemma 2 config.json files.
const std::vector<KeyRule>& rules() {
  static const std::vector<KeyRule> r = {
      // Gemma2Config: read into Config.
      {{"vocab_size", U, "vocabulary size V (embedding rows)", "16"}},
      {{"hidden_size", U, "hidden size D", "8"}},
      {{"intermediate_size", U, "MLP width I", "12"}},
      {{"num_hidden_layers", U, "layers L", "3"}},
      {{"num_attention_heads", U, "query heads H", "4"}},
      {{"num_key_value_heads", U, "key/value heads KV", "2"}},
      {{"head_dim", U, "head width hd", "4"}},
      {{"query_pre_attn_scalar", U, "attention scale query_pre_attn_scalar^-0.5", "5"}},
      {{"sliding_window", U, "window of the sliding layers", "3"}},
      {{"layer_types", U, "sliding or full attention per layer", R"(["full_attention", "full_attention"])"}},
      {{"attn_logit_softcapping", U, "attention logit cap (null: none)", "null"}},
      {{"final_logit_softcapping", U, "final logit cap (null: none)", "20.0"}},
      {{"rms_norm_eps", U, "RMSNorm epsilon", "1e-5"}},
      {{"rope_theta", U, "RoPE base (old style; rope_parameters' rope_theta wins when both are set)", "20000.0"}},
      {{"rope_parameters", U, "RoPE (new style): rope_type \"default\" with its rope_theta",
        R"({"rope_type": "default", "rope_theta": 20000.0})"}},
      {{"rope_scaling", U, "older name of rope_parameters (also spelled with \"type\"); wins over it when both are set",
        R"({"rope_type": "default", "rope_theta": 20000.0})"}},
      {{"max_position_embeddings", U, "positions trained on; a longer sequence runs with a warning (RoPE continues)", "32"}},
      {{"pad_token_id", U, "the embedding's padding_idx (null: none)", "null"}},
      {{"eos_token_id", U, "end-of-sequence id (the first of a list); not part of the loss", "5"}},
      {{"bos_token_id", U, "beginning-of-sequence id; not part of the loss", "5"}},
      // Gemma2Config: values other than the implemented one change the loss or the gradients.
      {{"model_type", M, "gemma2 only", "\"llama\""}, is_gemma2},
      {{"hidden_activation", M,
        "Gemma 2's MLP applies hidden_activation; gelu_pytorch_tanh (HF's default) is implemented", "\"gelu\""},
       tanh_gelu},
      // null is not HF's default but an explicit value: the config stores it, and transformers 5.x's loader
      // (modeling_utils, get_expanded_tied_weights_keys: `if not self.config.tie_word_embeddings and not
      // self.config.tie_encoder_decoder: return {}`) then ties nothing; lm_head.weight is loaded or left random.
      // Read from the source, not measured on the GPU host.
      {{"tie_word_embeddings", M, "the LM head is the embedding (true, HF's default; null is read by HF as untied)",
        "false"},
       is_true},
      {{"attention_bias", M, "projections without biases (false)", "true"}, null_or_false},
      {{"attention_dropout", M,
        "no attention dropout (0): HF applies it whenever the model trains, so gradients with it are those of a random "
        "mask",
        "0.1"},
       null_or_zero},
      {{"use_bidirectional_attention", M, "causal attention (null or false); true removes the causal mask", "true"},
       null_or_false},
      {{"partial_rotary_factor", M, "RoPE on the whole head (1.0)", "0.5"}, null_or_one},
      // Common PretrainedConfig keys that change the math.
      {{"quantization_config", M,
        "unquantized weights (null), or bitsandbytes 4-bit nf4 with uint8 storage, dequantized on load (docs/qlora.md); "
        "fp4, 8-bit, GPTQ, AWQ, ... are not implemented",
        R"({"quant_method": "bitsandbytes", "load_in_4bit": true})"},
       nullptr, bnb_nf4_or_null},
      {{"per_layer_config", M, "one configuration for every layer (null)", R"({"0": {"sliding_window": 2}})"},
       null_or_empty},
      {{"pruned_heads", M, "no pruned attention heads ({})", R"({"0": [1]})"}, null_or_empty},
      {{"attn_implementation", M,
        "eager attention (null or \"eager\"), the spec's; HF's sdpa path has no attention softcap for Gemma 2",
        "\"sdpa\""},
       null_or_eager},
      {{"_attn_implementation", M, "eager attention (null or \"eager\"), as attn_implementation", "\"sdpa\""},
       null_or_eager},
      // Not read by HF's Gemma 2; a disagreement with what is read is worth a warning.
      {{"hidden_act", W, "HF's Gemma 2 MLP reads hidden_activation; hidden_act is another model family's key",
        "\"gelu\""}},
      // Cannot change the loss or the gradients.
      {{"architectures", H,
        "names a model class; the tensors' names decide what is loaded (a Gemma2Model checkpoint loads as HF loads it)",
        R"(["Gemma2Model"])"}},
      {{"transformers_version", H, "provenance", "\"4.0.0\""}},
      {{"_name_or_path", H, "provenance", "\"someone/else\""}},
      {{"name_or_path", H, "provenance", "\"someone/else\""}},
      {{"_commit_hash", H, "provenance", "\"0123abc\""}},
      {{"torch_dtype", H, "the weights' storage dtype: tensors are read as stored and computed in float64",
        "\"float16\""}},
      {{"dtype", H, "the weights' storage dtype (transformers 5's name for torch_dtype)", "\"float16\""}},
      {{"use_cache", H, "the key/value cache of generation", "false"}},
      {{"cache_implementation", H, "the key/value cache of generation", "\"static\""}},
      {{"sliding_window_size", H,
        "written by some releases beside sliding_window; HF's Gemma 2 code reads sliding_window only", "2"}},
      {{"initializer_range", H, "initialises new weights; every weight here is loaded or generated from a seed",
        "0.5"}},
      {{"output_hidden_states", H, "what the model returns, not what it computes", "true"}},
      {{"output_attentions", H, "what the model returns, not what it computes", "true"}},
      {{"return_dict", H, "what the model returns, not what it computes", "false"}},
      {{"use_return_dict", H, "what the model returns, not what it computes", "false"}},
      {{"torchscript", H, "export format", "true"}},
      {{"use_bfloat16", H, "TensorFlow models only", "true"}},
      {{"tf_legacy_loss", H, "TensorFlow models only", "true"}},
      {{"chunk_size_feed_forward", H, "read by models that chunk their feed-forward; Gemma 2's code does not", "4"}},
      {{"is_encoder_decoder", H, "encoder-decoder setting; Gemma 2's code does not read it", "true"}},
      {{"is_decoder", H, "encoder-decoder setting; Gemma 2's code does not read it", "true"}},
      {{"add_cross_attention", H, "encoder-decoder setting; Gemma 2's code does not read it", "true"}},
      {{"cross_attention_hidden_size", H, "encoder-decoder setting; Gemma 2's code does not read it", "8"}},
      {{"tie_encoder_decoder", H, "encoder-decoder setting; Gemma 2's code does not read it", "true"}},
      {{"id2label", H, "classification heads, not the causal-LM loss", R"({"0": "A"})"}},
      {{"label2id", H, "classification heads, not the causal-LM loss", R"({"A": 0})"}},
      {{"num_labels", H, "classification heads, not the causal-LM loss", "3"}},
      {{"problem_type", H, "classification heads, not the causal-LM loss", "\"regression\""}},
      {{"finetuning_task", H, "classification heads, not the causal-LM loss", "\"sst2\""}},
      {{"tokenizer_class", H, "tokenizer metadata", "\"GemmaTokenizer\""}},
      {{"prefix", H, "pipeline metadata", "\"x\""}},
      {{"task_specific_params", H, "pipeline metadata", R"({"summarization": {}})"}},
      {{"sep_token_id", H, "a token id Gemma 2's model does not read", "5"}},
      {{"decoder_start_token_id", H, "a token id Gemma 2's model does not read", "5"}},
      {{"_attn_implementation_autoset", H, "records that HF picked the attention implementation itself", "true"}},
      {{"experts_implementation", H, "Gemma 2 has no experts", "\"grouped_mm\""}},
      {{"gradient_checkpointing", H, "recomputes activations in the backward pass: the same values", "true"}},
      // PretrainedConfig's generation parameters: HF moves them to the generation config.
      {{"max_length", H, "generation only", "64"}},
      {{"min_length", H, "generation only", "4"}},
      {{"max_new_tokens", H, "generation only", "64"}},
      {{"min_new_tokens", H, "generation only", "4"}},
      {{"do_sample", H, "generation only", "true"}},
      {{"early_stopping", H, "generation only", "true"}},
      {{"num_beams", H, "generation only", "4"}},
      {{"num_beam_groups", H, "generation only", "2"}},
      {{"diversity_penalty", H, "generation only", "0.5"}},
      {{"temperature", H, "generation only", "0.7"}},
      {{"top_k", H, "generation only", "5"}},
      {{"top_p", H, "generation only", "0.9"}},
      {{"typical_p", H, "generation only", "0.9"}},
      {{"repetition_penalty", H, "generation only", "1.1"}},
      {{"length_penalty", H, "generation only", "2.0"}},
      {{"no_repeat_ngram_size", H, "generation only", "3"}},
      {{"encoder_no_repeat_ngram_size", H, "generation only", "3"}},
      {{"bad_words_ids", H, "generation only", "[[5]]"}},
      {{"num_return_sequences", H, "generation only", "2"}},
      {{"output_scores", H, "generation only", "true"}},
      {{"output_logits", H, "generation only", "true"}},
      {{"return_dict_in_generate", H, "generation only", "true"}},
      {{"forced_bos_token_id", H, "generation only", "5"}},
      {{"forced_eos_token_id", H, "generation only", "5"}},
      {{"remove_invalid_values", H, "generation only", "true"}},
      {{"exponential_decay_length_penalty", H, "generation only", "[4, 1.5]"}},
      {{"suppress_tokens", H, "generation only", "[5]"}},
      {{"begin_suppress_tokens", H, "generation only", "[5]"}},
  };
  return r;
}

const KeyRule* find_rule(const std::string& key) {
  for (const KeyRule& r : rules())
    if (key == r.key.key) return &r;
  return nullptr;
}

}  // namespace

const std::vector<ConfigKey>& config_keys() {
  static const std::vector<ConfigKey> keys = [] {
    std::vector<ConfigKey> k;
    for (const KeyRule& r : rules()) k.push_back(r.key);
    return k;
  }();
  return keys;
}

namespace {

// RoPE as transformers 5 reads it (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict): the rope_scaling
// dict when it is set (non-empty), else rope_parameters, with rope_theta from the top level when the dict has
// none; the older spelling "type" stands for "rope_type". Only default RoPE is implemented.
void parse_rope(const Reader& r, Config& c) {
  const std::string& source = r.source;
  const auto& warn = r.warn;
  auto set = [](const json* v) { return v && !v->is_null() && !(v->is_object() && v->empty()); };
  const json* scaling = r.find("rope_scaling");
  const json* params = r.find("rope_parameters");
  const json* top = r.find("rope_theta");
  const json* rope = set(scaling) ? scaling : set(params) ? params : nullptr;
  // No theta anywhere: transformers 5 standardizes the RoPE parameters with rope_theta 10000.0 (Gemma2Config's
  // default, read on the GPU host with 5.17), so that is the value, with a warning.
  auto default_theta = [&](const std::string& where) {
    warn("no rope_theta " + where + ": the default 10000.0 is used, as transformers 5 does");
    c.rope_theta = 10000.0;
  };
  if (!rope) {
    if (!top) return default_theta("(nor rope_parameters or rope_scaling)");
    c.rope_theta = r.number(*top, "rope_theta");
    return;
  }
  const std::string name = rope == scaling ? "rope_scaling" : "rope_parameters";
  if (!rope->is_object()) fail(source, name + " must be an object, got " + json_brief(*rope));
  if (rope->contains("sliding_attention") || rope->contains("full_attention"))
    fail(source, name + " gives RoPE per layer type: not implemented (Gemma 2 has one RoPE for every layer)");
  if (rope == scaling && set(params))
    warn("rope_scaling and rope_parameters are both set: rope_scaling is used (as transformers 5 does)");
  const json* type = rope->contains("rope_type") ? &(*rope)["rope_type"]
                     : rope->contains("type")    ? &(*rope)["type"]
                                                 : nullptr;
  if (type && !(type->is_string() && type->get<std::string>() == "default"))
    fail(source, name + "." + (rope->contains("rope_type") ? "rope_type" : "type") + " = " + json_brief(*type) +
                     " is not implemented (only default RoPE)");
  if (rope->contains("partial_rotary_factor") && !null_or_one((*rope)["partial_rotary_factor"]))
    fail(source, name + ".partial_rotary_factor = " + json_brief((*rope)["partial_rotary_factor"]) +
                     " is not implemented (RoPE on the whole head)");
  for (const auto& [k, v] : rope->items())
    if (k != "rope_type" && k != "type" && k != "rope_theta" && k != "partial_rotary_factor")
      warn(name + " key '" + k + "' is not read by default RoPE: ignored (HF warns the same)");
  if (rope->contains("rope_theta")) {
    c.rope_theta = r.number((*rope)["rope_theta"], name + ".rope_theta");
    if (top && top->is_number() && top->get<double>() != c.rope_theta)
      warn("rope_theta " + json_brief(*top) + " is not used: " + name + ".rope_theta " +
           json_brief((*rope)["rope_theta"]) + " is (as transformers 5 reads it)");
  } else if (top) {
    c.rope_theta = r.number(*top, "rope_theta");
  } else {
    default_theta("in " + name + " or at the top level");
  }
}

}  // namespace

Config parse_config_json(const std::string& text, const std::string& source, std::vector<std::string>* warnings) {
  json j;
  try {
    j = parse_json(text);
  } catch (const json::exception& e) {
    // parse_error for bad syntax, out_of_range for a number no double holds (1e999): both are bad files.
    fail(source, std::string("malformed JSON: ") + e.what());
  }
  if (!j.is_object()) fail(source, "config is not a JSON object");
  const std::function<void(const std::string&)> warn = [&](const std::string& m) {
    if (warnings) warnings->push_back(one_line(source + ": " + m));
  };
  Reader r{j, source, warn};
  if (const json* mt = r.find("model_type")) {
    if (!is_gemma2(*mt)) fail(source, "model_type is " + json_brief(*mt) + ", expected \"gemma2\"");
  }
  // Every key is classified before any is used: a key that changes the math is never passed over.
  for (const auto& [key, v] : j.items()) {
    const KeyRule* rule = find_rule(key);
    if (!rule) {
      warn("unknown key '" + key + "' (not a Gemma2Config key this project knows): ignored");
      continue;
    }
    if (rule->check) {
      rule->check(v, source, warnings);
      continue;
    }
    if (rule->key.kind == KeyKind::math && !rule->implemented(v))
      fail(source, key + " = " + json_brief(v) + " is not implemented (implemented: " + rule->key.why + ")");
  }

  // The defaults are transformers 5.17's Gemma2Config.__init__ (read on the GPU host); a missing cap is 50 or 30,
  // not off (off is null).
  Config c;
  c.vocab_size = r.integer("vocab_size", 256000);
  c.hidden_size = r.integer("hidden_size", 2304);
  c.intermediate_size = r.integer("intermediate_size", 9216);
  c.num_hidden_layers = r.integer("num_hidden_layers", 26);
  c.num_attention_heads = r.integer("num_attention_heads", 8);
  c.num_key_value_heads = r.integer("num_key_value_heads", 4);
  c.head_dim = r.integer("head_dim", 256);
  c.query_pre_attn_scalar = r.number("query_pre_attn_scalar", 256);
  if (const json* w = r.find_or_default("sliding_window", "4096"); !w)
    c.sliding_window = 4096;
  else if (!w->is_null())
    c.sliding_window = r.as_integer(*w, "sliding_window");
  c.attn_logit_softcapping = r.nullable_number("attn_logit_softcapping", 50.0);
  c.final_logit_softcapping = r.nullable_number("final_logit_softcapping", 30.0);
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  parse_rope(r, c);

  // Gemma2MLP applies ACT2FN[config.hidden_activation], whose default is gelu_pytorch_tanh. hidden_act, which
  // real Gemma 2 configs often carry too, is not read: a config with only hidden_act gets the default, as in HF.
  // An explicit null is not the default: HF's Gemma2MLP looks up ACT2FN[None] and fails to build.
  if (const json* act = r.find("hidden_activation"); act && act->is_null())
    fail(source, "hidden_activation is null: HF's Gemma2MLP cannot build an activation from it (ACT2FN[None]); "
                 "Gemma 2's is \"gelu_pytorch_tanh\"");
  else if (act)
    c.hidden_activation = act->get<std::string>();
  if (const json* ha = r.find("hidden_act"); ha && !ha->is_null()) {
    if (!(ha->is_string() && ha->get<std::string>() == c.hidden_activation))
      warn("hidden_act " + json_brief(*ha) + " is not what HF's Gemma 2 uses: its MLP applies hidden_activation (\"" +
           c.hidden_activation + "\"" + (r.find("hidden_activation") ? "" : ", HF's default") +
           "); hidden_act is ignored, as HF ignores it");
  }
  if (const json* m = r.find("max_position_embeddings")) c.max_position_embeddings = r.as_integer(*m, "max_position_embeddings");
  // A missing pad_token_id is Gemma2Config's 0 and, like every defaulted used key, said: it decides which embedding
  // row gets no lookup gradient.
  if (const json* p = r.find_or_default("pad_token_id", "0")) {
    if (p->is_null()) {
      c.pad_token_id.reset();
    } else {
      const int64_t v = r.as_integer(*p, "pad_token_id");
      // nn.Embedding(padding_idx=v) takes v in [-V, V) and counts a negative one from the end.
      if (c.vocab_size > 0 && (v < -c.vocab_size || v >= c.vocab_size))
        fail(source, "pad_token_id " + std::to_string(v) + " is outside the vocabulary [-" +
                         std::to_string(c.vocab_size) + ", " + std::to_string(c.vocab_size) +
                         "): torch's nn.Embedding refuses it as padding_idx");
      c.pad_token_id = v < 0 ? c.vocab_size + v : v;
    }
  }
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
  // transformers 5 validates config fields by their declared types, and query_pre_attn_scalar is an int there: an
  // integral value is written as one ("224", not "224.0", which from_pretrained refuses).
  const double q = c.query_pre_attn_scalar;
  if (q == std::floor(q) && std::fabs(q) < 9.0e15)
    j["query_pre_attn_scalar"] = int64_t(q);
  else
    j["query_pre_attn_scalar"] = q;
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
  j["pad_token_id"] = c.pad_token_id ? json(*c.pad_token_id) : json(nullptr);
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
  for (const auto& [key, cap] : {std::pair{"attn_logit_softcapping", c.attn_logit_softcapping},
                                  std::pair{"final_logit_softcapping", c.final_logit_softcapping}})
    if (cap && !(std::isfinite(*cap) && *cap > 0))
      fail(source, std::string(key) + " must be positive or null (c tanh(x / c) divides by it), got " + json(*cap).dump());
  if (c.hidden_activation != "gelu_pytorch_tanh")
    fail(source, "hidden_activation '" + c.hidden_activation + "' is not Gemma 2's gelu_pytorch_tanh");
  if (int64_t(c.layer_types.size()) != c.num_hidden_layers)
    fail(source, "layer_types has " + std::to_string(c.layer_types.size()) + " entries for " +
                     std::to_string(c.num_hidden_layers) + " layers");
  bool any_sliding = false;
  for (auto t : c.layer_types) any_sliding |= (t == LayerType::sliding);
  if (any_sliding && !c.sliding_window) fail(source, "sliding layers need a sliding_window");
  if (c.sliding_window && *c.sliding_window < 1) fail(source, "sliding_window must be at least 1");
  if (c.pad_token_id && (*c.pad_token_id < 0 || *c.pad_token_id >= c.vocab_size))
    fail(source, "pad_token_id " + std::to_string(*c.pad_token_id) + " is outside the vocabulary [0, " +
                     std::to_string(c.vocab_size) + ")");
}

}  // namespace gemma
