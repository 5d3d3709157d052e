// Optimizer settings every trainer shares (the reference's reference/adamw.hpp and the fast trainer's
// fast/adamw.cuh implement them): torch.optim.AdamW's hyperparameters.
#pragma once

namespace gemma {

struct AdamWConfig {
  double lr = 1e-4;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // decoupled: the weight is scaled by (1 - lr weight_decay) before the Adam update
};

}  // namespace gemma
