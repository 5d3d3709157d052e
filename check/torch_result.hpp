// verify's judge of a PyTorch implementation's result (tools/torch_case.py: /expected with expected_kind
// "torch-<dtype>"): its loss, logits and trainable gradients against the reference run under the precision policy
// of that dtype (HF eager + PEFT), within 3 x the spread of correct implementations of that policy on the same
// inputs, and against float64; on failure, which known bug's fingerprint the difference carries. docs/torch.md.
#pragma once
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "check/inputs.hpp"
#include "check/report.hpp"
#include "reference/run.hpp"

namespace gemma::check {

// The precision policy a result of kind `expected_kind` (an attribute on /expected) is held to: torch-bf16 is HF
// eager with PEFT in bf16 (policy hf-bf16), torch-fp16 the same casts in float16, torch-fp32 every cast in fp32.
// nullopt for the float64 kinds (compare_expected's). Another torch-* kind is an InputError naming `source`: judged
// as float64 it would fail a correct run for the wrong reason.
std::optional<ref::Policy> torch_result_policy(const std::map<std::string, std::string>& provenance,
                                               const std::string& source);

struct TorchJudgement {
  double worst_ratio = 0;  // the largest value / tolerance of the checks
  std::string worst_check;
  struct Fingerprint {
    std::string id;
    double ratio = 0;  // the difference's projection on the bug's float64 effect over correct variants' largest
  };
  std::vector<Fingerprint> fingerprints;  // on failure only, largest ratio first
  std::string note;  // on failure, when the result is more exact than the policy allows (no fingerprints then)
  nlohmann::json json() const;
};

// Adds the checks of one softcap combination's result `ex` (prefix names the combination); `f64` is the float64
// reference's run of the same combination, with logits.
TorchJudgement judge_torch_result(Report& r, const std::string& prefix, const Inputs& in, Softcap sc,
                                  const Expected& ex, const ref::Policy& policy, const ref::Output& f64);

}  // namespace gemma::check
