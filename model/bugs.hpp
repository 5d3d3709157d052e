// The known Gemma 2 bugs and variants, one id each. The reference's switches (reference/policy.hpp), the fast
// trainer's fault switches (GEMMA_FAST_FAULT, fast/device.hpp) and verify diagnose's rows all name a bug by
// its id here, so that one bug has one name everywhere (docs/model.md, "Known bugs").
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace gemma {

enum class Bug : uint8_t {
  normalizer_exact,            // embedding normalizer sqrt(D) not rounded to bf16
  rmsnorm_early_downcast,      // RMSNorm's x * rsqrt(...) cast to bf16 before the (1 + w) multiply
  rope_bf16,                   // RoPE positions and angles in bf16
  gelu_exact,                  // erf GELU instead of the tanh approximation
  qpas_head_dim,               // attention scaled by another head size than query_pre_attn_scalar
  sliding_odd_layers,          // window on odd layers instead of even
  sliding_off_by_one,          // window admits W + 1 keys
  no_sliding_window,           // window ignored: every layer global
  no_attn_softcap,             // attention softcap dropped
  no_logit_softcap,            // final softcap dropped
  padded_vocab_unmasked,       // padded vocabulary columns left in the softmax
  grad_accum_mean_of_means,    // each micro-batch normalised by its own target count, then averaged
  rmsnorm_no_weight_grad,      // RMSNorm weight gradients dropped
  softcap_grad_missing,        // attention softcap's derivative omitted in the backward
  logit_softcap_grad_missing,  // final softcap's derivative omitted in the loss backward
  rmsnorm_plain_weight,        // RMSNorm scaled by w instead of (1 + w) (Llama's convention)
  loss_normalised_by_tokens,   // gradients scaled by 1 / (positions of the step) instead of 1 / (scored targets)
  count
};
inline constexpr int kNumBugs = int(Bug::count);

struct BugInfo {
  Bug bug;
  std::string_view id;     // "softcap-grad-missing": the one name used on command lines, in JSON and in docs
  std::string_view what;   // one line
  std::string_view where;  // where it happened in the field
};

// Every bug, in the order of the table above (diagnose prints its rows in this order).
const std::array<BugInfo, kNumBugs>& bug_table();
const BugInfo& bug_info(Bug b);
std::optional<Bug> bug_from_id(std::string_view id);
// "a, b, c": every id, for error messages.
std::string bug_ids();
// A comma-separated list of ids (GEMMA_FAST_FAULT, --variants); throws InputError naming `source` and an unknown id.
std::vector<Bug> parse_bug_list(const std::string& text, const std::string& source);

}  // namespace gemma
