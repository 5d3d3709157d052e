// Hugging Face checkpoints: safetensors files (single, or sharded with model.safetensors.index.json) next to
// a config.json, and PEFT adapter directories. Files are memory-mapped and tensors alias the mapping, so a
// 27b checkpoint run with two layers only ever touches the bytes of those two layers.
#pragma once
#include <optional>
#include <string>

#include "checkpoint.hpp"

namespace gemma {

// One .safetensors file (BF16, F16, F32, F64 tensors). Every structural problem is an InputError. U8 tensors
// (bitsandbytes' packed weights and quant states) go to `u8` when it is given and are refused otherwise.
TensorMap read_safetensors(const std::string& path, ByteTensorMap* u8 = nullptr);
// A file, a shard index (model.safetensors.index.json, its shards beside it), or a directory with
// model.safetensors or model.safetensors.index.json (+ shards).
TensorMap read_safetensors_any(const std::string& path, ByteTensorMap* u8 = nullptr);
// Writes a safetensors file atomically (temporary name, then rename).
void write_safetensors(const std::string& path, const TensorMap& tensors);
// The same with a "__metadata__" header entry (string to string, as the format allows): HF's loaders of some
// versions insist on {"format": "pt"}, which PEFT and transformers write.
void write_safetensors(const std::string& path, const TensorMap& tensors, const std::map<std::string, std::string>& metadata);

// config.json + weights (a bitsandbytes 4-bit NF4 checkpoint, as config.json's quantization_config says, is
// dequantized on load: model/nf4.hpp) (+ PEFT adapter directory or adapter_model.safetensors with adapter_config.json
// beside it). `layers`, when set, keeps only the first layers (true widths on a small machine); without it, a
// checkpoint holding layers its config does not have is refused. The configs' warnings go to
// Checkpoint::warnings.
Checkpoint load_hf_checkpoint(const std::string& config_path, const std::string& weights_path,
                              const std::optional<std::string>& adapter_path, std::optional<int64_t> layers);

std::string read_text_file(const std::string& path);

}  // namespace gemma
