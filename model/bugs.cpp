#include "model/bugs.hpp"

#include "model/errors.hpp"

namespace gemma {

const std::array<BugInfo, kNumBugs>& bug_table() {
  static const std::array<BugInfo, kNumBugs> t = {{
      {Bug::normalizer_exact, "normalizer-exact", "embedding normalizer kept exact instead of rounded to bf16",
       "gemma_pytorch before PR #67"},
      {Bug::rmsnorm_early_downcast, "rmsnorm-early-downcast", "RMSNorm output cast to bf16 before the (1 + w) multiply",
       "gemma_pytorch before PR #67"},
      {Bug::rope_bf16, "rope-bf16", "RoPE positions and angles computed in bf16", "HF before 4.38.2; Keras mixed_bfloat16"},
      {Bug::gelu_exact, "gelu-exact", "exact erf GELU instead of the tanh approximation", "HF/gemma_pytorch before March 2024"},
      {Bug::qpas_head_dim, "qpas-head-dim", "attention scaled by head_dim or hidden/heads instead of query_pre_attn_scalar",
       "JAX / gemma_pytorch, July 2024"},
      {Bug::sliding_odd_layers, "sliding-odd-layers", "sliding window on odd layers instead of even",
       "first HF Gemma 2 release (PR #31775)"},
      {Bug::sliding_off_by_one, "sliding-off-by-one", "sliding window attends W + 1 keys",
       "HF flash-attention path (issue #39408)"},
      {Bug::no_sliding_window, "no-sliding-window", "sliding window ignored: every layer attends to all past keys",
       "engines without local attention: right up to W tokens, wrong beyond"},
      {Bug::no_attn_softcap, "no-attn-softcap", "attention softcap silently dropped", "HF SDPA path; several inference engines"},
      {Bug::no_logit_softcap, "no-logit-softcap", "final softcap dropped", "Cut Cross-Entropy's Gemma 2 patch (issue #48)"},
      {Bug::padded_vocab_unmasked, "padded-vocab-unmasked", "padded vocabulary columns left in the softmax",
       "any kernel padding the LM head"},
      {Bug::grad_accum_mean_of_means, "grad-accum-mean-of-means", "per-micro-batch mean losses averaged",
       "HF Trainer / TRL before Oct 2024"},
      {Bug::rmsnorm_no_weight_grad, "rmsnorm-no-weight-grad", "RMSNorm weight gradient dropped", "Unsloth kernels"},
      {Bug::softcap_grad_missing, "softcap-grad-missing", "attention softcap's derivative omitted in the backward",
       "flash-attn 2.6.0/2.6.1"},
      {Bug::logit_softcap_grad_missing, "logit-softcap-grad-missing",
       "final softcap's derivative omitted in the fused loss backward", "a fused softcap + cross-entropy kernel (the same slip as flash-attn 2.6.0, in the loss)"},
      {Bug::rmsnorm_plain_weight, "rmsnorm-plain-weight", "RMSNorm scaled by w instead of (1 + w)",
       "ports reusing a Llama-style RMSNorm (Gemma stores w for a scale of 1 + w)"},
      {Bug::loss_normalised_by_tokens, "loss-normalised-by-tokens",
       "gradients scaled by 1 / (every position of the step) instead of 1 / (its scored targets)",
       "training loops averaging a masked per-token loss over all positions (a mean over the -100 labels too)"},
  }};
  return t;
}

const BugInfo& bug_info(Bug b) { return bug_table()[size_t(b)]; }

std::optional<Bug> bug_from_id(std::string_view id) {
  for (const BugInfo& b : bug_table())
    if (b.id == id) return b.bug;
  return std::nullopt;
}

std::string bug_ids() {
  std::string s;
  for (const BugInfo& b : bug_table()) s += (s.empty() ? "" : ", ") + std::string(b.id);
  return s;
}

std::vector<Bug> parse_bug_list(const std::string& text, const std::string& source) {
  std::vector<Bug> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = text.find(',', pos);
    const std::string id = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (!id.empty()) {
      const std::optional<Bug> b = bug_from_id(id);
      if (!b) fail(source, "unknown bug id '" + id + "' (known: " + bug_ids() + ")");
      out.push_back(*b);
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

}  // namespace gemma
