// The one description of a Gemma 2 model that every backend, reader and tool uses.
// Field names are Hugging Face's config.json keys; the presets are the released models' exact values.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace gemma {

enum class LayerType : uint8_t { sliding, full };

struct Config {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;        // D
  int64_t intermediate_size = 0;  // I
  int64_t num_hidden_layers = 0;  // L
  int64_t num_attention_heads = 0;  // H
  int64_t num_key_value_heads = 0;  // KV
  int64_t head_dim = 0;             // hd
  double query_pre_attn_scalar = 0;  // attention scale is query_pre_attn_scalar^-0.5
  std::optional<int64_t> sliding_window;  // W keys, the query's own included
  std::optional<double> attn_logit_softcapping;   // null: the model has no attention cap
  std::optional<double> final_logit_softcapping;  // null: the model has no final cap
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  std::string hidden_activation = "gelu_pytorch_tanh";
  int64_t max_position_embeddings = 8192;
  std::vector<LayerType> layer_types;  // one per layer
  // HF builds the embedding as nn.Embedding(..., padding_idx=pad_token_id): that row gets no gradient from
  // lookups. null (no value) means no padding index at all; a negative id counts from the end, as torch does.
  std::optional<int64_t> pad_token_id = 0;
  int64_t eos_token_id = 1, bos_token_id = 2;

  int64_t kv_groups() const { return num_attention_heads / num_key_value_heads; }
};

// Which of the two caps a run applies; the cap values themselves always come from the Config.
struct Softcap {
  bool attn = true;
  bool logits = true;
  // Spelled out: the CUDA sources that include this header are compiled as C++17.
  bool operator==(const Softcap& o) const { return attn == o.attn && logits == o.logits; }
};
// "none", "attn", "logits", "attn,logits" (also "logits,attn"); throws InputError naming `flag`.
Softcap parse_softcap(const std::string& text, const std::string& flag);
std::string softcap_name(Softcap s);   // "none", "attn", "logits", "attn,logits" (the CLI spelling)
std::string softcap_combo(Softcap s);  // "none", "attn", "logits", "attn_logits" (the case-file group)
// The four combinations in a fixed order: none, attn, logits, attn,logits.
std::vector<Softcap> all_softcaps();
// The fast trainer's --recompute-num-layers: a count of 0 or more in decimal digits, or "auto" (nullopt: the fewest
// recomputed layers that fit); throws InputError naming `flag` for anything else (signs, spaces, empty).
std::optional<int64_t> parse_recompute_num_layers(const std::string& text, const std::string& flag);
// Every cap the config defines is on: the default when the user names none.
Softcap config_softcaps(const Config& c);
// Throws when `s` asks for a cap the config does not define (null in config.json).
void check_softcap_available(const Config& c, Softcap s, const std::string& source);

std::vector<std::string> preset_names();
bool is_preset(const std::string& name);
// A preset by name; throws InputError for an unknown one, listing the known ones.
Config preset(const std::string& name);
// The same model with only its first n layers (layer types kept): how true widths fit a small machine.
Config with_layers(const Config& c, int64_t n);

// Parses HF config.json text, old or new key style, as transformers' Gemma2Config reads it. `source` names the
// file in error messages. Every key is classified (config_keys()): a key that would change the loss or the
// gradients is either implemented or refused (InputError naming it and its value). What does not stop the
// run but deserves a word (a key nobody knows, a hidden_act HF does not use) is appended to `warnings` as
// one line "<source>: ..."; pass nullptr only where nothing could print them (fuzzers, unit tests).
Config parse_config_json(const std::string& text, const std::string& source, std::vector<std::string>* warnings);
// In the warning for a key the file leaves out, which takes Gemma2Config's default: a shape error elsewhere repeats
// such warnings as the likely cause (validate_checkpoint).
inline constexpr const char* kDefaultedKeyNote = "is missing: Gemma2Config's default";
// How a config.json key is treated.
enum class KeyKind : uint8_t {
  used,      // parsed into Config
  harmless,  // cannot change the loss or the gradients (ConfigKey::why says why); accepted silently
  math,      // changes the math: the implemented value is accepted, any other refused naming key and value
  warned,    // not read by HF's Gemma 2 either, but a value that disagrees with what HF does use is a warning
};
struct ConfigKey {
  const char* key;
  KeyKind kind;
  const char* why;      // harmless: why it cannot matter; math: what is implemented; used/warned: what it sets
  const char* example;  // a JSON value that differs from what is implemented: the table's tests walk it
};
// Every config.json key this project knows: Gemma2Config's own, PretrainedConfig's common ones, and what real
// checkpoints carry. A key outside it is one warning, never an error and never silence.
const std::vector<ConfigKey>& config_keys();

// New-style HF config.json (layer_types, rope_parameters), readable by transformers 5.
std::string to_config_json(const Config& c);
// Throws InputError naming `source` and the first inconsistency found.
void validate(const Config& c, const std::string& source);

}  // namespace gemma
