#include "check/setting.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>

#include "model/errors.hpp"
#include "model/synthetic.hpp"

namespace gemma::check {

bool gate_companion(const std::string& name) {
  return name == "gemma2-odd" || name == "gemma2-hd128" || name == "gemma2-hd256";
}

bool gate_preset(const std::string& name) {
  return name == "gemma2-2b" || name == "gemma2-9b" || name == "gemma2-27b" || gate_companion(name);
}

namespace {

// A tensor of the synthetic stream (seed, name) with the given std, stored as `dt` (f32: not rounded to bf16).
Tensor drawn(DType dt, const std::string& name, const Shape& shape, double std, uint64_t seed) {
  const uint64_t key = stream_key(seed, name);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = std::sqrt(3.0) * std * stream_uniform(key, uint64_t(i));
  return tensor_from_doubles(dt, shape, v);
}

}  // namespace

void make_gate_setting(Inputs& in, const std::string& preset, uint64_t seed) {
  Config& c = in.model.config;
  Batch& b = in.batch;
  const int64_t T = b.T, B = b.B;
  const bool released = !gate_companion(preset);
  auto path = [&](const std::string& s) { in.paths.push_back(s); };

  // Sliding layers must see sequences longer than their window: shrunk for the gate (the released 4096 would need
  // float64 attention over 4096+ tokens at true widths).
  if (c.sliding_window && *c.sliding_window >= T) {
    const int64_t W = std::max<int64_t>(2, T / 3);
    path("sliding window " + std::to_string(*c.sliding_window) + " shrunk to " + std::to_string(W) +
         " so that sequences of " + std::to_string(T) + " cross it");
    c.sliding_window = W;
  } else if (c.sliding_window) {
    path("sliding window " + std::to_string(*c.sliding_window) + " crossed by sequences of " + std::to_string(T));
  }
  {
    const double r = std::sqrt(double(c.hidden_size));
    char s[160];
    std::snprintf(s, sizeof s, "embedding normalizer sqrt(%lld) = %.6g, %s in bf16 (%.6g)", (long long)c.hidden_size, r,
                  round_to(DType::bf16, r) == r ? "exact" : "not exact", round_to(DType::bf16, r));
    path(s);
  }

  // The head: released presets get Google's JAX layout, 128 nonzero padding rows beyond the 256000-token vocabulary
  // (masked out of the softmax); an odd vocabulary makes a trainer pad its own head to its granule.
  if (released) {
    const int64_t P = 128;
    in.model.weights[kEmbedPaddingName] =
        drawn(DType::bf16, kEmbedPaddingName, {P, c.hidden_size}, synthetic_std(c, kEmbedName), seed);
    path("LM head of " + std::to_string(c.vocab_size + P) + " rows (JAX layout): " + std::to_string(P) +
         " padding rows beyond the vocabulary, masked");
  } else {
    path("vocabulary " + std::to_string(c.vocab_size) + ", not a multiple of 64 or 128: a padded head's extra columns "
         "must be masked");
  }

  // Adapters as they are after some training: fp32 values that no bf16 holds (synthetic adapters are bf16-valued).
  if (in.model.adapter) {
    for (const WeightSpec& w : adapter_weight_specs(c, *in.model.adapter)) {
      const bool is_a = w.name.find("lora_A") != std::string::npos;
      const double sd = is_a ? 1.0 / std::sqrt(double(w.shape[1])) : 0.25 / std::sqrt(double(w.shape[1]));
      in.model.weights[w.name] = drawn(DType::f32, w.name + ":fp32", w.shape, sd, seed);
    }
    path("adapters with fp32 values (not bf16 numbers), A and B nonzero");
  }

  if (released) path(make_trained_like(in.model, 6.0, 0.25, -2.7, 0.5));

  // The batch. Released presets: the first sequence a chunk from deep inside a document (positions up to 4095) with
  // only its last quarter scored, the others packed with three documents each (positions restart, HF's
  // padding-free packing). gemma2-odd: an attention mask with right padding, left padding and none.
  if (released) {
    b.position_ids.assign(size_t(B * T), 0);
    for (int64_t r = 0; r < B; ++r) {
      if (r == 0 && B > 1) {
        const int64_t off = std::max<int64_t>(0, std::min<int64_t>(4096, c.max_position_embeddings) - T);
        for (int64_t t = 0; t < T; ++t) b.position_ids[size_t(t)] = off + t;
        for (int64_t t = 1; t < 3 * T / 4; ++t) b.labels[size_t(t)] = kIgnoreIndex;
        continue;
      }
      const int64_t l1 = std::max<int64_t>(1, 5 * T / 12), l2 = std::max<int64_t>(1, 4 * T / 12);
      for (int64_t t = 0; t < T; ++t)
        b.position_ids[size_t(r * T + t)] = t < l1 ? t : t < l1 + l2 ? t - l1 : t - l1 - l2;
    }
    path("position_ids: " + std::string(B > 1 ? "sequence 0 at positions " + std::to_string(b.position_ids[0]) + ".." +
                                                    std::to_string(b.position_ids[size_t(T - 1)]) + ", the others " : "") +
         "packed with three documents each (attention kept within a document, positions restarting)");
  } else {
    b.attention_mask.assign(size_t(B * T), 1);
    const int64_t right = std::max<int64_t>(1, T / 6), left = std::max<int64_t>(1, T / 8);
    for (int64_t t = T - right; t < T; ++t) b.attention_mask[size_t(t)] = 0;
    if (B > 1)
      for (int64_t t = 0; t < left; ++t) b.attention_mask[size_t(T + t)] = 0;
    for (int64_t i = 0; i < B * T; ++i)
      if (!b.attention_mask[size_t(i)]) b.labels[size_t(i)] = kIgnoreIndex;
    if (B > 1) b.labels[size_t(T + left)] = kIgnoreIndex;  // a padding query predicts nothing
    path("attention_mask: right padding (" + std::to_string(right) + " tokens)" +
         (B > 1 ? ", left padding (" + std::to_string(left) + " tokens; queries that see no key)" : std::string()));
  }
  if (b.count_targets() == 0) fail("gate", "the gate's batch has no scored target (a longer --seq?)");

  // A token whose embedding row is nearly zero, as the unused tokens of a trained vocabulary are: its residual's
  // mean square sits at rms_norm_eps, where the epsilon decides the first RMSNorm's output (with eps added after
  // the square root instead of inside, that row's xn1 moves by 40%; on rows of mean square ~1 the two differ by
  // 5e-7 relative, far below a bf16 ulp, so no other input could show that bug).
  {
    const int64_t row = B - 1, t = b.attention_mask.empty() ? T / 2 : T / 3;  // a real token in every setting
    const int64_t id = b.input_ids[size_t(row * T + t)];
    Tensor& e = in.model.weights.at(kEmbedName);
    const int64_t D = c.hidden_size;
    std::vector<double> v(static_cast<size_t>(D));
    e.to_double(id * D, D, v.data());
    const double normalizer = round_to(DType::bf16, std::sqrt(double(D)));
    double ss = 0;
    for (double x : v) ss += x * normalizer * x * normalizer;
    const double factor = std::sqrt(c.rms_norm_eps) / std::sqrt(ss / double(D));
    for (double& x : v) x *= factor;
    OwnedTensor out = make_tensor(e.dtype, e.shape);
    std::memcpy(out.raw, e.bytes.get(), size_t(e.numel()) * dtype_size(e.dtype));
    const Tensor row_t = tensor_from_doubles(e.dtype, {D}, v);
    std::memcpy(out.raw + id * D * int64_t(dtype_size(e.dtype)), row_t.bytes.get(), size_t(D) * dtype_size(e.dtype));
    e = out.t;
    char s[200];
    std::snprintf(s, sizeof s, "token %lld (sequence %lld, position %lld) with an embedding row scaled to mean square "
                  "rms_norm_eps (%.3g): where RMSNorm's epsilon matters", (long long)id, (long long)row, (long long)t,
                  c.rms_norm_eps);
    path(s);
  }

  // Two micro-batches of different sizes and scored-target counts: gradient accumulation, normalised by the
  // step's total.
  if (B > 1) {
    in.micro_rows = (B + 1) / 2;
    std::string counts;
    for (const Batch& m : split_batch(b, in.micro_rows)) counts += (counts.empty() ? "" : ", ") + std::to_string(m.count_targets());
    path("gradient accumulation over " + std::to_string((B + in.micro_rows - 1) / in.micro_rows) +
         " micro-batches (scored targets " + counts + ")");
  }
}

// Weights shaped like a trained Gemma 2's, and so that the bugs measured on them can show. Synthetic weights as
// drawn give a residual stream dominated by the embedding and logits centred at 0, led by the input token's own
// logit: the layers barely move the loss, so a bug inside them hides under the logits' bf16 rounding, and
// zero-filled padded vocabulary rows (logit 0) take no probability mass, while in a trained LM most logits sit
// below 0 and a zero logit "stays 0 after the cap and steals probability mass" (docs/model.md). So (1) the
// post-attention and post-feedforward norm scales go to about 4, as in the released checkpoints, making the
// layers dominate the residual stream, and (2) every embedding row gets a shared component on one dimension in
// 8, which the final norm's scale (1 + w) maps to -1, shifting the whole vocabulary's logits down by about
// `shift`, and (3) q_proj is scaled by `q_scale`: the drawn weights spread attention scores over about a quarter
// of the cap so that the cap acts, which makes every softmax nearly one-hot (a changed scale or rotation barely
// moves it) and its bf16 noise large; most heads of a trained model are cooler; (4) below.
std::string make_trained_like(Checkpoint& ck, double shift, double q_scale, double gate_mean, double gate_spread) {
  const Config& c = ck.config;
  const int64_t D = c.hidden_size, L = c.num_hidden_layers;
  // Block by block: the 27b embedding is 1.2e9 values, 9.4 GB as one float64 vector.
  auto edit = [&](const std::string& name, const std::function<double(int64_t, double)>& f) {
    Tensor& t = ck.weights.at(name);
    OwnedTensor out = make_tensor(t.dtype, t.shape);
    const int64_t n = t.numel(), block = int64_t(1) << 20;
    std::vector<double> v;
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      const int64_t m = std::min(block, n - i0);
      v.resize(size_t(m));
      t.to_double(i0, m, v.data());
      for (int64_t i = 0; i < m; ++i) v[size_t(i)] = f(i0 + i, v[size_t(i)]);
      const Tensor part = tensor_from_doubles(t.dtype, {m}, v);
      std::memcpy(out.raw + i0 * int64_t(dtype_size(t.dtype)), part.bytes.get(), size_t(m) * dtype_size(t.dtype));
    }
    t = out.t;
  };
  for (int64_t l = 0; l < L; ++l)
    for (Norm n : {Norm::post_attention_layernorm, Norm::post_feedforward_layernorm})
      edit(norm_weight_name(l, n), [](int64_t, double w) { return w + 3.0; });
  // The shared component m on D/8 dimensions shifts a logit by about -(D/8) m^2 sqrt(D) / rms(x_L), where
  // rms(x_L)^2 = r0^2 + (D/8) m^2 + 2L * 16 (the embedding output's drawn part, rms r0 = 1 at the released widths
  // and larger for narrow test models, its shared part, 2L post-norm outputs of scale ~4). With a = (D/8) m^2:
  // a sqrt(D) / sqrt(r0^2 + 32 L + a) = shift, solved by fixed-point iteration.
  const double r0 = synthetic_std(c, kEmbedName) * std::sqrt(double(D));
  double a = 1.0;
  for (int it = 0; it < 50; ++it) a = shift * std::sqrt(r0 * r0 + 32.0 * double(L) + a) / std::sqrt(double(D));
  const double m = std::sqrt(8.0 * a / double(D));
  edit(kEmbedName, [&](int64_t i, double e) { return (i % D) % 8 == 0 ? e + m : e; });
  edit(kFinalNormName, [&](int64_t i, double w) { return i % 8 == 0 ? -2.0 : w; });
  for (int64_t l = 0; l < L; ++l) edit(proj_weight_name(l, Proj::q_proj), [&](int64_t, double w) { return w * q_scale; });
  // (4) A sparse MLP: the gate inputs are centred at gate_mean with the drawn spread scaled by gate_spread, so that
  // most units sit where the tanh and erf GELUs differ most for their size. The two differ by at most 4.7e-4, at
  // x = +-2.70; for x > 0 that is 2e-4 of the output, 3% of a bf16 ulp, and the gelu-exact bug hides in bf16 noise
  // (drawn gates, N(0, 1.2^2): the bf16 run's move along its float64 effect is 0.33x the jitter runs' at 9b
  // widths). Near -2.7 the difference is 10% of the output. Gemma's MLP has no bias, so the offset rides on the
  // shared component: each gate_proj row gets -beta on the shared dimensions. Before layer l's MLP the residual
  // stream holds the embedding output (drawn part r0, shared part a) and 2l + 1 post-norm outputs (scale
  // 4 + U(-0.5, 0.5), mean square 16.08), so the pre-feedforward norm maps a shared value m sqrt(D) to
  // m sqrt(D) (1 + w_j) / rms_l, and a row's offset is -beta times the sum of those over the shared j. The
  // achieved mean is measured in every run and printed: within 0.3 of gate_mean at the released widths (weight
  // seeds 0, the default, 7 and 11); less exact where few shared dimensions carry it (gemma2-tiny: -2.4, -1.5).
  for (int64_t l = 0; l < L; ++l) {
    const std::vector<double> w = ck.weights.at(norm_weight_name(l, Norm::pre_feedforward_layernorm)).to_double();
    double scale_sum = 0;
    for (int64_t j = 0; j < D; j += 8) scale_sum += 1.0 + w[size_t(j)];
    const double rms = std::sqrt(r0 * r0 + a + 16.08 * double(2 * l + 1));
    const double beta = -gate_mean / (m * std::sqrt(double(D)) / rms * scale_sum);
    edit(proj_weight_name(l, Proj::gate_proj),
         [&](int64_t i, double g) { return (i % D) % 8 == 0 ? gate_spread * g - beta : gate_spread * g; });
  }
  char b[1024];  // room for any double the %g and %.0f fields could print
  std::snprintf(b, sizeof b, "trained-like weights: post-norm scales raised by 3, shared embedding component %.4f on every 8th "
                "dimension mapped to -1 by the final norm (logits shifted down by about %.0f), q_proj scaled by %g (attention "
                "scores spread %g times as wide), a sparse MLP (gate_proj offset on the shared dimensions to centre the gate "
                "inputs at about %g, its drawn part scaled by %g)", m, shift, q_scale, q_scale, gate_mean, gate_spread);
  return b;
}


}  // namespace gemma::check
