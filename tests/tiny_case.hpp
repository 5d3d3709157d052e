// The smallest model with every structural feature a reader checks (two layers of both kinds, grouped KV
// heads, both caps, a sliding window): the bad-input catalogue corrupts it, and the fuzzers start from it.
// Small enough that a whole case file is a few kilobytes, so a fuzzer's mutations land on structure.
#pragma once
#include "model/casefile.hpp"
#include "model/synthetic.hpp"

namespace gemma::test {

inline Config tiny_config() {
  Config c;
  c.vocab_size = 8;
  c.hidden_size = 4;
  c.intermediate_size = 6;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 2;
  c.query_pre_attn_scalar = 3;
  c.sliding_window = 2;
  c.attn_logit_softcapping = 50.0;
  c.final_logit_softcapping = 30.0;
  c.max_position_embeddings = 16;
  c.layer_types = {LayerType::sliding, LayerType::full};
  return c;
}

inline AdapterConfig tiny_adapter(int64_t r = 2) {
  AdapterConfig a;
  a.r = r;
  a.lora_alpha = 4;
  a.target_modules = {Proj::q_proj, Proj::v_proj};
  return a;
}

// A valid case: B = 2 sequences of T = 4 tokens, synthetic bf16 weights, optionally LoRA adapters.
inline CaseFile tiny_case(bool adapters = false, uint64_t seed = 3) {
  CaseFile cf;
  cf.model.config = tiny_config();
  cf.model.weights = synthetic_weights(cf.model.config, seed);
  if (adapters) {
    cf.model.adapter = tiny_adapter();
    TensorMap a = synthetic_adapters(cf.model.config, *cf.model.adapter, seed);
    cf.model.weights.insert(a.begin(), a.end());
  }
  cf.batch = synthetic_batch(cf.model.config, 2, 4, seed, 0.0);
  return cf;
}

}  // namespace gemma::test
