// Weight names and shapes (Hugging Face's state-dict names and [out, in] layouts), LoRA adapter configs in
// PEFT's format, token batches, and the validation every reader applies before a backend sees anything.
#pragma once
#include <array>
#include <optional>
#include <string>
#include <vector>

#include "config.hpp"
#include "nf4_weight.hpp"
#include "tensor.hpp"

namespace gemma {

// The seven linear projections of a decoder layer, in HF module order.
enum class Proj : uint8_t { q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj };
inline constexpr int kNumProj = 7;
inline constexpr std::array<Proj, kNumProj> kAllProj = {Proj::q_proj,    Proj::k_proj,  Proj::v_proj,   Proj::o_proj,
                                                        Proj::gate_proj, Proj::up_proj, Proj::down_proj};
const char* proj_name(Proj p);    // "q_proj"
const char* proj_module(Proj p);  // "self_attn.q_proj", "mlp.gate_proj"
int64_t proj_out(const Config& c, Proj p);
int64_t proj_in(const Config& c, Proj p);

// The four RMSNorms of a decoder layer, in the order they are applied.
enum class Norm : uint8_t { input_layernorm, post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm };
inline constexpr std::array<Norm, 4> kAllNorms = {Norm::input_layernorm, Norm::post_attention_layernorm,
                                                  Norm::pre_feedforward_layernorm, Norm::post_feedforward_layernorm};
const char* norm_name(Norm n);

inline const char* kEmbedName = "model.embed_tokens.weight";
inline const char* kFinalNormName = "model.norm.weight";
inline const char* kLmHeadName = "lm_head.weight";
// LM-head rows beyond the vocabulary, (P, D): no token maps to them and their logits are masked out of the softmax
// (the 128 extra rows of Google's original JAX checkpoints, 256128 in all). Not an HF name: only the gate puts it
// in a Checkpoint, in memory, so that the padded-head paths of every backend run.
inline const char* kEmbedPaddingName = "model.embed_tokens.weight:padding";
std::string proj_weight_name(int64_t layer, Proj p);
std::string norm_weight_name(int64_t layer, Norm n);
std::string lora_weight_name(int64_t layer, Proj p, char which);  // which: 'A' or 'B'

struct WeightSpec {
  std::string name;
  Shape shape;
};
// All base weights of a config in HF state-dict order (embedding, then each layer, then the final norm).
std::vector<WeightSpec> base_weight_specs(const Config& c);

// One projection's LoRA adapter as PEFT builds it: y = x W^T + scaling (x A^T) B^T, A (r, in), B (out, r).
struct LoraModule {
  int64_t r = 0;  // 0: this projection has no adapter
  double lora_alpha = 0;
  double scaling = 0;  // PEFT: lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilised LoRA
  bool adapted() const { return r > 0; }
};

// The largest LoRA rank read or made: far beyond any real adapter, and a bound that keeps a rank from a file or a
// flag from sizing allocations past memory before anything else is checked.
inline constexpr int64_t kMaxLoraRank = 65536;

// A LoRA adapter in PEFT's terms. Two forms:
//  - uniform: `target_modules` in every layer, each with rank `r` and `lora_alpha` (the synthetic adapters, and
//    every PEFT adapter that comes out that way);
//  - per module: `per_layer` says for each (layer, projection) whether it is adapted and with which rank and
//    alpha, as PEFT's target_modules (list, regex, all-linear), exclude_modules, layers_to_transform,
//    rank_pattern and alpha_pattern resolve for one config; r and lora_alpha are then PEFT's defaults only.
struct AdapterConfig {
  int64_t r = 0;
  double lora_alpha = 0;
  std::vector<Proj> target_modules;
  bool use_rslora = false;
  // Training-time noise on the adapter's input (PEFT's lora_dropout): applied by train's reference backend
  // (ref::RunOptions::lora_dropout); verify computes gradients without it, as in evaluation.
  double lora_dropout = 0;
  std::vector<std::array<LoraModule, kNumProj>> per_layer;  // empty: uniform

  // The adapter of one projection (unadapted: r == 0). A per-module adapter must have been resolved for a
  // config of at least layer + 1 layers.
  LoraModule module(int64_t layer, Proj p) const;
  // Uniform form only (throws std::logic_error otherwise): whether every layer adapts p, and the scaling.
  bool targets(Proj p) const;
  double scaling() const;
  // Whether every adapted module, in every one of `layers` layers, adapts the same projections with the same
  // rank and scaling; `why` (when not) names the first difference. A per-module adapter that is uniform can be
  // turned into the uniform form (uniform_form).
  bool uniform(int64_t layers, std::string* why = nullptr) const;
  AdapterConfig uniform_form(int64_t layers) const;
  // "LoRA r=8 on 7 projections" or "LoRA on 182 of 294 projections, r 16, layers 16..41".
  std::string describe(int64_t layers) const;
};
// Reads PEFT's adapter_config.json for the model `c` (the modules PEFT would adapt depend on its layers),
// following PEFT's own rules (check_target_module_exists, get_pattern_key). Options that rewrite the base
// weights, add parameters or change the adapter's function and are not implemented are refused (InputError
// naming the option and value); keys nobody knows become warnings ("<source>: ...").
AdapterConfig parse_adapter_config_json(const std::string& text, const Config& c, const std::string& source,
                                        std::vector<std::string>* warnings);
// PEFT's adapter_config.json; parse_adapter_config_json reads it back to the same modules (a per-module
// adapter is written with full module names and exact-name rank and alpha patterns).
std::string to_adapter_config_json(const AdapterConfig& a);
// Every adapter_config.json key this project knows, classified as config_keys() are (checkpoint.cpp has the
// table with PEFT's reasons).
const std::vector<ConfigKey>& adapter_config_keys();
std::vector<WeightSpec> adapter_weight_specs(const Config& c, const AdapterConfig& a);

inline constexpr int64_t kIgnoreIndex = -100;

// A batch of token sequences in HF's causal-LM convention: position t is scored against labels[t + 1].
// Packed rows and padding follow HF transformers 5 (masking_utils.py; docs/formats.md):
//  - position_ids, when given, are the RoPE positions. Without an attention mask they also separate packed
//    documents: a new document starts at every token whose position is not its predecessor's + 1 (a restart at
//    0 always starts one), and a token attends only within its document. With an attention mask HF does not look
//    for documents (the mask is then the only restriction besides causality and the window).
//  - attention_mask: 0 marks a padding token. A padding key is never attended; a padding query's output never
//    reaches a scored position (keys at padding are masked for everyone), so it is computed as zero.
struct Batch {
  int64_t B = 0, T = 0;
  std::vector<int64_t> input_ids;     // [B, T]
  std::vector<int64_t> labels;        // [B, T], kIgnoreIndex where not scored
  std::vector<int64_t> position_ids;  // [B, T], or empty: 0..T-1 in every row
  std::vector<uint8_t> attention_mask;  // [B, T] of 0/1, or empty: every token real
  // Tokens of the rows that are padding although no mask says so: train's packed rows end in a document of pad
  // tokens that nothing scored sees. Counted here so that a step's token count means one thing, packed or not.
  int64_t unmasked_padding = 0;
  int64_t id(int64_t b, int64_t t) const { return input_ids[size_t(b * T + t)]; }
  // The target scored at position t, or kIgnoreIndex (the last position has none).
  int64_t target(int64_t b, int64_t t) const { return t + 1 < T ? labels[size_t(b * T + t + 1)] : kIgnoreIndex; }
  int64_t position(int64_t b, int64_t t) const { return position_ids.empty() ? t : position_ids[size_t(b * T + t)]; }
  bool real(int64_t b, int64_t t) const { return attention_mask.empty() || attention_mask[size_t(b * T + t)] != 0; }
  int64_t count_targets() const;
  // True when HF would separate documents in this batch: position_ids given, no attention mask, and some row
  // where a position is not its predecessor's + 1.
  bool packed() const;
  // [B, T]: the document of each token, numbered from 0 in each row (all 0 unless packed()).
  std::vector<int32_t> document_ids() const;
};
// Splits a batch into micro-batches of `rows` sequences each (the last may be shorter).
std::vector<Batch> split_batch(const Batch& b, int64_t rows);
// Shapes, token and label ranges, position_ids, attention_mask; InputError naming `source` and the entry.
// A sequence longer than max_position_embeddings is accepted, as transformers accepts it (RoPE is a formula of the
// position and continues past the trained range); its warning (beyond_max_positions, on the positions used) is
// added to `warnings`.
void validate_batch(const Config& c, const Batch& b, const std::string& source,
                    std::vector<std::string>* warnings = nullptr);
// The warning for T > max_position_embeddings (positions 0..T-1), or nothing.
std::optional<std::string> beyond_max_positions(const Config& c, int64_t T, const std::string& source);
// The same for a batch: its position_ids' largest value against max_position_embeddings when it has them.
std::optional<std::string> beyond_max_positions(const Config& c, const Batch& b, const std::string& source);

struct Checkpoint {
  Config config;
  std::optional<AdapterConfig> adapter;
  TensorMap weights;  // base weights and, when `adapter` is set, the adapter tensors
  // How the base projections were quantized (model/nf4.hpp), when they were: `weights` then holds their
  // dequantized values, which every backend uses as it uses any stored weight.
  std::optional<std::string> quantization;
  // The NF4 form of each quantized projection, by HF name: `weights` holds exactly dequantize_nf4 of it. The
  // reference reads `weights`; the CUDA trainer keeps these on the device and dequantizes a layer at a time into
  // the same bf16 values (QLoRA's memory). Empty when nothing was quantized.
  std::map<std::string, Nf4Weight> nf4;
  // What reading it noticed that does not stop a run (unknown keys, keys HF ignores): one line each,
  // "<file>: ...", for the tools to print as warnings.
  std::vector<std::string> warnings;
};

// A name of the bare Gemma2Model's state_dict (`embed_tokens.`, `layers.`, `norm.`, without `model.`).
bool bare_base_name(const std::string& n);

// Renames a checkpoint's tensors as HF and PEFT load them: PEFT's `base_model.model.` prefix dropped, a
// Gemma2Model checkpoint's `embed_tokens...`, `layers...`, `norm...` given `model.`. `bytes`, a bitsandbytes
// checkpoint's U8 tensors (packed weights and quant states), is renamed with `weights`, so that a quantized
// projection is found under the name its float form would have; renaming only the float tensors, after
// dequantization, let prefixed and bare bnb checkpoints go unread. Refuses (InputError naming `source`) a name
// present with and without the PEFT prefix, and a checkpoint that mixes bare and `model.` names. Idempotent.
void normalize_checkpoint_names(TensorMap& weights, ByteTensorMap* bytes, const std::string& source);

// Normalises names as HF and PEFT load them (drops PEFT's `base_model.model.` prefix; gives a Gemma2Model
// checkpoint's `embed_tokens...`, `layers...`, `norm...` the `model.` prefix), then checks that every tensor the
// config needs is present with its exact shape and finite values, that nothing unknown is there, and that a
// stored lm_head equals the embedding (Gemma 2 ties them). Tensors of layers beyond the config's depth are
// dropped when `allow_deeper` (--layers asked for fewer layers), and rejected otherwise, naming both depths.
void validate_checkpoint(Checkpoint& ck, const std::string& source, bool allow_deeper = false);

}  // namespace gemma
