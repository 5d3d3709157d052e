#include "synthetic.hpp"

#include <algorithm>
#include <cmath>

namespace gemma {

uint64_t stream_key(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001b3ull;
  return splitmix64(seed ^ splitmix64(h));
}

double synthetic_std(const Config& c, const std::string& name) {
  const double D = double(c.hidden_size);
  auto ends = [&](const char* s) {
    const std::string suf(s);
    return name.size() >= suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0;
  };
  if (name == kEmbedName) {
    // The tied head makes the logit of the input token itself about share * rms(x0) * sqrt(D), where
    // x0 = e * sqrt(D) is the embedding output and share its part of the final residual stream (about a
    // half with two layers, whose post-norms each add rms ~1). rms(x0) = 1 balances x0 against the layers
    // (so the normalizer's rounding shows) and puts that logit near the final cap at real widths; narrow
    // test models scale it up to reach the cap too.
    const double cap = c.final_logit_softcapping.value_or(30.0);
    return std::max(1.0, 1.5 * cap / std::sqrt(D)) / std::sqrt(D);
  }
  if (ends("layernorm.weight") || name == kFinalNormName) return 0.5 / std::sqrt(3.0);  // uniform in +-0.5
  if (ends("q_proj.weight") || ends("k_proj.weight")) {
    // score = scale q.k with q_i ~ std(W) sqrt(D): std(score) = scale sqrt(hd) std(W)^2 D.
    const double cap = c.attn_logit_softcapping.value_or(50.0);
    const double scale = 1.0 / std::sqrt(c.query_pre_attn_scalar);
    return std::sqrt(0.25 * cap / (scale * std::sqrt(double(c.head_dim)) * D));
  }
  if (ends("o_proj.weight")) return 1.0 / std::sqrt(double(c.num_attention_heads * c.head_dim));
  if (ends("down_proj.weight")) return 1.0 / std::sqrt(double(c.intermediate_size));
  return 1.0 / std::sqrt(D);  // v, gate, up
}

namespace {

Tensor generate(const std::string& name, const Shape& shape, double std, uint64_t seed) {
  OwnedTensor o = make_tensor(DType::bf16, shape);
  const uint64_t key = stream_key(seed, name);
  const double half_width = std::sqrt(3.0) * std;  // uniform on [-a, a) has std a / sqrt(3)
  uint16_t* out = o.data<uint16_t>();
  const int64_t n = o.t.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(float(half_width * stream_uniform(key, uint64_t(i))));
  return o.t;
}

}  // namespace

TensorMap synthetic_weights(const Config& c, uint64_t seed) {
  TensorMap m;
  for (const auto& s : base_weight_specs(c)) m[s.name] = generate(s.name, s.shape, synthetic_std(c, s.name), seed);
  return m;
}

TensorMap synthetic_adapters(const Config& c, const AdapterConfig& a, uint64_t seed) {
  TensorMap m;
  for (const auto& s : adapter_weight_specs(c, a)) {
    const bool is_a = s.name.find("lora_A") != std::string::npos;
    // A: unit-scale projections of the input; B: small, so the adapter perturbs rather than replaces. Both
    // from the module's own shape (A is [r, in], B [out, r]): a per-module rank gets its own scale.
    const double std = is_a ? 1.0 / std::sqrt(double(s.shape[1])) : 0.25 / std::sqrt(double(s.shape[1]));
    m[s.name] = generate(s.name, s.shape, std, seed);
  }
  return m;
}

Batch synthetic_batch(const Config& c, int64_t B, int64_t T, uint64_t seed, double ignore_fraction) {
  Batch b;
  b.B = B;
  b.T = T;
  const uint64_t ids = stream_key(seed, "input_ids"), ign = stream_key(seed, "ignore");
  for (int64_t i = 0; i < B * T; ++i) {
    const double u = 0.5 * (stream_uniform(ids, uint64_t(i)) + 1.0);
    b.input_ids.push_back(std::min(c.vocab_size - 1, int64_t(u * double(c.vocab_size))));
  }
  b.labels = b.input_ids;
  for (int64_t i = 0; i < B * T; ++i)
    if (0.5 * (stream_uniform(ign, uint64_t(i)) + 1.0) < ignore_fraction) b.labels[size_t(i)] = kIgnoreIndex;
  if (T >= 2 && b.count_targets() == 0) b.labels[1] = b.input_ids[1];
  return b;
}

}  // namespace gemma
