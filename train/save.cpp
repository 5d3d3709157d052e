#include "train/save.hpp"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "check/golden.hpp"
#include "check/report.hpp"
#include "model/atomic_file.hpp"
#include "model/errors.hpp"
#include "model/json_brief.hpp"
#include "model/safetensors.hpp"
#include "model/json_text.hpp"

namespace gemma::train {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

constexpr int kStateVersion = 1;
const char* kPeftPrefix = "base_model.model.";

}  // namespace


namespace {

Tensor f64_tensor(const Shape& s, const std::vector<double>& v) { return tensor_from_doubles(DType::f64, s, v); }

}  // namespace

std::string peft_adapter_config_json(const AdapterConfig& a, const std::string& base_model_name_or_path) {
  json j = json::parse(to_adapter_config_json(a));
  // The keys PEFT's LoraConfig writes at their defaults (the reader classifies each: docs/inputs.md).
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] = base_model_name_or_path;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["fan_in_fan_out"] = false;
  j["use_dora"] = false;
  j["modules_to_save"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["revision"] = nullptr;
  if (!j.contains("rank_pattern")) j["rank_pattern"] = json::object();
  if (!j.contains("alpha_pattern")) j["alpha_pattern"] = json::object();
  return j.dump(2) + "\n";  // sorted keys, as PEFT's save_pretrained (json.dumps(sort_keys=True))
}

void save_dir(const std::string& dir, const Config& c, const std::optional<AdapterConfig>& adapter,
              const std::string& base_model_name_or_path, const TensorMap& weights, const TrainState* state,
              json trainer_state, std::vector<std::string>* warnings) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir, ec)) fail(dir, "cannot create the directory" + (ec ? ": " + ec.message() : std::string()));
  const fs::path d(dir);
  json files = json::object();
  std::vector<fs::path> written;  // by this call, removed again if a later file fails
  auto record = [&](const std::string& name) {
    written.push_back(d / name);
    files[name] = check::sha256_file((d / name).string());
  };
  // A save that fails part-way left the files written before it (an adapter without its config, no
  // trainer_state.json) under their final names (found by a probe, 2026-12-05): they are removed, so the directory
  // holds a whole save or none of this one. Each file is itself written whole or not at all (write_file_atomically).
  try {
    // float32, as PEFT and HF save a float32 model: the exact float64 values are in training_state.safetensors.
    // A diverged run's checkpoint (lr 1e300) was all inf without a word (found by a probe, 2026-12-05): the values
    // float32 cannot hold are counted as they are converted.
    TensorMap out;
    int64_t overflowed = 0, total = 0;
    for (const auto& [name, t] : weights) {
      if (name == kEmbedPaddingName) continue;  // the gate's in-memory head padding is not part of an HF model
      const std::string n = adapter ? kPeftPrefix + name : name;
      const std::vector<double> v = t.to_double();
      for (double x : v) overflowed += !std::isfinite(float(x));
      total += int64_t(v.size());
      out.emplace(n, tensor_from_doubles(DType::f32, t.shape, v));
    }
    if (overflowed > 0 && warnings)
      warnings->push_back(dir + ": " + std::to_string(overflowed) + " of " + std::to_string(total) +
                          " trained values are beyond float32's range and are saved as inf" +
                          (state ? " (training_state.safetensors keeps them in float64)" : ""));
    const std::map<std::string, std::string> meta{{"format", "pt"}};
    if (adapter) {
      write_safetensors((d / "adapter_model.safetensors").string(), out, meta);
      record("adapter_model.safetensors");
      write_text_file_atomically((d / "adapter_config.json").string(), peft_adapter_config_json(*adapter, base_model_name_or_path));
      record("adapter_config.json");
    } else {
      write_safetensors((d / "model.safetensors").string(), out, meta);
      record("model.safetensors");
      write_text_file_atomically((d / "config.json").string(), to_config_json(c) + "\n");
      record("config.json");
    }
    if (state) {
      TensorMap st;
      for (const auto& [name, p] : state->params) {
        const Shape& s = state->shapes.at(name);
        st.emplace(name, f64_tensor(s, p));
        st.emplace(name + ".exp_avg", f64_tensor(s, state->exp_avg.at(name)));
        st.emplace(name + ".exp_avg_sq", f64_tensor(s, state->exp_avg_sq.at(name)));
      }
      write_safetensors((d / "training_state.safetensors").string(), st, {{"format", "gemma-train"}, {"step", std::to_string(state->step)}});
      record("training_state.safetensors");
    }
    trainer_state["gemma_train"]["version"] = kStateVersion;
    trainer_state["gemma_train"]["files"] = files;
    trainer_state["gemma_train"]["resumable"] = state != nullptr;
    write_text_file_atomically((d / "trainer_state.json").string(), trainer_state.dump(2) + "\n");
  } catch (...) {
    for (const fs::path& p : written) fs::remove(p, ec);
    throw;
  }
}

std::string save_checkpoint(const std::string& dir, const Config& c, const std::optional<AdapterConfig>& adapter,
                            const std::string& base_model_name_or_path, const TensorMap& weights, const TrainState& state,
                            const json& trainer_state, std::vector<std::string>* warnings) {
  const fs::path final_dir = fs::path(dir) / ("checkpoint-" + std::to_string(state.step));
  const fs::path tmp = fs::path(dir) / (".checkpoint-" + std::to_string(state.step) + ".tmp-" + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(tmp, ec);
  std::vector<std::string> w;
  save_dir(tmp.string(), c, adapter, base_model_name_or_path, weights, &state, trainer_state, &w);
  if (warnings)  // said of the checkpoint's own name, not of the temporary one it is built under
    for (std::string& line : w) warnings->push_back(final_dir.string() + line.substr(tmp.string().size()));
  // A checkpoint of the same step from an earlier run is replaced whole, as HF's Trainer overwrites it.
  fs::remove_all(final_dir, ec);
  fs::rename(tmp, final_dir, ec);
  if (ec) {
    const std::string why = ec.message();  // before remove_all reuses ec ("cannot write: Success", from a probe)
    fs::remove_all(tmp, ec);
    fail(final_dir.string(), "cannot write: " + why);
  }
  return final_dir.string();
}

Resumed read_resume_dir(const std::string& dir) {
  const fs::path d(dir);
  std::error_code ec;
  if (!fs::is_directory(d, ec)) fail(dir, "no such directory (--resume wants a directory train saved)");
  const std::string sp = (d / "trainer_state.json").string();
  if (!fs::exists(sp, ec)) fail(dir, "has no trainer_state.json: not a directory train saved, or an incomplete save");
  Resumed r;
  try {
    r.trainer_state = parse_json(read_text_file(sp));
  } catch (const json::exception& e) {
    fail(sp, std::string("malformed JSON: ") + e.what());
  }
  const json& g = r.trainer_state.value("gemma_train", json::object());
  if (!g.is_object() || g.value("version", 0) != kStateVersion)
    fail(sp, "has no gemma_train section of version " + std::to_string(kStateVersion) + ": not written by this train");
  if (!g.value("resumable", false))
    fail(sp, "holds no optimizer state (written by --backend fast, whose AdamW moments stay on the device): it cannot "
             "be resumed from");
  if (!g.contains("files") || !g["files"].is_object()) fail(sp, "gemma_train.files is missing");
  for (const auto& [name, sha] : g["files"].items()) {
    const std::string p = (d / name).string();
    if (!fs::exists(p, ec)) fail(p, "is missing (listed in trainer_state.json)");
    if (!sha.is_string() || check::sha256_file(p) != sha.get<std::string>())
      fail(p, "does not match the sha256 in trainer_state.json: an incomplete or modified save");
  }
  const std::string tp = (d / "training_state.safetensors").string();
  if (!g["files"].contains("training_state.safetensors")) fail(sp, "lists no training_state.safetensors");
  const TensorMap st = read_safetensors(tp);
  for (const auto& [name, t] : st) {
    if (t.dtype != DType::f64) fail(tp, "tensor '" + name + "' is not float64");
    auto ends = [&](const std::string& s) { return name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0; };
    if (ends(".exp_avg") || ends(".exp_avg_sq")) continue;
    const auto m = st.find(name + ".exp_avg"), v = st.find(name + ".exp_avg_sq");
    if (m == st.end() || v == st.end()) fail(tp, "tensor '" + name + "' has no exp_avg or exp_avg_sq beside it");
    if (m->second.shape != t.shape || v->second.shape != t.shape) fail(tp, "tensor '" + name + "': its moments differ in shape");
    r.state.params[name] = t.to_double();
    r.state.exp_avg[name] = m->second.to_double();
    r.state.exp_avg_sq[name] = v->second.to_double();
    r.state.shapes[name] = t.shape;
  }
  if (r.state.params.empty()) fail(tp, "holds no tensor");
  const json& gs = r.trainer_state.value("global_step", json());
  if (!gs.is_number_integer() || gs.get<int64_t>() < 1) fail(sp, "global_step is not a positive integer");
  r.state.step = gs.get<int64_t>();
  return r;
}

void check_same_run(const json& saved, const json& now, const std::string& dir) {
  for (const auto& [key, value] : now.items()) {
    if (!saved.contains(key)) fail("--resume " + dir, "the saved run does not record '" + key + "'");
    if (saved[key] != value)
      fail("--resume " + dir, key + " was " + json_brief(saved[key]) + " in the saved run, is " + json_brief(value) +
                                  " now: a resumed run must continue the same run");
  }
  for (const auto& [key, value] : saved.items())
    if (!now.contains(key)) fail("--resume " + dir, "the saved run has '" + key + "', which this run does not");
}

}  // namespace gemma::train
