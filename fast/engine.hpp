// The CUDA engine behind fast.hpp's run and Trainer: device weights, adapters, optimizer state and the forward /
// backward schedule. A plain C++ header (the CUDA state hides behind a pointer), implemented in engine.cu.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"

namespace gemma::fast {

struct EngineOptions {
  Softcap softcap;
  bool recompute = true;  // one fp32 residual per layer kept; the layer is recomputed in the backward
  bool offload = false;   // those residuals in pinned host memory, copied on a second stream
  int device = 0;         // the CUDA device: every call of the engine makes it current first
  // Synthetic weights only: the base projections quantized to NF4 as QLoRA does (blocksize 64, double
  // quantization) and kept so on the device. A checkpoint brings its own (Checkpoint::nf4).
  bool quantize_nf4 = false;
  // With recompute: each layer also keeps what its attention block and down_proj computed (q|k|v after RoPE, the
  // attention output in fp32, o_proj's and down_proj's outputs, their adapter splits, the RMSNorm 1/rms), so the
  // backward recomputes only the two input norms, gate|up and GeGLU. The same bits as the other modes; about 48 KB
  // more per token and layer at gemma2-9b. Not with offload (InputError).
  bool recompute_mlp_only = false;
  // With recompute: only layers 0 .. recompute_num_layers - 1 are recomputed in the backward (Megatron-LM's "block"
  // method, its name; all but the last of them, whose shared buffers still hold its forward's); the layers after
  // them keep every activation, as without recompute, or with recompute_mlp_only only gate|up's output, from which
  // the backward rebuilds the norms and GeGLU. -1: every layer. Trades memory for time a layer at a time (at
  // gemma2-9b 2 x 1024 about 0.34 GB a layer, 0.12 GB with recompute_mlp_only; n = 1 holds and takes as much as 0);
  // the same bits in every mode. InputError outside -1 .. num_hidden_layers, or other than -1 without recompute.
  int64_t recompute_num_layers = -1;
};

struct AdamWHyper {
  double lr, beta1, beta2, eps, weight_decay;
  double grad_scale = 1.0;  // gradient clipping's coefficient (adamw.cuh, AdamWScalars::grad_scale)
};

class Engine {
 public:
  // Weights from a checkpoint with adapters (the base is frozen). Throws InputError without adapters.
  Engine(const Checkpoint& ck, const EngineOptions& o);
  // Synthetic weights generated on the device, the bits of model/synthetic.hpp's generators.
  Engine(const Config& c, const AdapterConfig& a, uint64_t seed, const EngineOptions& o);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  struct Pass {
    double loss_sum = 0;  // sum of per-target losses
    int64_t tokens = 0;   // scored targets over all micro-batches
    std::map<int64_t, std::vector<float>> logits;  // requested rows of the flattened batch -> capped logits
    int64_t layers_rebuilt = 0;  // layers the backward recomputed, summed over micro-batches (recompute_num_layers)
  };
  // Forward and backward over the micro-batches of one step: adapter gradients are zeroed, then accumulated
  // with every micro-batch scaled by 1 / (the step's scored targets). Waits for the device. `total_targets` > 0
  // replaces the normaliser by the scored targets of a larger step this engine computes a part of (data
  // parallel: fast/data_parallel.hpp); 0 counts those of `micro`.
  Pass forward_backward(const std::vector<Batch>& micro, const std::vector<int64_t>& logit_rows,
                        int64_t total_targets = 0);
  // The fp32 adapter gradients in place on the device (`count` values, in adapters()' order) and the stream the
  // engine works on (a cudaStream_t): for a collective that sums them across GPUs before adamw_step.
  struct GradBuffer {
    float* data;
    int64_t count;
    void* stream;
  };
  GradBuffer grad_buffer();
  void adamw_step(const AdamWHyper& h);  // one optimizer step on the accumulated gradients
  // The 2-norm of every adapter gradient together (float64 sum of squares of the fp32 gradients; deterministic).
  double grad_norm();
  // The gate's probes (fast.hpp, Probe): layer l, the head and the embedding run by the engine's own code on the
  // given micro-batch (positions, documents, padding) and inputs. probe_layer zeroes the adapter gradients; with
  // pins (LayerProbeInput::pins) every operation runs on its inputs' pins, and each output named is the operation's
  // own. probe_head's xf (or empty) is the LM head's input in place of the final norm's own.
  std::map<std::string, std::vector<float>> probe_layer(int64_t l, const Batch& mb, const std::vector<float>& x,
                                                        const std::vector<float>& dy,
                                                        const std::map<std::string, std::vector<float>>& pins);
  std::map<std::string, std::vector<float>> probe_head(const Batch& mb, const std::vector<float>& x,
                                                       const std::vector<float>& xf, float grad_scale);
  std::vector<float> probe_embedding(const Batch& mb);
  void synchronize();

  TensorMap adapters() const;  // fp32, HF names
  TensorMap grads() const;     // fp32, HF names
  size_t peak_bytes() const;
  // Allocates the work buffers of micro-batches of B sequences of T tokens, which are all a step allocates
  // besides the weights (so a step of that shape then fits), and returns true; or, when they do not fit in the
  // device or under the memory limit, frees them and returns false. Replaces the buffers held before; on success
  // peak_bytes restarts from what is held then (a search's failed attempts are no step's peak). `why` gets the
  // out-of-memory message of a failure (device, limit, or pinned host memory for offloaded checkpoints).
  bool reserve(int64_t B, int64_t T, std::string* why = nullptr);
  void set_memory_limit(size_t bytes);  // MemoryTracker::limit; 0: the device's memory
  // EngineOptions::recompute_num_layers for the steps from now on (InputError as at construction); the work
  // buffers are freed, to be sized again for the new layout by the next reserve or step.
  void set_recompute_num_layers(int64_t n);
  // The fewest recomputed layers (the fastest recompute_num_layers) with which micro-batches of B x T fit the
  // memory limit, or the device less 1 GiB for what CUDA and NCCL allocate outside the engine, found by bisection
  // over reserve (memory falls as n grows); the engine keeps that setting with its buffers reserved. OutOfMemory
  // when a step does not fit even with every layer recomputed; InputError without recompute.
  int64_t fit_recompute_num_layers(int64_t B, int64_t T);
  // With GEMMA_FAST_PROFILE=1: device time per step by schedule segment (CUDA events); empty otherwise.
  std::string profile() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gemma::fast
