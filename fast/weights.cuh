// The engine's weights on the device, as plain structs the engine (engine.cu) fills and the layer functions
// (layer.cuh) read: the frozen base (bf16, or NF4 staged a layer at a time) and the trained adapters (fp32 masters,
// gradients, AdamW moments, and their bf16 split terms for the products).
#pragma once
#include <array>
#include <string>
#include <vector>

#include "fast/lora.cuh"
#include "fast/nf4.cuh"
#include "model/errors.hpp"
#include "model/tensor.hpp"

namespace gemma::fast {
namespace {

// The sizes every buffer and kernel call of the engine is built from: the model's (Config), the adapters' rank and
// scaling, and the padded vocabulary.
struct Dims {
  int64_t D = 0, I = 0, H = 0, KV = 0, hd = 0, L = 0, V = 0, Vp = 0;  // hidden, intermediate, heads, ...
  int64_t QKV = 0, HD = 0, KVHD = 0;  // (H + 2 KV) hd, H hd, KV hd: the fused q|k|v width, q's, k's (= v's)
  int r = 0;                          // LoRA rank
  float s = 0;                        // LoRA scaling
  float normalizer = 0;               // the embedding normalizer sqrt(D), rounded to bf16 as the model has it
  float eps = 0;                      // RMSNorm epsilon
};

// The projection groups a layer's products run as, each over one shared input.
enum Group { kQKV = 0, kO = 1, kGU = 2, kDown = 3 };

// One layer's base weights. Projections fused by shared input: qkv = [q; k; v] (QKV, D), o (D, HD),
// gu = [gate; up] (2I, D), down (D, I); bf16, row-major [out, in].
struct LayerWeights {
  DeviceArray<bf16> qkv, o, gu, down;  // fused [out, in]; empty with NF4 base weights (the staged buffers instead)
  DeviceArray<float> scale;            // (4, D): 1 + w for the four norms, in Norm order
  // NF4 base weights (QLoRA): each projection either quantized (nf4[p]) or, where the checkpoint left it
  // unquantized (llm_int8_skip_modules), bf16 (plain[p]); staged into the fused buffers before the layer runs.
  std::array<Nf4Stored, 7> nf4;
  std::array<DeviceArray<bf16>, 7> plain;
};

// The frozen base model.
struct BaseWeights {
  DeviceArray<bf16> embed;  // (Vp, D): the vocabulary padded to a multiple of 128 rows
  std::vector<LayerWeights> layers;
  DeviceArray<float> final_scale;  // (D): 1 + w of the final norm
  // NF4 base weights: one layer's projections dequantized into `staged` (its fused bf16 arrays), which every
  // layer's GEMMs read; `staged_layer` is the layer it holds (-1: none, or scratch).
  bool nf4 = false;
  LayerWeights staged;
  int64_t staged_layer = -1;
};

// The LoRA adapters: every A and B in one fp32 allocation (HF order), with gradients and AdamW moments alike.
struct AdapterState {
  struct Tensor {
    std::string name;
    Shape shape;
    int64_t offset;  // elements into params (and grads, adam_m, adam_v)
  };
  std::vector<Tensor> tensors;
  int64_t n_params = 0;
  DeviceArray<float> params, grads, adam_m, adam_v;
  DeviceArray<double> sumsq_work;  // grad_norm's partial sums
  int64_t adam_t = 0;              // AdamW steps taken
  // One layer's bf16 split terms of the adapters (lora.cuh), rebuilt when another layer needs them.
  DeviceArray<bf16> splits;
  int64_t splits_layer = -1;  // the layer whose splits the slot holds (-1: none, or stale)
  std::vector<std::array<LoraGroupDev, 4>> groups;  // per layer, by Group: the base weight and its adapters
  int np_max = 0;           // most adapters in one group
  int64_t gpart_max = 0;    // the largest group's adapter gradient partials (lora_gpart_elems)

  int64_t offset(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return t.offset;
    throw InputError("fast: no adapter tensor '" + name + "'");
  }
};

}  // namespace
}  // namespace gemma::fast
