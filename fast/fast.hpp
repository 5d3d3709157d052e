// The fast CUDA trainer's host API: a plain C++ header (no CUDA types), so that tools built with g++ include it.
// LoRA finetuning of Gemma 2 on the GPU: bf16 storage, fp32 accumulation, cuBLAS products, fused kernels, AdamW
// on the fp32 adapters. Its rounding points are exactly the reference's `fast` precision policy
// (reference/policies.cpp, fast/README.md), so the two agree to fp32 accumulation order.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/errors.hpp"
#include "model/optimizer.hpp"


namespace gemma::fast {

// A CUDA or cuBLAS call failed: the message names the call, the file and the line. A bug or a broken device,
// not bad input.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The device ran out of memory. An InputError (the tools exit 2): the message gives the size asked for, what it
// was for, the free memory, and what to change (micro-batches, sequence length, checkpoint offload).
struct OutOfMemory : InputError {
  using InputError::InputError;
};

// False, with the reason, when there is no usable CUDA device (no driver, no device, or one this build's
// sm_90a code cannot run on).
bool device_available(std::string* why);

struct Options {
  Softcap softcap;
  int64_t micro_batches = 1;        // gradient accumulation: the batch's sequences split into this many parts
  std::vector<int64_t> logit_rows;  // rows n of the flattened (B*T) batch whose capped logits (length V) to return
  bool recompute = true;            // activation checkpointing: keep one residual per layer, recompute the rest
  bool offload = false;             // keep those checkpoints in pinned host memory (needs recompute)
  bool recompute_mlp_only = false;  // also keep each layer's attention-block outputs (EngineOptions)
  int64_t recompute_num_layers = -1;  // only the first N layers checkpointed, the rest keep more (EngineOptions)
};

struct Output {
  double loss = 0;     // mean over scored targets
  int64_t tokens = 0;  // scored targets
  TensorMap grads;     // fp32 gradients of the LoRA adapters, named like the weights (lora_weight_name)
  std::map<int64_t, std::vector<float>> logits;  // row -> capped logits, for Options::logit_rows
  double seconds = 0;                            // forward + backward on the device (weights' upload excluded)
  size_t peak_device_bytes = 0;                  // peak of this run's device allocations
  int64_t layers_rebuilt = 0;  // layer recomputations in the backward, summed over micro-batches (EngineOptions)
};

// Loss and adapter gradients on a validated Checkpoint with adapters (the base is frozen).
Output run(const Checkpoint& ck, const Batch& batch, const Options& opt);

// The gate's questions about one step (check/gate.cpp), answered on one engine: probes of the embedding, of
// single layers and of the head, each fed inputs the gate chooses (the reference's own values at that point, so
// that a wrong kernel shows where it is instead of through the whole model's cascade); then the step itself (loss,
// adapter gradients, logit rows); then the adapters after one AdamW step on those gradients.
struct LayerProbeInput {
  int64_t micro = 0;      // which micro-batch (its positions, documents, padding)
  int64_t layer = 0;
  std::vector<float> x;   // (N, D) residual entering the layer
  std::vector<float> dy;  // (N, D) gradient of the layer's output (bf16 values)
  // The pins: by name (ref::kPinnedOps: xn1, q, k, v after RoPE, att, o, x_mid, xn2, gate, up, act, down; d_gate,
  // d_up, d_o, d_att, dq, dk, dv), (N, width) row-major, the value each operation's successor runs on in place of
  // the operation's own output (the gate's emulation's). Empty: nothing pinned, the layer runs as in a step.
  std::map<std::string, std::vector<float>> pins;
};
struct HeadProbeInput {
  int64_t micro = 0;
  std::vector<float> x;   // (N, D) residual entering the final norm
  std::vector<float> xf;  // (N, D) the LM head's input in place of the final norm's own (bf16 values); empty: none
  double grad_scale = 1;  // 1 / (the step's scored targets)
};
struct GateOutput {
  Output step;
  TensorMap adapters_after_step;                  // fp32, after one AdamW step on step.grads
  std::vector<std::vector<float>> embedding;      // per micro-batch: (N, D) embedding times normalizer
  // Per LayerProbeInput: xn1, q, k, v (after RoPE), att, o, x_mid, xn2, gate, up, act, down, x_out; dx, d_o,
  // d_gate, d_up, d_att, dq, dk, dv, each what its own operation computed (before a pin replaced it); the layer's
  // adapter gradients by name (that micro-batch alone).
  std::vector<std::map<std::string, std::vector<float>>> layers;
  std::vector<std::map<std::string, std::vector<float>>> heads;  // per HeadProbeInput: row_loss, xf (its own), dxf, dx
};
GateOutput gate_run(const Checkpoint& ck, const std::vector<Batch>& micro, const Options& opt, const AdamWConfig& adamw,
                    const std::vector<LayerProbeInput>& layers, const std::vector<HeadProbeInput>& heads);

// gate_run's arguments as the C entry point of libgemma_fast_gate.so takes them (fast/gate_entry.cpp):
//   extern "C" int gemma_fast_gate_run(GateRunArgs* args, char* err, size_t err_len);  // 0: done, else err says why
struct GateRunArgs {
  const Checkpoint* ck;
  const std::vector<Batch>* micro;
  const Options* opt;
  const AdamWConfig* adamw;
  const std::vector<LayerProbeInput>* layers;
  const std::vector<HeadProbeInput>* heads;
  GateOutput* out;
};

struct TrainerOptions {
  bool recompute = true;
  bool offload = false;
  bool recompute_mlp_only = false;
  int64_t recompute_num_layers = -1;  // EngineOptions
  // Synthetic weights only: base projections in NF4 as QLoRA keeps them (EngineOptions::quantize_nf4). From a
  // checkpoint, its own NF4 forms decide (Checkpoint::nf4).
  bool quantize_nf4 = false;
};

class Engine;

// Persistent weights on the device; AdamW (torch.optim.AdamW semantics) on the fp32 adapters.
class Trainer {
 public:
  Trainer(const Checkpoint& ck, const AdamWConfig& adamw, Softcap softcap, TrainerOptions o = {});
  // Synthetic weights generated on the device, bit-identical to model/synthetic.hpp's synthetic_weights and
  // synthetic_adapters for (c, a, seed): a benchmark needs no 18 GB host copy of a 9b model.
  Trainer(const Config& c, const AdapterConfig& a, uint64_t seed, const AdamWConfig& adamw, Softcap softcap,
          TrainerOptions o = {});
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  struct Step {
    double loss;
    int64_t tokens;
    double seconds;
  };
  Step step(const Batch& batch, int64_t micro_batches);  // one optimizer step (gradient accumulation inside)
  TensorMap adapters() const;                           // current fp32 adapter weights, HF names
  size_t peak_device_bytes() const;
  // With the environment variable GEMMA_FAST_PROFILE=1: device time per step by schedule segment; else empty.
  std::string profile() const;
  // For a search of the longest sequence that fits (fast_bench --longest): allocations beyond `bytes` fail as
  // on a device of that size (0: the device's own); reserve says whether a step of B x T fits (Engine::reserve).
  void set_memory_limit(size_t bytes);
  bool reserve(int64_t B, int64_t T, std::string* why = nullptr);
  // The fastest recompute_num_layers with which micro-batches of B x T sequences fit (Engine::
  // fit_recompute_num_layers), kept for the following steps; train and fast_bench --recompute-num-layers auto.
  int64_t fit_recompute_num_layers(int64_t B, int64_t T);

 private:
  std::unique_ptr<Engine> engine_;
  Config config_;
  double lr_, beta1_, beta2_, eps_, weight_decay_;
};

}  // namespace gemma::fast
