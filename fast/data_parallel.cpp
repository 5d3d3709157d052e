// fast/data_parallel.hpp: one Engine per GPU, one host thread per GPU and step, NCCL all-reduce of the gradients.
#include "fast/data_parallel.hpp"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <functional>
#include <stdexcept>
#include <thread>

#include "fast/device.hpp"
#include "fast/engine.hpp"

namespace gemma::fast {

namespace {

#define GEMMA_NCCL(call)                                                                                  \
  do {                                                                                                    \
    const ncclResult_t gemma_r_ = (call);                                                                 \
    if (gemma_r_ != ncclSuccess)                                                                          \
      throw CudaError(std::string(#call) + " failed: " + ncclGetErrorString(gemma_r_) + " (" + __FILE__ + \
                      ":" + std::to_string(__LINE__) + ")");                                              \
  } while (0)

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Runs f(g) for every GPU g on its own thread with that GPU current; rethrows the first failure (by GPU order)
// once every thread has finished, so that no thread outlives the engines it uses.
void on_every_gpu(int n, const std::function<void(int)>& f) {
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int g = 0; g < n; ++g)
    threads.emplace_back([&, g] {
      try {
        GEMMA_CUDA(cudaSetDevice(g));
        f(g);
      } catch (...) {
        errors[size_t(g)] = std::current_exception();
      }
    });
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

void check_gpus(int gpus) {
  if (gpus < 1) throw InputError("--gpus: " + std::to_string(gpus) + " is not a number of GPUs (1 or more)");
  const int have = device_count();
  if (gpus > have)
    throw InputError("--gpus: " + std::to_string(gpus) + " GPUs asked for, " + std::to_string(have) +
                     " CUDA device(s) present");
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

struct DataParallelTrainer::Impl {
  Config config;
  AdamWConfig adamw;
  std::vector<std::unique_ptr<Engine>> engines;
  std::vector<ncclComm_t> comms;

  void init_comms() {
    const int n = int(engines.size());
    if (n < 2) return;
    comms.assign(size_t(n), nullptr);
    std::vector<int> devs(static_cast<size_t>(n));
    for (int g = 0; g < n; ++g) devs[size_t(g)] = g;
    GEMMA_NCCL(ncclCommInitAll(comms.data(), n, devs.data()));
  }

  ~Impl() {
    for (ncclComm_t c : comms)
      if (c) (void)ncclCommDestroy(c);
    // Each engine frees its memory with its own device current.
    for (size_t g = 0; g < engines.size(); ++g) {
      (void)cudaSetDevice(int(g));
      engines[g].reset();
    }
  }

  // Sequences [g B / n, (g + 1) B / n) of `batch` for GPU g, in `micro` micro-batches.
  std::vector<std::vector<Batch>> split(const Batch& batch, int64_t micro) const {
    const int64_t n = int64_t(engines.size());
    if (batch.B % n != 0)
      throw InputError("--gpus: the batch's " + std::to_string(batch.B) + " sequences do not split evenly over " +
                       std::to_string(n) + " GPUs");
    const int64_t per = batch.B / n;
    if (micro < 1 || micro > per)
      throw InputError("--micro-batches: " + std::to_string(micro) + " is outside 1.." + std::to_string(per) +
                       " (each GPU has " + std::to_string(per) + " sequences)");
    std::vector<Batch> parts = split_batch(batch, per);
    std::vector<std::vector<Batch>> out;
    for (const Batch& p : parts) out.push_back(split_batch(p, (per + micro - 1) / micro));
    return out;
  }

  // Forward and backward on every GPU, then the all-reduce; returns the step's loss, tokens and the all-reduce's time.
  Step pass(const Batch& batch, int64_t micro) {
    validate_batch(config, batch, "batch");
    const std::vector<std::vector<Batch>> parts = split(batch, micro);
    const int64_t total = batch.count_targets();
    if (total == 0) throw InputError("batch: every label is ignored (-100): the mean loss is undefined (0/0)");
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<double> loss_sum(engines.size(), 0.0);
    on_every_gpu(int(engines.size()), [&](int g) {
      loss_sum[size_t(g)] = engines[size_t(g)]->forward_backward(parts[size_t(g)], {}, total).loss_sum;
    });
    Step s{};
    for (double l : loss_sum) s.loss += l;
    s.loss /= double(total);
    s.tokens = total;
    const auto t1 = std::chrono::steady_clock::now();
    if (engines.size() > 1) {
      // One process drives every GPU: NCCL asks for the ranks' calls inside one group.
      GEMMA_NCCL(ncclGroupStart());
      for (size_t g = 0; g < engines.size(); ++g) {
        const Engine::GradBuffer b = engines[g]->grad_buffer();
        GEMMA_NCCL(ncclAllReduce(b.data, b.data, size_t(b.count), ncclFloat, ncclSum, comms[g],
                                 static_cast<cudaStream_t>(b.stream)));
      }
      GEMMA_NCCL(ncclGroupEnd());
      on_every_gpu(int(engines.size()), [&](int g) { engines[size_t(g)]->synchronize(); });
    }
    s.allreduce_seconds = since(t1);
    s.seconds = since(t0);
    return s;
  }
};

// The two constructors differ only in how each GPU's engine is made.
void DataParallelTrainer::start(const Config& c, int gpus, const AdamWConfig& adamw, Softcap softcap,
                                const std::function<std::unique_ptr<Engine>(int)>& make_engine) {
  check_gpus(gpus);
  check_softcap_available(c, softcap, "fast");
  impl_->config = c;
  impl_->adamw = adamw;
  impl_->engines.resize(size_t(gpus));
  on_every_gpu(gpus, [&](int g) { impl_->engines[size_t(g)] = make_engine(g); });
  impl_->init_comms();
}

DataParallelTrainer::DataParallelTrainer(const Checkpoint& ck, int gpus, const AdamWConfig& adamw, Softcap softcap,
                                         TrainerOptions o)
    : impl_(std::make_unique<Impl>()) {
  start(ck.config, gpus, adamw, softcap, [&](int g) {
    return std::make_unique<Engine>(ck, EngineOptions{.softcap = softcap, .recompute = o.recompute,
                                                      .offload = o.offload, .device = g,
                                                      .recompute_mlp_only = o.recompute_mlp_only,
                .recompute_num_layers = o.recompute_num_layers});
  });
}

DataParallelTrainer::DataParallelTrainer(const Config& c, const AdapterConfig& a, uint64_t seed, int gpus,
                                         const AdamWConfig& adamw, Softcap softcap, TrainerOptions o)
    : impl_(std::make_unique<Impl>()) {
  start(c, gpus, adamw, softcap, [&](int g) {
    return std::make_unique<Engine>(c, a, seed,
                                    EngineOptions{.softcap = softcap, .recompute = o.recompute, .offload = o.offload,
                                                  .device = g, .quantize_nf4 = o.quantize_nf4,
                                                  .recompute_mlp_only = o.recompute_mlp_only,
                .recompute_num_layers = o.recompute_num_layers});
  });
}

DataParallelTrainer::~DataParallelTrainer() = default;

DataParallelTrainer::Step DataParallelTrainer::step(const Batch& batch, int64_t micro_batches, const StepOptions& o) {
  if (!(o.max_grad_norm >= 0) || !std::isfinite(o.max_grad_norm))
    throw InputError("max_grad_norm: must be 0 (no clipping) or positive");
  const auto t0 = std::chrono::steady_clock::now();
  Step s = impl_->pass(batch, micro_batches);
  const AdamWConfig& h = impl_->adamw;
  const double lr = o.lr.value_or(h.lr);
  // After the all-reduce every GPU holds the same gradient bits, and the norm's reduction order is fixed, so each
  // GPU computes the same norm and clipping coefficient: no further communication.
  std::vector<double> norms(size_t(gpus()), 0.0);
  on_every_gpu(gpus(), [&](int g) {
    Engine& e = *impl_->engines[size_t(g)];
    const double norm = e.grad_norm();
    norms[size_t(g)] = norm;
    // torch.nn.utils.clip_grad_norm_ (HF's Trainer, after accumulation): every gradient times
    // min(1, max_norm / (norm + 1e-6)); train/schedule.hpp's clip_grad_norm is the reference's copy of it.
    const double scale = o.max_grad_norm > 0 ? std::min(1.0, o.max_grad_norm / (norm + 1e-6)) : 1.0;
    e.adamw_step({lr, h.beta1, h.beta2, h.eps, h.weight_decay, scale});
    e.synchronize();
  });
  for (double n : norms)
    if (n != norms[0]) throw std::logic_error("data parallel: the GPUs' gradient norms differ after the all-reduce");
  s.grad_norm = norms[0];
  s.seconds = since(t0);
  return s;
}

DataParallelTrainer::Step DataParallelTrainer::gradients(const Batch& batch, int64_t micro_batches, TensorMap* grads,
                                                         int gpu) {
  if (gpu < 0 || gpu >= gpus()) throw InputError("gradients: no GPU " + std::to_string(gpu));
  Step s = impl_->pass(batch, micro_batches);
  if (grads) {
    GEMMA_CUDA(cudaSetDevice(gpu));
    *grads = impl_->engines[size_t(gpu)]->grads();
  }
  return s;
}

TensorMap DataParallelTrainer::adapters(int gpu) const {
  if (gpu < 0 || gpu >= gpus()) throw InputError("adapters: no GPU " + std::to_string(gpu));
  GEMMA_CUDA(cudaSetDevice(gpu));
  return impl_->engines[size_t(gpu)]->adapters();
}

size_t DataParallelTrainer::peak_device_bytes() const {
  size_t p = 0;
  for (const auto& e : impl_->engines) p = std::max(p, e->peak_bytes());
  return p;
}

int DataParallelTrainer::gpus() const { return int(impl_->engines.size()); }

int64_t DataParallelTrainer::fit_recompute_num_layers(int64_t B, int64_t T) {
  int64_t n = 0;
  for (const auto& e : impl_->engines) n = std::max(n, e->fit_recompute_num_layers(B, T));
  // A GPU that fit fewer takes the common setting (every GPU then runs the same schedule; the bits are the same in
  // any case).
  for (const auto& e : impl_->engines) {
    e->set_recompute_num_layers(n);
    if (!e->reserve(B, T)) throw std::logic_error("fast: recompute_num_layers " + std::to_string(n) + " no longer fits");
  }
  return n;
}

}  // namespace gemma::fast
