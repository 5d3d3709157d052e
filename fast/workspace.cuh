// The engine's per-step buffers as plain structs: each layer's activations (Acts), the work buffers of a step of
// up to capB x capT tokens (Workspace, sized by Engine::Impl::allocate_work), and the host side of offloaded
// activation checkpoints (CheckpointOffload).
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "fast/common.cuh"

namespace gemma::fast {
namespace {

// One layer's activations: pointers into the workspace's activation buffers (act_bf16, act_f32), each either this
// layer's own or shared by the recomputed layers, as the recompute mode decides (allocate_work).
struct Acts {
  bf16 *xn1 = nullptr, *qkv = nullptr, *att = nullptr, *o = nullptr, *xn2 = nullptr, *gu = nullptr, *act = nullptr,
       *down = nullptr;
  float *o32 = nullptr, *x_mid = nullptr, *rstd = nullptr, *m = nullptr, *l = nullptr;
  std::array<bf16*, 4> L{};  // split adapter inputs per group
};

struct Workspace {
  int64_t capB = 0, capT = 0, capN = 0;  // the largest micro-batch the buffers hold
  int64_t cap_slots = 0;                 // requested logit rows `capped` holds
  int64_t chunk_rows = 0;                // rows of one logits chunk
  DeviceArray<int32_t> ids, targets;
  // Per micro-batch: each token's RoPE position, its document (packed rows) and whether it is a real token (padding
  // mask); the last two are passed to the attention kernels only when the micro-batch has them.
  DeviceArray<int32_t> pos, doc;
  DeviceArray<uint8_t> key_ok;
  bool has_doc = false, has_mask = false;
  int64_t rope_rows = 0;  // positions the RoPE tables cover
  DeviceArray<int> slots;
  DeviceArray<float> cosv, sinv;
  std::vector<DeviceArray<float>> ckpt;  // the fp32 residual entering each layer (L + 1, or 2 slots with offload)
  std::vector<Acts> acts;                // one per layer
  std::vector<DeviceArray<bf16>> act_bf16;
  std::vector<DeviceArray<float>> act_f32;
  DeviceArray<float> x_scratch;
  DeviceArray<bf16> dres, dsmall, dgu, datt, dqkv, Lb;
  DeviceArray<float> dacc, dQ, dK, dV, Dv, tile_stats, part, gpart;
  DeviceArray<bf16> xf, dxf;
  DeviceArray<float> ce_stats;  // the loss chunk's per-block (max, sum) pairs (loss.cuh), two floats each
  DeviceArray<float> rstd_f, row_loss, capped;
  std::vector<int32_t> ids_h, tgt_h, slot_h;
  std::vector<float> loss_h;

  // Frees every device buffer of a step (the requested-logit rows `capped` stay: they are sized separately). The
  // capacities stay too: the engine grows them from these values and zeroes them itself where nothing is allocated
  // after (Engine::Impl::ensure, reserve), so after release() they describe no buffer until allocate_work runs.
  void release() {
    for (auto* a : {&ids, &targets, &pos, &doc}) a->reset();
    key_ok.reset();
    slots.reset();
    ckpt.clear();
    acts.clear();
    act_bf16.clear();
    act_f32.clear();
    for (auto* a : {&cosv, &sinv, &x_scratch, &dacc, &dQ, &dK, &dV, &Dv, &tile_stats, &part, &gpart, &rstd_f, &row_loss, &ce_stats})
      a->reset();
    for (auto* a : {&dres, &dsmall, &dgu, &datt, &dqkv, &Lb, &xf, &dxf}) a->reset();
  }
};

// Offloaded activation checkpoints: layer l's residual in pinned host memory, copied out after the forward
// writes it and back before the backward needs it, on the `copy` stream, ordered by events through two device
// slots (Engine::Impl::micro_step).
struct CheckpointOffload {
  cudaStream_t copy = nullptr;
  cudaEvent_t written[2] = {}, copied[2] = {}, freed[2] = {}, loaded[2] = {};
  float* host = nullptr;  // L residuals of (N, D)
  size_t host_bytes = 0;

  void release_host() {
    if (!host) return;
    GEMMA_CUDA(cudaFreeHost(host));
    host = nullptr;
  }
};

}  // namespace
}  // namespace gemma::fast
