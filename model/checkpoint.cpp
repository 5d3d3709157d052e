#include "checkpoint.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <stdexcept>

#include "errors.hpp"
#include "json_brief.hpp"
#include "json_text.hpp"

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

LoraModule AdapterConfig::module(int64_t layer, Proj p) const {
  if (per_layer.empty()) return targets(p) ? LoraModule{r, lora_alpha, scaling()} : LoraModule{};
  if (layer < 0 || size_t(layer) >= per_layer.size())
    throw std::logic_error("adapter resolved for " + std::to_string(per_layer.size()) + " layers asked about layer " +
                           std::to_string(layer));
  return per_layer[size_t(layer)][size_t(p)];
}

bool AdapterConfig::targets(Proj p) const {
  if (!per_layer.empty()) throw std::logic_error("AdapterConfig::targets asked of a per-module adapter");
  for (Proj t : target_modules)
    if (t == p) return true;
  return false;
}

namespace {

double peft_scaling(double alpha, int64_t r, bool rslora) {
  return rslora ? alpha / std::sqrt(double(r)) : alpha / double(r);
}

std::string module_name(int64_t layer, Proj p) {
  return "model.layers." + std::to_string(layer) + "." + proj_module(p);
}

}  // namespace

double AdapterConfig::scaling() const {
  if (!per_layer.empty()) throw std::logic_error("AdapterConfig::scaling asked of a per-module adapter");
  return peft_scaling(lora_alpha, r, use_rslora);
}

bool AdapterConfig::uniform(int64_t layers, std::string* why) const {
  if (per_layer.empty()) return true;
  auto no = [&](const std::string& w) {
    if (why) *why = w;
    return false;
  };
  std::string first;  // the first adapted projection, which every other must equal
  LoraModule f;
  for (int64_t l = 0; l < layers; ++l) {
    for (Proj p : kAllProj) {
      const LoraModule m = module(l, p), m0 = module(0, p);
      if (m.adapted() != m0.adapted())
        return no(module_name(l, p) + (m.adapted() ? " is adapted but " : " is not adapted but ") + module_name(0, p) +
                  (m0.adapted() ? " is" : " is not") + " (layers adapt different projections)");
      if (!m.adapted()) continue;
      if (first.empty()) {
        first = module_name(l, p);
        f = m;
      }
      if (m.r != f.r || m.scaling != f.scaling) {
        char buf[160];
        std::snprintf(buf, sizeof buf, " (r=%lld, scaling %g) differs from %s (r=%lld, scaling %g)", (long long)m.r,
                      m.scaling, first.c_str(), (long long)f.r, f.scaling);
        return no(module_name(l, p) + buf + ": per-module rank or alpha");
      }
    }
  }
  if (first.empty()) return no("no projection is adapted");
  return true;
}

AdapterConfig AdapterConfig::uniform_form(int64_t layers) const {
  std::string why;
  if (!uniform(layers, &why)) throw std::logic_error("uniform_form of a per-module adapter: " + why);
  if (per_layer.empty()) return *this;
  AdapterConfig a;
  a.use_rslora = use_rslora;
  a.lora_dropout = lora_dropout;
  for (Proj p : kAllProj) {
    const LoraModule m = module(0, p);
    if (!m.adapted()) continue;
    a.r = m.r;
    a.lora_alpha = m.lora_alpha;
    a.target_modules.push_back(p);
  }
  return a;
}

std::string AdapterConfig::describe(int64_t layers) const {
  if (per_layer.empty())
    return "LoRA r=" + std::to_string(r) + " on " + std::to_string(target_modules.size()) + " projections";
  int64_t n = 0, lo = -1, hi = -1;
  std::set<int64_t> ranks;
  for (int64_t l = 0; l < layers; ++l)
    for (Proj p : kAllProj)
      if (const LoraModule m = module(l, p); m.adapted()) {
        ++n;
        ranks.insert(m.r);
        if (lo < 0) lo = l;
        hi = l;
      }
  std::string rs;
  for (int64_t x : ranks) rs += (rs.empty() ? "" : "/") + std::to_string(x);
  return "LoRA on " + std::to_string(n) + " of " + std::to_string(layers * kNumProj) + " projections, r " + rs +
         ", layers " + std::to_string(lo) + ".." + std::to_string(hi);
}

namespace {

using ojson = nlohmann::ordered_json;

// ------------------------------------------------------------------------------------------------------
// adapter_config.json keys (PEFT's LoraConfig and PeftConfig, src/peft/tuners/lora/config.py and
// src/peft/config.py, read at PEFT 0.18). What each one does to an adapter loaded onto Gemma 2:
//
// | key                        | kind     | here                                                                  |
// |----------------------------|----------|-----------------------------------------------------------------------|
// | r, lora_alpha, use_rslora  | used     | default rank, alpha; scaling alpha/r or alpha/sqrt(r)                 |
// | target_modules             | used     | list (name == entry or ends with "." + entry), "all-linear", or a     |
// |                            |          | regex full-matched against the module name; null: PEFT's default for  |
// |                            |          | gemma2, q_proj and v_proj                                             |
// | exclude_modules            | used     | list (same rule) or regex, applied first                              |
// | layers_to_transform,       | used     | layer index from the name (PEFT's regex), list targets only           |
// |   layers_pattern           |          |                                                                       |
// | rank_pattern, alpha_pattern| used     | per-module r and alpha: first key k (in file order) with              |
// |                            |          | re.match(rf"(.*\.)?({k})$", name)                                     |
// | lora_dropout               | used     | applied by train's reference backend; verify's gradients without it   |
// | init_lora_weights          | math     | true, false, "gaussian", "orthogonal": an initialisation the loaded   |
// |                            |          | tensors override. pissa*, olora, corda, loftq: PEFT rewrites the base |
// |                            |          | weights when it loads the adapter; lora_ga: trained on a base LoRA-GA |
// |                            |          | rewrote; mica: B frozen; eva: refused (not checked against PEFT's     |
// |                            |          | EVA, whose load zeroes B before loading it): all refused              |
// | use_dora, lora_bias,       | math     | extra parameters (DoRA magnitude, a bias on B): refused when true     |
// |   use_qalora               |          | QALoRA pools the adapter's input: refused when true                   |
// | bias                       | math     | "none"; "all"/"lora_only" train biases (Gemma 2 has none; refused     |
// |                            |          | rather than assumed empty)                                            |
// | fan_in_fan_out             | math     | false; PEFT resets true to false for torch.nn.Linear with a warning,  |
// |                            |          | but a file saying true was written for another layout: refused        |
// | modules_to_save,           | math     | extra trainable copies of whole modules / embedding rows: refused     |
// |   trainable_token_indices  |          | unless null or empty                                                  |
// | target_parameters          | math     | LoRA on raw nn.Parameters: refused unless null or empty               |
// | layer_replication          | math     | duplicates layers (a deeper model): refused unless null or empty      |
// | alora_invocation_tokens,   | math     | LoRA variants that change the adapter's function (activated LoRA,     |
// |   velora_config,           |          | compressed-activation backward, Monte Carlo LoRA, block-diagonal,     |
// |   monteclora_config,       |          | Arrow routing, KaSA): refused unless null                             |
// |   use_bdlora, arrow_config,|          |                                                                       |
// |   kasa_config              |          |                                                                       |
// | peft_type                  | math     | "LORA" only                                                           |
// | task_type, inference_mode, | harmless | wrapper class and requires_grad flags; provenance. task_type: one     |
// |   base_model_name_or_path, |          | of PEFT's TaskType values or null (PEFT raises on any other)          |
// |   revision, auto_mapping,  |          |                                                                       |
// |   peft_version             |          |                                                                       |
// | megatron_config,           | harmless | only read for Megatron parallel layers, which Gemma 2 has none of     |
// |   megatron_core            |          |                                                                       |
// | qalora_group_size          | harmless | only read with use_qalora (refused)                                   |
// | loftq_config, eva_config,  | harmless | only read with their init_lora_weights (refused); PEFT drops them     |
// |   corda_config,            |          | otherwise                                                             |
// |   lora_ga_config           |          |                                                                       |
// | ensure_weight_tying        | harmless | ties adapters of the tied embedding and head, which are never adapted |
// |                            |          | here (refused as targets)                                             |
// | runtime_config             | harmless | ephemeral GPU offload of DoRA's initialisation                        |

bool a_null(const ojson& v) { return v.is_null(); }
bool a_null_or_empty(const ojson& v) { return v.is_null() || (v.is_structured() && v.empty()); }
bool a_false(const ojson& v) { return v.is_null() || (v.is_boolean() && !v.get<bool>()); }
bool a_bias_none(const ojson& v) { return v.is_null() || (v.is_string() && v.get<std::string>() == "none"); }
bool a_lora(const ojson& v) { return v.is_null() || (v.is_string() && v.get<std::string>() == "LORA"); }

struct AdapterKeyRule {
  ConfigKey key;
  bool (*implemented)(const ojson& v) = nullptr;
};

const std::vector<AdapterKeyRule>& adapter_rules() {
  static const std::vector<AdapterKeyRule> r = {
      {{"r", KeyKind::used, "default rank", "4"}},
      {{"lora_alpha", KeyKind::used, "default alpha", "16"}},
      {{"use_rslora", KeyKind::used, "scaling alpha/sqrt(r) instead of alpha/r", "true"}},
      {{"target_modules", KeyKind::used, "the adapted modules", R"(["k_proj"])"}},
      {{"exclude_modules", KeyKind::used, "modules left out", R"(["q_proj"])"}},
      {{"layers_to_transform", KeyKind::used, "the adapted layers (list targets)", "[1]"}},
      {{"layers_pattern", KeyKind::used, "the name of the layer list layers_to_transform counts in", "\"layers\""}},
      {{"rank_pattern", KeyKind::used, "per-module ranks", R"({"q_proj": 4})"}},
      {{"alpha_pattern", KeyKind::used, "per-module alphas", R"({"q_proj": 16})"}},
      {{"lora_dropout", KeyKind::used, "training-time dropout on the adapter's input (verify: not applied; train's reference backend applies it)", "0.1"}},
      {{"init_lora_weights", KeyKind::math,
        "true, false, \"gaussian\" or \"orthogonal\": an initialisation the loaded tensors override", "\"pissa\""}},
      {{"peft_type", KeyKind::math, "LORA only", "\"IA3\""}, a_lora},
      {{"use_dora", KeyKind::math, "false: DoRA's magnitude vectors are not implemented", "true"}, a_false},
      {{"lora_bias", KeyKind::math, "false: a bias on lora_B is not implemented", "true"}, a_false},
      {{"use_qalora", KeyKind::math, "false: QALoRA's pooled adapter input is not implemented", "true"}, a_false},
      {{"bias", KeyKind::math, "\"none\": trainable biases are not implemented", "\"all\""}, a_bias_none},
      {{"fan_in_fan_out", KeyKind::math, "false: weights stored [out, in] (torch.nn.Linear)", "true"}, a_false},
      {{"modules_to_save", KeyKind::math, "null: fully trained copies of whole modules are not implemented",
        R"(["lm_head"])"},
       a_null_or_empty},
      {{"trainable_token_indices", KeyKind::math, "null: trainable embedding rows are not implemented", "[5]"},
       a_null_or_empty},
      {{"target_parameters", KeyKind::math, "null: LoRA on raw parameters is not implemented",
        R"(["mlp.down_proj.weight"])"},
       a_null_or_empty},
      {{"layer_replication", KeyKind::math, "null: replicated layers are not implemented", "[[0, 2], [1, 2]]"},
       a_null_or_empty},
      {{"alora_invocation_tokens", KeyKind::math, "null: activated LoRA is not implemented", "[5]"}, a_null},
      {{"velora_config", KeyKind::math, "null: VeLoRA is not implemented", R"({"num_groups": 2})"}, a_null},
      {{"monteclora_config", KeyKind::math, "null: Monte Carlo LoRA is not implemented", R"({"num_samples": 2})"},
       a_null},
      {{"use_bdlora", KeyKind::math, "null: block-diagonal LoRA is not implemented", R"({"nblocks": 2})"}, a_null},
      {{"arrow_config", KeyKind::math, "null: Arrow routing is not implemented", R"({"top_k": 2})"}, a_null},
      {{"kasa_config", KeyKind::math, "null: KaSA is not implemented", "{}"}, a_null},
      {{"task_type", KeyKind::harmless, "the PEFT wrapper class (one of PEFT's TaskType values or null)", "\"SEQ_2_SEQ_LM\""}},
      {{"inference_mode", KeyKind::harmless, "requires_grad flags only", "false"}},
      {{"base_model_name_or_path", KeyKind::harmless, "provenance", "\"someone/else\""}},
      {{"revision", KeyKind::harmless, "provenance", "\"main\""}},
      {{"auto_mapping", KeyKind::harmless, "provenance", R"({"base_model_class": "X"})"}},
      {{"peft_version", KeyKind::harmless, "provenance", "\"0.1.0\""}},
      {{"megatron_config", KeyKind::harmless, "read for Megatron parallel layers only", "{}"}},
      {{"megatron_core", KeyKind::harmless, "read for Megatron parallel layers only", "\"x.core\""}},
      {{"qalora_group_size", KeyKind::harmless, "read with use_qalora only", "32"}},
      {{"loftq_config", KeyKind::harmless, "read with init_lora_weights \"loftq\" only", R"({"loftq_bits": 4})"}},
      {{"eva_config", KeyKind::harmless, "read with init_lora_weights \"eva\" only", R"({"rho": 2.0})"}},
      {{"corda_config", KeyKind::harmless, "read with init_lora_weights \"corda\" only", R"({"corda_method": "kpm"})"}},
      {{"lora_ga_config", KeyKind::harmless, "read with init_lora_weights \"lora_ga\" only",
        R"({"direction": "ArBr"})"}},
      {{"ensure_weight_tying", KeyKind::harmless, "ties adapters of the tied embedding and head, never adapted here",
        "true"}},
      {{"runtime_config", KeyKind::harmless, "ephemeral GPU offload of DoRA's initialisation",
        R"({"ephemeral_gpu_offload": true})"}},
  };
  return r;
}

// Patterns from a file run on libstdc++'s polynomial (breadth-first) matcher: its default backtracking one
// takes exponential time on patterns like "(.*)*x" (minutes on a 32-character module name), and a file must
// never hang the tools. Back-references, which that matcher cannot run, are refused at compile time.
constexpr auto kRegexFlags = std::regex::ECMAScript | std::regex_constants::__polynomial;

// A pattern from the file, compiled once. PEFT's patterns are Python re; they run here as ECMAScript, which agrees
// with it on what module-name patterns use (., *, +, ?, |, groups, classes, \d \w \s \b and their negations).
// Where the two differ the pattern is translated or refused, never read another way: Python's \A and \Z (start
// and end of the string) become ^ and $, the same anchors without the multiline flag; any other escaped letter
// (ECMAScript reads an unknown one as the letter, Python refuses it or means something else) and a POSIX class
// "[:alpha:]" inside brackets (Python reads its characters literally) are refused; a ']' first in a class, Python's
// literal, is escaped.
std::regex compile(const std::string& pattern, const std::string& what, const std::string& source) {
  // Deeply nested patterns make the compiler recurse as deep; no module name needs more than this.
  if (pattern.size() > 4096)
    fail(source, what + " is " + std::to_string(pattern.size()) + " characters long (at most 4096)");
  // libstdc++ reads a repetition count ("{n}", "{n,m}") and a back-reference ("\\n") into a long without
  // checking for overflow (undefined behaviour; the fuzzer found "a{7777777777777777777}"), so both are
  // screened here first. Counts above kMaxRepeat are refused: a module name is tens of characters, and larger
  // counts only grow the automaton toward libstdc++'s state limit. Back-references are refused outright (the
  // polynomial matcher cannot run them, and Python's re reads "\\1" inside a class as an octal escape instead).
  constexpr long kMaxRepeat = 1000;
  bool in_class = false;
  std::string translated;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char ch = pattern[i];
    translated += ch;
    if (ch == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[i + 1];
      if (std::isdigit(static_cast<unsigned char>(e)) && e != '0')
        fail(source, what + " '" + pattern + "' uses a back-reference (\\" + e +
                         "), which module-name matching does not support");
      if (!in_class && (e == 'A' || e == 'Z')) {
        translated.back() = e == 'A' ? '^' : '$';
        ++i;
        continue;
      }
      if (std::isalpha(static_cast<unsigned char>(e)) && std::string("dDwWsSbBntrfvxu").find(e) == std::string::npos)
        fail(source, what + " '" + pattern + "' uses the escape \\" + e +
                         ", which Python's re (PEFT's matcher) and ECMAScript read differently");
      translated += e;
      ++i;
    } else if (in_class) {
      if (ch == '[' && i + 1 < pattern.size() && (pattern[i + 1] == ':' || pattern[i + 1] == '=' || pattern[i + 1] == '.'))
        fail(source, what + " '" + pattern + "' has '[" + pattern[i + 1] +
                         "' inside brackets: a POSIX class here, literal characters in Python's re (PEFT's matcher)");
      if (ch == ']') in_class = false;
    } else if (ch == '[') {
      in_class = true;
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') translated += pattern[++i];
      // A ']' first in a class is a literal in Python's re ("[]q]", "[^]x]"); ECMAScript reads "[]" as an empty
      // class and "[^]" as any character, so it is escaped.
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') {
        translated += "\\]";
        ++i;
      }
    } else if (ch == '{') {
      // Every digit run of the brace body, whatever follows it: "{12", "{1,99999", "{,5}".
      for (size_t j = i + 1; j < pattern.size() && pattern[j] != '}'; ++j) {
        if (!std::isdigit(static_cast<unsigned char>(pattern[j]))) continue;
        size_t k = j;
        while (k < pattern.size() && std::isdigit(static_cast<unsigned char>(pattern[k]))) ++k;
        const std::string digits = pattern.substr(j, k - j);
        if (k - j > 4 || std::stol(digits) > kMaxRepeat)
          fail(source, what + " '" + pattern + "' repeats " + digits + " times (at most " +
                           std::to_string(kMaxRepeat) + " supported)");
        j = k - 1;
      }
    }
  }
  try {
    return std::regex(translated, kRegexFlags);
  } catch (const std::regex_error& e) {
    fail(source,
         what + " '" + pattern + "' is not a regular expression this project can compile (ECMAScript): " + e.what());
  }
}

bool full_match(const std::regex& re, const std::string& s) { return std::regex_match(s, re); }

// Gemma2ForCausalLM's named_modules() (the root excluded, as PEFT skips it): the keys PEFT matches.
struct NamedModule {
  std::string name, kind;
  int64_t layer = -1;
  std::optional<Proj> proj;
};
std::vector<NamedModule> gemma2_modules(const Config& c) {
  std::vector<NamedModule> m;
  auto add = [&](std::string name, std::string kind, int64_t layer = -1, std::optional<Proj> p = std::nullopt) {
    m.push_back({std::move(name), std::move(kind), layer, p});
  };
  add("model", "Gemma2Model");
  add("model.embed_tokens", "Embedding");
  add("model.layers", "ModuleList");
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string L = "model.layers." + std::to_string(l);
    add(L, "Gemma2DecoderLayer", l);
    add(L + ".self_attn", "Gemma2Attention", l);
    for (Proj p : {Proj::q_proj, Proj::k_proj, Proj::v_proj, Proj::o_proj}) add(module_name(l, p), "Linear", l, p);
    add(L + ".mlp", "Gemma2MLP", l);
    for (Proj p : {Proj::gate_proj, Proj::up_proj, Proj::down_proj}) add(module_name(l, p), "Linear", l, p);
    add(L + ".mlp.act_fn", "activation", l);
    for (Norm n : kAllNorms) add(L + "." + norm_name(n), "Gemma2RMSNorm", l);
  }
  add("model.norm", "Gemma2RMSNorm");
  add("model.rotary_emb", "Gemma2RotaryEmbedding");
  add("lm_head", "Linear");
  return m;
}

// A list of module names, or a regex string: PEFT's two forms of target_modules and exclude_modules.
struct NameRule {
  bool given = false;
  std::optional<std::regex> regex;
  std::vector<std::string> names;
  // check_target_module_exists: a regex full-matches the key; a list entry equals it or is its suffix after a ".".
  bool matches(const std::string& key) const {
    if (regex) return full_match(*regex, key);
    for (const auto& n : names)
      if (key == n || (key.size() > n.size() && key.compare(key.size() - n.size(), n.size(), n) == 0 &&
                       key[key.size() - n.size() - 1] == '.'))
        return true;
    return false;
  }
  bool exact(const std::string& key) const {
    return !regex && std::find(names.begin(), names.end(), key) != names.end();
  }
};

NameRule name_rule(const ojson& v, const std::string& key, const std::string& source) {
  NameRule r;
  if (v.is_null()) return r;
  r.given = true;
  if (v.is_string()) {
    r.regex = compile(v.get<std::string>(), key, source);
  } else if (v.is_array()) {
    for (const auto& e : v) {
      if (!e.is_string()) fail(source, key + " entries must be strings, got " + json_brief(e));
      r.names.push_back(e.get<std::string>());
    }
  } else {
    fail(source, key + " must be a list of module names or a regular expression, got " + json_brief(v));
  }
  return r;
}

// rank_pattern / alpha_pattern: PEFT's get_pattern_key takes the first key k, in the file's order, with
// re.match(rf"(.*\.)?({k})$", name), i.e. k full-matches the name or a dot-separated tail of it.
struct Pattern {
  std::string key;
  std::regex re;
  double value;
};
std::vector<Pattern> patterns(const ojson& v, const std::string& what, bool rank, const std::string& source) {
  std::vector<Pattern> out;
  if (v.is_null()) return out;
  if (!v.is_object())
    fail(source, what + " must be an object mapping module patterns to " + (rank ? "ranks" : "alphas"));
  for (const auto& [k, x] : v.items()) {
    const std::string where = what + "['" + k + "']";
    double value;
    if (rank) {
      if (!x.is_number_integer() || x.get<int64_t>() < 1 || x.get<int64_t>() > kMaxLoraRank)
        fail(source, where + " = " + json_brief(x) + " is not a rank in 1.." + std::to_string(kMaxLoraRank));
      value = double(x.get<int64_t>());
    } else {
      if (!x.is_number() || !std::isfinite(x.get<double>()))
        fail(source, where + " = " + json_brief(x) + " is not a number");
      value = x.get<double>();
    }
    out.push_back({k, compile("(.*\\.)?(" + k + ")", what + " key", source), value});
  }
  return out;
}

std::optional<double> first_pattern(const std::vector<Pattern>& ps, const std::string& name) {
  for (const Pattern& p : ps)
    if (full_match(p.re, name)) return p.value;
  return std::nullopt;
}

std::string regex_escape(const std::string& s) {
  std::string r;
  for (char ch : s) {
    if (std::strchr(".^$|()[]{}*+?\\", ch)) r += '\\';
    r += ch;
  }
  return r;
}

}  // namespace

const std::vector<ConfigKey>& adapter_config_keys() {
  static const std::vector<ConfigKey> keys = [] {
    std::vector<ConfigKey> k;
    for (const AdapterKeyRule& r : adapter_rules()) k.push_back(r.key);
    return k;
  }();
  return keys;
}

AdapterConfig parse_adapter_config_json(const std::string& text, const Config& c, const std::string& source,
                                        std::vector<std::string>* warnings) {
  ojson j;
  try {
    j = parse_json<ojson>(text);
  } catch (const ojson::exception& e) {
    // parse_error for bad syntax, out_of_range for a number no double holds (1e999): both are bad files.
    fail(source, std::string("malformed JSON: ") + e.what());
  }
  if (!j.is_object()) fail(source, "adapter config is not a JSON object");
  auto warn = [&](const std::string& m) {
    if (warnings) warnings->push_back(one_line(source + ": " + m));
  };
  auto get = [&](const char* key) -> const ojson& {
    static const ojson null;
    auto it = j.find(key);
    return it == j.end() ? null : *it;
  };
  if (const ojson& pt = get("peft_type"); !a_lora(pt))
    fail(source, "peft_type is " + json_brief(pt) + ", only \"LORA\" is supported");
  // task_type only picks PEFT's wrapper class, but PeftConfig.__post_init__ raises on a value outside its TaskType
  // enum: a file PEFT cannot load is not loaded here either.
  if (const ojson& tt = get("task_type"); !tt.is_null()) {
    static const std::set<std::string> peft_task_types = {"SEQ_CLS",      "SEQ_2_SEQ_LM",      "CAUSAL_LM",
                                                          "TOKEN_CLS",    "QUESTION_ANS",      "FEATURE_EXTRACTION"};
    if (!tt.is_string() || !peft_task_types.count(tt.get<std::string>()))
      fail(source, "task_type = " + json_brief(tt) + " is not one of PEFT's task types (SEQ_CLS, SEQ_2_SEQ_LM, " +
                       "CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION, or null): PEFT refuses it");
  }
  for (const auto& [key, v] : j.items()) {
    const AdapterKeyRule* rule = nullptr;
    for (const AdapterKeyRule& r : adapter_rules())
      if (key == r.key.key) rule = &r;
    if (!rule) {
      warn("unknown key '" + key + "' (not a LoraConfig field this project knows): ignored");
      continue;
    }
    if (rule->implemented && !rule->implemented(v))
      fail(source, key + " = " + json_brief(v) + " is not implemented (implemented: " + rule->key.why + ")");
  }

  AdapterConfig a;
  {
    const ojson& v = get("r");
    if (!v.is_number_integer()) fail(source, "adapter config needs an integer 'r'");
    a.r = v.get<int64_t>();
    if (a.r < 1 || a.r > kMaxLoraRank)
      fail(source, "lora rank r = " + std::to_string(a.r) + " is outside 1.." + std::to_string(kMaxLoraRank));
  }
  {
    const ojson& v = get("lora_alpha");
    if (!v.is_number()) fail(source, "adapter config needs a numeric 'lora_alpha'");
    a.lora_alpha = v.get<double>();
    if (!std::isfinite(a.lora_alpha)) fail(source, "lora_alpha must be finite");
  }
  if (const ojson& v = get("use_rslora"); !v.is_null()) {
    if (!v.is_boolean()) fail(source, "use_rslora must be true or false");
    a.use_rslora = v.get<bool>();
  }
  if (const ojson& v = get("lora_dropout"); !v.is_null()) {
    // torch's nn.Dropout takes p in [0, 1].
    if (!v.is_number() || !(v.get<double>() >= 0 && v.get<double>() <= 1))
      fail(source, "lora_dropout = " + json_brief(v) + " is not a probability in [0, 1]");
    a.lora_dropout = v.get<double>();
  }

  // What PEFT builds, module by module.
  const ojson& tm = get("target_modules");
  const ojson& ltt = get("layers_to_transform");
  const ojson& lp = get("layers_pattern");
  const bool lp_set =
      !lp.is_null() && !(lp.is_structured() && lp.empty()) && !(lp.is_string() && lp.get<std::string>().empty());
  // LoraConfig.__post_init__ refuses these combinations.
  if (tm.is_string() && !ltt.is_null())
    fail(source, "layers_to_transform cannot be used when target_modules is a string (PEFT refuses it)");
  if (tm.is_string() && !lp.is_null())
    fail(source, "layers_pattern cannot be used when target_modules is a string (PEFT refuses it)");
  if (lp_set && ltt.is_null()) fail(source, "layers_pattern needs layers_to_transform (PEFT refuses it alone)");
  // PEFT's check is Python truthiness, `if self.layers_pattern and not self.layers_to_transform`: layer 0 given as
  // the integer 0, and the empty list, count as not given there (found by a probe, 2026-12-05).
  if (lp_set && ((ltt.is_number_integer() && ltt.get<int64_t>() == 0) || (ltt.is_array() && ltt.empty())))
    fail(source, "layers_pattern with layers_to_transform " + json_brief(ltt) +
                     ": PEFT's LoraConfig refuses it (its check reads 0 and [] as not given)");

  NameRule target;
  if (tm.is_null()) {
    // PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["gemma2"].
    target.given = true;
    target.names = {"q_proj", "v_proj"};
  } else if (tm.is_string()) {
    std::string lower = tm.get<std::string>();
    for (char& ch : lower) ch = char(std::tolower(static_cast<unsigned char>(ch)));
    if (lower == "all-linear") {
      // Every nn.Linear but the output layer, as full names (so that layer filters do not apply).
      target.given = true;
      for (int64_t l = 0; l < c.num_hidden_layers; ++l)
        for (Proj p : kAllProj) target.names.push_back(module_name(l, p));
    } else {
      target = name_rule(tm, "target_modules", source);
    }
  } else {
    target = name_rule(tm, "target_modules", source);
    if (target.names.empty()) fail(source, "target_modules is empty");
  }
  const NameRule exclude = name_rule(get("exclude_modules"), "exclude_modules", source);

  // layers_to_transform: an int or a list of ints; an empty list means every layer.
  std::optional<std::set<int64_t>> layer_set;
  if (!ltt.is_null()) {
    std::set<int64_t> s;
    if (ltt.is_number_integer()) {
      s.insert(ltt.get<int64_t>());
      layer_set = s;
    } else if (ltt.is_array()) {
      for (const auto& e : ltt) {
        if (!e.is_number_integer()) fail(source, "layers_to_transform entries must be integers, got " + json_brief(e));
        s.insert(e.get<int64_t>());
      }
      if (!s.empty()) layer_set = s;
    } else {
      fail(source, "layers_to_transform must be an integer or a list of integers, got " + json_brief(ltt));
    }
  }
  // The layer index PEFT reads from a module name: the number after the first ".<something>." segment, or after
  // ".<layers_pattern>.".
  std::vector<std::regex> layer_res;
  if (lp_set) {
    std::vector<std::string> pats;
    if (lp.is_string())
      pats.push_back(lp.get<std::string>());
    else if (lp.is_array())
      for (const auto& e : lp) {
        if (!e.is_string()) fail(source, "layers_pattern entries must be strings, got " + json_brief(e));
        pats.push_back(e.get<std::string>());
      }
    else
      fail(source, "layers_pattern must be a string or a list of strings, got " + json_brief(lp));
    for (const auto& p : pats) layer_res.push_back(compile(".*?\\." + p + "\\.(\\d+)\\.", "layers_pattern", source));
  } else {
    layer_res.push_back(std::regex(R"(.*?\.[^.]*\.(\d+)\.)", kRegexFlags));
  }
  auto layer_index = [&](const std::string& key) -> std::optional<int64_t> {
    for (const std::regex& re : layer_res) {
      std::smatch m;
      if (std::regex_search(key, m, re, std::regex_constants::match_continuous)) {
        // PEFT pastes layers_pattern into its regex as is, so a pattern with an alternative ("|ayers") or a group
        // of its own leaves no number (or another group) in group 1, where PEFT's int() then raises: refused.
        const std::string d = m[1].str();
        if (!m[1].matched || d.empty() || !std::all_of(d.begin(), d.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
          fail(source, "layers_pattern makes the layer-number group of PEFT's regex match '" + d + "' in '" + key +
                           "' (an alternative or a group of its own in the pattern?)");
        if (d.size() > 9) return std::nullopt;
        return std::stoll(d);
      }
    }
    return std::nullopt;
  };

  const std::vector<Pattern> rank_pattern = patterns(get("rank_pattern"), "rank_pattern", true, source);
  const std::vector<Pattern> alpha_pattern = patterns(get("alpha_pattern"), "alpha_pattern", false, source);

  a.per_layer.assign(size_t(c.num_hidden_layers), {});
  int64_t adapted = 0;
  for (const NamedModule& m : gemma2_modules(c)) {
    if (exclude.given && exclude.matches(m.name)) continue;
    bool found;
    if (target.regex) {
      found = full_match(*target.regex, m.name);
    } else if (target.exact(m.name)) {
      found = true;  // a full name in the list: no layer filter (PEFT checks `key in target_modules` first)
    } else {
      found = target.matches(m.name);
      if (found && layer_set) {
        const std::optional<int64_t> li = layer_index(m.name);
        found = li && layer_set->count(*li);
      }
    }
    if (!found) continue;
    if (!m.proj) {
      const std::string why = m.name == "lm_head" ? "LoRA on the LM head is not implemented (all-linear leaves it out)"
                              : m.name == "model.embed_tokens"
                                  ? "LoRA on the embedding is not implemented"
                                  : "PEFT adapts linear and embedding layers only and refuses a " + m.kind;
      fail(source, "target_modules " + json_brief(tm) + " selects '" + m.name + "' (" + m.kind + "): " + why);
    }
    LoraModule lm;
    lm.r = int64_t(first_pattern(rank_pattern, m.name).value_or(double(a.r)));
    lm.lora_alpha = first_pattern(alpha_pattern, m.name).value_or(a.lora_alpha);
    lm.scaling = peft_scaling(lm.lora_alpha, lm.r, a.use_rslora);
    a.per_layer[size_t(m.layer)][size_t(*m.proj)] = lm;
    ++adapted;
  }
  if (adapted == 0)
    fail(source, "target_modules " + json_brief(tm) + (exclude.given ? " (after exclude_modules)" : "") +
                     (layer_set ? " (in layers_to_transform)" : "") + " matches no projection of this " +
                     std::to_string(c.num_hidden_layers) + "-layer Gemma 2 (PEFT refuses such an adapter)");

  if (const ojson& v = get("init_lora_weights"); !v.is_null()) {
    // Only initialisations that loading the saved tensors overrides are accepted (LoraLayer.update_layer).
    if (v.is_boolean()) {
    } else if (!v.is_string()) {
      fail(source, "init_lora_weights = " + json_brief(v) + " is neither true, false nor a method name");
    } else {
      const std::string s = v.get<std::string>();
      std::string lower = s;
      for (char& ch : lower) ch = char(std::tolower(static_cast<unsigned char>(ch)));
      const std::string head = "init_lora_weights = \"" + s + "\" is not implemented: ";
      if (lower == "gaussian") {
      } else if (s == "orthogonal") {
        for (int64_t l = 0; l < c.num_hidden_layers; ++l)
          for (Proj p : kAllProj)
            if (const LoraModule m = a.per_layer[size_t(l)][size_t(p)]; m.adapted() && m.r % 2 != 0)
              fail(source, "init_lora_weights \"orthogonal\" with the odd rank " + std::to_string(m.r) + " of " +
                               module_name(l, p) + ": PEFT refuses to load it");
      } else if (s.rfind("pissa", 0) == 0 || s.rfind("corda", 0) == 0 || lower == "olora" || s == "loftq") {
        fail(source, head +
                         "PEFT rewrites the base weights when it loads such an adapter (the base minus the adapter's "
                         "initial product, or a quantized base), and that rewrite is not reproduced here");
      } else if (s == "lora_ga") {
        fail(source, head +
                         "the adapter was trained on base weights LoRA-GA rewrote, which the checkpoint does not hold; "
                         "save it with path_initial_model_for_weight_conversion to get a plain LoRA adapter");
      } else if (lower == "mica") {
        fail(source, head + "MiCA freezes lora_B, so its gradients are not those of LoRA");
      } else if (s == "eva") {
        fail(source, head + "EVA adapters are not implemented (not checked against PEFT's EVA loading)");
      } else {
        fail(source, head + "PEFT does not know this initialisation either");
      }
    }
  }

  // An adapter that is uniform after all takes the uniform form: it is what the CUDA trainer supports.
  if (a.uniform(c.num_hidden_layers)) a = a.uniform_form(c.num_hidden_layers);
  return a;
}

std::string to_adapter_config_json(const AdapterConfig& a) {
  ojson j;
  j["peft_type"] = "LORA";
  j["r"] = a.r;
  j["lora_alpha"] = a.lora_alpha;
  j["use_rslora"] = a.use_rslora;
  j["lora_dropout"] = a.lora_dropout;
  j["bias"] = "none";
  ojson t = ojson::array();
  if (a.per_layer.empty()) {
    for (Proj p : a.target_modules) t.push_back(proj_name(p));
    j["target_modules"] = t;
    return j.dump(2);
  }
  // Per module: exact names, and exact-name patterns where a module's rank or alpha is not the default.
  ojson rp = ojson::object(), ap = ojson::object();
  for (size_t l = 0; l < a.per_layer.size(); ++l)
    for (Proj p : kAllProj) {
      const LoraModule& m = a.per_layer[l][size_t(p)];
      if (!m.adapted()) continue;
      const std::string name = module_name(int64_t(l), p);
      t.push_back(name);
      if (m.r != a.r) rp[regex_escape(name)] = m.r;
      if (m.lora_alpha != a.lora_alpha) ap[regex_escape(name)] = m.lora_alpha;
    }
  j["target_modules"] = t;
  j["rank_pattern"] = rp;
  j["alpha_pattern"] = ap;
  return j.dump(2);
}

std::vector<WeightSpec> adapter_weight_specs(const Config& c, const AdapterConfig& a) {
  if (!a.per_layer.empty() && int64_t(a.per_layer.size()) != c.num_hidden_layers)
    throw std::logic_error("adapter resolved for " + std::to_string(a.per_layer.size()) + " layers used with " +
                           std::to_string(c.num_hidden_layers));
  std::vector<WeightSpec> s;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (Proj p : kAllProj)
      if (const LoraModule m = a.module(l, p); m.adapted()) {
        s.push_back({lora_weight_name(l, p, 'A'), {m.r, proj_in(c, p)}});
        s.push_back({lora_weight_name(l, p, 'B'), {proj_out(c, p), m.r}});
      }
  return s;
}

int64_t Batch::count_targets() const {
  int64_t n = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < T; ++t) n += target(b, t) != kIgnoreIndex;
  return n;
}

bool Batch::packed() const {
  if (position_ids.empty() || !attention_mask.empty()) return false;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 1; t < T; ++t)
      if (position(b, t) != position(b, t - 1) + 1) return true;
  return false;
}

std::vector<int32_t> Batch::document_ids() const {
  std::vector<int32_t> d(size_t(B * T), 0);
  if (!packed()) return d;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 1; t < T; ++t)
      d[size_t(b * T + t)] = d[size_t(b * T + t - 1)] + (position(b, t) != position(b, t - 1) + 1 ? 1 : 0);
  return d;
}

std::vector<Batch> split_batch(const Batch& b, int64_t rows) {
  std::vector<Batch> out;
  auto rows_of = [&](const auto& v, int64_t b0, int64_t n) {
    using V = std::decay_t<decltype(v)>;
    return v.empty() ? V() : V(v.begin() + b0 * b.T, v.begin() + (b0 + n) * b.T);
  };
  for (int64_t b0 = 0; b0 < b.B; b0 += rows) {
    Batch m;
    m.B = std::min(rows, b.B - b0);
    m.T = b.T;
    m.input_ids = rows_of(b.input_ids, b0, m.B);
    m.labels = rows_of(b.labels, b0, m.B);
    m.position_ids = rows_of(b.position_ids, b0, m.B);
    m.attention_mask = rows_of(b.attention_mask, b0, m.B);
    out.push_back(std::move(m));
  }
  return out;
}

std::optional<std::string> beyond_max_positions(const Config& c, int64_t T, const std::string& source) {
  if (T <= c.max_position_embeddings) return std::nullopt;
  return source + ": sequence length " + std::to_string(T) + " exceeds max_position_embeddings " +
         std::to_string(c.max_position_embeddings) +
         ": RoPE continues past the positions the model was trained on, as transformers does (no error there either)";
}

std::optional<std::string> beyond_max_positions(const Config& c, const Batch& b, const std::string& source) {
  if (b.position_ids.empty()) return beyond_max_positions(c, b.T, source);
  // With position_ids the positions RoPE sees are theirs, not 0..T-1: a long packed row can stay within the trained
  // range, and a short row can leave it (found by a probe, 2026-12-05: the warning followed T in both cases).
  const int64_t largest = *std::max_element(b.position_ids.begin(), b.position_ids.end());
  if (largest < c.max_position_embeddings) return std::nullopt;
  return source + ": position_ids reach " + std::to_string(largest) + ", past max_position_embeddings " +
         std::to_string(c.max_position_embeddings) +
         ": RoPE continues past the positions the model was trained on, as transformers does (no error there either)";
}

void validate_batch(const Config& c, const Batch& b, const std::string& source, std::vector<std::string>* warnings) {
  if (b.B < 1 || b.T < 1) fail(source, "batch shape [" + std::to_string(b.B) + ", " + std::to_string(b.T) + "] is empty");
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
  auto at = [&](size_t i) { return "[" + std::to_string(i / size_t(b.T)) + ", " + std::to_string(i % size_t(b.T)) + "]"; };
  if (!b.position_ids.empty()) {
    if (int64_t(b.position_ids.size()) != b.B * b.T) fail(source, "position_ids must have B*T entries");
    // The fast trainer indexes positions as 32-bit integers; RoPE itself takes any position.
    for (size_t i = 0; i < b.position_ids.size(); ++i)
      if (b.position_ids[i] < 0 || b.position_ids[i] >= (int64_t(1) << 30))
        fail(source, "position_ids" + at(i) + " = " + std::to_string(b.position_ids[i]) + " is outside [0, 2^30)");
  }
  if (warnings)
    if (auto w = beyond_max_positions(c, b, source)) warnings->push_back(*w);
  if (!b.attention_mask.empty()) {
    if (int64_t(b.attention_mask.size()) != b.B * b.T) fail(source, "attention_mask must have B*T entries");
    for (size_t i = 0; i < b.attention_mask.size(); ++i)
      if (b.attention_mask[i] > 1)
        fail(source, "attention_mask" + at(i) + " = " + std::to_string(b.attention_mask[i]) + " is neither 0 nor 1");
    for (int64_t r = 0; r < b.B; ++r)
      for (int64_t t = 0; t < b.T; ++t) {
        const size_t i = size_t(r * b.T + t);
        if (b.attention_mask[i] == 0 && b.labels[i] != kIgnoreIndex)
          fail(source, "labels" + at(i) + " = " + std::to_string(b.labels[i]) +
                           " is the label of a padding token (attention_mask 0); padding is never scored: set it to -100");
        // A padding query sees no key in its causal window when the padding is on the left; HF's eager attention
        // then spreads it uniformly over every key, future ones included, a value no trainer should be judged on.
        if (b.attention_mask[i] == 0 && b.target(r, t) != kIgnoreIndex)
          fail(source, "position " + at(i) + " is padding (attention_mask 0) but is scored against labels" + at(i + 1) +
                           " = " + std::to_string(b.target(r, t)) +
                           ": a padding token predicts nothing; set that label to -100");
      }
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

// Names that only a PEFT model's live state_dict, or an adapter kind that is not implemented, produces: each
// gets its real cause before any "missing tensor" could hide it.
void check_peft_internal_name(const std::string& n, const std::string& source) {
  for (const char* ab : {".lora_A.", ".lora_B."}) {
    const size_t at = n.find(ab);
    // PEFT's lora_bias = True saves a bias on lora_B ('...lora_B.bias'): an adapter kind, not a raw state_dict.
    if (at != std::string::npos && n.compare(at + 8, std::string::npos, "bias") == 0)
      fail(source, "tensor '" + n + "' is a bias on the adapter's B (PEFT's lora_bias): not implemented");
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

// HF's loader gives a checkpoint of the bare Gemma2Model (no `model.` in its names) the prefix the causal-LM
// wrapper expects; a checkpoint with both kinds of names is refused, since HF would load one kind and leave the
// weights of the other at their random initialisation.
bool bare_base_name(const std::string& n) {
  return n.rfind("embed_tokens.", 0) == 0 || n.rfind("layers.", 0) == 0 || n.rfind("norm.", 0) == 0;
}

namespace {

template <class Map, class Rename>
Map renamed_map(Map& m, Rename rename, const std::string& source) {
  Map out;
  for (auto& [name, t] : m) {
    const std::string n = rename(name);
    if (out.count(n)) fail(source, "tensor '" + n + "' appears twice (with and without the PEFT prefix)");
    out.emplace(n, std::move(t));
  }
  return out;
}

}  // namespace

void normalize_checkpoint_names(TensorMap& weights, ByteTensorMap* bytes, const std::string& source) {
  const auto unprefixed = [](const std::string& n) {
    const std::string peft = "base_model.model.";
    return n.rfind(peft, 0) == 0 ? n.substr(peft.size()) : n;
  };
  weights = renamed_map(weights, unprefixed, source);
  if (bytes) *bytes = renamed_map(*bytes, unprefixed, source);
  const std::string* prefixed = nullptr;
  const std::string* bare = nullptr;
  const auto scan = [&](const auto& m) {
    for (const auto& [n, t] : m) {
      if (!prefixed && n.rfind("model.", 0) == 0) prefixed = &n;
      if (!bare && bare_base_name(n)) bare = &n;
    }
  };
  scan(weights);
  if (bytes) scan(*bytes);
  if (prefixed && bare)
    fail(source, "mixes names with and without the 'model.' prefix ('" + *prefixed + "' and '" + *bare +
                     "'): HF would load one kind and leave the other's weights random");
  if (bare) {
    const auto with_model = [](const std::string& n) { return bare_base_name(n) ? "model." + n : n; };
    weights = renamed_map(weights, with_model, source);
    if (bytes) *bytes = renamed_map(*bytes, with_model, source);
  }
}

void validate_checkpoint(Checkpoint& ck, const std::string& source, bool allow_deeper) {
  const Config& c = ck.config;
  normalize_checkpoint_names(ck.weights, nullptr, source);
  TensorMap& renamed = ck.weights;
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
    if (it->second.shape != w.shape) {
      // Expected from the config: where that left a size out, its default is a likely cause, so say so.
      std::string defaulted;
      for (const std::string& m : ck.warnings)
        if (m.find(kDefaultedKeyNote) != std::string::npos) defaulted += "; " + m;
      fail(source, "tensor '" + w.name + "' has shape " + shape_str(it->second.shape) + ", expected " +
                       shape_str(w.shape) + defaulted);
    }
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
      fail(source, "adapter tensor '" + n + "' is for a module that target_modules does not list (after " +
                       "exclude_modules and layers_to_transform), or of a layer the config does not have");
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
