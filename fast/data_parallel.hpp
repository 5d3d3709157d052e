// Data-parallel LoRA training over the GPUs of one host, through NCCL. A plain C++ header (no CUDA or NCCL types).
//
// One engine per GPU, each driven by its own host thread. A step's global batch is split by sequences, evenly over
// the GPUs; every GPU scales its micro-batches by 1 / (the scored targets of the whole global batch), so the sum
// of the GPUs' gradients is the one-GPU gradient of that batch, up to the order of the fp32 additions. NCCL's
// all-reduce (sum) of the adapter gradients then leaves the same bits on every GPU, and every GPU applies the same
// AdamW step, so the adapters stay bit-identical across GPUs without a broadcast.
//
// Why no bucketing or overlap with the backward: the adapter gradients are small (LoRA r 32 on all seven
// projections of gemma2-9b: 108M fp32 values, 0.43 GB) and the all-reduce runs over NVLink in a few milliseconds,
// against a step of about a second; its time is measured and reported with every step (Step::allreduce_seconds).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "fast/fast.hpp"
#include "model/checkpoint.hpp"
#include "model/optimizer.hpp"

namespace gemma::fast {

// Number of CUDA devices (0 when there is no usable driver).
int device_count();

class Engine;  // fast/engine.hpp: one GPU's trainer

// What may change from step to step, as HF's Trainer changes it: the learning rate of a schedule, and gradient
// clipping by global norm (torch.nn.utils.clip_grad_norm_; 0: off).
struct StepOptions {
  std::optional<double> lr;  // default: the trainer's AdamWConfig::lr
  double max_grad_norm = 0;
};

class DataParallelTrainer {
 public:
  // Weights from a checkpoint with adapters, copied to each of the first `gpus` devices. InputError when fewer
  // devices exist than asked for, or without adapters.
  DataParallelTrainer(const Checkpoint& ck, int gpus, const AdamWConfig& adamw, Softcap softcap, TrainerOptions o = {});
  // Synthetic weights generated on every device: the same bits on each (model/synthetic.hpp's generators).
  DataParallelTrainer(const Config& c, const AdapterConfig& a, uint64_t seed, int gpus, const AdamWConfig& adamw,
                      Softcap softcap, TrainerOptions o = {});
  ~DataParallelTrainer();
  DataParallelTrainer(const DataParallelTrainer&) = delete;
  DataParallelTrainer& operator=(const DataParallelTrainer&) = delete;

  struct Step {
    double loss;               // mean over the global batch's scored targets
    double grad_norm;          // the all-reduced adapter gradients' global 2-norm, before clipping (HF's grad_norm)
    int64_t tokens;            // scored targets of the global batch
    double seconds;            // the whole step, host wall time, until every GPU is done
    double allreduce_seconds;  // of which the gradients' all-reduce (wall time from its start to its end)
  };
  // One optimizer step on `batch` (B sequences, B a multiple of gpus()): GPU g takes sequences
  // [g B / gpus, (g + 1) B / gpus) in `micro_batches` micro-batches. InputError for a batch that does not split.
  // The gradients are clipped to o.max_grad_norm (when > 0) before AdamW, on every GPU alike.
  Step step(const Batch& batch, int64_t micro_batches, const StepOptions& o = {});
  // Forward and backward only (no optimizer step): the all-reduced gradients, read back from GPU `gpu`.
  Step gradients(const Batch& batch, int64_t micro_batches, TensorMap* grads, int gpu = 0);
  TensorMap adapters(int gpu = 0) const;  // fp32, HF names
  size_t peak_device_bytes() const;       // the largest of the GPUs' peaks
  // The fastest recompute_num_layers with which every GPU fits its micro-batches of B x T sequences (each GPU's
  // own fit, Engine::fit_recompute_num_layers; the largest of them on all), kept for the following steps.
  int64_t fit_recompute_num_layers(int64_t B, int64_t T);
  int gpus() const;

 private:
  void start(const Config& c, int gpus, const AdamWConfig& adamw, Softcap softcap,
             const std::function<std::unique_ptr<Engine>(int)>& make_engine);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gemma::fast
