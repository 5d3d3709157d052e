#include "policy.hpp"

namespace gemma::ref {

const char* cast_name(Cast c) {
  static const char* n[] = {"weights",     "embed_out",   "normalizer", "embed_scaled", "norm_in",
                            "norm_normed", "norm_scale",  "norm_out",   "matmul_in",    "matmul_out",
                            "lora_mid",    "lora_out",    "rope_inputs", "rope_angle", "rope_cossin",  "rope_out",
                            "attn_scores", "attn_capped", "attn_probs", "attn_out",     "gelu",
                            "geglu",       "residual",    "logits",     "logits_capped", "loss",
                            "grad_act",    "grads",       "adapters",   "optimizer_state"};
  static_assert(sizeof(n) / sizeof(n[0]) == kNumCasts);
  return n[int(c)];
}

bool Policy::exact() const {
  for (DType d : fmt)
    if (d != DType::f64) return false;
  return true;
}

}  // namespace gemma::ref
