// Optimizer settings every trainer shares (the reference's reference/adamw.hpp and the fast trainer's
// fast/adamw.cuh implement them): torch.optim.AdamW's hyperparameters.
#pragma once

#include <algorithm>
#include <cctype>
#include <string>

namespace gemma {

struct AdamWConfig {
  double lr = 1e-4;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // decoupled: the weight is scaled by (1 - lr weight_decay) before the Adam update
};

// Whether HF's Trainer decays the parameter of this (HF) name: its create_optimizer puts every parameter that
// get_decay_parameter_names leaves out in a group with weight_decay 0. The names it leaves out are those matching,
// lowercased, any of r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)" (transformers'
// trainer.py, 4.4x and 5.x; read from the source), and parameters of nn.LayerNorm modules, which Gemma 2 has none
// of. So Gemma 2's four RMSNorm weights per layer and model.norm.weight are never decayed; the embedding, the
// projections and LoRA's A and B are. Decaying the norms too moved them by lr * weight_decay per step in a
// full-weight run where HF's would not have moved them (found by a probe, 2026-12-05).
inline bool weight_decay_applies(const std::string& hf_name) {
  std::string n = hf_name;
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char ch) { return char(std::tolower(ch)); });
  if (n.find("bias") != std::string::npos || n.find("layernorm") != std::string::npos ||
      n.find("rmsnorm") != std::string::npos)
    return false;
  // The last two patterns together: "norm" after the start, a '.' or a '_', and before the end or a '.'.
  for (size_t at = n.find("norm"); at != std::string::npos; at = n.find("norm", at + 1)) {
    const bool starts = at == 0 || n[at - 1] == '.' || n[at - 1] == '_';
    const bool ends = at + 4 == n.size() || n[at + 4] == '.';
    if (starts && ends) return false;
  }
  return true;
}

}  // namespace gemma
