// The learning-rate schedules of HF transformers (optimization.py) and torch's gradient clipping by global norm,
// exactly as they compute them in float64 (Python floats).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <vector>

#include "model/errors.hpp"

namespace gemma::train {

enum class Scheduler { linear, cosine, constant, constant_with_warmup };

inline Scheduler parse_scheduler(const std::string& s) {
  if (s == "linear") return Scheduler::linear;
  if (s == "cosine") return Scheduler::cosine;
  if (s == "constant") return Scheduler::constant;
  if (s == "constant_with_warmup") return Scheduler::constant_with_warmup;
  fail("--lr-scheduler", "'" + s + "' is not one of linear, cosine, constant, constant_with_warmup");
}
inline const char* scheduler_name(Scheduler s) {
  switch (s) {
    case Scheduler::linear: return "linear";
    case Scheduler::cosine: return "cosine";
    case Scheduler::constant: return "constant";
    case Scheduler::constant_with_warmup: return "constant_with_warmup";
  }
  return "?";
}

struct Schedule {
  Scheduler kind = Scheduler::linear;
  double lr = 1e-4;            // the peak (HF's learning_rate)
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;     // HF's num_training_steps
};

// HF's lr_lambda at scheduler step `current` (0-based: the number of scheduler.step() calls so far).
inline double lr_lambda(const Schedule& s, int64_t current) {
  const double cur = double(current), warm = double(s.warmup_steps), total = double(s.total_steps);
  switch (s.kind) {
    case Scheduler::constant: return 1.0;
    case Scheduler::constant_with_warmup:
      return current < s.warmup_steps ? cur / std::max(1.0, warm) : 1.0;
    case Scheduler::linear:
      if (current < s.warmup_steps) return cur / std::max(1.0, warm);
      return std::max(0.0, (total - cur) / std::max(1.0, total - warm));
    case Scheduler::cosine: {
      if (current < s.warmup_steps) return cur / std::max(1.0, warm);
      const double progress = (cur - warm) / std::max(1.0, total - warm);
      const double num_cycles = 0.5;  // HF's default: half a cosine, from the peak to 0
      return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * num_cycles * 2.0 * progress)));
    }
  }
  return 1.0;
}

// The learning rate optimizer step `step` (1-based) uses. HF's Trainer calls optimizer.step() and then
// lr_scheduler.step(), so step k runs at lambda(k - 1): with warmup the first step has learning rate 0.
inline double lr_at(const Schedule& s, int64_t step) { return s.lr * lr_lambda(s, step - 1); }

// torch.nn.utils.clip_grad_norm_(parameters, max_norm) with norm_type 2: the total norm is the 2-norm of the
// per-tensor 2-norms; every gradient is multiplied by min(1, max_norm / (total + 1e-6)). Returns the total norm
// before clipping (what HF logs as grad_norm). `tensors` are (pointer, count) pairs; max_norm <= 0 only measures.
inline double clip_grad_norm(const std::vector<std::pair<double*, int64_t>>& tensors, double max_norm) {
  double sq = 0;
  for (const auto& [p, n] : tensors) {
    double t = 0;
    for (int64_t i = 0; i < n; ++i) t += p[i] * p[i];
    const double norm = std::sqrt(t);
    sq += norm * norm;
  }
  const double total = std::sqrt(sq);
  if (max_norm > 0) {
    const double coef = std::min(1.0, max_norm / (total + 1e-6));
    // torch multiplies by the clamped coefficient in every case; multiplying by 1.0 changes no bit, so skipping
    // it is the same.
    if (coef < 1.0)
      for (const auto& [p, n] : tensors)
        for (int64_t i = 0; i < n; ++i) p[i] *= coef;
  }
  return total;
}

}  // namespace gemma::train
