// The fast CUDA backend as verify and train see it: available or not (with the reason), and its comparison
// with the reference. The fast trainer rounds exactly where the reference's `fast` precision policy does, so
// it is held tightly to that emulation and, more loosely, to float64.
#pragma once
#include <optional>
#include <string>

#include "reference/run.hpp"
#include "check/inputs.hpp"
#include "check/report.hpp"

namespace gemma::check {

// False, with the reason, when this build has no CUDA backend or there is no usable device.
bool fast_available(std::string* why);

struct FastResult {
  double loss = 0;
  int64_t tokens = 0;
  double seconds = 0;
  double peak_device_bytes = 0;
  double loss_fast_policy = 0;  // the reference under the fast policy
};

// Runs the fast backend and the fast-policy reference on the same inputs and adds, per tensor family (loss,
// logits of sampled rows, each adapter gradient), a check against the fast-policy reference and, when
// `f64` is given, one against float64 with a tolerance derived from the fast policy's own distance to it.
FastResult compare_fast(Report& r, const std::string& prefix, const Inputs& in, Softcap sc, const ref::Output* f64);

}  // namespace gemma::check
