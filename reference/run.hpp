// The float64 reference as the tools use it: one call gives the mean loss, the gradients of the trainable
// weights by name, and optionally the logits; a directional finite-difference check tests the backward pass
// against the forward pass on any input.
#pragma once
#include <vector>

#include "reference/gemma2.hpp"

namespace gemma::ref {

struct Output {
  double loss = 0;      // mean over scored targets
  int64_t tokens = 0;   // scored targets
  TensorMap grads;      // float64, named like the weights (adapters only, when the checkpoint has them)
  std::vector<double> logits;  // (B, T, V) after the final cap, when asked for
};

// Forward and backward on one batch, split into micro-batches of `micro_rows` sequences (0: one batch);
// gradients are normalised by the whole batch's target count.
Output run(const Checkpoint& ck, const Batch& batch, const RunOptions& opt, int64_t micro_rows = 0);

struct DirectionalCheck {
  double analytic = 0;  // g . u from the backward pass
  double numeric = 0;   // the best extrapolated central difference of the forward loss along u
  double rel_err = 0;   // |numeric - analytic| / |analytic|
  double fd_err = 0;    // that estimate's own error (the extrapolation tableau's), relative to the smaller of
                        // |analytic| and |numeric| (run.cpp says why)
  double step = 0;      // the step h of the best estimate
  int64_t passes = 0;   // forward passes spent
  int64_t tensors = 0;  // trainable tensors in the direction
  bool not_smooth = false;  // the loss's second differences shrank like h, not h^2 (run.cpp): a kink below the steps
};

// u is every trainable tensor's gradient scaled to unit norm, so each tensor weighs the same: a tensor whose
// gradient is wrong by a factor (1 + e) moves the result by about e / (number of tensors).
// The derivative along u comes from central differences at steps h0, h0/2, h0/4, ... extrapolated by
// Richardson's rule into a tableau (Ridders' method: Numerical Recipes, 3rd ed., 5.7): each new step adds a row
// of ever higher-order estimates and an error estimate for each (never below the loss's float64 rounding over the
// step), and the best estimate is kept. It stops once the error estimate is below `target` (relative to the smaller
// of |analytic| and the estimate), once the newest row's error is the rounding's (rounding has taken over), or after
// `max_halvings` halvings of the step. Where the second differences L(h) - 2 L(0) + L(-h) shrink like h rather
// than h^2 around the best row (a kink in the loss below every step), the estimate's error is at least the
// one-sided slopes' disagreement and `not_smooth` is set. The first step is 1e-4 of the rms parameter and at most 1e-2 of the smallest
// nonzero tensor's norm. On ordinary inputs three steps resolve the derivative to ~1e-11; sharply peaked attention
// (scores spread over hundreds, no cap) and tiny caps need smaller steps.
DirectionalCheck directional_check(const Checkpoint& ck, const Batch& batch, const RunOptions& opt, const TensorMap& grads,
                                   double target = 1e-9, int max_halvings = 10);

}  // namespace gemma::ref
