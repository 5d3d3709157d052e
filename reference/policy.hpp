// How a run's numerics differ from exact float64 HF semantics: a precision policy (the cast points where a
// low-precision trainer rounds a value to its storage format) and semantic switches (the known variants and
// bugs of docs/model.md). The reference always computes in its scalar type; a cast rounds exactly
// (dtype.hpp) and the arithmetic carries on in float64, so the reference reproduces a trainer's rounding
// decisions without its accumulation order.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/bugs.hpp"
#include "model/config.hpp"
#include "model/dtype.hpp"

namespace gemma::ref {

enum class Cast : uint8_t {
  weights,         // base weights as loaded
  embed_out,       // embedding rows after the lookup
  normalizer,      // sqrt(hidden_size)
  embed_scaled,    // embedding times normalizer: the residual stream's first value
  norm_in,         // RMSNorm input as the norm sees it
  norm_normed,     // x * rsqrt(mean(x^2) + eps) before the (1 + w) multiply
  norm_scale,      // (1 + w)
  norm_out,        // RMSNorm output
  matmul_in,       // activations entering q/k/v/o/gate/up/down (and their adapters)
  matmul_out,      // outputs of those products
  lora_mid,        // x A^T inside an adapter
  lora_out,        // s (x A^T) B^T, the adapter's contribution before it is added to the base output
  rope_inputs,     // positions and inverse frequencies
  rope_angle,      // position * inv_freq
  rope_cossin,     // cos and sin tables
  rope_out,        // rotated q and k
  attn_scores,     // scale * q.k, before the cap
  attn_capped,     // after the cap
  attn_probs,      // softmax output
  attn_out,        // P v
  gelu,            // gelu(gate)
  geglu,           // gelu(gate) * up
  residual,        // residual stream after each add
  logits,          // LM-head output before the final cap
  logits_capped,   // after the final cap
  loss,            // the running sum of per-token losses
  grad_act,        // activation gradients passed between operations in the backward
  grads,           // weight gradients as returned
  adapters,        // LoRA weights as stored
  optimizer_state, // AdamW moments
  softcap_steps,   // inside either softcap: x / c and tanh(x / c), stored before the multiply by c (HF eager's
                   // three tensor ops); untouched (f64) where a trainer computes c tanh(x / c) in one go
  count
};
inline constexpr int kNumCasts = int(Cast::count);
const char* cast_name(Cast c);

// The jitter that stands for fp32 accumulation: a value an fp32 trainer hands to a rounding differs from
// float64's by about one fp32 ulp, 2^-23 relative.
inline constexpr double kFp32Jitter = 0x1p-23;
// The push of Policy::jitter_toward_boundary: 4 fp32 ulps, what a tensor core's truncating accumulation may lose
// over 8 steps of 16 products (accum_noise, gemma2.hpp), a projection over 128 inputs. Measured on gemma2-odd
// (2026-11-30): at 2^-23 correct stand-ins under unseen seeds still failed at up to 5.7 x, at 2^-21 none above 0.6.
inline constexpr double kBoundaryJitter = 0x1p-21;
// The key block of Policy::attn_probs_blockwise: keys [64 n, 64 n + 64) share a running maximum. fast/'s forward
// kernels step over keys in tiles of this size (or pairs of 32-key steps), aligned to it.
inline constexpr int64_t kAttnKeyBlock = 64;

struct Policy {
  std::string name = "f64";
  std::array<DType, kNumCasts> fmt{};  // f64 everywhere: no rounding
  // Relative size of a deterministic +-perturbation applied to every value just before it is rounded (0: none).
  // A trainer accumulating in fp32 hands its roundings values that differ from float64's by about this much;
  // running the policy with and without it measures how far such differences alone can move the results
  // (verify uses it to derive the fast backend's tolerance).
  double jitter = 0;
  uint64_t jitter_seed = 0;  // which +- pattern: runs with different seeds are equally valid fp32 trainers
  // Instead of a pseudo-random sign, move every value toward the rounding boundary nearer to it: the correct
  // trainer whose every rounding that fp32-sized differences can flip went the other way. Random signs flip only
  // some of those, and which ones decides how far a result moves: one flipped rounding in a rank-r adapter
  // bottleneck shifts a whole row downstream, so random seeds' spreads differed 17-fold on the same layer
  // (measured on gemma2-odd, 2026-11-30). This variant bounds that lottery in one run.
  bool jitter_toward_boundary = false;
  // Tensor-core accumulation (0: off, 1: on): every long product (projections, the LM head, the adapters' inner
  // products) moves each output by a pseudo-random amount within what a GPU's fp32 accumulation may lose, up to
  // one fp32 ulp of the running sum per step of 16 products (gemma2.hpp, accum_noise); so do the attention
  // backward's sums (dP, the row's sum D, dq, dk, dv: attention_backward). The jitter above perturbs
  // a value relative to itself, which is what an fp32 trainer differs by after a short sum; after thousands of
  // accumulation steps over cancelling terms (the LM head's backward sums 256000 of them) a correct GPU result is
  // further away, and only this models it.
  double accum_jitter = 0;
  // The forward's P V rounds each weight against the row's running maximum over kAttnKeyBlock-key blocks instead of
  // after the softmax: w_j = bf16(exp(z_j - m_b)) exp(m_b - m) / l, m_b the largest visible capped score of the
  // blocks up to j's, m and l the row's maximum and sum (attention_forward). A one-pass kernel (FlashAttention's
  // schedule, blocks in ascending order) computes exactly these roundings, since its running maximum at a block is
  // m_b; HF's order (bf16(exp(z - m) / l)) needs the row's final m and l first, a second pass over the keys. The
  // block's largest weight is exp(0) = 1, exact, so an fp32 error in a score moves single weights, never the
  // rounding of a whole row (an integer anchor did: docs/fast.md). The backward's P keeps HF's form, as the kernels
  // recompute it from the saved m and l.
  bool attn_probs_blockwise = false;
  DType& operator[](Cast c) { return fmt[size_t(c)]; }
  DType operator[](Cast c) const { return fmt[size_t(c)]; }
  bool exact() const;
};

// Departures from the model's definition: the switches behind the bug ids of model/bugs.hpp that are not a cast.
struct Semantics {
  bool gelu_exact = false;               // gelu-exact: erf GELU instead of the tanh approximation
  std::optional<double> query_pre_attn_scalar;  // qpas-head-dim: overrides the config's
  bool sliding_odd_layers = false;       // sliding-odd-layers: window on odd layers instead of even
  int64_t window_extra = 0;              // sliding-off-by-one: the window admits W + 1 keys
  bool no_sliding_window = false;        // no-sliding-window: every layer global
  bool padded_vocab_unmasked = false;    // padded-vocab-unmasked: padded LM-head columns left in the softmax
  bool rmsnorm_no_weight_grad = false;   // rmsnorm-no-weight-grad: RMSNorm weight gradients dropped
  bool rmsnorm_plain_weight = false;     // rmsnorm-plain-weight: gain w instead of 1 + w
  bool attn_softcap_grad_missing = false;   // softcap-grad-missing: attention cap's derivative omitted
  bool logit_softcap_grad_missing = false;  // logit-softcap-grad-missing: final cap's derivative omitted
  bool grad_accum_mean_of_means = false;   // grad-accum-mean-of-means: per-micro-batch means averaged
  bool loss_normalised_by_tokens = false;  // loss-normalised-by-tokens: gradients over every position, not targets
  bool operator==(const Semantics&) const = default;
};

struct Numerics {
  Policy policy;
  Semantics semantics;
};

// Named policies (policies.cpp):
Policy policy_f64();      // no rounding anywhere: the float64 reference itself
Policy policy_hf_bf16();  // HF transformers eager + PEFT with the model in bf16 (adapters kept in fp32)
Policy policy_fast();     // exactly the cast points of the CUDA trainer in fast/
// By name: "f64", "hf-bf16", "fast"; throws InputError for another name.
Policy policy_named(const std::string& name);

// Makes a run commit bug `b` of model/bugs.hpp: on top of a correct run (`n` its numerics, `s` its caps), the one
// deviation the bug is. Returns why the bug cannot change this model, or "" when it can: a cast the policy
// already makes at that precision, a cap the run does not apply, a wrong value that equals the right one
// (qpas-head-dim with query_pre_attn_scalar == head_dim == hidden_size / num_attention_heads), no sliding layer.
// What depends on the batch (sequences longer than the window, unequal micro-batches, a padded head) is the
// caller's to judge.
std::string apply_bug(Bug b, const Config& c, Numerics& n, Softcap& s);

}  // namespace gemma::ref
