#include "policy.hpp"

#include <algorithm>
#include <cmath>

namespace gemma::ref {

const char* cast_name(Cast c) {
  static const char* n[] = {"weights",     "embed_out",   "normalizer", "embed_scaled", "norm_in",
                            "norm_normed", "norm_scale",  "norm_out",   "matmul_in",    "matmul_out",
                            "lora_mid",    "lora_out",    "rope_inputs", "rope_angle", "rope_cossin",  "rope_out",
                            "attn_scores", "attn_capped", "attn_probs", "attn_out",     "gelu",
                            "geglu",       "residual",    "logits",     "logits_capped", "loss",
                            "grad_act",    "grads",       "adapters",   "optimizer_state", "softcap_steps"};
  static_assert(sizeof(n) / sizeof(n[0]) == kNumCasts);
  return n[int(c)];
}

bool Policy::exact() const {
  for (DType d : fmt)
    if (d != DType::f64) return false;
  return true;
}

std::string apply_bug(Bug b, const Config& c, Numerics& n, Softcap& s) {
  Policy& p = n.policy;
  Semantics& m = n.semantics;
  const bool any_sliding =
      std::any_of(c.layer_types.begin(), c.layer_types.end(), [](LayerType t) { return t == LayerType::sliding; });
  switch (b) {
    case Bug::normalizer_exact: {
      p[Cast::normalizer] = DType::f64;
      const double r = std::sqrt(double(c.hidden_size));
      if (round_to(DType::bf16, r) == r) return "sqrt(hidden_size) is exact in bf16";
      return "";
    }
    case Bug::rmsnorm_early_downcast:
      // Llama style: the normalised x is cast to bf16, then multiplied by a bf16 (1 + w).
      if (p[Cast::norm_normed] == DType::bf16 && p[Cast::norm_scale] == DType::bf16) return "the policy already rounds there";
      p[Cast::norm_normed] = DType::bf16;
      p[Cast::norm_scale] = DType::bf16;
      return "";
    case Bug::rope_bf16:
      p[Cast::rope_inputs] = DType::bf16;
      p[Cast::rope_angle] = DType::bf16;
      return "";
    case Bug::gelu_exact:
      m.gelu_exact = true;
      return "";
    case Bug::qpas_head_dim: {
      // The two wrong scales seen in the field: head_dim (27b scaled by 128^-0.5 instead of 144^-0.5) and
      // hidden_size / num_attention_heads (9b's early 224 = 3584 / 16). Whichever differs from the right value.
      const double right = c.query_pre_attn_scalar;
      for (double wrong : {double(c.head_dim), double(c.hidden_size) / double(c.num_attention_heads)})
        if (wrong != right) {
          m.query_pre_attn_scalar = wrong;
          return "";
        }
      return "query_pre_attn_scalar equals head_dim and hidden_size / num_attention_heads";
    }
    case Bug::sliding_odd_layers:
      m.sliding_odd_layers = true;
      return c.sliding_window ? "" : "the model has no sliding window";
    case Bug::sliding_off_by_one:
      m.window_extra = 1;
      return any_sliding && c.sliding_window ? "" : "the model has no sliding layer";
    case Bug::no_sliding_window:
      m.no_sliding_window = true;
      return any_sliding && c.sliding_window ? "" : "the model has no sliding layer";
    case Bug::no_attn_softcap: {
      const bool on = s.attn;
      s.attn = false;
      return on ? "" : "the attention cap is off in this run";
    }
    case Bug::no_logit_softcap: {
      const bool on = s.logits;
      s.logits = false;
      return on ? "" : "the final cap is off in this run";
    }
    case Bug::padded_vocab_unmasked:
      m.padded_vocab_unmasked = true;
      return "";
    case Bug::grad_accum_mean_of_means:
      m.grad_accum_mean_of_means = true;
      return "";
    case Bug::loss_normalised_by_tokens:
      m.loss_normalised_by_tokens = true;
      return "";
    case Bug::rmsnorm_no_weight_grad:
      m.rmsnorm_no_weight_grad = true;
      return "";
    case Bug::softcap_grad_missing:
      m.attn_softcap_grad_missing = true;
      return s.attn ? "" : "the attention cap is off in this run";
    case Bug::logit_softcap_grad_missing:
      m.logit_softcap_grad_missing = true;
      return s.logits ? "" : "the final cap is off in this run";
    case Bug::rmsnorm_plain_weight:
      m.rmsnorm_plain_weight = true;
      return "";
    case Bug::count: break;
  }
  return "not a bug id";
}

}  // namespace gemma::ref
