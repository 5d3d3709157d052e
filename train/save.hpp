// What train writes and reads back: a PEFT adapter (or, for full-weight training, an HF checkpoint) plus the
// state a run resumes from bit-exactly.
//
// A save directory holds (docs/train.md):
//   adapter_model.safetensors + adapter_config.json   LoRA: PEFT's names and keys, float32
//   model.safetensors + config.json                   full-weight training: HF's names, float32
//   training_state.safetensors                        float64: every trainable tensor as trained (<name>), AdamW's
//                                                     moments (<name>.exp_avg, <name>.exp_avg_sq)
//   trainer_state.json                                global_step, epoch, log_history (HF's keys), and under
//                                                     "gemma_train" the settings that change the math and the
//                                                     sha256 of every file above. Written last: a directory
//                                                     whose files do not match it is an incomplete save.
// Every file is written to a temporary name and renamed into place; a checkpoint directory as a whole is built
// under a temporary name and renamed.
#pragma once
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"

namespace gemma::train {

// The trainable tensors' exact values and AdamW moments, by weight name (HF names, no PEFT prefix).
struct TrainState {
  std::map<std::string, std::vector<double>> params, exp_avg, exp_avg_sq;
  std::map<std::string, Shape> shapes;
  int64_t step = 0;  // optimizer steps taken (AdamW's t)
};


// PEFT's adapter_config.json for `a`: the project's own keys (to_adapter_config_json) plus the ones PEFT writes
// (task_type CAUSAL_LM, base_model_name_or_path, inference_mode, init_lora_weights, ...).
std::string peft_adapter_config_json(const AdapterConfig& a, const std::string& base_model_name_or_path);

// Writes `dir` (created if missing). `weights` are the trained tensors by HF name (float32 is written); `state`
// may be null (the fast backend, whose moments stay on the device): then no training_state.safetensors, and the
// directory cannot be resumed from. `trainer_state` gets "gemma_train.files" added. Trained values beyond float32's
// range are written as +-inf (the float64 ones stay in training_state.safetensors), with a line in `warnings`.
void save_dir(const std::string& dir, const Config& c, const std::optional<AdapterConfig>& adapter,
              const std::string& base_model_name_or_path, const TensorMap& weights, const TrainState* state,
              nlohmann::json trainer_state, std::vector<std::string>* warnings = nullptr);
// The same into dir/checkpoint-<step> (HF's name), built as a whole under a temporary name and renamed.
std::string save_checkpoint(const std::string& dir, const Config& c, const std::optional<AdapterConfig>& adapter,
                            const std::string& base_model_name_or_path, const TensorMap& weights, const TrainState& state,
                            const nlohmann::json& trainer_state, std::vector<std::string>* warnings = nullptr);

struct Resumed {
  TrainState state;
  nlohmann::json trainer_state;
};
// Reads a save directory back, checking that trainer_state.json is there, that every file matches its sha256, and
// that the state holds every tensor in float64. InputError naming the file otherwise.
Resumed read_resume_dir(const std::string& dir);

// Compares the settings a resumed run would use with those saved (trainer_state.json "gemma_train.run"): any
// difference is an InputError naming the setting and both values, since the run would not be the one resumed.
void check_same_run(const nlohmann::json& saved, const nlohmann::json& now, const std::string& dir);

}  // namespace gemma::train
