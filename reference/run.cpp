#include "reference/run.hpp"

#include "model/synthetic.hpp"

#include <algorithm>
#include <cmath>

namespace gemma::ref {

Output run(const Checkpoint& ck, const Batch& batch, const RunOptions& opt, int64_t micro_rows) {
  Model<double> m = make_model<double>(ck, opt.numerics.policy);
  Grads<double> g = zero_grads(m);
  Output out;
  std::vector<Batch> micro = micro_rows > 0 ? split_batch(batch, micro_rows) : std::vector<Batch>{batch};
  // The logits come from the step's own forward passes, micro-batch after micro-batch (rows in batch order).
  std::vector<Result<double>> results;
  out.loss = step_loss_and_grads(m, micro, opt, g, opt.keep_logits ? &results : nullptr);
  for (const Result<double>& r : results) out.logits.insert(out.logits.end(), r.logits.data(), r.logits.data() + r.logits.size());
  out.tokens = batch.count_targets();
  for_each_trainable(m, g, [&](const std::string& name, const Shape& shape, const double*, const double* gr, int64_t n) {
    out.grads[name] = tensor_from_doubles(DType::f64, shape, std::vector<double>(gr, gr + n));
  });
  return out;
}

DirectionalCheck directional_check(const Checkpoint& ck, const Batch& batch, const RunOptions& opt, const TensorMap& grads,
                                   double target, int max_halvings) {
  Model<double> m = make_model<double>(ck, opt.numerics.policy);
  Grads<double> dir = zero_grads(m);
  DirectionalCheck r;
  // Direction: per-tensor unit gradients. Step: 1e-4 of the rms parameter magnitude (held to the scale of a tiny
  // tensor, below), far above the ~1e-16 relative rounding of the loss and small enough that Richardson
  // extrapolation leaves an O(h^4) truncation error.
  double analytic = 0, param_sq = 0, smallest_norm = INFINITY;
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
    if (norm > 0) {
      for (int64_t i = 0; i < n; ++i) u[i] = g[size_t(i)] / norm;
      analytic += norm;  // g . (g / |g|)
    } else {
      // A tensor whose gradient is all zero still gets a direction of its own (a fixed pseudo-random unit vector):
      // a backward that wrongly drops a gradient (rmsnorm-no-weight-grad) then contributes 0 to the analytic side
      // while the forward's derivative along it is not 0. A gradient that is truly zero (LoRA A while B = 0) is 0
      // on both sides.
      const uint64_t key = stream_key(0, name);
      double s = 0;
      for (int64_t i = 0; i < n; ++i) {
        u[i] = stream_uniform(key, uint64_t(i));
        s += u[i] * u[i];
      }
      for (int64_t i = 0; i < n; ++i) u[i] /= std::sqrt(s);
    }
    double tensor_sq = 0;
    for (int64_t i = 0; i < n; ++i) tensor_sq += p[i] * p[i];
    if (tensor_sq > 0) smallest_norm = std::min(smallest_norm, std::sqrt(tensor_sq));
    param_sq += tensor_sq;
    param_n += n;
    ++r.tensors;
  });
  r.analytic = analytic;
  // The step moves each tensor by h (its share of u has unit norm). Where a tensor is tiny, a step sized by the
  // whole model's parameters moves it by many times itself, and a tensor that reaches the loss through a
  // scale-invariant RMSNorm (the embedding, o_proj, down_proj) makes the loss curve on the scale of the tensor: the
  // differences then converge, smoothly and confidently, to the slope of a different function. Found by an
  // adversarial probe (2026-12-05): embeddings scaled to 1e-12 with rms_norm_eps 1e-30 gave differences agreeing to
  // 3.6e-6 on 0.0797 where the backward says 2.062 (a correct backward failed). The step is held to 1e-2 of the
  // smallest nonzero tensor's norm; where that is below what the loss's rounding can resolve, the noise floor below
  // makes the check say "unresolved". (An all-zero tensor, LoRA B before training, has no scale to respect; a single
  // tiny row inside an ordinary tensor is the zero-row case the tableau itself reports as unresolved.)
  r.step = std::min(1e-4 * std::sqrt(param_sq / double(std::max<int64_t>(param_n, 1))), 1e-2 * smallest_norm);
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
  // The tableau: row k starts with the central difference at h0 / 2^k; entry j extrapolates away the h^(2j) term
  // (errors of a central difference are even in h). Its error estimate is the larger of its distances to the two
  // lower-order entries it came from.
  // Errors are relative to the derivative, which is |analytic| when the backward is right and the estimate itself
  // when it is not: an error estimate must be small against the smaller of the two. Against |analytic| alone, an
  // estimate that had not converged looked resolved whenever the analytic value dwarfed it: a looked-up all-zero
  // embedding row (pad_token_id null) at the first position keeps the hidden state 0 through every RMSNorm, the
  // backward multiplies by (1 + w) / sqrt(eps) at each (3.0e14 along the direction, agreeing with torch), the loss is
  // that steep only within ~eps^(n/2) of the row, and the central differences at the steps tried doubled with every
  // halving while their tableau claimed an error of 1.4e-11 of 3.0e14 (test_gate,
  // Gate.FiniteDifferencesSayUnresolvedWhereTheyCannotResolve; now 0.49: unresolved). An estimate within 100 x its
  // rounding noise of 0 is measured against |analytic| (absolute when every gradient is zero), so that a backward
  // giving a gradient where the loss has none still fails.
  const double h0 = r.step, scale = r.analytic != 0 ? std::fabs(r.analytic) : 1.0;
  std::vector<std::vector<double>> a;
  double best = 0, best_err = INFINITY, best_h = h0;
  int best_k = 0;
  const double at_theta = loss_at(0);
  r.passes += 1;
  double loss_mag = std::fabs(at_theta);  // |loss| near theta: the scale of its float64 rounding
  std::vector<double> second;             // L(h) - 2 L(0) + L(-h) of each row
  // The loss's rounding noise on a difference over 2h (1e-14 relative for a summed float64 loss), and the
  // derivative's size against which an entry v at step h has its error measured (the comment above says why).
  // With every gradient zero (scale 1) errors are absolute: an estimate of 0 within the noise then agrees.
  const auto noise_at = [&](double h) { return 1e-14 * loss_mag / h; };
  const auto magnitude = [&](double v, double h) {
    return r.analytic == 0 ? scale : std::min(scale, std::max(std::fabs(v), 100 * noise_at(h)));
  };
  for (int k = 0; k <= max_halvings; ++k) {
    const double h = h0 / double(int64_t(1) << k);
    const double up = loss_at(h), down = loss_at(-h);
    loss_mag = std::max({loss_mag, std::fabs(up), std::fabs(down)});
    second.push_back(up - 2 * at_theta + down);
    std::vector<double> row{(up - down) / (2 * h)};
    r.passes += 2;
    const double noise = noise_at(h);
    double row_best_abs = INFINITY;  // the newest row's smallest absolute error estimate
    double f = 1;
    for (int j = 1; j <= k; ++j) {
      f *= 4;
      row.push_back((f * row[size_t(j - 1)] - a[size_t(k - 1)][size_t(j - 1)]) / (f - 1));
      const double v = row[size_t(j)];
      // No entry is surer than the rounding of the differences it is made of: tableau entries that agree because
      // the loss did not change at all within its rounding (a final cap of 1e-6 saturates it; all entries 0) are not
      // an estimate of error 0.
      const double d = std::max({std::fabs(v - row[size_t(j - 1)]), std::fabs(v - a[size_t(k - 1)][size_t(j - 1)]), noise});
      const double e = d / magnitude(v, h);
      row_best_abs = std::min(row_best_abs, d);
      if (e < best_err) {
        best_err = e;
        best = v;
        best_h = h;
        best_k = k;
      }
    }
    a.push_back(std::move(row));
    // Three steps make the first error estimate of a fourth-order value (what the check always did); beyond them,
    // stop when resolved, or when rounding has taken over: the newest row's best error is within 4 x the noise the
    // loss's rounding puts on a difference at this step (a summed float64 loss is good to about 1e-14 relative; over
    // 2h that is 1e-14 |L| / h). Every later row has twice the noise, so it cannot do better. A row that is worse
    // than an earlier one far above that noise says the step is not yet small enough for the extrapolation (a
    // sharply curved loss: peaked attention under a cap, a small final cap), and the halving goes on. Two earlier
    // rules stopped there and left an estimate whose error was underestimated, failing correct code: 8.8e-5
    // estimated against 4.6e-4 actual (peaked attention under a cap), and 3.5e-6 against 4.2e-5 (an attention cap
    // of 1e-6, where a rule "the best is within 1e4 of the noise" fired while the newest row was 7000 x the noise;
    // three more halvings resolve it to 5e-8).
    if (k >= 2 && (best_err <= target || row_best_abs <= 4 * noise)) break;
  }
  // Smoothness at the steps' scale. Richardson's rule assumes L(h) - L(-h) is a series in odd powers of h, and
  // then so is L(h) - 2 L(0) + L(-h) = h^2 L'' + O(h^4) in even ones: it shrinks 4-fold per halving. A loss with a
  // kink at a scale below every step (|L(h) - L(0)| growing like a |h| + b h) has central differences that converge,
  // confidently, to b, while its derivative at theta, the backward's, is set below the kink. Found by an adversarial
  // probe (2026-12-05): an all-zero embedding makes every hidden state 0, each RMSNorm multiplies by
  // (1 + w) / sqrt(eps), the loss is linear only within far below any resolvable step, and the differences
  // converged to 0.0193 (error estimate 1e-5) against the backward's exact 0, failing correct code. Its second
  // differences shrank 2.0-2.4-fold per halving (smooth losses printed: 4.0 at the best row); with eps 1e-4 and two
  // layers they stayed constant (a jump below the steps). Two consecutive ratios between 0 and 3 at the best row,
  // with the second differences far above their rounding, say the loss is not smooth there: the differences are
  // then no estimate of the derivative at all (the one-sided slopes disagree by S / h, which need not shrink with
  // h), and the check cannot resolve it. fd_err records that disagreement, a lower bound on the estimate's error.
  if (best_k >= 2) {
    const double s_noise = 4e-14 * loss_mag;
    bool kink = true;
    for (int k = best_k - 2; k <= best_k; ++k) kink = kink && std::fabs(second[size_t(k)]) > 100 * s_noise;
    for (int k = best_k - 1; k <= best_k; ++k) {
      const double ratio = second[size_t(k - 1)] / second[size_t(k)];
      kink = kink && ratio > 0 && ratio < 3;
    }
    if (kink) {
      r.not_smooth = true;
      best_err = std::max(best_err, std::fabs(second[size_t(best_k)]) / (2 * best_h) / magnitude(best, best_h));
    }
  }
  r.numeric = best;
  r.step = best_h;
  r.rel_err = std::fabs(r.numeric - r.analytic) / scale;
  r.fd_err = best_err;
  return r;
}

}  // namespace gemma::ref
