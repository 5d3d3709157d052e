// The named precision policies. Each entry says where a trainer stores a value in a low-precision format;
// everything not named stays exact (float64 arithmetic in the reference).
#include "model/errors.hpp"
#include "reference/policy.hpp"

namespace gemma::ref {

Policy policy_f64() { return Policy{}; }

// HF transformers 5 eager attention with the model cast to bf16, PEFT LoRA on top (docs/benchmarks.md):
// every module output is a bf16 tensor; RMSNorm computes in fp32 (x.float(), (1 + w.float())) and casts
// once at the end; RoPE's inverse frequencies and angles are fp32 and cos/sin are cast to bf16 before the
// rotation; the attention softmax runs in fp32 and is cast back to bf16; the final softcap runs in bf16 ops
// and the loss upcasts to fp32. PEFT keeps adapter weights in fp32 (autocast_adapter_dtype) and computes
// the adapter branch in fp32 before adding it to the bf16 base output. Both softcaps are three bf16 tensor ops in
// HF eager (x / c, tanh, * c), each rounded: Cast::softcap_steps. Measured with tools/gemma2_torch.py (HF eager's
// ops in plain torch, bf16, CPU) on gemma2-tiny: with the final cap rounded once instead, HF's loss sat 3.7e-4
// relative from this policy's, 4.6 x the spread of correct variants; with the steps rounded, 1.8e-5
// (docs/torch.md). What remains between HF eager and this policy is listed there.
Policy policy_hf_bf16() {
  Policy p;
  p.name = "hf-bf16";
  for (Cast c : {Cast::weights, Cast::embed_out, Cast::normalizer, Cast::embed_scaled, Cast::norm_out, Cast::matmul_in,
                 Cast::matmul_out, Cast::rope_cossin, Cast::rope_out, Cast::attn_scores, Cast::attn_capped,
                 Cast::attn_probs, Cast::attn_out, Cast::gelu, Cast::geglu, Cast::residual, Cast::logits,
                 Cast::logits_capped, Cast::softcap_steps, Cast::grad_act})
    p[c] = DType::bf16;
  for (Cast c : {Cast::norm_in, Cast::norm_normed, Cast::norm_scale, Cast::lora_mid, Cast::lora_out, Cast::rope_inputs,
                 Cast::rope_angle, Cast::loss, Cast::grads, Cast::adapters, Cast::optimizer_state})
    p[c] = DType::f32;
  return p;
}

// The CUDA trainer in fast/ (fast/README.md lists the kernel behind each entry). bf16: the base weights, the
// embedding table and its normalizer (48.0, 59.75, 68.0), every product input (norm outputs feeding a product,
// the attention output, GeGLU's output) and output, rotated q and k, the attention probabilities (the P of
// P V, rounded after normalising, as the reference orders it), and every activation gradient passed between
// kernels. fp32: the residual stream (so the embedding product and the post-norm residual adds round to fp32),
// everything inside RMSNorm, RoPE's tables (built in float64 and rounded once), attention scores before and after
// the cap, GELU, the logits before and after the final cap, the adapter branch (its products run on the exact
// three-way bf16 split of the fp32 values), gradients, adapters and AdamW moments. The loss's running sum is
// float64 (per-token fp32 losses summed in double on the host). What remains between the two is fp32 arithmetic:
// accumulation order, and fp32 exp/tanh/division in place of the reference's float64 ones.
Policy policy_fast() {
  Policy p;
  p.name = "fast";
  for (Cast c : {Cast::weights, Cast::embed_out, Cast::normalizer, Cast::matmul_in, Cast::matmul_out, Cast::rope_out,
                 Cast::attn_probs, Cast::attn_out, Cast::geglu, Cast::grad_act})
    p[c] = DType::bf16;
  for (Cast c : {Cast::embed_scaled, Cast::norm_in, Cast::norm_normed, Cast::norm_scale, Cast::norm_out, Cast::lora_mid,
                 Cast::lora_out, Cast::rope_inputs, Cast::rope_angle, Cast::rope_cossin, Cast::attn_scores,
                 Cast::attn_capped, Cast::gelu, Cast::residual, Cast::logits, Cast::logits_capped, Cast::grads,
                 Cast::adapters, Cast::optimizer_state})
    p[c] = DType::f32;
  p.attn_probs_blockwise = true;  // one pass over the keys (fast/attention_sm90.cuh, attention.cuh)
  return p;  // Cast::loss stays f64
}

Policy policy_named(const std::string& name) {
  if (name == "f64") return policy_f64();
  if (name == "hf-bf16") return policy_hf_bf16();
  if (name == "fast") return policy_fast();
  fail("--policy", "unknown precision policy '" + name + "' (known: f64, hf-bf16, fast)");
}

}  // namespace gemma::ref
