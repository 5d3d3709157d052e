// Inputs that change the math are implemented or refused, never ignored (issue 13): every config.json key is
// classified, PEFT's own rules decide which modules an adapter covers and with which rank and scaling,
// checkpoints load as HF loads them, and --lora-r does what it says or is refused. The reported files in
// tests/reported/ (see its README) run through the real verify and train binaries.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "model/casefile.hpp"
#include "model/safetensors.hpp"
#include "model/synthetic.hpp"
#include "reference/run.hpp"
#include "tests/badinput_support.hpp"
#include "tests/tiny_case.hpp"

using namespace gemma;
using namespace gemma::test;
using nlohmann::json;

namespace {

const std::string kVerify = GEMMA_VERIFY_BIN;
const std::string kTrain = GEMMA_TRAIN_BIN;
const std::string kReported = GEMMA_REPORTED_DIR;

// The tiny config in the old key style (top-level rope_theta, no layer_types): every key of the table can be
// set on it to a value of its own without another key overriding it.
json old_style_tiny() {
  json c = json::parse(to_config_json(tiny_config()));
  c.erase("rope_parameters");
  c.erase("layer_types");
  c["rope_theta"] = 10000.0;
  return c;
}

std::string canonical(const Config& c) { return to_config_json(c); }

std::vector<std::string> warning_lines(const ToolRun& r, const std::string& tool) {
  std::vector<std::string> w;
  for (const auto& l : r.err_lines())
    if (l.rfind(tool + ": warning: ", 0) == 0) w.push_back(l);
  return w;
}

void expect_ok(const ToolRun& r) {
  ASSERT_TRUE(r.exited) << "signal " << r.status;
  EXPECT_EQ(r.status, 0) << "stderr:\n" << r.err << "stdout:\n" << r.out;
}

ToolRun verify_ckpt(const TempDir& d, const std::string& config, const std::string& weights,
                    std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"--config", config, "--weights", weights, "--backend", "reference"};
  args.insert(args.end(), extra.begin(), extra.end());
  return run_tool(kVerify, args, d);
}

double json_loss(const std::string& path) {
  return json::parse(slurp(path))["results"]["reference"]["loss"].get<double>();
}

TensorMap read_grads(const std::string& path) {
  h5::quiet();
  H5::H5File f(path, H5F_ACC_RDONLY);
  H5::Group g = f.openGroup("grads");
  TensorMap m;
  for (const auto& n : h5::children(g)) m[n] = h5::read_float_tensor(g, n, path);
  return m;
}

// The tiny model as config.json + model.safetensors in `d`, weights as given.
std::pair<std::string, std::string> write_tiny_checkpoint(const TempDir& d, const json& config, const TensorMap& w,
                                                          const std::string& stem = "") {
  const std::string cfg = d / (stem + "config.json"), weights = d / (stem + "model.safetensors");
  spit(cfg, config.dump(2));
  write_safetensors(weights, w);
  return {cfg, weights};
}

}  // namespace

// ------------------------------------------------------------------------------------------------------
// config.json: the key table

// Walks the whole table: each key set to a value other than the implemented one is parsed into a different
// Config (used), accepted unchanged and silently (harmless), refused naming the key (math), or accepted
// unchanged with one warning naming it (warned).
TEST(ConfigKeys, EveryKeyBehavesAsItsTableSays) {
  const json base = old_style_tiny();
  std::vector<std::string> w;
  const std::string base_config = canonical(parse_config_json(base.dump(), "config.json", &w));
  ASSERT_TRUE(w.empty()) << w[0];
  std::set<std::string> keys;
  for (const ConfigKey& k : config_keys()) {
    SCOPED_TRACE(k.key);
    EXPECT_TRUE(keys.insert(k.key).second) << "listed twice";
    json c = base;
    c[k.key] = json::parse(k.example);
    w.clear();
    switch (k.kind) {
      case KeyKind::used: {
        const Config got = parse_config_json(c.dump(), "config.json", &w);
        EXPECT_NE(canonical(got), base_config) << k.key << " = " << k.example << " changed nothing";
        // rope_parameters and rope_scaling say that they win over the top-level rope_theta.
        for (const auto& line : w) EXPECT_NE(line.find(k.key), std::string::npos) << line;
        break;
      }
      case KeyKind::harmless: {
        const Config got = parse_config_json(c.dump(), "config.json", &w);
        EXPECT_EQ(canonical(got), base_config);
        EXPECT_TRUE(w.empty()) << w[0];
        EXPECT_GT(std::string(k.why).size(), 8u) << "a harmless key says why";
        break;
      }
      case KeyKind::math:
        expect_input_error([&] { parse_config_json(c.dump(), "config.json", &w); }, {"config.json: ", k.key});
        break;
      case KeyKind::warned: {
        const Config got = parse_config_json(c.dump(), "config.json", &w);
        EXPECT_EQ(canonical(got), base_config);
        ASSERT_EQ(w.size(), 1u);
        EXPECT_NE(w[0].find(k.key), std::string::npos) << w[0];
        break;
      }
    }
  }
  // What this project writes reads back without a warning.
  w.clear();
  parse_config_json(to_config_json(tiny_config()), "config.json", &w);
  EXPECT_TRUE(w.empty()) << w[0];
}

TEST(ConfigKeys, AnUnknownKeyIsOneWarningNamingIt) {
  json c = old_style_tiny();
  c["use_sliding_window"] = true;  // a Qwen2 key
  std::vector<std::string> w;
  const Config got = parse_config_json(c.dump(), "x/config.json", &w);
  EXPECT_EQ(canonical(got), canonical(parse_config_json(old_style_tiny().dump(), "x/config.json", nullptr)));
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0].rfind("x/config.json: unknown key 'use_sliding_window'", 0), 0u) << w[0];
}

// Gemma2MLP applies ACT2FN[config.hidden_activation] (default gelu_pytorch_tanh); hidden_act is not read.
TEST(ConfigKeys, HiddenActAloneIsReadAsHfReadsIt) {
  json c = old_style_tiny();
  c.erase("hidden_activation");
  c["hidden_act"] = "gelu";
  std::vector<std::string> w;
  const Config got = parse_config_json(c.dump(), "config.json", &w);
  EXPECT_EQ(got.hidden_activation, "gelu_pytorch_tanh");
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("hidden_act \"gelu\""), std::string::npos) << w[0];
  EXPECT_NE(w[0].find("gelu_pytorch_tanh"), std::string::npos) << w[0];
  // Agreeing with what HF uses, it is silent.
  c["hidden_act"] = "gelu_pytorch_tanh";
  w.clear();
  parse_config_json(c.dump(), "config.json", &w);
  EXPECT_TRUE(w.empty());
}

// hidden_activation: null once read as the default; HF cannot build that model (ACT2FN[None]). A cap of 0 is
// refused naming which cap.
TEST(ConfigKeys, NullActivationAndZeroCapsAreRefusedByName) {
  json c = old_style_tiny();
  c["hidden_activation"] = nullptr;
  expect_input_error([&] { parse_config_json(c.dump(), "config.json", nullptr); },
                     {"config.json: hidden_activation is null", "ACT2FN[None]"});
  for (const char* key : {"attn_logit_softcapping", "final_logit_softcapping"}) {
    c = old_style_tiny();
    c[key] = 0.0;
    expect_input_error([&] { parse_config_json(c.dump(), "config.json", nullptr); },
                       {std::string("config.json: ") + key + " must be positive or null"});
  }
}

// A NUL byte ended nlohmann's input: the keys after it were dropped (here the cap that turns attention capping
// off), where Python's json.loads, HF's reader, refuses the file.
TEST(ConfigKeys, ANulByteIsNotTheEndOfTheFile) {
  const std::string head = old_style_tiny().dump();
  const std::string text = head.substr(0, head.size() - 1) + '\0' + ", \"attn_logit_softcapping\": null}";
  expect_input_error([&] { parse_config_json(text, "config.json", nullptr); },
                     {"config.json: malformed JSON", "a NUL byte"});
  // Inside a value the parser stopped with "unexpected end of input"; the NUL is named instead.
  expect_input_error([&] { parse_config_json(std::string("{\"vocab_size\": ") + '\0' + "16}", "config.json", nullptr); },
                     {"config.json: malformed JSON", "at byte 16: a NUL byte"});
}

// tie_word_embeddings: null was read as HF's default (tied). To HF it is an explicit value, read as untied.
TEST(ConfigKeys, NullTieWordEmbeddingsIsRefused) {
  json c = old_style_tiny();
  c["tie_word_embeddings"] = nullptr;
  expect_input_error([&] { parse_config_json(c.dump(), "config.json", nullptr); },
                     {"config.json: tie_word_embeddings = null is not implemented", "null is read by HF as untied"});
  c["tie_word_embeddings"] = true;
  EXPECT_NO_THROW(parse_config_json(c.dump(), "config.json", nullptr));
}

TEST(ConfigKeys, RopeScalingOfDefaultTypeIsReadOthersRefused) {
  json c = old_style_tiny();
  c.erase("rope_theta");
  c["rope_scaling"] = {{"type", "default"}, {"rope_theta", 5000.0}};  // the older spelling of rope_type
  EXPECT_EQ(parse_config_json(c.dump(), "config.json", nullptr).rope_theta, 5000.0);
  // Both set: rope_scaling wins, as in transformers 5, with a warning.
  c["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 7000.0}};
  std::vector<std::string> w;
  EXPECT_EQ(parse_config_json(c.dump(), "config.json", &w).rope_theta, 5000.0);
  EXPECT_EQ(w.size(), 1u);
  c.erase("rope_parameters");
  for (const char* type : {"linear", "dynamic", "yarn", "llama3"}) {
    c["rope_scaling"] = {{"rope_type", type}, {"rope_theta", 5000.0}, {"factor", 2.0}};
    expect_input_error([&] { parse_config_json(c.dump(), "config.json", nullptr); },
                       {"config.json: rope_scaling.rope_type = \"" + std::string(type) + "\" is not implemented"});
  }
  // No theta anywhere: transformers 5's default 10000.0, with a warning (not the tiny config's 10000 by chance: the
  // top-level key is erased and the dict has none).
  c.erase("rope_theta");
  c["rope_scaling"] = {{"rope_type", "default"}};
  std::vector<std::string> w2;
  EXPECT_EQ(parse_config_json(c.dump(), "config.json", &w2).rope_theta, 10000.0);
  ASSERT_EQ(w2.size(), 1u);
  EXPECT_NE(w2[0].find("no rope_theta"), std::string::npos) << w2[0];
}

// A key the file leaves out takes Gemma2Config's default (transformers 5.17's Gemma2Config.__init__, as HF's loader
// fills it), with one warning naming the key and the value; a missing cap is its default, never "off" (null).
TEST(ConfigKeys, MissingKeysTakeGemma2ConfigDefaults) {
  const std::vector<std::pair<const char*, double>> defaults = {
      {"vocab_size", 256000}, {"hidden_size", 2304}, {"intermediate_size", 9216}, {"num_hidden_layers", 26},
      {"num_attention_heads", 8}, {"num_key_value_heads", 4}, {"head_dim", 256}, {"query_pre_attn_scalar", 256},
      {"sliding_window", 4096}, {"attn_logit_softcapping", 50}, {"final_logit_softcapping", 30},
      {"rms_norm_eps", 1e-6}, {"rope_theta", 10000}};
  for (const auto& [key, value] : defaults) {
    json c = old_style_tiny();
    if (std::string(key) == "rope_theta") c["rope_theta"] = 500.0;  // so that the default is visibly not the file's
    else if (std::string(key) == "num_hidden_layers") c.erase("layer_types");
    ASSERT_TRUE(c.contains(key)) << key;
    c.erase(key);
    std::vector<std::string> w;
    Config cfg;
    try {
      cfg = parse_config_json(c.dump(), "config.json", &w);
    } catch (const InputError& e) {
      // The default can contradict the file's other keys (4 KV heads for the tiny model's 2 query heads): then the
      // refusal names the key, as it would for that value written out.
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << key << ": " << e.what();
      continue;
    }
    const std::map<std::string, double> got = {
        {"vocab_size", double(cfg.vocab_size)}, {"hidden_size", double(cfg.hidden_size)},
        {"intermediate_size", double(cfg.intermediate_size)}, {"num_hidden_layers", double(cfg.num_hidden_layers)},
        {"num_attention_heads", double(cfg.num_attention_heads)}, {"num_key_value_heads", double(cfg.num_key_value_heads)},
        {"head_dim", double(cfg.head_dim)}, {"query_pre_attn_scalar", cfg.query_pre_attn_scalar},
        {"sliding_window", double(cfg.sliding_window.value_or(-1))},
        {"attn_logit_softcapping", cfg.attn_logit_softcapping.value_or(-1)},
        {"final_logit_softcapping", cfg.final_logit_softcapping.value_or(-1)}, {"rms_norm_eps", cfg.rms_norm_eps},
        {"rope_theta", cfg.rope_theta}};
    EXPECT_EQ(got.at(key), value) << key;
    bool named = false;
    for (const auto& line : w) named |= line.find(key) != std::string::npos;
    EXPECT_TRUE(named) << key << ": no warning names it";
  }
  // Against a checkpoint the default is checked like a written value: the tiny embedding has 384 rows, not 256000.
  TempDir d;
  json c = old_style_tiny();
  c.erase("vocab_size");
  const auto [cfg, weights] = write_tiny_checkpoint(d, c, tiny_case().model.weights);
  const ToolRun r = verify_ckpt(d, cfg, weights, {"--seq", "6"});
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("vocab_size"), std::string::npos) << r.err;
}

TEST(ConfigKeys, PadTokenAsTorchsPaddingIdx) {
  json c = old_style_tiny();
  c["pad_token_id"] = nullptr;
  const Config none = parse_config_json(c.dump(), "config.json", nullptr);
  EXPECT_FALSE(none.pad_token_id.has_value());
  EXPECT_TRUE(json::parse(to_config_json(none))["pad_token_id"].is_null()) << "to_config_json must write null";
  EXPECT_FALSE(parse_config_json(to_config_json(none), "config.json", nullptr).pad_token_id.has_value());
  // Absent: Gemma2Config's default 0, with the warning every defaulted key gets (docs/inputs.md): the default decides
  // which embedding row gets no lookup gradient. A probe found it taken without one.
  c.erase("pad_token_id");
  std::vector<std::string> w;
  EXPECT_EQ(parse_config_json(c.dump(), "config.json", &w).pad_token_id, 0);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0], "config.json: key 'pad_token_id' is missing: Gemma2Config's default 0 is used, as HF does");
  c["pad_token_id"] = -1;  // nn.Embedding counts a negative padding_idx from the end
  EXPECT_EQ(parse_config_json(c.dump(), "config.json", nullptr).pad_token_id, 7);
  c["pad_token_id"] = 8;
  expect_input_error([&] { parse_config_json(c.dump(), "config.json", nullptr); },
                     {"pad_token_id 8 is outside the vocabulary"});
}

// An integer above INT64_MAX is stored unsigned by the JSON reader: read as int64 it wrapped (2^64 - 384 became -384,
// row 0 counted from the end, and the run went on with row 0 as its padding row; found by a probe). It is refused,
// quoted as written; so is an integral float beyond what a double holds exactly.
TEST(ConfigKeys, IntegersBeyondInt64AreRefusedAsWritten) {
  json c = old_style_tiny();
  c["pad_token_id"] = 18446744073709551232ull;
  expect_input_error([&] { parse_config_json(c.dump(), "config.json", nullptr); },
                     {"key 'pad_token_id' is 18446744073709551232, out of range"});
  c["pad_token_id"] = 0;
  c["sliding_window"] = 9223372036854775808ull;
  expect_input_error([&] { parse_config_json(c.dump(), "config.json", nullptr); },
                     {"key 'sliding_window' is 9223372036854775808, out of range"});
  c["sliding_window"] = 1e30;
  expect_input_error([&] { parse_config_json(c.dump(), "config.json", nullptr); },
                     {"key 'sliding_window' is 1e+30, out of range"});
}

// ------------------------------------------------------------------------------------------------------
// Reported inputs: configs

TEST(Reported, BidirectionalAttentionIsRefused) {
  TempDir d;
  const std::string p = kReported + "/bidir_true.h5";
  expect_rejected(run_tool(kVerify, {"--case", p, "--backend", "reference"}, d), "verify",
                  {p, "use_bidirectional_attention = true is not implemented"});
}

// Default RoPE with the theta of rope_scaling: the same loss as the same checkpoint with a top-level
// rope_theta, and another loss with another theta (so the value is read, not defaulted).
TEST(Reported, RopeScalingDefaultLoadsWithItsTheta) {
  TempDir d;
  const std::string dir = kReported + "/rope_scaling_default/model";
  const ToolRun r = verify_ckpt(d, dir + "/config.json", dir, {"--json", d / "a.json"});
  expect_ok(r);
  // Read without a word about RoPE; the file has no pad_token_id, and its default is the one warning.
  const std::vector<std::string> w = warning_lines(r, "verify");
  ASSERT_EQ(w.size(), 1u) << r.err;
  EXPECT_NE(w[0].find("key 'pad_token_id' is missing"), std::string::npos) << w[0];
  json c = json::parse(slurp(dir + "/config.json"));
  c.erase("rope_scaling");
  c["rope_theta"] = 10000.0;
  spit(d / "top.json", c.dump());
  expect_ok(verify_ckpt(d, d / "top.json", dir, {"--json", d / "b.json"}));
  EXPECT_EQ(json_loss(d / "a.json"), json_loss(d / "b.json"));
  c["rope_theta"] = 500.0;
  spit(d / "other.json", c.dump());
  const ToolRun o = verify_ckpt(d, d / "other.json", dir, {"--json", d / "c.json"});
  ASSERT_TRUE(o.exited);
  EXPECT_NE(json_loss(d / "a.json"), json_loss(d / "c.json"));
}

// pad_token_id null: no padding index, so row 0 of the embedding gets the gradient of its lookups. Against the
// same checkpoint with pad_token_id 0, only row 0 differs; verify's finite-difference check (which now covers
// row 0 too) passes.
TEST(Reported, PadTokenNullGivesRowZeroItsLookupGradient) {
  TempDir d;
  const std::string dir = kReported + "/pad_token_null/model";
  expect_ok(verify_ckpt(d, dir + "/config.json", dir, {"--dump-grads", d / "null.h5"}));
  json c = json::parse(slurp(dir + "/config.json"));
  c["pad_token_id"] = 0;
  spit(d / "pad0.json", c.dump());
  expect_ok(verify_ckpt(d, d / "pad0.json", dir, {"--dump-grads", d / "zero.h5"}));
  const std::vector<double> a = read_grads(d / "null.h5").at(kEmbedName).to_double();
  const std::vector<double> b = read_grads(d / "zero.h5").at(kEmbedName).to_double();
  ASSERT_EQ(a.size(), b.size());
  const size_t D = 64;
  double row0 = 0, diff0 = 0;
  for (size_t j = 0; j < D; ++j) {
    row0 += a[j] * a[j];
    diff0 += (a[j] - b[j]) * (a[j] - b[j]);
  }
  std::printf("row 0: |null| %.6e, |null - pad 0| %.6e\n", std::sqrt(row0), std::sqrt(diff0));
  EXPECT_GT(std::sqrt(diff0), 1e-3 * std::sqrt(row0)) << "token 0 is in the batch: its lookups must count";
  for (size_t i = D; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << "only row 0 may differ (flat index " << i << ")";
}

// ------------------------------------------------------------------------------------------------------
// Reported inputs and their kinds: checkpoints

TEST(Reported, CheckpointDeeperThanConfigIsRefusedUnlessLayersAsksForFewer) {
  TempDir d;
  const std::string dir = kReported + "/checkpoint_deeper_than_config/model";
  expect_rejected(verify_ckpt(d, dir + "/config.json", dir), "verify",
                  {dir, "tensor 'model.layers.2.", "is of layer 2: the checkpoint has 3 layers, the config 2"});
  expect_ok(verify_ckpt(d, dir + "/config.json", dir, {"--layers", "2"}));
  expect_ok(verify_ckpt(d, dir + "/config.json", dir, {"--layers", "1"}));
}

// A Gemma2Model checkpoint (no `model.` prefix) loads as HF loads it: the same loss as the prefixed file.
TEST(Reported, Gemma2ModelWithoutPrefixLoadsAsHfDoes) {
  TempDir d;
  const std::string dir = kReported + "/gemma2model_no_prefix/model";
  expect_ok(verify_ckpt(d, dir + "/config.json", dir, {"--json", d / "bare.json"}));
  TensorMap prefixed;
  for (const auto& [n, t] : read_safetensors(dir + "/model.safetensors")) {
    ASSERT_NE(n.rfind("model.", 0), 0u) << n;
    prefixed["model." + n] = t;
  }
  write_safetensors(d / "prefixed.safetensors", prefixed);
  expect_ok(verify_ckpt(d, dir + "/config.json", d / "prefixed.safetensors", {"--json", d / "prefixed.json"}));
  EXPECT_EQ(json_loss(d / "bare.json"), json_loss(d / "prefixed.json"));
}

TEST(Checkpoints, MixedPrefixesAreRefusedNamingOneOfEach) {
  TempDir d;
  TensorMap w = tiny_case().model.weights;
  w["norm.weight"] = w.at(kFinalNormName);
  w.erase(kFinalNormName);
  const auto [cfg, weights] = write_tiny_checkpoint(d, json::parse(to_config_json(tiny_config())), w);
  expect_rejected(
      verify_ckpt(d, cfg, weights), "verify",
      {weights, "mixes names with and without the 'model.' prefix", "'model.embed_tokens.weight'", "'norm.weight'"});
}

// model.safetensors.index.json given as --weights: its shards, found beside it.
TEST(Checkpoints, IndexFileAsWeightsLoadsItsShards) {
  TempDir d;
  fs::create_directories(d.dir / "sharded");
  TensorMap a, b;
  json map = json::object();
  for (const auto& [n, t] : tiny_case().model.weights) {
    const bool first = n < "model.layers.1";
    (first ? a : b)[n] = t;
    map[n] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  write_safetensors(d / "sharded/model-00001-of-00002.safetensors", a);
  write_safetensors(d / "sharded/model-00002-of-00002.safetensors", b);
  spit(d / "sharded/model.safetensors.index.json", json({{"metadata", json::object()}, {"weight_map", map}}).dump());
  const auto [cfg, weights] =
      write_tiny_checkpoint(d, json::parse(to_config_json(tiny_config())), tiny_case().model.weights);
  expect_ok(verify_ckpt(d, cfg, d / "sharded/model.safetensors.index.json", {"--seq", "6", "--json", d / "idx.json"}));
  expect_ok(verify_ckpt(d, cfg, weights, {"--seq", "6", "--json", d / "one.json"}));
  EXPECT_EQ(json_loss(d / "idx.json"), json_loss(d / "one.json"));
  // A directory holding both a model.safetensors and an index: HF's from_pretrained takes the single file, and so
  // does this loader (other weights there, so that the two readings give different losses).
  const TensorMap other = synthetic_weights(tiny_config(), 99);
  write_safetensors(d / "sharded/model.safetensors", other);
  fs::create_directories(d.dir / "single");
  write_safetensors(d / "single/model.safetensors", other);
  expect_ok(verify_ckpt(d, cfg, d / "sharded", {"--seq", "6", "--json", d / "both.json"}));
  expect_ok(verify_ckpt(d, cfg, d / "single/model.safetensors", {"--seq", "6", "--json", d / "other.json"}));
  EXPECT_EQ(json_loss(d / "both.json"), json_loss(d / "other.json"));
  EXPECT_NE(json_loss(d / "both.json"), json_loss(d / "idx.json"));
}

// Names only a PEFT model's live state_dict (or DoRA) has are refused with that cause, not "missing tensor".
TEST(Checkpoints, PeftStateDictNamesGetTheirRealCause) {
  TempDir d;
  const auto [cfg, weights] =
      write_tiny_checkpoint(d, json::parse(to_config_json(tiny_config())), tiny_case().model.weights);
  fs::create_directories(d.dir / "adapter");
  spit(d / "adapter/adapter_config.json", to_adapter_config_json(tiny_adapter()));
  auto with_adapter = [&](const std::function<void(TensorMap&)>& mutate) {
    TensorMap t;
    for (const auto& [n, x] : synthetic_adapters(tiny_config(), tiny_adapter(), 3)) t["base_model.model." + n] = x;
    mutate(t);
    write_safetensors(d / "adapter/adapter_model.safetensors", t);
    return verify_ckpt(d, cfg, weights, {"--seq", "6", "--adapter", d / "adapter"});
  };
  expect_ok(with_adapter([](TensorMap&) {}));
  expect_rejected(with_adapter([](TensorMap& t) {
                    TensorMap r;
                    for (auto& [n, x] : t) {
                      std::string m = n;
                      m.replace(m.rfind(".weight"), 7, ".default.weight");
                      r[m] = x;
                    }
                    t = r;
                  }),
                  "verify", {"lora_A.default.weight' carries PEFT's adapter name ('default')", "save_pretrained"});
  // PEFT's lora_bias saves '...lora_B.bias': named as that adapter kind, not as a raw state_dict.
  expect_rejected(with_adapter([](TensorMap& t) {
                    const std::string w = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
                    Tensor b = t.at(w);
                    b.shape = {b.shape[0]};
                    t[w.substr(0, w.size() - 6) + "bias"] = b;
                  }),
                  "verify", {"q_proj.lora_B.bias' is a bias on the adapter's B (PEFT's lora_bias)"});
  expect_rejected(with_adapter([](TensorMap& t) {
                    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"] =
                        tensor_from_doubles(DType::f32, {4}, {1, 1, 1, 1});
                  }),
                  "verify", {"lora_magnitude_vector", "DoRA"});
  TensorMap w = tiny_case().model.weights;
  w["model.layers.0.self_attn.q_proj.base_layer.weight"] = w.at("model.layers.0.self_attn.q_proj.weight");
  w.erase("model.layers.0.self_attn.q_proj.weight");
  write_safetensors(d / "wrapped.safetensors", w);
  expect_rejected(verify_ckpt(d, cfg, d / "wrapped.safetensors", {"--seq", "6"}), "verify",
                  {"base_layer.weight' is a base weight inside a PEFT-wrapped layer"});
}

// ------------------------------------------------------------------------------------------------------
// Reported inputs: PEFT adapters

TEST(Reported, PissaAdapterIsRefused) {
  TempDir d;
  const std::string base = kReported + "/base9b_small/model", ad = kReported + "/peft_init_pissa/adapter";
  expect_rejected(
      verify_ckpt(d, base + "/config.json", base, {"--adapter", ad}), "verify",
      {ad + "/adapter_config.json", "init_lora_weights = \"pissa\" is not implemented", "rewrites the base weights"});
}

TEST(Reported, RegexTargetAdaptsQAndVOfEveryLayer) {
  TempDir d;
  const std::string base = kReported + "/base9b_small/model", ad = kReported + "/peft_regex_target/adapter";
  expect_ok(verify_ckpt(d, base + "/config.json", base, {"--adapter", ad, "--dump-grads", d / "g.h5"}));
  std::set<std::string> got, want;
  for (const auto& [n, t] : read_grads(d / "g.h5")) got.insert(n);
  for (int64_t l = 0; l < 2; ++l)
    for (Proj p : {Proj::q_proj, Proj::v_proj})
      for (char ab : {'A', 'B'}) want.insert(lora_weight_name(l, p, ab));
  EXPECT_EQ(got, want);
}

// The same adapter as PEFT names it on a bare Gemma2Model ('base_model.model.layers...'): refused naming that
// cause. Before, the bare names met the base's prefixed ones and the message blamed a mix of prefixes, quoting the
// base's 'model.embed_tokens.weight' against the adapter file.
TEST(Reported, AdapterOfABareGemma2ModelIsRefusedForItsNames) {
  TempDir d;
  const std::string base = kReported + "/base9b_small/model", ad = kReported + "/peft_regex_target/adapter";
  fs::create_directories(d / "adapter");
  fs::copy_file(ad + "/adapter_config.json", d / "adapter/adapter_config.json");
  TensorMap bare;
  for (const auto& [n, t] : read_safetensors(ad + "/adapter_model.safetensors")) {
    ASSERT_EQ(n.rfind("base_model.model.model.layers.", 0), 0u) << n;
    bare["base_model.model." + n.substr(23)] = t;
  }
  write_safetensors(d / "adapter/adapter_model.safetensors", bare);
  const ToolRun r = verify_ckpt(d, base + "/config.json", base, {"--adapter", d / "adapter"});
  expect_rejected(r, "verify",
                  {d / "adapter/adapter_model.safetensors", "'base_model.model.layers.",
                   "names its module without 'model.'", "an adapter made on a bare Gemma2Model"});
  EXPECT_EQ(r.err.find("mixes names"), std::string::npos) << r.err;
}

// Adapters on exactly layers 16..41, all seven projections, r 16; the dropout is named, not applied.
TEST(Reported, LayersToTransformAdaptsExactlyThoseLayers) {
  TempDir d;
  const std::string dir = kReported + "/peft_layers_to_transform";
  const ToolRun r = verify_ckpt(d, dir + "/model/config.json", dir + "/model",
                                {"--adapter", dir + "/adapter", "--seq", "8", "--dump-grads", d / "g.h5"});
  expect_ok(r);
  EXPECT_NE(r.out.find("lora_dropout 0.05 is training-time noise: these gradients are computed without dropout"),
            std::string::npos)
      << r.out;
  std::set<std::string> got, want;
  for (const auto& [n, t] : read_grads(d / "g.h5")) {
    got.insert(n);
    EXPECT_TRUE(t.shape[0] == 16 || t.shape[1] == 16) << n;
  }
  for (int64_t l = 16; l < 42; ++l)
    for (Proj p : kAllProj)
      for (char ab : {'A', 'B'}) want.insert(lora_weight_name(l, p, ab));
  EXPECT_EQ(got, want);
}

// A real adapter's lora_dropout (0.05) is applied by train's reference backend: the step's loss differs from the
// same adapter's with lora_dropout 0 (its masked LoRA branch), and the run says nothing is ignored.
TEST(Reported, TrainAppliesAnAdapterWithDropout) {
  TempDir d;
  const std::string dir = kReported + "/peft_layers_to_transform";
  std::filesystem::copy(dir + "/adapter", d / "nodrop");
  json cfg = json::parse(slurp(d / "nodrop/adapter_config.json"));
  ASSERT_EQ(cfg["lora_dropout"].get<double>(), 0.05);
  cfg["lora_dropout"] = 0.0;
  spit(d / "nodrop/adapter_config.json", cfg.dump());
  auto loss_of = [&](const std::string& adapter) {
    const ToolRun r = run_tool(kTrain, {"--config", dir + "/model/config.json", "--weights", dir + "/model", "--adapter",
                                        adapter, "--steps", "1", "--seq", "8"},
                               d);
    EXPECT_EQ(r.status, 0) << r.err;
    const size_t at = r.out.find("loss ");
    return at == std::string::npos ? NAN : std::stod(r.out.substr(at + 5));
  };
  const double with = loss_of(dir + "/adapter"), without = loss_of(d / "nodrop");
  std::printf("step 1 loss with lora_dropout 0.05: %.15g, with 0: %.15g\n", with, without);
  EXPECT_TRUE(std::isfinite(with));
  EXPECT_NE(with, without);
}

// ------------------------------------------------------------------------------------------------------
// PEFT's rules (check_target_module_exists, get_pattern_key, LoraConfig.__post_init__)

namespace {

const Config kTiny = tiny_config();

AdapterConfig parse(const json& j, std::vector<std::string>* w = nullptr) {
  return parse_adapter_config_json(j.dump(), kTiny, "a.json", w);
}

json lora(const json& targets) { return {{"r", 2}, {"lora_alpha", 4}, {"target_modules", targets}}; }

// "l.proj" for each adapted module, e.g. "0.q_proj 1.v_proj".
std::string adapted(const AdapterConfig& a) {
  std::string s;
  for (int64_t l = 0; l < kTiny.num_hidden_layers; ++l)
    for (Proj p : kAllProj)
      if (a.module(l, p).adapted()) s += (s.empty() ? "" : " ") + std::to_string(l) + "." + proj_name(p);
  return s;
}

}  // namespace

TEST(PeftRules, ListEntriesMatchTheNameOrADotSeparatedTail) {
  EXPECT_EQ(adapted(parse(lora({"q_proj", "mlp.down_proj"}))), "0.q_proj 0.down_proj 1.q_proj 1.down_proj");
  EXPECT_EQ(adapted(parse(lora({"model.layers.1.self_attn.k_proj"}))), "1.k_proj");
  // An entry matching nothing beside one that matches is ignored, as by PEFT; "_proj" is no dot-separated tail.
  EXPECT_EQ(adapted(parse(lora({"o_proj", "_proj", "qkv"}))), "0.o_proj 1.o_proj");
  expect_input_error([] { parse(lora({"_proj"})); }, {"a.json: target_modules [\"_proj\"] matches no projection"});
}

TEST(PeftRules, AllLinearIsEveryProjectionButTheHead) {
  const AdapterConfig a = parse(lora("ALL-LINEAR"));  // PEFT compares it lower-cased
  EXPECT_TRUE(a.per_layer.empty()) << "uniform adapters take the uniform form";
  EXPECT_EQ(a.target_modules.size(), size_t(kNumProj));
}

TEST(PeftRules, AStringIsARegexFullMatchedAgainstTheName) {
  EXPECT_EQ(adapted(parse(lora(R"(.*\.(q_proj|v_proj))"))), "0.q_proj 0.v_proj 1.q_proj 1.v_proj");
  EXPECT_EQ(adapted(parse(lora(R"(model\.layers\.1\.mlp\.(up|down)_proj)"))), "1.up_proj 1.down_proj");
  // Full match: "q_proj" as a pattern matches no full module name.
  expect_input_error([] { parse(lora("q_proj")); }, {"target_modules \"q_proj\" matches no projection"});
  // A pattern that reaches past the projections names what it reached.
  expect_input_error([] { parse(lora(R"(.*\.mlp)")); }, {"selects 'model.layers.0.mlp' (Gemma2MLP)"});
  expect_input_error([] { parse(lora(".*")); }, {"selects 'model' (Gemma2Model)"});
  expect_input_error([] { parse(lora(R"(.*(head|q_proj))")); },
                     {"selects 'lm_head'", "LoRA on the LM head is not implemented"});
  expect_input_error([] { parse(lora({"embed_tokens"})); },
                     {"'model.embed_tokens'", "LoRA on the embedding is not implemented"});
}

TEST(PeftRules, AnUncompilableRegexIsRefusedNamingIt) {
  expect_input_error([] { parse(lora(".*(q_proj")); },
                     {"a.json: target_modules '.*(q_proj' is not a regular expression"});
  json j = lora({"q_proj"});
  j["rank_pattern"] = {{"q_proj[", 4}};
  expect_input_error([&] { parse(j); }, {"rank_pattern key", "q_proj["});
}

// libstdc++ reads "{n}" and "\\n" into a long unchecked; the fuzzer found "a{7777777777777777777}" (signed overflow
// under UBSan). Such counts and back-references are refused by name before the compiler sees them; counts a
// module name can use still compile, and braces inside a class are literal.
TEST(PeftRules, HugeRepetitionCountsAndBackReferencesAreRefusedBeforeCompiling) {
  expect_input_error([] { parse(lora("a{7777777777777777777}")); }, {"repeats 7777777777777777777 times"});
  expect_input_error([] { parse(lora(R"(.*\.q_proj{1,99999})")); }, {"repeats 99999 times", "at most 1000"});
  expect_input_error([] { parse(lora(R"((.*)\.q_\1234567890123456789012)")); }, {"back-reference"});
  json j = lora({"q_proj"});
  j["rank_pattern"] = {{"q{2000}", 4}};
  expect_input_error([&] { parse(j); }, {"rank_pattern key", "repeats 2000 times"});
  EXPECT_EQ(adapted(parse(lora(R"(model\.layers\.\d{1,3}\.self_attn\.q_proj)"))), "0.q_proj 1.q_proj");
  EXPECT_EQ(adapted(parse(lora(R"(.*[{]?\.(q_proj))"))), "0.q_proj 1.q_proj");
}

// PEFT matches with Python's re, this project with ECMAScript: \A and \Z once read as the letters A and Z (an
// alpha_pattern "q_proj\Z" silently missed, keeping the default alpha), and "[[:alpha:]]" as a POSIX class
// (adapting q, k, v, o where PEFT matches nothing). Python's anchors are translated; readings that differ are refused.
TEST(PeftRules, PythonOnlyRegexSyntaxIsTranslatedOrRefused) {
  EXPECT_EQ(adapted(parse(lora(R"(\A.*\.q_proj\Z)"))), "0.q_proj 1.q_proj");
  json j = lora({"q_proj"});
  j["alpha_pattern"] = {{R"(q_proj\Z)", 16}};
  EXPECT_EQ(parse(j).module(0, Proj::q_proj).lora_alpha, 16);
  expect_input_error([] { parse(lora(R"(.*\.[[:alpha:]]_proj)")); }, {"'[:' inside brackets", "Python's re"});
  expect_input_error([] { parse(lora(R"(.*\.q_proj\z)")); }, {"the escape \\z", "Python's re"});
  j = lora({"q_proj"});
  j["rank_pattern"] = {{R"(\Lq_proj)", 4}};
  expect_input_error([&] { parse(j); }, {"rank_pattern key", "the escape \\L"});
}

// A ']' first in a bracket class is a literal in Python's re ("[]q]" is "] or q", "[^]x]" anything but ']' or 'x');
// ECMAScript reads "[]" as an empty class and "[^]" as any character, so alpha_pattern {"[]q]_proj": 16} silently
// kept q_proj's default alpha (found by a probe: the loss of no pattern where PEFT's is that of {"q_proj": 16}).
TEST(PeftRules, ACloseBracketFirstInAClassIsALiteral) {
  json j = lora({"q_proj", "k_proj"});
  j["alpha_pattern"] = {{"[]q]_proj", 16}};
  EXPECT_EQ(parse(j).module(0, Proj::q_proj).lora_alpha, 16);
  EXPECT_NE(parse(j).module(0, Proj::k_proj).lora_alpha, 16);
  j["alpha_pattern"] = {{"[^]x]_proj", 16}};
  EXPECT_EQ(parse(j).module(1, Proj::k_proj).lora_alpha, 16);
  EXPECT_EQ(adapted(parse(lora(".*[]q]_proj"))), "0.q_proj 1.q_proj");
}

// A file must not hang the tools: "(.*)*x" takes minutes per module name on a backtracking matcher.
TEST(PeftRules, ABacktrackingPatternIsMatchedInPolynomialTime) {
  const auto t0 = std::chrono::steady_clock::now();
  expect_input_error([] { parse(lora("(.*)*x")); }, {"matches no projection"});
  json j = lora({"q_proj"});
  j["rank_pattern"] = {{"((.*)*)*y", 4}};
  EXPECT_EQ(parse(j).module(0, Proj::q_proj).r, 2);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%.3f s\n", s);
  EXPECT_LT(s, 5.0);
}

TEST(PeftRules, ExcludeModulesAsListOrRegex) {
  json j = lora({"q_proj", "v_proj"});
  j["exclude_modules"] = {"model.layers.0.self_attn.q_proj"};
  EXPECT_EQ(adapted(parse(j)), "0.v_proj 1.q_proj 1.v_proj");
  j["exclude_modules"] = R"(.*\.1\..*)";
  EXPECT_EQ(adapted(parse(j)), "0.q_proj 0.v_proj");
}

TEST(PeftRules, LayersToTransformAndLayersPattern) {
  json j = lora({"q_proj", "down_proj"});
  j["layers_to_transform"] = 1;
  EXPECT_EQ(adapted(parse(j)), "1.q_proj 1.down_proj");
  j["layers_to_transform"] = {0};
  j["layers_pattern"] = "layers";
  EXPECT_EQ(adapted(parse(j)), "0.q_proj 0.down_proj");
  j["layers_to_transform"] = json::array();  // empty: every layer
  j.erase("layers_pattern");
  EXPECT_EQ(adapted(parse(j)), "0.q_proj 0.down_proj 1.q_proj 1.down_proj");
  // A full module name in the list is taken as is: PEFT checks `key in target_modules` before the layer filter.
  j = lora({"model.layers.0.self_attn.q_proj", "down_proj"});
  j["layers_to_transform"] = {1};
  EXPECT_EQ(adapted(parse(j)), "0.q_proj 1.down_proj");
  // A layers_pattern no name contains leaves nothing.
  j = lora({"q_proj"});
  j["layers_to_transform"] = {0};
  j["layers_pattern"] = "h";
  expect_input_error([&] { parse(j); }, {"matches no projection"});
  // PEFT pastes the pattern into its regex: an alternative or a group of its own leaves no layer number in
  // group 1 (the fuzzer's "|ayers"; PEFT's int() raises), refused by name rather than thrown past the reader.
  for (const char* bad : {"|ayers", "(lay)ers"}) {
    j["layers_pattern"] = bad;
    expect_input_error([&] { parse(j); }, {"layers_pattern makes the layer-number group"});
  }
}

// PeftConfig.__post_init__ raises on a task_type outside PEFT's TaskType (a probe: "FOO" loaded here). Its six values
// and null load, the wrapper class being all they choose; any other value, another case or a non-string included,
// is refused.
TEST(PeftRules, TaskTypeIsOneOfPeftsOrNull) {
  const json base = lora({"q_proj"});
  const std::string want = to_adapter_config_json(parse(base));
  for (const json& ok : {json("SEQ_CLS"), json("SEQ_2_SEQ_LM"), json("CAUSAL_LM"), json("TOKEN_CLS"),
                         json("QUESTION_ANS"), json("FEATURE_EXTRACTION"), json(nullptr)}) {
    json j = base;
    j["task_type"] = ok;
    std::vector<std::string> w;
    EXPECT_EQ(to_adapter_config_json(parse(j, &w)), want) << ok;
    EXPECT_TRUE(w.empty()) << ok;
  }
  for (const json& bad : {json("FOO"), json("causal_lm"), json(""), json(5), json::array({"CAUSAL_LM"})}) {
    json j = base;
    j["task_type"] = bad;
    expect_input_error([&] { parse(j); }, {"a.json: task_type = " + bad.dump() + " is not one of PEFT's task types"});
  }
}

TEST(PeftRules, CombinationsPeftRefusesAreRefused) {
  json j = lora(".*q_proj");
  j["layers_to_transform"] = {0};
  expect_input_error([&] { parse(j); }, {"layers_to_transform cannot be used when target_modules is a string"});
  j = lora("all-linear");
  j["layers_pattern"] = "layers";
  expect_input_error([&] { parse(j); }, {"layers_pattern cannot be used when target_modules is a string"});
  j = lora({"q_proj"});
  j["layers_pattern"] = "layers";
  expect_input_error([&] { parse(j); }, {"layers_pattern needs layers_to_transform"});
  // PEFT's check is truthiness: 0 and [] are "not given" there (found by a probe, 2026-12-05; they were read as
  // layer 0 and every layer).
  for (const json& falsy : {json(0), json::array()}) {
    j["layers_to_transform"] = falsy;
    expect_input_error([&] { parse(j); }, {"layers_pattern with layers_to_transform " + falsy.dump(), "reads 0 and [] as not given"});
  }
  j["layers_to_transform"] = 1;  // a true value passes the check
  EXPECT_NO_THROW(parse(j));
}

// get_pattern_key: the first key, in the file's order, with re.match(rf"(.*\.)?({key})$", name).
TEST(PeftRules, RankAndAlphaPatternsTakeTheFirstMatchInFileOrder) {
  const std::string text = R"({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"],
    "rank_pattern": {"layers\\.1\\.self_attn\\.q_proj": 8, "q_proj": 4, "elf_attn.v_proj": 16},
    "alpha_pattern": {"mlp.down_proj": 3, "down_proj": 100}})";
  const AdapterConfig a = parse_adapter_config_json(text, kTiny, "a.json", nullptr);
  EXPECT_EQ(a.module(0, Proj::q_proj).r, 4);
  EXPECT_EQ(a.module(1, Proj::q_proj).r, 8);  // the first key wins
  EXPECT_EQ(a.module(0, Proj::v_proj).r, 2);  // "elf_attn.v_proj" is no dot-separated tail
  EXPECT_EQ(a.module(0, Proj::down_proj).lora_alpha, 3);
  EXPECT_EQ(a.module(0, Proj::q_proj).scaling, 4.0 / 4);
  EXPECT_EQ(a.module(1, Proj::q_proj).scaling, 4.0 / 8);
  EXPECT_EQ(a.module(0, Proj::down_proj).scaling, 3.0 / 2);
  json j = json::parse(text);
  j["use_rslora"] = true;
  EXPECT_EQ(parse(j).module(1, Proj::q_proj).scaling, 4.0 / std::sqrt(8.0));
  std::string why;
  EXPECT_FALSE(a.uniform(kTiny.num_hidden_layers, &why));
  EXPECT_NE(why.find("per-module rank or alpha"), std::string::npos) << why;
}

TEST(PeftRules, NullTargetModulesIsPeftsDefaultForGemma2) {
  EXPECT_EQ(adapted(parse({{"r", 2}, {"lora_alpha", 4}, {"target_modules", nullptr}})),
            "0.q_proj 0.v_proj 1.q_proj 1.v_proj");
}

// A per-module adapter written by to_adapter_config_json (case files keep it so) reads back module for module.
TEST(PeftRules, PerModuleAdapterRoundTripsThroughItsJson) {
  json j = lora({"q_proj", "v_proj", "up_proj"});
  j["layers_to_transform"] = {1};
  j["rank_pattern"] = {{"v_proj", 3}};
  j["alpha_pattern"] = {{"up_proj", 7}};
  j["lora_dropout"] = 0.1;
  const AdapterConfig a = parse(j);
  ASSERT_FALSE(a.per_layer.empty());
  std::vector<std::string> w;
  const AdapterConfig b = parse_adapter_config_json(to_adapter_config_json(a), kTiny, "a.json", &w);
  EXPECT_TRUE(w.empty());
  EXPECT_EQ(b.lora_dropout, 0.1);
  for (int64_t l = 0; l < 2; ++l)
    for (Proj p : kAllProj) {
      const LoraModule x = a.module(l, p), y = b.module(l, p);
      EXPECT_TRUE(x.r == y.r && x.lora_alpha == y.lora_alpha && x.scaling == y.scaling) << l << " " << proj_name(p);
    }
}

// The CUDA trainer supports one rank and scaling on the same projections of every layer: the test it applies
// (Engine::Impl::init refuses with its reason) says so.
TEST(PeftRules, UniformityIsWhatTheFastTrainerChecks) {
  json j = lora({"q_proj", "v_proj"});
  j["rank_pattern"] = {{"q_proj", 2}};  // the default rank after all
  const AdapterConfig u = parse(j);
  EXPECT_TRUE(u.per_layer.empty());
  EXPECT_EQ(u.describe(2), "LoRA r=2 on 2 projections");
  j = lora({"q_proj"});
  j["layers_to_transform"] = {1};
  std::string why;
  EXPECT_FALSE(parse(j).uniform(2, &why));
  EXPECT_NE(why.find("model.layers.1.self_attn.q_proj is adapted but model.layers.0.self_attn.q_proj is not"),
            std::string::npos)
      << why;
}

// Options refused or accepted by their table entry: every harmless key is silent and changes nothing, every
// math key with a value other than the implemented one is refused naming it; unknown keys warn.
TEST(PeftRules, EveryHarmlessOrRefusedAdapterKeyBehavesAsItsTableSays) {
  const json base = lora({"q_proj", "v_proj"});
  const std::string want = to_adapter_config_json(parse(base));
  for (const ConfigKey& k : adapter_config_keys()) {
    SCOPED_TRACE(k.key);
    json j = base;
    j[k.key] = json::parse(k.example);
    std::vector<std::string> w;
    if (k.kind == KeyKind::harmless) {
      EXPECT_EQ(to_adapter_config_json(parse(j, &w)), want);
      EXPECT_TRUE(w.empty());
    } else if (k.kind == KeyKind::math) {
      expect_input_error([&] { parse(j, &w); }, {"a.json: ", k.key});
    }
  }
  for (const char* init : {"true", "false", "\"gaussian\"", "\"orthogonal\""}) {
    json j = base;
    j["init_lora_weights"] = json::parse(init);
    EXPECT_EQ(to_adapter_config_json(parse(j)), want) << init;
  }
  for (const char* init : {"pissa", "pissa_niter_4", "olora", "corda", "loftq", "eva", "lora_ga", "mica", "bogus"}) {
    json j = base;
    j["init_lora_weights"] = init;
    expect_input_error([&] { parse(j); }, {"init_lora_weights = \"" + std::string(init) + "\" is not implemented"});
  }
  json j = base;
  j["merge_weights"] = false;
  std::vector<std::string> w;
  parse(j, &w);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0], "a.json: unknown key 'merge_weights' (not a LoraConfig field this project knows): ignored");
}

// ------------------------------------------------------------------------------------------------------
// The reference with per-module ranks and scalings

// Each module's adapter is its own: the loss equals that of the base with every adapted W replaced by
// W + s B A with that module's s, and the adapter gradients are s G A^T and s B^T G with G that model's
// gradient of W.
TEST(PerModuleLora, EachModuleUsesItsOwnRankAndScaling) {
  const Config c = preset("gemma2-tiny");
  const AdapterConfig a = parse_adapter_config_json(
      R"({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1],
          "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"v_proj": 9}, "use_rslora": true})",
      c, "a.json", nullptr);
  ASSERT_FALSE(a.per_layer.empty());
  Checkpoint ck;
  ck.config = c;
  ck.weights = synthetic_weights(c, 5);
  ck.adapter = a;
  TensorMap ad = synthetic_adapters(c, a, 5);
  ck.weights.insert(ad.begin(), ad.end());
  const Batch batch = synthetic_batch(c, 2, 12, 5);
  ref::RunOptions opt;
  const ref::Output lo = ref::run(ck, batch, opt);

  Checkpoint merged;
  merged.config = c;
  merged.weights = synthetic_weights(c, 5);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (Proj p : kAllProj)
      if (const LoraModule m = a.module(l, p); m.adapted()) {
        const std::string wn = proj_weight_name(l, p);
        std::vector<double> W = merged.weights.at(wn).to_double();
        const std::vector<double> A = ad.at(lora_weight_name(l, p, 'A')).to_double(),
                                  B = ad.at(lora_weight_name(l, p, 'B')).to_double();
        const int64_t out = proj_out(c, p), in = proj_in(c, p);
        for (int64_t i = 0; i < out; ++i)
          for (int64_t k = 0; k < in; ++k) {
            double s = 0;
            for (int64_t q = 0; q < m.r; ++q) s += B[size_t(i * m.r + q)] * A[size_t(q * in + k)];
            W[size_t(i * in + k)] += m.scaling * s;
          }
        merged.weights[wn] = tensor_from_doubles(DType::f64, {out, in}, W);
      }
  const ref::Output full = ref::run(merged, batch, opt);
  std::printf("loss: adapters %.17g, merged %.17g\n", lo.loss, full.loss);
  EXPECT_NEAR(lo.loss, full.loss, 1e-13 * std::fabs(full.loss));

  double worst = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (Proj p : kAllProj)
      if (const LoraModule m = a.module(l, p); m.adapted()) {
        const int64_t out = proj_out(c, p), in = proj_in(c, p);
        const std::vector<double> G = full.grads.at(proj_weight_name(l, p)).to_double();
        const std::vector<double> A = ad.at(lora_weight_name(l, p, 'A')).to_double(),
                                  B = ad.at(lora_weight_name(l, p, 'B')).to_double();
        const std::vector<double> gA = lo.grads.at(lora_weight_name(l, p, 'A')).to_double();
        const std::vector<double> gB = lo.grads.at(lora_weight_name(l, p, 'B')).to_double();
        double num = 0, den = 0;
        for (int64_t i = 0; i < out; ++i)
          for (int64_t q = 0; q < m.r; ++q) {
            double s = 0;
            for (int64_t k = 0; k < in; ++k) s += G[size_t(i * in + k)] * A[size_t(q * in + k)];
            num += std::pow(gB[size_t(i * m.r + q)] - m.scaling * s, 2);
            den += std::pow(m.scaling * s, 2);
          }
        for (int64_t q = 0; q < m.r; ++q)
          for (int64_t k = 0; k < in; ++k) {
            double s = 0;
            for (int64_t i = 0; i < out; ++i) s += B[size_t(i * m.r + q)] * G[size_t(i * in + k)];
            num += std::pow(gA[size_t(q * in + k)] - m.scaling * s, 2);
            den += std::pow(m.scaling * s, 2);
          }
        worst = std::max(worst, std::sqrt(num / den));
      }
  std::printf("adapter gradients vs s G A^T, s B^T G: worst relative L2 %.3e\n", worst);
  EXPECT_LT(worst, 1e-12);
}

// ------------------------------------------------------------------------------------------------------
// --lora-r with --config/--weights, --adapter and --case

TEST(LoraRFlag, PutsSyntheticAdaptersOnACheckpoint) {
  TempDir d;
  const std::string dir = kReported + "/base9b_small/model";
  const ToolRun r = verify_ckpt(d, dir + "/config.json", dir, {"--lora-r", "4", "--dump-grads", d / "g.h5"});
  expect_ok(r);
  EXPECT_NE(r.out.find("LoRA r=4 on 7 projections"), std::string::npos) << r.out;
  const TensorMap g = read_grads(d / "g.h5");
  EXPECT_EQ(g.size(), size_t(2 * kNumProj * 2));
  for (const auto& [n, t] : g) {
    EXPECT_NE(n.find(".lora_"), std::string::npos) << n;
    EXPECT_TRUE(t.shape[0] == 4 || t.shape[1] == 4) << n;
  }
}

TEST(LoraRFlag, ZeroOrAbsentTrainsEveryWeight) {
  TempDir d;
  const std::string dir = kReported + "/base9b_small/model";
  for (std::vector<std::string> extra : {std::vector<std::string>{}, std::vector<std::string>{"--lora-r", "0"}}) {
    extra.insert(extra.end(), {"--dump-grads", d / "g.h5"});
    expect_ok(verify_ckpt(d, dir + "/config.json", dir, extra));
    const TensorMap g = read_grads(d / "g.h5");
    EXPECT_TRUE(g.count(kEmbedName));
    EXPECT_EQ(g.size(), base_weight_specs(parse_config_json(slurp(dir + "/config.json"), "c", nullptr)).size());
  }
}

TEST(LoraRFlag, ConflictsWithAdapterOrCaseAreRefused) {
  TempDir d;
  const std::string base = kReported + "/base9b_small/model", ad = kReported + "/peft_regex_target/adapter";
  expect_rejected(verify_ckpt(d, base + "/config.json", base, {"--adapter", ad, "--lora-r", "4"}), "verify",
                  {"--lora-r: conflicts with --adapter"});
  expect_rejected(
      run_tool(kTrain, {"--config", base + "/config.json", "--weights", base, "--adapter", ad, "--lora-r", "4"}, d),
      "train", {"--lora-r: conflicts with --adapter"});
  CaseFile cf = tiny_case();
  write_case(d / "case.h5", cf);
  expect_rejected(run_tool(kVerify, {"--case", d / "case.h5", "--lora-r", "4"}, d), "verify",
                  {"--lora-r: conflicts with --case"});
  expect_rejected(run_tool(kVerify, {"--case", d / "case.h5", "--lora-r", "0"}, d), "verify",
                  {"--lora-r: conflicts with --case"});
}

// --adapter with --case or --model once ran without it (exit 0, the same loss): an adapter belongs to a checkpoint.
TEST(AdapterFlag, OutsideACheckpointIsRefused) {
  TempDir d;
  const std::string ad = kReported + "/peft_regex_target/adapter";
  write_case(d / "case.h5", tiny_case());
  expect_rejected(run_tool(kVerify, {"--case", d / "case.h5", "--adapter", ad}, d), "verify",
                  {"--adapter: applies to --config/--weights only", "case file"});
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-tiny", "--adapter", ad}, d), "verify",
                  {"--adapter: applies to --config/--weights only", "--lora-r"});
  expect_rejected(run_tool(kVerify, {"diagnose", "--model", "gemma2-tiny", "--adapter", ad}, d), "verify",
                  {"--adapter: applies to --config/--weights only"});
  expect_rejected(run_tool(kVerify, {"diagnose", "--model", "gemma2-tiny", "--lora-r", "0"}, d), "verify",
                  {"--lora-r: diagnose needs LoRA adapters"});
  expect_rejected(run_tool(kTrain, {"--case", d / "case.h5", "--adapter", ad, "--max-steps", "1"}, d), "train",
                  {"--adapter: applies to --config/--weights only"});
}

// A quantized base has no weight gradients to give (QLoRA trains adapters only; HF's Trainer refuses purely
// quantized models): --lora-r 0 with --quantize once reported "gradients" of the NF4 weights.
TEST(AdapterFlag, QuantizedBaseWithoutAdaptersIsRefused) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-tiny", "--quantize", "nf4", "--lora-r", "0"}, d), "verify",
                  {"--lora-r: a 4-bit quantized base trains only LoRA adapters"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--quantize", "nf4", "--lora-r", "0", "--max-steps", "1"},
                           d),
                  "train", {"--lora-r: a 4-bit quantized base trains only LoRA adapters"});
}

// ------------------------------------------------------------------------------------------------------
// Warnings reach what the tools print: from config.json, adapter_config.json and a case file's config_json

TEST(Warnings, ReachVerifyAndTrainFromCheckpointsAdaptersAndCaseFiles) {
  TempDir d;
  json c = json::parse(to_config_json(tiny_config()));
  c["bogus_key"] = 1;
  const auto [cfg, weights] = write_tiny_checkpoint(d, c, tiny_case().model.weights);
  json a = json::parse(to_adapter_config_json(tiny_adapter()));
  a["other_key"] = true;
  fs::create_directories(d.dir / "adapter");
  spit(d / "adapter/adapter_config.json", a.dump());
  write_safetensors(d / "adapter/adapter_model.safetensors", synthetic_adapters(tiny_config(), tiny_adapter(), 3));
  const ToolRun r = verify_ckpt(d, cfg, weights, {"--seq", "6", "--adapter", d / "adapter"});
  expect_ok(r);
  const auto w = warning_lines(r, "verify");
  ASSERT_EQ(w.size(), 2u) << r.err;
  EXPECT_EQ(w[0], "verify: warning: " + cfg +
                      ": unknown key 'bogus_key' (not a Gemma2Config key this project knows): ignored");
  EXPECT_EQ(w[1].rfind("verify: warning: " + d / "adapter/adapter_config.json" + ": unknown key 'other_key'", 0), 0u)
      << w[1];
  const ToolRun t = run_tool(kTrain, {"--config", cfg, "--weights", weights, "--steps", "1", "--seq", "6"}, d);
  expect_ok(t);
  EXPECT_EQ(warning_lines(t, "train").size(), 1u) << t.err;

  const std::string p = d / "case.h5";
  write_case(p, tiny_case());
  edit_h5(p, [&](H5::H5File& f) {
    f.removeAttr("config_json");
    h5::write_string_attr(f, "config_json", c.dump());
  });
  const ToolRun v = run_tool(kVerify, {"--case", p}, d);
  expect_ok(v);
  const auto vw = warning_lines(v, "verify");
  ASSERT_EQ(vw.size(), 1u) << v.err;
  EXPECT_EQ(vw[0].rfind("verify: warning: " + p + ": config_json: unknown key 'bogus_key'", 0), 0u) << vw[0];
  const ToolRun tc = run_tool(kTrain, {"--case", p, "--steps", "1"}, d);
  expect_ok(tc);
  EXPECT_EQ(warning_lines(tc, "train").size(), 1u) << tc.err;
}
