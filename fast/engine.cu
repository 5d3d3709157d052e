// The fast trainer's engine: weights and adapters on the device, and the schedule of one optimizer step.
//
// Layout. Base weights are bf16, fused by shared input: W_qkv = [q; k; v] (QKV, D), W_o (D, HD),
// W_gu = [gate; up] (2I, D), W_down (D, I); the embedding is padded to Vp = a multiple of 128 rows (nonzero rows
// no token maps to, masked out of the softmax): first the checkpoint's own padding rows when it has them (a
// JAX-style 256128-row head, "model.embed_tokens.weight:padding"), then generated ones. Norm weights are kept as fp32 (1 + w). Adapters: every A and B
// in one fp32 allocation (HF order), with gradients and AdamW moments alike, and their bf16 splits (lora.cuh).
//
// Step. Per micro-batch: embedding into the fp32 residual; per layer, the layer's input residual is the only
// activation kept (activation checkpointing; optionally in pinned host memory); the head runs chunked over
// tokens (loss.cuh); the backward recomputes each layer's forward from its checkpoint, then runs its backward.
// Without recompute every layer keeps its activations (faster, about 0.35 GB per layer of gemma2-9b at 2 x 1024);
// with recompute_mlp_only a layer keeps the outputs of its attention block and down_proj (about 0.11 GB) and the
// backward recomputes only its MLP's input half (the norms, gate|up, GeGLU): the same bits in every mode.
// Adapter gradients accumulate in fp32 over the micro-batches, each scaled by 1 / (the step's scored targets).
// The rounding points are those of the reference's `fast` policy (fast/README.md lists them per kernel).
#include "fast/engine.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>

#include "fast/adamw.cuh"
#include "fast/attention_sm90.cuh"
#include "fast/embedding.cuh"
#include "fast/fast.hpp"
#include "fast/geglu.cuh"
#include "fast/gemm.cuh"
#include "fast/lora.cuh"
#include "fast/loss.cuh"
#include "fast/nf4.cuh"
#include "fast/rmsnorm.cuh"
#include "fast/rope.cuh"
#include "fast/synthetic.cuh"
#include "model/dtype.hpp"
#include "model/errors.hpp"
#include "model/synthetic.hpp"

namespace gemma::fast {

namespace {

enum Group { kQKV = 0, kO = 1, kGU = 2, kDown = 3 };

struct LayerWeights {
  DeviceArray<bf16> qkv, o, gu, down;  // fused [out, in]; empty with NF4 base weights (the staged buffers instead)
  DeviceArray<float> scale;            // (4, D): 1 + w for the four norms, in Norm order
  // NF4 base weights (QLoRA): each projection either quantized (nf4[p]) or, where the checkpoint left it
  // unquantized (llm_int8_skip_modules), bf16 (plain[p]); staged into the fused buffers before the layer runs.
  std::array<Nf4Stored, 7> nf4;
  std::array<DeviceArray<bf16>, 7> plain;
};

// One layer's activations: pointers into the engine's activation buffers (Impl::act_bf16, act_f32), each either
// this layer's own or shared by every layer, as the recompute mode decides (Impl::ensure).
struct Acts {
  bf16 *xn1 = nullptr, *qkv = nullptr, *att = nullptr, *o = nullptr, *xn2 = nullptr, *gu = nullptr, *act = nullptr,
       *down = nullptr;
  float *o32 = nullptr, *x_mid = nullptr, *rstd = nullptr, *m = nullptr, *l = nullptr;
  std::array<bf16*, 4> L{};  // split adapter inputs per group
};


}  // namespace

struct Engine::Impl {
  Config cfg;
  AdapterConfig ad;
  EngineOptions opt;
  int64_t D = 0, I = 0, H = 0, KV = 0, hd = 0, L = 0, V = 0, Vp = 0, QKV = 0, HD = 0, KVHD = 0;
  int r = 0;
  float s = 0, normalizer = 0, eps = 0;
  MemoryTracker mem;
  cudaStream_t stream = nullptr, copy = nullptr;
  cudaEvent_t ev_written[2] = {}, ev_copied[2] = {}, ev_free[2] = {}, ev_loaded[2] = {};
  std::unique_ptr<Blas> blas;

  DeviceArray<bf16> embed;
  std::vector<LayerWeights> layers;
  // NF4 base weights: one layer's projections dequantized into `staged` (its fused bf16 arrays), which every
  // layer's GEMMs read; `staged_layer` is the layer it holds (-1: none, or scratch).
  bool nf4 = false;
  LayerWeights staged;
  int64_t staged_layer = -1;
  DeviceArray<float> final_scale;

  struct AdapterTensor {
    std::string name;
    Shape shape;
    int64_t offset;
  };
  std::vector<AdapterTensor> tensors;
  int64_t n_params = 0;
  DeviceArray<float> params, grads, adam_m, adam_v;
  DeviceArray<double> sumsq_work;  // grad_norm's partial sums (allocated on first use)
  int64_t adam_t = 0;
  DeviceArray<bf16> splits;   // one layer's bf16 split terms of the adapters (ensure_splits)
  int64_t splits_layer = -1;  // the layer whose splits the slot holds (-1: none, or stale)
  std::vector<std::array<LoraGroupDev, 4>> groups;
  int np_max = 0;
  int64_t gpart_max = 0;

  // Work buffers, sized for the largest micro-batch seen.
  int64_t capB = 0, capT = 0, capN = 0, cap_slots = 0, chunk_rows = 0;
  DeviceArray<int32_t> ids, targets;
  // Per micro-batch: each token's RoPE position, its document (packed rows) and whether it is a real token (padding
  // mask); the last two are passed to the attention kernels only when the micro-batch has them.
  DeviceArray<int32_t> pos, doc;
  DeviceArray<uint8_t> key_ok;
  bool has_doc = false, has_mask = false;
  int64_t rope_rows = 0;  // positions the RoPE tables cover
  DeviceArray<int> slots;
  DeviceArray<float> cosv, sinv;
  std::vector<DeviceArray<float>> ckpt;
  float* host_ckpt = nullptr;
  size_t host_ckpt_bytes = 0;
  std::vector<Acts> acts;  // one per layer (ensure)
  std::vector<DeviceArray<bf16>> act_bf16;
  std::vector<DeviceArray<float>> act_f32;
  DeviceArray<float> x_scratch;
  DeviceArray<bf16> dres, dsmall, dgu, datt, dqkv, Lb;
  DeviceArray<float> dacc, dQ, dK, dV, Dv, part, gpart;
  DeviceArray<bf16> xf, dxf, dlog;
  DeviceArray<float> rstd_f, logits, row_loss, capped;
  std::vector<int32_t> ids_h, tgt_h, slot_h;
  std::vector<float> loss_h;

  // Profile (GEMMA_FAST_PROFILE=1): device time between consecutive marks, summed per segment name.
  bool prof_on = false;
  std::vector<std::pair<std::string, cudaEvent_t>> marks;
  std::map<std::string, double> prof_ms;
  int64_t prof_steps = 0;
  bool prof_skip = false;
  const char* phase = "fwd";
  bool recomputing = false;  // layer_forward is the backward's recomputation: the attention statistics are kept

  void mark(const std::string& name) {
    if (!prof_on) return;
    cudaEvent_t e;
    GEMMA_CUDA(cudaEventCreate(&e));
    GEMMA_CUDA(cudaEventRecord(e, stream));
    marks.emplace_back(name, e);
  }
  void prof_begin() {
    if (!prof_on) return;
    marks.clear();
    mark("");
  }
  void prof_end() {
    if (!prof_on) return;
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    for (size_t i = 1; i < marks.size() && !prof_skip; ++i) {
      float ms = 0;
      GEMMA_CUDA(cudaEventElapsedTime(&ms, marks[i - 1].second, marks[i].second));
      prof_ms[marks[i].first] += ms;
    }
    for (auto& m : marks) GEMMA_CUDA(cudaEventDestroy(m.second));
    marks.clear();
  }

  // ------------------------------------------------------------------------------------------------------
  // Construction

  void init(const Config& c, const AdapterConfig& a, const EngineOptions& o, bool nf4_base, int64_t pad_rows = 0) {
    cfg = c;
    // The kernels take one rank and one scaling for every adapted projection, and the same projections in every
    // layer (q|k|v, gate|up and down are fused per layer): anything else is refused, not approximated.
    std::string why;
    if (!a.uniform(c.num_hidden_layers, &why))
      throw InputError(
          "fast: the CUDA trainer needs one rank and scaling and the same adapted projections in every "
          "layer; this adapter differs: " +
          why);
    ad = a.uniform_form(c.num_hidden_layers);
    opt = o;
    if (opt.offload && !opt.recompute)
      throw InputError("fast: offloading activation checkpoints needs recompute (activation checkpointing)");
    if (opt.recompute_mlp_only && (!opt.recompute || opt.offload))
      throw InputError(std::string("fast: recompute_mlp_only keeps activations beside the checkpoints, so it needs "
                                   "recompute and no offload; this run has ") +
                       (opt.recompute ? "offload" : "no recompute"));
    if (ad.r < 1) throw InputError("fast: LoRA rank must be at least 1");
    D = c.hidden_size;
    I = c.intermediate_size;
    H = c.num_attention_heads;
    KV = c.num_key_value_heads;
    hd = c.head_dim;
    L = c.num_hidden_layers;
    V = c.vocab_size;
    Vp = padded_vocab(V + pad_rows);
    QKV = (H + 2 * KV) * hd;
    HD = H * hd;
    KVHD = KV * hd;
    r = int(ad.r);
    s = float(ad.scaling());
    normalizer = bf16_to_float(float_to_bf16(float(std::sqrt(double(D)))));
    eps = float(c.rms_norm_eps);
    (void)attn_hdp(int(hd));  // rejects an unsupported head_dim before anything is allocated

    // The inputs are checked above without touching CUDA (a refusal must not need a device); from here on every
    // allocation, stream and handle belongs to the engine's device.
    GEMMA_CUDA(cudaSetDevice(o.device));
    GEMMA_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    GEMMA_CUDA(cudaStreamCreateWithFlags(&copy, cudaStreamNonBlocking));
    for (int i = 0; i < 2; ++i) {
      GEMMA_CUDA(cudaEventCreateWithFlags(&ev_written[i], cudaEventDisableTiming));
      GEMMA_CUDA(cudaEventCreateWithFlags(&ev_copied[i], cudaEventDisableTiming));
      GEMMA_CUDA(cudaEventCreateWithFlags(&ev_free[i], cudaEventDisableTiming));
      GEMMA_CUDA(cudaEventCreateWithFlags(&ev_loaded[i], cudaEventDisableTiming));
    }
    blas = std::make_unique<Blas>(stream, mem);
    const char* prof = std::getenv("GEMMA_FAST_PROFILE");
    prof_on = prof && std::string(prof) == "1";

    embed = DeviceArray<bf16>(size_t(Vp * D), "the embedding (vocabulary padded to a multiple of 128)", mem);
    layers.resize(size_t(L));
    nf4 = nf4_base;
    auto projections = [&](LayerWeights& lw, const std::string& what) {
      lw.qkv = DeviceArray<bf16>(size_t(QKV * D), "q|k|v_proj weights" + what, mem);
      lw.o = DeviceArray<bf16>(size_t(D * HD), "o_proj weight" + what, mem);
      lw.gu = DeviceArray<bf16>(size_t(2 * I * D), "gate|up_proj weights" + what, mem);
      lw.down = DeviceArray<bf16>(size_t(D * I), "down_proj weight" + what, mem);
    };
    if (nf4) projections(staged, " (one layer dequantized from NF4)");
    for (auto& lw : layers) {
      if (!nf4) projections(lw, "");
      lw.scale = DeviceArray<float>(size_t(4 * D), "RMSNorm scales", mem);
    }
    final_scale = DeviceArray<float>(size_t(D), "final norm scale", mem);

    int64_t off = 0;
    for (const WeightSpec& w : adapter_weight_specs(cfg, ad)) {
      tensors.push_back({w.name, w.shape, off});
      off += shape_numel(w.shape);
    }
    n_params = off;
    params = DeviceArray<float>(size_t(n_params), "LoRA adapters (fp32)", mem);
    grads = DeviceArray<float>(size_t(n_params), "LoRA gradients (fp32)", mem);
    adam_m = DeviceArray<float>(size_t(n_params), "AdamW first moments", mem);
    adam_v = DeviceArray<float>(size_t(n_params), "AdamW second moments", mem);
    GEMMA_CUDA(cudaMemsetAsync(grads.get(), 0, size_t(n_params) * 4, stream));
    GEMMA_CUDA(cudaMemsetAsync(adam_m.get(), 0, size_t(n_params) * 4, stream));
    GEMMA_CUDA(cudaMemsetAsync(adam_v.get(), 0, size_t(n_params) * 4, stream));
    wire_groups();
  }

  int64_t tensor_offset(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return t.offset;
    throw InputError("fast: no adapter tensor '" + name + "'");
  }

  void wire_groups() {
    groups.assign(size_t(L), {});
    auto align8 = [](int64_t n) { return (n + 7) / 8 * 8; };
    int64_t per_layer = 0;
    // Two passes: count the bf16 split elements, then hand out pointers. Every layer's splits use the same slot,
    // filled by ensure_splits(l) before the layer's products (1.2 GiB at 9b for all 42 layers at once; 29 MB).
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t l = 0; l < L; ++l) {
        int64_t at = 0;
        auto& G = groups[size_t(l)];
        G[kQKV].in = D;
        G[kQKV].out_total = QKV;
        G[kO].in = HD;
        G[kO].out_total = D;
        G[kGU].in = D;
        G[kGU].out_total = 2 * I;
        G[kDown].in = I;
        G[kDown].out_total = D;
        if (pass == 1) {
          const LayerWeights& lw = nf4 ? staged : layers[size_t(l)];
          G[kQKV].W = lw.qkv.get();
          G[kO].W = lw.o.get();
          G[kGU].W = lw.gu.get();
          G[kDown].W = lw.down.get();
        }
        for (auto& g : G) g.projs.clear();
        for (Proj p : kAllProj) {
          if (!ad.targets(p)) continue;
          int gi = kQKV;
          int64_t col = 0;
          switch (p) {
            case Proj::q_proj: gi = kQKV; col = 0; break;
            case Proj::k_proj: gi = kQKV; col = HD; break;
            case Proj::v_proj: gi = kQKV; col = HD + KVHD; break;
            case Proj::o_proj: gi = kO; col = 0; break;
            case Proj::gate_proj: gi = kGU; col = 0; break;
            case Proj::up_proj: gi = kGU; col = I; break;
            case Proj::down_proj: gi = kDown; col = 0; break;
          }
          LoraProjDev P;
          P.out = proj_out(cfg, p);
          P.col = col;
          if (pass == 1) {
            const int64_t oa = tensor_offset(lora_weight_name(l, p, 'A')), ob = tensor_offset(lora_weight_name(l, p, 'B'));
            P.A = params.get() + oa;
            P.B = params.get() + ob;
            P.gA = grads.get() + oa;
            P.gB = grads.get() + ob;
            P.Bfwd = splits.get() + at;
          }
          at += align8(P.out * 6 * r);
          G[size_t(gi)].projs.push_back(P);
          gpart_max = std::max(gpart_max, 3 * int64_t(r) * std::max(P.out, proj_in(cfg, p)));
        }
        for (auto& g : G) {
          const int64_t np = int64_t(g.projs.size());
          np_max = std::max<int>(np_max, int(np));
          if (pass == 1) g.Abwd = splits.get() + at;
          at += align8(6 * r * np * g.in);
        }
        per_layer = std::max(per_layer, at);
      }
      if (pass == 0) splits = DeviceArray<bf16>(size_t(std::max<int64_t>(per_layer, 1)), "LoRA bf16 splits (one layer's)", mem);
    }
    invalidate_splits();
  }

  // The adapters changed (loaded, generated, an optimizer step): the slot's splits are stale.
  void invalidate_splits() { splits_layer = -1; }

  // Layer l's adapters as their bf16 split terms (lora.cuh) in the shared slot, unless it holds them already.
  void ensure_splits(int64_t l) {
    if (splits_layer == l) return;
    for (auto& g : groups[size_t(l)]) lora_prepare(g, r, stream);
    splits_layer = l;
    mark("LoRA bf16 splits");
  }

  // Host to device through the compute stream (a non-blocking stream does not wait for cudaMemcpy's legacy
  // stream), finished before the host buffer can go away.
  void h2d(void* dst, const void* src, size_t bytes) {
    GEMMA_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
    GEMMA_CUDA(cudaStreamSynchronize(stream));
  }

  void upload_bf16(bf16* dst, const Tensor& t) {
    const int64_t n = t.numel();
    if (t.dtype == DType::bf16) {
      h2d(dst, t.bytes.get(), size_t(n) * 2);
      return;
    }
    // The `weights` cast: round to bf16 exactly as the reference does (dtype.hpp), block by block.
    const int64_t blk = int64_t(1) << 20;
    std::vector<double> d;
    std::vector<uint16_t> b;
    for (int64_t i0 = 0; i0 < n; i0 += blk) {
      const int64_t m = std::min(blk, n - i0);
      d.resize(size_t(m));
      b.resize(size_t(m));
      t.to_double(i0, m, d.data());
      for (int64_t i = 0; i < m; ++i) b[size_t(i)] = float_to_bf16(float(d[size_t(i)]));
      h2d(dst + i0, b.data(), size_t(m) * 2);
    }
  }

  void upload_f32(float* dst, const Tensor& t) {
    std::vector<double> d = t.to_double();
    std::vector<float> f(d.size());
    for (size_t i = 0; i < d.size(); ++i) f[i] = float(d[i]);
    h2d(dst, f.data(), f.size() * 4);
  }

  void upload_norm(float* scale, const Tensor& t) {
    DeviceArray<bf16> tmp(size_t(D), "norm weight upload", mem);
    upload_bf16(tmp.get(), t);
    norm_scale(scale, tmp.get(), D, stream);
    GEMMA_CUDA(cudaStreamSynchronize(stream));
  }

  void fill_padding(int64_t from) {
    if (Vp == from) return;
    // Nonzero rows of the embedding's scale: unmasked, they would take probability mass (and a test would see it).
    synthetic_bf16(embed.get() + from * D, Vp - from, D, D, stream_key(0, kEmbedPaddingName),
                   std::sqrt(3.0) * synthetic_std(cfg, kEmbedName), stream);
  }

  // Where projection p of a layer sits in its fused arrays.
  bf16* proj_dst(LayerWeights& w, Proj p) const {
    switch (p) {
      case Proj::q_proj: return w.qkv.get();
      case Proj::k_proj: return w.qkv.get() + HD * D;
      case Proj::v_proj: return w.qkv.get() + (HD + KVHD) * D;
      case Proj::o_proj: return w.o.get();
      case Proj::gate_proj: return w.gu.get();
      case Proj::up_proj: return w.gu.get() + I * D;
      case Proj::down_proj: return w.down.get();
    }
    return nullptr;
  }

  // With NF4 base weights: layer l's projections into the staged bf16 buffers (nothing when they hold it).
  void stage(int64_t l) {
    if (!nf4 || staged_layer == l) return;
    LayerWeights& w = layers[size_t(l)];
    for (Proj p : kAllProj) {
      const size_t i = size_t(p);
      if (!w.nf4[i].empty())
        nf4_dequantize(proj_dst(staged, p), w.nf4[i].q, stream);
      else
        GEMMA_CUDA(cudaMemcpyAsync(proj_dst(staged, p), w.plain[i].get(), w.plain[i].size() * 2,
                                   cudaMemcpyDeviceToDevice, stream));
    }
    staged_layer = l;
    mark("NF4 dequantization");
  }

  void load(const Checkpoint& ck) {
    auto need = [&](const std::string& name) -> const Tensor& {
      auto it = ck.weights.find(name);
      if (it == ck.weights.end()) throw InputError("fast: checkpoint has no tensor '" + name + "'");
      return it->second;
    };
    upload_bf16(embed.get(), need(kEmbedName));
    int64_t given = 0;
    if (auto it = ck.weights.find(kEmbedPaddingName); it != ck.weights.end()) {
      if (it->second.shape.size() != 2 || it->second.shape[1] != D)
        throw InputError("fast: padding rows '" + std::string(kEmbedPaddingName) + "' must be (P, hidden_size)");
      upload_bf16(embed.get() + V * D, it->second);
      given = it->second.shape[0];
    }
    fill_padding(V + given);
    DeviceArray<unsigned long long> count;
    if (nf4) count = DeviceArray<unsigned long long>(1, "NF4 comparison counter", mem);
    for (int64_t l = 0; l < L; ++l) {
      LayerWeights& w = layers[size_t(l)];
      for (Proj p : kAllProj) {
        const std::string name = proj_weight_name(l, p);
        if (!nf4) {
          upload_bf16(proj_dst(w, p), need(name));
          continue;
        }
        const size_t i = size_t(p);
        const Tensor& t = need(name);
        auto form = ck.nf4.find(name);
        if (form == ck.nf4.end()) {  // left unquantized by the checkpoint
          w.plain[i] = DeviceArray<bf16>(size_t(t.numel()), name + " (not quantized)", mem);
          upload_bf16(w.plain[i].get(), t);
          continue;
        }
        w.nf4[i] = nf4_upload(form->second, name + " (NF4)", mem, stream);
        // The form must give exactly the weight the reference uses (Checkpoint::nf4's promise): checked here on
        // every load, on the device, against that weight uploaded into the staging buffer, and its float32 block
        // absmax against the host's decoding of them (model/nf4.cpp, nf4_absmax).
        upload_bf16(proj_dst(staged, p), t);
        if (const unsigned long long bad = nf4_mismatches(proj_dst(staged, p), w.nf4[i].q, count.get(), stream))
          throw std::logic_error("fast: the NF4 form of '" + name + "' dequantizes to other values than the checkpoint's "
                                 "weight (" + std::to_string(bad) + " of " + std::to_string(t.numel()) + " differ)");
        const std::vector<float> absmax = nf4_absmax(form->second);
        DeviceArray<float> want(absmax.size(), "NF4 absmax comparison", mem);
        h2d(want.get(), absmax.data(), absmax.size() * 4);
        if (const unsigned long long bad = nf4_absmax_mismatches(w.nf4[i].q, want.get(), count.get(), stream))
          throw std::logic_error("fast: the NF4 form of '" + name + "' decodes its block absmax to other float32 values "
                                 "than dequantize_4bit (" + std::to_string(bad) + " of " + std::to_string(absmax.size()) +
                                 " blocks differ)");
      }
      for (Norm n : kAllNorms) upload_norm(w.scale.get() + int64_t(n) * D, need(norm_weight_name(l, n)));
    }
    upload_norm(final_scale.get(), need(kFinalNormName));
    for (const auto& t : tensors) upload_f32(params.get() + t.offset, need(t.name));
    invalidate_splits();
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    staged_layer = -1;  // the staging buffers served as scratch
  }

  void generate(uint64_t seed) {
    auto gen = [&](bf16* dst, const std::string& name, int64_t rows, int64_t cols) {
      synthetic_bf16(dst, rows, cols, cols, stream_key(seed, name), std::sqrt(3.0) * synthetic_std(cfg, name), stream);
    };
    gen(embed.get(), kEmbedName, V, D);
    fill_padding(V);
    DeviceArray<bf16> tmp(size_t(D), "norm weight generation", mem);
    auto norm = [&](float* scale, const std::string& name) {
      gen(tmp.get(), name, 1, D);
      norm_scale(scale, tmp.get(), D, stream);
    };
    // NF4: each projection generated into the staging buffer, then quantized as QLoRA does (blocksize 64, double
    // quantization): the bits of quantize_nf4 applied to synthetic_weights.
    DeviceArray<float> absmax;
    if (nf4) absmax = DeviceArray<float>(size_t((std::max(QKV, 2 * I) * D + kNF4Blocksize - 1) / kNF4Blocksize),
                                         "NF4 quantization absmax", mem);
    for (int64_t l = 0; l < L; ++l) {
      LayerWeights& w = layers[size_t(l)];
      for (Proj p : kAllProj) {
        const std::string name = proj_weight_name(l, p);
        const int64_t rows = proj_out(cfg, p), cols = proj_in(cfg, p);
        gen(proj_dst(nf4 ? staged : w, p), name, rows, cols);
        if (nf4)
          w.nf4[size_t(p)] = nf4_quantize_device(proj_dst(staged, p), Shape{rows, cols}, kNF4Blocksize, true,
                                                 absmax.get(), name + " (NF4)", mem, stream);
      }
      for (Norm n : kAllNorms) norm(w.scale.get() + int64_t(n) * D, norm_weight_name(l, n));
    }
    norm(final_scale.get(), kFinalNormName);
    // synthetic_adapters: A uniform with std 1/sqrt(in), B with std 0.25/sqrt(r), both rounded to bf16.
    for (const auto& t : tensors) {
      const bool is_a = t.name.find("lora_A") != std::string::npos;
      const double sd = is_a ? 1.0 / std::sqrt(double(t.shape[1])) : 0.25 / std::sqrt(double(ad.r));
      synthetic_f32(params.get() + t.offset, shape_numel(t.shape), stream_key(seed, t.name), std::sqrt(3.0) * sd,
                    stream);
    }
    invalidate_splits();
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    staged_layer = -1;  // the staging buffers served as scratch
  }

  ~Impl() {
    if (stream) cudaStreamSynchronize(stream);
    if (copy) cudaStreamSynchronize(copy);
    blas.reset();
    if (host_ckpt) cudaFreeHost(host_ckpt);
    for (int i = 0; i < 2; ++i) {
      if (ev_written[i]) cudaEventDestroy(ev_written[i]);
      if (ev_copied[i]) cudaEventDestroy(ev_copied[i]);
      if (ev_free[i]) cudaEventDestroy(ev_free[i]);
      if (ev_loaded[i]) cudaEventDestroy(ev_loaded[i]);
    }
    if (copy) cudaStreamDestroy(copy);
    if (stream) cudaStreamDestroy(stream);
  }

  // ------------------------------------------------------------------------------------------------------
  // Work buffers

  void release_work() {
    ids.reset();
    targets.reset();
    pos.reset();
    doc.reset();
    key_ok.reset();
    slots.reset();
    cosv.reset();
    sinv.reset();
    ckpt.clear();
    if (host_ckpt) {
      GEMMA_CUDA(cudaFreeHost(host_ckpt));
      host_ckpt = nullptr;
    }
    acts.clear();
    act_bf16.clear();
    act_f32.clear();
    for (auto* a : {&x_scratch, &dacc, &dQ, &dK, &dV, &Dv, &part, &gpart, &rstd_f, &logits, &row_loss}) a->reset();
    for (auto* a : {&dres, &dsmall, &dgu, &datt, &dqkv, &Lb, &xf, &dxf, &dlog}) a->reset();
  }

  void ensure(int64_t B, int64_t T) {
    if (B <= capB && T <= capT) return;
    prof_skip = true;  // a step that allocates is not a step to time
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    GEMMA_CUDA(cudaStreamSynchronize(copy));
    release_work();
    capB = std::max(capB, B);
    capT = std::max(capT, T);
    // A failed allocation leaves no capacity behind: the next call allocates again instead of using freed buffers.
    try {
      allocate_work();
    } catch (...) {
      release_work();
      capB = capT = capN = 0;
      throw;
    }
  }

  // Every buffer of a step of capB x capT tokens (ensure).
  void allocate_work() {
    const int64_t N = capB * capT;
    capN = N;
    auto F = [&](int64_t n, const std::string& what) { return DeviceArray<float>(size_t(std::max<int64_t>(n, 1)), what, mem); };
    auto Hf = [&](int64_t n, const std::string& what) { return DeviceArray<bf16>(size_t(std::max<int64_t>(n, 1)), what, mem); };
    ids = DeviceArray<int32_t>(size_t(N), "token ids", mem);
    targets = DeviceArray<int32_t>(size_t(N), "targets", mem);
    slots = DeviceArray<int>(size_t(N), "logit row slots", mem);
    pos = DeviceArray<int32_t>(size_t(N), "RoPE positions", mem);
    doc = DeviceArray<int32_t>(size_t(N), "document ids", mem);
    key_ok = DeviceArray<uint8_t>(size_t(N), "padding mask", mem);
    rope_rows = 0;
    ensure_rope(capT);
    const int64_t nck = opt.offload ? 2 : L + 1;
    for (int64_t i = 0; i < nck; ++i) ckpt.push_back(F(N * D, "activation checkpoints (an fp32 residual per layer)"));
    if (opt.offload) {
      host_ckpt_bytes = size_t(L) * size_t(N * D) * 4;
      const cudaError_t e = cudaMallocHost(&host_ckpt, host_ckpt_bytes);
      if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        host_ckpt = nullptr;
        throw OutOfMemory("fast: out of pinned host memory for offloaded activation checkpoints (" +
                          std::to_string(host_ckpt_bytes >> 20) + " MiB); hint: fewer sequences per micro-batch");
      }
      GEMMA_CUDA(e);
    }
    // Each activation buffer is per layer, or one that every layer's forward overwrites and the recomputation
    // rebuilds (recompute); recompute_mlp_only keeps the attention block's and down_proj's outputs per layer.
    acts.assign(size_t(L), Acts{});
    const bool all = !opt.recompute, keep = opt.recompute_mlp_only;
    auto per = [&](auto& own, auto Acts::*field, bool per_layer, int64_t n, const std::string& what) {
      const int64_t copies = per_layer ? L : 1;
      own.emplace_back(size_t(std::max<int64_t>(n * copies, 1)), what, mem);
      for (int64_t l = 0; l < L; ++l) acts[size_t(l)].*field = own.back().get() + (per_layer ? l * n : 0);
    };
    per(act_bf16, &Acts::xn1, all, N * D, "activations: input_layernorm output");
    per(act_bf16, &Acts::qkv, all || keep, N * QKV, "activations: q|k|v");
    per(act_bf16, &Acts::att, all || keep, N * HD, "activations: attention output");
    per(act_f32, &Acts::o32, all || keep, N * HD, "activations: attention output (fp32)");
    // With recompute, every layer's softmax statistics (8 bytes per token, head and layer) outlive the shared
    // activations, so the recomputed forward skips the attention's first pass (attn_params, stats_in); not with
    // offload, the mode for the longest sequences, where they would cost 0.7 GiB of 80 at 9b, T = 131072.
    const bool stats = all || keep_stats();
    per(act_f32, &Acts::m, stats, capB * H * capT, "activations: softmax max");
    per(act_f32, &Acts::l, stats, capB * H * capT, "activations: softmax sum");
    per(act_bf16, &Acts::o, all || keep, N * D, "activations: o_proj output");
    per(act_f32, &Acts::x_mid, all, N * D, "activations: mid-layer residual");
    per(act_bf16, &Acts::xn2, all, N * D, "activations: pre_feedforward_layernorm output");
    per(act_bf16, &Acts::gu, all, N * 2 * I, "activations: gate|up");
    per(act_bf16, &Acts::act, all, N * I, "activations: GeGLU output");
    per(act_bf16, &Acts::down, all || keep, N * D, "activations: down_proj output");
    per(act_f32, &Acts::rstd, all || keep, 4 * N, "activations: RMSNorm 1/rms");
    const auto& G = groups.empty() ? std::array<LoraGroupDev, 4>{} : groups[0];
    for (int g = 0; g < 4; ++g) {
      const int64_t n = N * 6 * r * int64_t(G[size_t(g)].projs.size());
      const bool per_layer = all || (keep && g != kGU);
      act_bf16.emplace_back(size_t(std::max<int64_t>(n * (per_layer ? L : 1), 1)), "activations: LoRA splits", mem);
      for (int64_t l = 0; l < L; ++l) acts[size_t(l)].L[size_t(g)] = act_bf16.back().get() + (per_layer ? l * n : 0);
    }
    x_scratch = F(N * D, "recomputed layer output");
    dres = Hf(N * D, "residual gradient");
    dsmall = Hf(N * D, "norm-input gradient");
    dgu = Hf(N * 2 * I, "gate|up gradient");
    datt = Hf(N * HD, "attention-output gradient");
    dqkv = Hf(N * QKV, "q|k|v gradient");
    // Backward: the fp32 product sums of the input gradients; forward: the fp32 adapter terms of a group's output.
    dacc = F(N * std::max({D, I, HD, QKV, 2 * I}), "fp32 product sums (input gradients, adapter terms)");
    dQ = F(N * HD, "dq (fp32)");
    dK = F(N * KVHD, "dk (fp32)");
    dV = F(N * KVHD, "dv (fp32)");
    Dv = F(capB * H * capT, "attention rowsum(dO O)");
    part = F(N * 3 * r * np_max, "LoRA partial products");
    Lb = Hf(N * 6 * r * np_max, "LoRA backward splits");
    gpart = F(gpart_max, "LoRA gradient partials");
    xf = Hf(N * D, "final norm output");
    dxf = Hf(N * D, "final norm output gradient");
    rstd_f = F(N, "final norm 1/rms");
    row_loss = F(N, "per-token losses");
    // Logits chunks of about 512 MiB (fp32 logits and bf16 gradients): the (N, V) matrix never exists at once.
    chunk_rows = std::clamp<int64_t>((int64_t(512) << 20) / (Vp * 6), 1, N);
    logits = F(chunk_rows * Vp, "logits chunk (fp32)");
    dlog = Hf(chunk_rows * Vp, "logits-gradient chunk (bf16)");
  }

  // RoPE tables for positions 0..rows-1 (rebuilt when a micro-batch's positions go further).
  void ensure_rope(int64_t rows) {
    if (rows <= rope_rows) return;
    std::vector<float> c, sn;
    rope_tables(rows, hd, cfg.rope_theta, c, sn);
    cosv = DeviceArray<float>(c.size(), "RoPE cos table", mem);
    sinv = DeviceArray<float>(sn.size(), "RoPE sin table", mem);
    h2d(cosv.get(), c.data(), c.size() * 4);
    h2d(sinv.get(), sn.data(), sn.size() * 4);
    rope_rows = rows;
  }

  // A micro-batch's positions, documents and padding mask on the device.
  void upload_positions(const Batch& mb) {
    const int64_t N = mb.B * mb.T;
    std::vector<int32_t> ph(static_cast<size_t>(N));
    int64_t maxpos = 0;
    for (int64_t n = 0; n < N; ++n) {
      ph[size_t(n)] = int32_t(mb.position(n / mb.T, n % mb.T));
      maxpos = std::max<int64_t>(maxpos, ph[size_t(n)]);
    }
    ensure_rope(maxpos + 1);
    h2d(pos.get(), ph.data(), size_t(N) * 4);
    has_doc = mb.packed();
    if (has_doc) {
      const std::vector<int32_t> d = mb.document_ids();
      h2d(doc.get(), d.data(), size_t(N) * 4);
    }
    has_mask = !mb.attention_mask.empty();
    if (has_mask) h2d(key_ok.get(), mb.attention_mask.data(), size_t(N));
  }

  bool reserve(int64_t B, int64_t T, std::string* why) {
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    GEMMA_CUDA(cudaStreamSynchronize(copy));
    release_work();
    capB = capT = capN = 0;
    try {
      ensure(B, T);
      mem.peak = mem.current;  // a search's failed attempts are not a step's peak
      return true;
    } catch (const OutOfMemory& e) {
      if (why) *why = e.what();
      release_work();
      capB = capT = capN = 0;
      return false;
    }
  }

  void ensure_slots(int64_t n) {
    if (n <= cap_slots) return;
    capped = DeviceArray<float>(size_t(n * V), "requested logit rows", mem);
    cap_slots = n;
  }

  // ------------------------------------------------------------------------------------------------------
  // Layers

  Acts& acts_for(int64_t l) { return acts[size_t(l)]; }
  // Every layer's softmax statistics kept across the recomputation (ensure).
  bool keep_stats() const { return opt.recompute && !opt.offload; }

  AttnParams attn_params(int64_t l, int64_t B, int64_t T, Acts& A) {
    AttnParams p;
    p.q = A.qkv;
    p.k = A.qkv + HD;
    p.v = A.qkv + HD + KVHD;
    p.ld_qkv = QKV;
    p.B = int(B);
    p.T = int(T);
    p.H = int(H);
    p.KV = int(KV);
    p.hd = int(hd);
    p.scale = float(1.0 / std::sqrt(cfg.query_pre_attn_scalar));
    p.cap_on = opt.softcap.attn;
    p.cap = float(cfg.attn_logit_softcapping.value_or(1.0));
    const bool sliding = cfg.layer_types[size_t(l)] == LayerType::sliding && cfg.sliding_window.has_value();
    p.window = attn_window(sliding, cfg.sliding_window.value_or(0));
    p.doc = has_doc ? doc.get() : nullptr;
    p.key_ok = has_mask ? key_ok.get() : nullptr;
    p.drop_sech2 = faults().softcap_grad_missing;
    p.att = A.att;
    p.o32 = A.o32;
    p.ld_o = HD;
    p.m = A.m;
    p.l = A.l;
    p.stats_in = recomputing && keep_stats();
    p.dout = datt.get();
    p.Dv = Dv.get();
    p.dq = dQ.get();
    p.dk = dK.get();
    p.dv = dV.get();
    p.ld_dkv = KVHD;
    return p;
  }

  void layer_forward(int64_t l, const float* x_in, float* x_out, int64_t B, int64_t T) {
    stage(l);
    ensure_splits(l);
    Acts& A = acts_for(l);
    const LayerWeights& W = layers[size_t(l)];
    auto& G = groups[size_t(l)];
    const int64_t N = B * T;
    cublasHandle_t h = blas->h;
    // recompute_mlp_only: the attention block's and down_proj's outputs are this layer's own from the first
    // forward (ensure); the recomputation rebuilds only the shared ones: xn1, x_mid, xn2, gate|up and GeGLU.
    const bool kept = recomputing && opt.recompute_mlp_only;
    rmsnorm_forward_in(A.xn1, A.rstd, x_in, W.scale.get(), N, D, eps, stream);
    const std::string ph = phase;
    mark(ph + " norms");
    if (!kept) {
      group_forward(h, G[kQKV], r, s, A.xn1, N, A.qkv, A.L[kQKV], part.get(), dacc.get(), stream,
                    [&] { mark(ph + " q|k|v_proj (base product)"); });
      mark(ph + " q|k|v_proj LoRA terms");
      // q's H heads and k's KV heads are adjacent in a q|k|v row: one launch rotates both.
      rope_forward(A.qkv, QKV, N, T, pos.get(), int(H + KV), int(hd), cosv.get(), sinv.get(), stream);
      mark(ph + " rope");
      attention_forward(attn_params(l, B, T, A), stream);
      mark(ph + " attention");
      group_forward(h, G[kO], r, s, A.att, N, A.o, A.L[kO], part.get(), dacc.get(), stream,
                    [&] { mark(ph + " o_proj (base product)"); });
      mark(ph + " o_proj LoRA terms");
    }
    rmsnorm_forward_post(A.x_mid, A.rstd + N, A.o, W.scale.get() + D, x_in, N, D, eps, stream);
    rmsnorm_forward_in(A.xn2, A.rstd + 2 * N, A.x_mid, W.scale.get() + 2 * D, N, D, eps, stream);
    mark(ph + " norms");
    group_forward(h, G[kGU], r, s, A.xn2, N, A.gu, A.L[kGU], part.get(), dacc.get(), stream,
                  [&] { mark(ph + " gate|up_proj (base product)"); });
    mark(ph + " gate|up_proj LoRA terms");
    geglu_forward(A.act, A.gu, N, I, stream);
    mark(ph + " geglu");
    if (kept) return;  // down_proj's output and the last norm's 1/rms are kept; the layer's output is not needed
    group_forward(h, G[kDown], r, s, A.act, N, A.down, A.L[kDown], part.get(), dacc.get(), stream,
                  [&] { mark(ph + " down_proj (base product)"); });
    mark(ph + " down_proj LoRA terms");
    rmsnorm_forward_post(x_out, A.rstd + 3 * N, A.down, W.scale.get() + 3 * D, A.x_mid, N, D, eps, stream);
    mark(ph + " norms");
  }

  // dres holds d(layer output) on entry and d(layer input) on exit.
  void layer_backward(int64_t l, const float* x_in, int64_t B, int64_t T) {
    stage(l);
    ensure_splits(l);
    Acts& A = acts_for(l);
    const LayerWeights& W = layers[size_t(l)];
    auto& G = groups[size_t(l)];
    const int64_t N = B * T;
    cublasHandle_t h = blas->h;
    // x_out = x_mid + post_feedforward_layernorm(down)
    rmsnorm_backward_post(dsmall.get(), dres.get(), A.down, A.rstd + 3 * N, W.scale.get() + 3 * D, N, D,
                          stream);
    mark("bwd norms");
    group_backward(h, G[kDown], r, s, A.act, dsmall.get(), A.L[kDown], N, dacc.get(), part.get(), Lb.get(),
                   gpart.get(), stream,
                   [&] { mark("bwd down_proj (base product)"); });
    mark("bwd down_proj LoRA terms");
    geglu_backward(dgu.get(), dacc.get(), A.gu, N, I, stream);
    mark("bwd geglu");
    group_backward(h, G[kGU], r, s, A.xn2, dgu.get(), A.L[kGU], N, dacc.get(), part.get(), Lb.get(),
                   gpart.get(), stream,
                   [&] { mark("bwd gate|up_proj (base product)"); });
    mark("bwd gate|up_proj LoRA terms");
    rmsnorm_backward_in(dres.get(), dacc.get(), A.x_mid, A.rstd + 2 * N, W.scale.get() + 2 * D, N, D,
                        stream);
    // x_mid = x + post_attention_layernorm(o_proj(attention(...)))
    rmsnorm_backward_post(dsmall.get(), dres.get(), A.o, A.rstd + N, W.scale.get() + D, N, D, stream);
    mark("bwd norms");
    group_backward(h, G[kO], r, s, A.att, dsmall.get(), A.L[kO], N, dacc.get(), part.get(), Lb.get(),
                   gpart.get(), stream,
                   [&] { mark("bwd o_proj (base product)"); });
    to_bf16(datt.get(), HD, dacc.get(), HD, N, HD, stream);
    mark("bwd o_proj LoRA terms");
    attention_backward(attn_params(l, B, T, A), stream);
    mark("bwd attention");
    rope_backward(dqkv.get(), QKV, dQ.get(), HD, N, T, pos.get(), int(H), int(hd), cosv.get(), sinv.get(), stream);
    rope_backward(dqkv.get() + HD, QKV, dK.get(), KVHD, N, T, pos.get(), int(KV), int(hd), cosv.get(), sinv.get(),
                  stream);
    to_bf16(dqkv.get() + HD + KVHD, QKV, dV.get(), KVHD, N, KVHD, stream);
    mark("bwd rope, dv to bf16");
    group_backward(h, G[kQKV], r, s, A.xn1, dqkv.get(), A.L[kQKV], N, dacc.get(), part.get(), Lb.get(),
                   gpart.get(), stream,
                   [&] { mark("bwd q|k|v_proj (base product)"); });
    mark("bwd q|k|v_proj LoRA terms");
    rmsnorm_backward_in(dres.get(), dacc.get(), x_in, A.rstd, W.scale.get(), N, D, stream);
    mark("bwd norms");
  }

  // Final norm, then the LM head and the loss chunk by chunk, then the final norm's backward: dres holds the
  // gradient of the residual x (N, D) entering the final norm.
  void head(int64_t N, const float* x, float grad_scale) {
    rmsnorm_forward_in(xf.get(), rstd_f.get(), x, final_scale.get(), N, D, eps, stream);
    mark("fwd norms");
    for (int64_t c0 = 0; c0 < N; c0 += chunk_rows) {
      LossChunk c;
      c.xf = xf.get() + c0 * D;
      c.E = embed.get();
      c.target = targets.get() + c0;
      c.capped_slot = slots.get() + c0;
      c.rows = std::min(chunk_rows, N - c0);
      c.D = D;
      c.V = V;
      c.Vp = Vp;
      c.cap_on = opt.softcap.logits;
      c.cap = float(cfg.final_logit_softcapping.value_or(1.0));
      c.grad_scale = grad_scale;
      c.logits = logits.get();
      c.dlog = dlog.get();
      c.row_loss = row_loss.get() + c0;
      c.capped_out = capped.get();
      c.dxf = dxf.get() + c0 * D;
      lm_head_loss_chunk(blas->h, c, stream);
    }
    mark("LM head + softcap + cross-entropy (fwd and bwd)");
    rmsnorm_backward_final(dres.get(), dxf.get(), x, rstd_f.get(), final_scale.get(), N, D, stream);
    mark("bwd norms");
  }

  // ------------------------------------------------------------------------------------------------------
  // Checkpoints: L + 1 device buffers, or two device slots backed by pinned host memory.

  float* ck_dev(int64_t l) { return opt.offload ? ckpt[size_t(l % 2)].get() : ckpt[size_t(l)].get(); }
  float* ck_host(int64_t l, int64_t N) { return host_ckpt + size_t(l) * size_t(N * D); }

  void micro_step(int64_t B, int64_t T, float grad_scale) {
    const int64_t N = B * T;
    const size_t ck_bytes = size_t(N * D) * 4;
    auto saved = [&](int64_t l) {  // checkpoint l is written: copy it out
      if (!opt.offload || l >= L) return;
      GEMMA_CUDA(cudaEventRecord(ev_written[l % 2], stream));
      GEMMA_CUDA(cudaStreamWaitEvent(copy, ev_written[l % 2], 0));
      GEMMA_CUDA(cudaMemcpyAsync(ck_host(l, N), ck_dev(l), ck_bytes, cudaMemcpyDeviceToHost, copy));
      GEMMA_CUDA(cudaEventRecord(ev_copied[l % 2], copy));
    };
    embed_forward(ck_dev(0), ids.get(), embed.get(), N, D, normalizer, stream);
    saved(0);
    mark("embedding");
    phase = "fwd";
    for (int64_t l = 0; l < L; ++l) {
      if (opt.offload && l + 1 >= 2) GEMMA_CUDA(cudaStreamWaitEvent(stream, ev_copied[(l + 1) % 2], 0));
      layer_forward(l, ck_dev(l), ck_dev(l + 1), B, T);
      saved(l + 1);
    }

    head(N, ck_dev(L), grad_scale);
    if (opt.offload) GEMMA_CUDA(cudaEventRecord(ev_free[L % 2], stream));
    phase = "recompute";

    for (int64_t l = L - 1; l >= 0; --l) {
      if (opt.offload) {
        if (l <= L - 2) GEMMA_CUDA(cudaStreamWaitEvent(stream, ev_loaded[l % 2], 0));
        if (l >= 1) {  // prefetch checkpoint l - 1 into the slot the layer above has finished with
          GEMMA_CUDA(cudaStreamWaitEvent(copy, ev_free[(l - 1) % 2], 0));
          GEMMA_CUDA(cudaMemcpyAsync(ck_dev(l - 1), ck_host(l - 1, N), ck_bytes, cudaMemcpyHostToDevice, copy));
          GEMMA_CUDA(cudaEventRecord(ev_loaded[(l - 1) % 2], copy));
        }
      }
      if (opt.offload && l <= L - 2) mark("offload: waiting for a checkpoint");
      if (opt.recompute) {
        // Cleared however layer_forward ends: a forward after a failed one must compute its own statistics.
        struct Recomputing {
          bool& flag;
          explicit Recomputing(bool& f) : flag(f) { flag = true; }
          ~Recomputing() { flag = false; }
        } scope(recomputing);
        layer_forward(l, ck_dev(l), x_scratch.get(), B, T);
      }
      layer_backward(l, ck_dev(l), B, T);
      if (opt.offload) GEMMA_CUDA(cudaEventRecord(ev_free[l % 2], stream));
    }
  }

  // A micro-batch's token ids, targets, positions, documents and padding on the device, and the slots of the
  // requested logit rows (rows row0.. of the flattened step are this micro-batch's); returns those rows.
  std::vector<int64_t> upload_inputs(const Batch& mb, const std::vector<int64_t>& logit_rows, int64_t row0) {
    ensure(mb.B, mb.T);
    const int64_t N = mb.B * mb.T;
    ids_h.assign(size_t(N), 0);
    tgt_h.assign(size_t(N), -100);
    slot_h.assign(size_t(N), -1);
    for (int64_t n = 0; n < N; ++n) {
      ids_h[size_t(n)] = int32_t(mb.input_ids[size_t(n)]);
      tgt_h[size_t(n)] = int32_t(mb.target(n / mb.T, n % mb.T));
    }
    std::vector<int64_t> slot_rows;
    for (int64_t row : logit_rows)
      if (row >= row0 && row < row0 + N && slot_h[size_t(row - row0)] < 0) {
        slot_h[size_t(row - row0)] = int(slot_rows.size());
        slot_rows.push_back(row);
      }
    ensure_slots(int64_t(slot_rows.size()));
    GEMMA_CUDA(cudaMemcpyAsync(ids.get(), ids_h.data(), size_t(N) * 4, cudaMemcpyHostToDevice, stream));
    GEMMA_CUDA(cudaMemcpyAsync(targets.get(), tgt_h.data(), size_t(N) * 4, cudaMemcpyHostToDevice, stream));
    GEMMA_CUDA(cudaMemcpyAsync(slots.get(), slot_h.data(), size_t(N) * 4, cudaMemcpyHostToDevice, stream));
    upload_positions(mb);
    return slot_rows;
  }

  // ------------------------------------------------------------------------------------------------------
  // Probes (the gate's layer-by-layer comparison): the engine's own layer and head code on inputs the caller
  // gives, every intermediate read back as float (bf16 values exactly).

  std::vector<float> d2h(const float* src, int64_t n, int64_t ld = 0, int64_t cols = 0) {
    std::vector<float> v(static_cast<size_t>(n));
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    if (ld == 0) {
      GEMMA_CUDA(cudaMemcpy(v.data(), src, size_t(n) * 4, cudaMemcpyDeviceToHost));
    } else {  // n = rows * cols out of a row stride ld
      GEMMA_CUDA(cudaMemcpy2D(v.data(), size_t(cols) * 4, src, size_t(ld) * 4, size_t(cols) * 4, size_t(n / cols),
                              cudaMemcpyDeviceToHost));
    }
    return v;
  }
  std::vector<float> d2h(const bf16* src, int64_t n, int64_t ld = 0, int64_t cols = 0) {
    std::vector<uint16_t> raw(static_cast<size_t>(n));
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    if (ld == 0) {
      GEMMA_CUDA(cudaMemcpy(raw.data(), src, size_t(n) * 2, cudaMemcpyDeviceToHost));
    } else {
      GEMMA_CUDA(cudaMemcpy2D(raw.data(), size_t(cols) * 2, src, size_t(ld) * 2, size_t(cols) * 2, size_t(n / cols),
                              cudaMemcpyDeviceToHost));
    }
    std::vector<float> v(raw.size());
    for (size_t i = 0; i < raw.size(); ++i) v[i] = bf16_to_float(raw[i]);
    return v;
  }

  std::map<std::string, std::vector<float>> probe_layer(int64_t l, const Batch& mb, const std::vector<float>& x,
                                                        const std::vector<float>& dy) {
    upload_inputs(mb, {}, 0);
    const int64_t N = mb.B * mb.T;
    if (int64_t(x.size()) != N * D || int64_t(dy.size()) != N * D) throw InputError("fast: probe inputs must be (N, D)");
    float* xin = ck_dev(0);
    h2d(xin, x.data(), size_t(N * D) * 4);
    GEMMA_CUDA(cudaMemsetAsync(grads.get(), 0, size_t(n_params) * 4, stream));
    layer_forward(l, xin, x_scratch.get(), mb.B, mb.T);
    Acts& A = acts_for(l);
    std::map<std::string, std::vector<float>> out;
    out["xn1"] = d2h(A.xn1, N * D);
    out["q"] = d2h(A.qkv, N * HD, QKV, HD);
    out["k"] = d2h(A.qkv + HD, N * KVHD, QKV, KVHD);
    out["v"] = d2h(A.qkv + HD + KVHD, N * KVHD, QKV, KVHD);
    out["att"] = d2h(A.att, N * HD);
    out["o"] = d2h(A.o, N * D);
    out["x_mid"] = d2h(A.x_mid, N * D);
    out["xn2"] = d2h(A.xn2, N * D);
    out["gate"] = d2h(A.gu, N * I, 2 * I, I);
    out["up"] = d2h(A.gu + I, N * I, 2 * I, I);
    out["act"] = d2h(A.act, N * I);
    out["down"] = d2h(A.down, N * D);
    out["x_out"] = d2h(x_scratch.get(), N * D);
    std::vector<uint16_t> dyb(dy.size());
    for (size_t i = 0; i < dy.size(); ++i) dyb[i] = float_to_bf16(dy[i]);
    h2d(dres.get(), dyb.data(), dyb.size() * 2);
    layer_backward(l, xin, mb.B, mb.T);
    out["dx"] = d2h(dres.get(), N * D);
    out["d_o"] = d2h(dsmall.get(), N * D);
    out["d_gate"] = d2h(dgu.get(), N * I, 2 * I, I);
    out["d_up"] = d2h(dgu.get() + I, N * I, 2 * I, I);
    out["d_att"] = d2h(datt.get(), N * HD);
    out["dq"] = d2h(dqkv.get(), N * HD, QKV, HD);
    out["dk"] = d2h(dqkv.get() + HD, N * KVHD, QKV, KVHD);
    out["dv"] = d2h(dqkv.get() + HD + KVHD, N * KVHD, QKV, KVHD);
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    for (auto& [name, t] : download(grads.get()))
      if (name.rfind(pre, 0) == 0) {
        const float* f = reinterpret_cast<const float*>(t.bytes.get());
        out[name] = std::vector<float>(f, f + t.numel());
      }
    return out;
  }

  std::map<std::string, std::vector<float>> probe_head(const Batch& mb, const std::vector<float>& x, float grad_scale) {
    upload_inputs(mb, {}, 0);
    const int64_t N = mb.B * mb.T;
    if (int64_t(x.size()) != N * D) throw InputError("fast: probe inputs must be (N, D)");
    float* xin = ck_dev(0);
    h2d(xin, x.data(), size_t(N * D) * 4);
    head(N, xin, grad_scale);
    std::map<std::string, std::vector<float>> out;
    out["row_loss"] = d2h(row_loss.get(), N);
    out["xf"] = d2h(xf.get(), N * D);
    out["dxf"] = d2h(dxf.get(), N * D);
    out["dx"] = d2h(dres.get(), N * D);
    return out;
  }

  std::vector<float> probe_embedding(const Batch& mb) {
    upload_inputs(mb, {}, 0);
    const int64_t N = mb.B * mb.T;
    embed_forward(ck_dev(0), ids.get(), embed.get(), N, D, normalizer, stream);
    return d2h(ck_dev(0), N * D);
  }

  Pass forward_backward(const std::vector<Batch>& micro, const std::vector<int64_t>& logit_rows, int64_t total_targets) {
    int64_t total = 0;
    for (const Batch& b : micro) total += b.count_targets();
    if (total_targets > 0) {
      if (total_targets < total) throw std::logic_error("forward_backward: total_targets below this part's own");
      total = total_targets;
    }
    if (total == 0) throw InputError("batch: every label is ignored (-100): the mean loss is undefined (0/0)");
    prof_begin();
    GEMMA_CUDA(cudaMemsetAsync(grads.get(), 0, size_t(n_params) * 4, stream));
    const float grad_scale = float(1.0 / double(total));
    Pass out;
    for (const Batch& b : micro) out.tokens += b.count_targets();
    int64_t row0 = 0;
    for (const Batch& mb : micro) {
      const int64_t N = mb.B * mb.T;
      const std::vector<int64_t> slot_rows = upload_inputs(mb, logit_rows, row0);
      mark("inputs");
      micro_step(mb.B, mb.T, grad_scale);
      loss_h.assign(size_t(N), 0.0f);
      GEMMA_CUDA(cudaMemcpyAsync(loss_h.data(), row_loss.get(), size_t(N) * 4, cudaMemcpyDeviceToHost, stream));
      GEMMA_CUDA(cudaStreamSynchronize(stream));
      for (float x : loss_h) out.loss_sum += double(x);
      for (size_t k = 0; k < slot_rows.size(); ++k) {
        std::vector<float> row(static_cast<size_t>(V));
        GEMMA_CUDA(cudaMemcpy(row.data(), capped.get() + int64_t(k) * V, size_t(V) * 4, cudaMemcpyDeviceToHost));
        out.logits[slot_rows[k]] = std::move(row);
      }
      row0 += N;
    }
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    prof_end();
    if (prof_on && !prof_skip) ++prof_steps;
    prof_skip = false;
    return out;
  }

  void adamw_step(const AdamWHyper& hp) {
    prof_begin();
    ++adam_t;
    adamw_update(params.get(), grads.get(), adam_m.get(), adam_v.get(), n_params,
                 adamw_scalars(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, adam_t, hp.grad_scale), stream);
    invalidate_splits();
    mark("AdamW");
    prof_end();
  }

  double grad_norm() {
    if (!sumsq_work.get()) sumsq_work = DeviceArray<double>(size_t(kSumSqBlocks + 1), "gradient norm partial sums", mem);
    sum_squares(grads.get(), n_params, sumsq_work.get(), stream);
    double sq = 0;
    GEMMA_CUDA(cudaMemcpyAsync(&sq, sumsq_work.get() + kSumSqBlocks, sizeof sq, cudaMemcpyDeviceToHost, stream));
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    return std::sqrt(sq);
  }

  std::string profile() const {
    if (!prof_on || prof_steps == 0) return "";
    double total = 0;
    std::vector<std::pair<double, std::string>> rows;
    for (const auto& [name, ms] : prof_ms) {
      total += ms;
      rows.emplace_back(ms / double(prof_steps), name);
    }
    std::sort(rows.rbegin(), rows.rend());
    std::ostringstream o;
    char b[160];
    std::snprintf(b, sizeof b, "device time per step, %lld steps (events between segments):\n", (long long)prof_steps);
    o << b;
    for (const auto& [ms, name] : rows) {
      std::snprintf(b, sizeof b, "  %-52s %9.2f ms %5.1f%%\n", name.c_str(), ms, 100.0 * ms * double(prof_steps) / total);
      o << b;
    }
    std::snprintf(b, sizeof b, "  %-52s %9.2f ms\n", "total", total / double(prof_steps));
    o << b;
    return o.str();
  }

  TensorMap download(const float* src) const {
    std::vector<float> all(static_cast<size_t>(n_params));
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    GEMMA_CUDA(cudaMemcpy(all.data(), src, all.size() * 4, cudaMemcpyDeviceToHost));
    TensorMap m;
    for (const auto& t : tensors) {
      OwnedTensor o = make_tensor(DType::f32, t.shape);
      std::memcpy(o.raw, all.data() + t.offset, size_t(shape_numel(t.shape)) * 4);
      m[t.name] = o.t;
    }
    return m;
  }
};

Engine::Engine(const Checkpoint& ck, const EngineOptions& o) : impl_(std::make_unique<Impl>()) {
  if (!ck.adapter) throw InputError("fast: the fast trainer finetunes LoRA adapters; the checkpoint has none");
  const auto pad = ck.weights.find(kEmbedPaddingName);
  impl_->init(ck.config, *ck.adapter, o, !ck.nf4.empty(), pad == ck.weights.end() ? 0 : pad->second.rows());
  impl_->load(ck);
}

Engine::Engine(const Config& c, const AdapterConfig& a, uint64_t seed, const EngineOptions& o)
    : impl_(std::make_unique<Impl>()) {
  impl_->init(c, a, o, o.quantize_nf4);
  impl_->generate(seed);
}

// Every entry point makes the engine's device current first: with several engines (one per GPU) a caller's thread
// may have another one current.
#define GEMMA_ON_DEVICE() GEMMA_CUDA(cudaSetDevice(impl_->opt.device))

Engine::~Engine() {
  if (impl_) (void)cudaSetDevice(impl_->opt.device);  // its memory is freed on its device
}

Engine::Pass Engine::forward_backward(const std::vector<Batch>& micro, const std::vector<int64_t>& logit_rows,
                                      int64_t total_targets) {
  GEMMA_ON_DEVICE();
  return impl_->forward_backward(micro, logit_rows, total_targets);
}
Engine::GradBuffer Engine::grad_buffer() {
  GEMMA_ON_DEVICE();
  return {impl_->grads.get(), impl_->n_params, impl_->stream};
}
void Engine::adamw_step(const AdamWHyper& h) {
  GEMMA_ON_DEVICE();
  impl_->adamw_step(h);
}
double Engine::grad_norm() {
  GEMMA_ON_DEVICE();
  return impl_->grad_norm();
}
std::map<std::string, std::vector<float>> Engine::probe_layer(int64_t l, const Batch& mb, const std::vector<float>& x,
                                                              const std::vector<float>& dy) {
  GEMMA_ON_DEVICE();
  return impl_->probe_layer(l, mb, x, dy);
}
std::map<std::string, std::vector<float>> Engine::probe_head(const Batch& mb, const std::vector<float>& x, float grad_scale) {
  GEMMA_ON_DEVICE();
  return impl_->probe_head(mb, x, grad_scale);
}
std::vector<float> Engine::probe_embedding(const Batch& mb) {
  GEMMA_ON_DEVICE();
  return impl_->probe_embedding(mb);
}
void Engine::synchronize() {
  GEMMA_ON_DEVICE();
  GEMMA_CUDA(cudaStreamSynchronize(impl_->stream));
}
TensorMap Engine::adapters() const {
  GEMMA_ON_DEVICE();
  return impl_->download(impl_->params.get());
}
TensorMap Engine::grads() const {
  GEMMA_ON_DEVICE();
  return impl_->download(impl_->grads.get());
}
size_t Engine::peak_bytes() const { return impl_->mem.peak; }
bool Engine::reserve(int64_t B, int64_t T, std::string* why) {
  GEMMA_ON_DEVICE();
  return impl_->reserve(B, T, why);
}
void Engine::set_memory_limit(size_t bytes) { impl_->mem.limit = bytes; }
std::string Engine::profile() const { return impl_->profile(); }

}  // namespace gemma::fast
