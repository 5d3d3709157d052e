// fast.hpp on top of the engine: input checks, micro-batch split, timing.
#include <cuda_runtime_api.h>

#include <chrono>

#include "fast/engine.hpp"
#include "fast/fast.hpp"
#include "model/optimizer.hpp"

namespace gemma::fast {

bool device_available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    if (why) *why = std::string("no usable CUDA device (cudaGetDeviceCount: ") + cudaGetErrorString(e) + ")";
    return false;
  }
  if (n == 0) {
    if (why) *why = "no CUDA device";
    return false;
  }
  cudaDeviceProp p{};
  const cudaError_t e2 = cudaGetDeviceProperties(&p, 0);
  if (e2 != cudaSuccess) {
    (void)cudaGetLastError();
    if (why) *why = std::string("CUDA device 0 unusable (cudaGetDeviceProperties: ") + cudaGetErrorString(e2) + ")";
    return false;
  }
  // The kernels are built for sm_90a (the Hopper attention's wgmma exists only there): machine code and PTX
  // of an architecture-specific target run on that architecture alone.
  if (p.major != 9 || p.minor != 0) {
    if (why)
      *why = std::string("CUDA device 0 (") + p.name + ") is sm_" + std::to_string(p.major) + std::to_string(p.minor) +
             "; the fast trainer is built for sm_90a (Hopper)";
    return false;
  }
  return true;
}

namespace {

std::vector<Batch> split_micro(const Batch& b, int64_t micro_batches) {
  if (micro_batches < 1 || micro_batches > b.B)
    fail("micro_batches", std::to_string(micro_batches) + " is outside 1.." + std::to_string(b.B) +
                              " (the batch has " + std::to_string(b.B) + " sequences)");
  return split_batch(b, (b.B + micro_batches - 1) / micro_batches);
}

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Output run(const Checkpoint& ck, const Batch& batch, const Options& opt) {
  check_softcap_available(ck.config, opt.softcap, "fast");
  validate_batch(ck.config, batch, "batch");
  for (int64_t row : opt.logit_rows)
    if (row < 0 || row >= batch.B * batch.T)
      fail("logit_rows", "row " + std::to_string(row) + " is outside the batch's " +
                             std::to_string(batch.B * batch.T) + " rows");
  const std::vector<Batch> micro = split_micro(batch, opt.micro_batches);
  Engine e(ck, {.softcap = opt.softcap, .recompute = opt.recompute, .offload = opt.offload,
                .recompute_mlp_only = opt.recompute_mlp_only,
                .recompute_num_layers = opt.recompute_num_layers});
  const auto t0 = std::chrono::steady_clock::now();
  Engine::Pass p = e.forward_backward(micro, opt.logit_rows);
  e.synchronize();
  Output out;
  out.seconds = since(t0);
  out.loss = p.loss_sum / double(p.tokens);
  out.tokens = p.tokens;
  out.grads = e.grads();
  out.logits = std::move(p.logits);
  out.peak_device_bytes = e.peak_bytes();
  out.layers_rebuilt = p.layers_rebuilt;
  return out;
}

GateOutput gate_run(const Checkpoint& ck, const std::vector<Batch>& micro, const Options& opt, const AdamWConfig& adamw,
                    const std::vector<LayerProbeInput>& layers, const std::vector<HeadProbeInput>& heads) {
  check_softcap_available(ck.config, opt.softcap, "fast");
  if (micro.empty()) fail("gate", "no micro-batch");
  for (const Batch& b : micro) validate_batch(ck.config, b, "batch");
  auto micro_of = [&](int64_t k) -> const Batch& {
    if (k < 0 || k >= int64_t(micro.size())) fail("gate", "probe of micro-batch " + std::to_string(k) + ", which does not exist");
    return micro[size_t(k)];
  };
  Engine e(ck, {.softcap = opt.softcap, .recompute = opt.recompute, .offload = opt.offload,
                .recompute_mlp_only = opt.recompute_mlp_only,
                .recompute_num_layers = opt.recompute_num_layers});
  GateOutput out;
  // Probes first: they must see the adapters before the optimizer step.
  for (const Batch& b : micro) out.embedding.push_back(e.probe_embedding(b));
  for (const LayerProbeInput& p : layers) out.layers.push_back(e.probe_layer(p.layer, micro_of(p.micro), p.x, p.dy, p.pins));
  for (const HeadProbeInput& p : heads) out.heads.push_back(e.probe_head(micro_of(p.micro), p.x, p.xf, float(p.grad_scale)));
  const auto t0 = std::chrono::steady_clock::now();
  Engine::Pass p = e.forward_backward(micro, opt.logit_rows);
  e.synchronize();
  out.step.seconds = since(t0);
  out.step.loss = p.loss_sum / double(p.tokens);
  out.step.tokens = p.tokens;
  out.step.grads = e.grads();
  out.step.logits = std::move(p.logits);
  e.adamw_step({adamw.lr, adamw.beta1, adamw.beta2, adamw.eps, adamw.weight_decay});
  out.adapters_after_step = e.adapters();
  out.step.peak_device_bytes = e.peak_bytes();
  return out;
}

Trainer::Trainer(const Checkpoint& ck, const AdamWConfig& a, Softcap softcap, TrainerOptions o)
    : config_(ck.config), lr_(a.lr), beta1_(a.beta1), beta2_(a.beta2), eps_(a.eps), weight_decay_(a.weight_decay) {
  check_softcap_available(ck.config, softcap, "fast");
  engine_ = std::make_unique<Engine>(
      ck, EngineOptions{.softcap = softcap, .recompute = o.recompute, .offload = o.offload,
                        .recompute_mlp_only = o.recompute_mlp_only,
                .recompute_num_layers = o.recompute_num_layers});
}

Trainer::Trainer(const Config& c, const AdapterConfig& ad, uint64_t seed, const AdamWConfig& a, Softcap softcap,
                 TrainerOptions o)
    : config_(c), lr_(a.lr), beta1_(a.beta1), beta2_(a.beta2), eps_(a.eps), weight_decay_(a.weight_decay) {
  check_softcap_available(c, softcap, "fast");
  engine_ = std::make_unique<Engine>(c, ad, seed,
                                     EngineOptions{.softcap = softcap, .recompute = o.recompute, .offload = o.offload,
                                                   .quantize_nf4 = o.quantize_nf4,
                                                   .recompute_mlp_only = o.recompute_mlp_only,
                .recompute_num_layers = o.recompute_num_layers});
}

Trainer::~Trainer() = default;

Trainer::Step Trainer::step(const Batch& batch, int64_t micro_batches) {
  validate_batch(config_, batch, "batch");
  const std::vector<Batch> micro = split_micro(batch, micro_batches);
  const auto t0 = std::chrono::steady_clock::now();
  Engine::Pass p = engine_->forward_backward(micro, {});
  engine_->adamw_step({lr_, beta1_, beta2_, eps_, weight_decay_});
  engine_->synchronize();
  return {p.loss_sum / double(p.tokens), p.tokens, since(t0)};
}

TensorMap Trainer::adapters() const { return engine_->adapters(); }
size_t Trainer::peak_device_bytes() const { return engine_->peak_bytes(); }
std::string Trainer::profile() const { return engine_->profile(); }
void Trainer::set_memory_limit(size_t bytes) { engine_->set_memory_limit(bytes); }
bool Trainer::reserve(int64_t B, int64_t T, std::string* why) { return engine_->reserve(B, T, why); }
int64_t Trainer::fit_recompute_num_layers(int64_t B, int64_t T) { return engine_->fit_recompute_num_layers(B, T); }

}  // namespace gemma::fast
