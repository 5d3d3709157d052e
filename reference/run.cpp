#include "reference/run.hpp"

#include <algorithm>
#include <cmath>

namespace gemma::ref {

Output run(const Checkpoint& ck, const Batch& batch, const RunOptions& opt, int64_t micro_rows) {
  Model<double> m = make_model<double>(ck, opt.numerics.policy);
  Grads<double> g = zero_grads(m);
  Output out;
  std::vector<Batch> micro = micro_rows > 0 ? split_batch(batch, micro_rows) : std::vector<Batch>{batch};
  if (opt.keep_logits) {
    // Logits come from a forward pass over the whole batch.
    RunOptions fo = opt;
    Result<double> r = forward_backward<double>(m, batch, fo, 0.0, nullptr);
    out.logits.assign(r.logits.data(), r.logits.data() + r.logits.size());
  }
  RunOptions bo = opt;
  bo.keep_logits = false;
  out.loss = step_loss_and_grads(m, micro, bo, g);
  out.tokens = batch.count_targets();
  for_each_trainable(m, g, [&](const std::string& name, const Shape& shape, const double*, const double* gr, int64_t n) {
    out.grads[name] = tensor_from_doubles(DType::f64, shape, std::vector<double>(gr, gr + n));
  });
  return out;
}

DirectionalCheck directional_check(const Checkpoint& ck, const Batch& batch, const RunOptions& opt, const TensorMap& grads) {
  Model<double> m = make_model<double>(ck, opt.numerics.policy);
  Grads<double> dir = zero_grads(m);
  DirectionalCheck r;
  // Direction: per-tensor unit gradients. Step: 1e-4 of the rms parameter magnitude, far above the
  // ~1e-16 relative rounding of the loss and small enough that Richardson extrapolation leaves an O(h^4)
  // truncation error.
  double analytic = 0, param_sq = 0;
  int64_t param_n = 0;
  for_each_trainable(m, dir, [&](const std::string& name, const Shape&, const double* p, double* u, int64_t n) {
    std::vector<double> g = grads.at(name).to_double();
    // The pad row's gradient omits its lookups by HF's rule (padding_idx), so it is not the loss's
    // derivative: the direction leaves that row alone. Without a padding index (pad_token_id null) every row's
    // gradient is the derivative, and every row is checked.
    if (name == kEmbedName && m.config.pad_token_id) {
      const int64_t D = m.config.hidden_size, pad = *m.config.pad_token_id;
      if (pad >= 0 && pad < m.config.vocab_size) std::fill(g.begin() + pad * D, g.begin() + (pad + 1) * D, 0.0);
    }
    double norm = 0;
    for (int64_t i = 0; i < n; ++i) norm += g[size_t(i)] * g[size_t(i)];
    norm = std::sqrt(norm);
    for (int64_t i = 0; i < n; ++i) {
      param_sq += p[i] * p[i];
      u[i] = norm > 0 ? g[size_t(i)] / norm : 0.0;
    }
    param_n += n;
    if (norm > 0) {
      analytic += norm;  // g . (g / |g|)
      ++r.tensors;
    }
  });
  r.analytic = analytic;
  r.step = 1e-4 * std::sqrt(param_sq / double(std::max<int64_t>(param_n, 1)));
  RunOptions fo = opt;
  fo.keep_logits = false;
  const int64_t tokens = batch.count_targets();
  auto loss_at = [&](double t) {
    // theta + t u, evaluated and restored exactly (the perturbation is undone from a saved copy).
    std::vector<std::vector<double>> saved;
    for_each_trainable(m, dir, [&](const std::string&, const Shape&, double* p, const double* u, int64_t n) {
      saved.emplace_back(p, p + n);
      for (int64_t i = 0; i < n; ++i) p[i] += t * u[i];
    });
    const double l = forward_backward<double>(m, batch, fo, 0.0, nullptr).loss_sum / double(tokens);
    size_t k = 0;
    for_each_trainable(m, dir, [&](const std::string&, const Shape&, double* p, const double*, int64_t n) {
      std::copy(saved[k].begin(), saved[k].end(), p);
      ++k;
      (void)n;
    });
    return l;
  };
  // Central differences at h, h/2, h/4; two Richardson extrapolations (error O(h^4)) whose difference
  // estimates the error left in the finer one. A sharply curved loss (peaked attention) needs that estimate:
  // its h^4 term can exceed any fixed tolerance while the gradient is right.
  const double h = r.step;
  const double d1 = (loss_at(h) - loss_at(-h)) / (2 * h);
  const double d2 = (loss_at(h / 2) - loss_at(-h / 2)) / h;
  const double d4 = (loss_at(h / 4) - loss_at(-h / 4)) / (h / 2);
  const double r1 = (4 * d2 - d1) / 3, r2 = (4 * d4 - d2) / 3;
  r.numeric = r2;
  r.rel_err = std::fabs(r.numeric - r.analytic) / std::fabs(r.analytic);
  r.fd_err = std::fabs(r2 - r1) / std::fabs(r.analytic);
  return r;
}

}  // namespace gemma::ref
