// The fast CUDA backend as verify and train see it: available or not (with the reason), and its comparison
// with the reference. The fast trainer rounds exactly where the reference's `fast` precision policy does, so
// it is held tightly to that emulation and, more loosely, to float64.
#pragma once
#include <optional>
#include <string>

#include <functional>
#include <memory>

#include "fast/fast.hpp"
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
  double worst_probe = 0;       // the layer-by-layer checks' worst value / tolerance
  std::string worst_probe_where;
};

// The step's micro-batches as verify and the gate run them (Inputs::micro_rows).
std::vector<Batch> micro_batches(const Inputs& in);

// How closely two tensors of one storage format agree element by element (both sides rounded to `fmt` first).
struct Agreement {
  int64_t n = 0, mismatched = 0;  // elements, and those whose stored values differ
  double max_ulp = 0;             // largest distance in units of the format's last place
  double rel_l2 = 0;              // |got - want| / |want| over the tensor, before rounding
  double mismatch_fraction() const { return n ? double(mismatched) / double(n) : 0.0; }
};
Agreement agreement(const std::vector<double>& got, const std::vector<double>& want, DType fmt);

// The fast backend against the reference under the `fast` precision policy (its exact rounding points), on the
// step as the inputs define it (micro-batches, padding, packing), in two ways:
//  - layer by layer: every layer of every micro-batch, and the head, fed the emulation's own inputs, every
//    intermediate compared in its storage format (values differing, relative L2), so a wrong kernel shows where it is;
//  - the whole step: loss, logits of three rows, each adapter gradient, the adapters' update by one AdamW step; and,
//    when `f64` is given, the same against float64.
// Tolerances are 3 x the spread of correct implementations on the same inputs: the reference instantiated in fp32
// arithmetic, and the emulation jittered by +-2^-23 before every rounding.
// What answers the gate's questions (fast.hpp, gate_run): the CUDA trainer in production; a reference run standing
// in for it (a correct implementation, or one with a bug switched on) in the CPU tests of the gate itself.
using GateRunner = std::function<fast::GateOutput(const Checkpoint&, const std::vector<Batch>&, Softcap,
                                                  const std::vector<int64_t>& logit_rows, const AdamWConfig&,
                                                  const std::vector<fast::LayerProbeInput>&,
                                                  const std::vector<fast::HeadProbeInput>&)>;
GateRunner fast_runner();
// The float64 reference under `how` (a precision policy, jitter, a bug's semantics, its own softcap choice) in the
// fast trainer's place.
GateRunner reference_runner(const ref::RunOptions& how);

// Correct implementations of the policy `po` besides its fp32 instance, each a float64 run with its own jitter
// (fast_backend.cpp says which and why); verify's judge of PyTorch results (check/torch_result.cpp) uses them too.
std::vector<ref::RunOptions> correct_variants(const ref::RunOptions& po);

FastResult compare_fast(Report& r, const std::string& prefix, const Inputs& in, Softcap sc, const ref::Output* f64,
                        const GateRunner& runner = {});

// An upper estimate of the memory one softcap combination of verify's reference side needs beyond the weights,
// in bytes: its traces (each layer's activations in float64, for every token) and the head's logits, for the
// float64 run, and with `gate` the gate's six more (the policy traced, its fp32 instance, the variants, the
// layer-by-layer probes); twice that, for what the estimate leaves out. Callers run as many combinations side by
// side as the free memory holds.
double working_set_bytes(const Inputs& in, bool gate);

// compare_fast in its two halves: what the reference side computes (on the CPU, no CUDA call), and the checks of one
// trainer's answers against it. The mutation harness (tools/gate_mutants.cpp) computes the first once and judges
// every mutant with the second, exactly as verify would.
struct GateReference;
// `alongside` (optional) runs among the reference side's tasks, and may be what fills *f64: f64 is read only after
// every task has finished (verify runs its float64 step that way).
std::shared_ptr<const GateReference> gate_reference(const Inputs& in, Softcap sc, const ref::Output* f64,
                                                   const std::function<void()>& alongside = {});
FastResult gate_judge(Report& r, const std::string& prefix, const GateReference& g, const fast::GateOutput& out);
// The inputs a runner is called with for a GateReference.
struct GateQuestions {
  const std::vector<Batch>* micro;
  const std::vector<int64_t>* rows;
  const AdamWConfig* adamw;
  const std::vector<fast::LayerProbeInput>* layers;
  const std::vector<fast::HeadProbeInput>* heads;
};
GateQuestions gate_questions(const GateReference& g);
// The fast trainer (or `runner` in its place) asked gate_reference's questions and judged by gate_judge: compare_fast
// with the reference side computed beforehand (verify computes every softcap combination's side by side).
FastResult judge_fast(Report& r, const std::string& prefix, const Checkpoint& ck, Softcap sc, const GateReference& g,
                      const GateRunner& runner = {});

}  // namespace gemma::check
