// Case files (HDF5): one model, one batch and optionally the expected results, in the layout of
// docs/formats.md. Other programs (h5py, HDFView, the HF cross-check) read and write them.
#pragma once
#include <map>
#include <optional>
#include <string>

#include "checkpoint.hpp"

namespace gemma {

struct Expected {
  std::optional<double> loss;
  std::optional<Tensor> logits;  // [B, T, V] after the final softcap (if on)
  TensorMap grads;               // d loss / d weight, named like the weights
};

struct CaseFile {
  Checkpoint model;
  Batch batch;
  std::map<std::string, Expected> expected;       // keyed by combo: none, attn, logits, attn_logits
  std::map<std::string, std::string> provenance;  // string attributes on /expected (who wrote it, how)
};

// Whether /expected's expected_kind is one the comparison knows (docs/formats.md's table): hf-float64-shipped,
// hf-float64-patched, reference-float64, or torch-<dtype> (whose dtype check/torch_result.cpp judges).
bool known_expected_kind(const std::string& kind);

// Reads and validates a case file; every problem is an InputError naming `path` and the tensor.
CaseFile read_case(const std::string& path);
// Writes to a temporary name beside `path` and renames it into place, so no half-written file is seen.
// Weights are written as float32 when exact (bf16, f16 as float16), float64 otherwise.
void write_case(const std::string& path, const CaseFile& cf);

// Flat list of the string attributes on the root group (config_json and friends), for tools that report.
std::map<std::string, std::string> read_root_attributes(const std::string& path);

}  // namespace gemma
