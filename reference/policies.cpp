// The named precision policies. Each entry says where a trainer stores a value in a low-precision format;
// everything not named stays exact (float64 arithmetic in the reference).
#include "model/errors.hpp"
#include "reference/policy.hpp"

namespace gemma::ref {

Policy policy_f64() { return Policy{}; }

// HF transformers 5 eager attention with the model cast to bf16, PEFT LoRA on top (shared/spec/peers.md):
// every module output is a bf16 tensor; RMSNorm computes in fp32 (x.float(), (1 + w.float())) and casts
// once at the end; RoPE's inverse frequencies and angles are fp32 and cos/sin are cast to bf16 before the
// rotation; the attention softmax runs in fp32 and is cast back to bf16; the final softcap runs in bf16 ops
// and the loss upcasts to fp32. PEFT keeps adapter weights in fp32 (autocast_adapter_dtype) and computes
// the adapter branch in fp32 before adding it to the bf16 base output.
Policy policy_hf_bf16() {
  Policy p;
  p.name = "hf-bf16";
  for (Cast c : {Cast::weights, Cast::embed_out, Cast::normalizer, Cast::embed_scaled, Cast::norm_out, Cast::matmul_in,
                 Cast::matmul_out, Cast::rope_cossin, Cast::rope_out, Cast::attn_scores, Cast::attn_capped,
                 Cast::attn_probs, Cast::attn_out, Cast::gelu, Cast::geglu, Cast::residual, Cast::logits,
                 Cast::logits_capped, Cast::grad_act})
    p[c] = DType::bf16;
  for (Cast c : {Cast::norm_in, Cast::norm_normed, Cast::norm_scale, Cast::lora_mid, Cast::lora_out, Cast::rope_inputs,
                 Cast::rope_angle, Cast::loss, Cast::grads, Cast::adapters, Cast::optimizer_state})
    p[c] = DType::f32;
  return p;
}

// Placeholder until fast/ defines its cast points: the CUDA trainer's policy is kept in sync with its
// kernels there (see fast/README.md).
Policy policy_fast() {
  Policy p = policy_hf_bf16();
  p.name = "fast";
  return p;
}

Policy policy_named(const std::string& name) {
  if (name == "f64") return policy_f64();
  if (name == "hf-bf16") return policy_hf_bf16();
  if (name == "fast") return policy_fast();
  fail("--policy", "unknown precision policy '" + name + "' (known: f64, hf-bf16, fast)");
}

}  // namespace gemma::ref
