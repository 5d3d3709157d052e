// The fast trainer's engine: weights and adapters on the device, and the schedule of one optimizer step. Its
// state is plain structs in their own files: the model's sizes (Dims) and the weights (BaseWeights,
// AdapterState) in weights.cuh, the step's buffers (Workspace, Acts, CheckpointOffload) in workspace.cuh, the
// profile in profiler.cuh; a layer's forward and backward are free functions in layer.cuh. This file loads or
// generates the weights, sizes the buffers, and runs the schedule.
//
// Layout. Base weights are bf16, fused by shared input: W_qkv = [q; k; v] (QKV, D), W_o (D, HD),
// W_gu = [gate; up] (2I, D), W_down (D, I); the embedding is padded to Vp = a multiple of 128 rows (nonzero rows
// no token maps to, masked out of the softmax): first the checkpoint's own padding rows when it has them (a
// JAX-style 256128-row head, "model.embed_tokens.weight:padding"), then generated ones. Norm weights are kept as fp32 (1 + w). Adapters: every A and B
// in one fp32 allocation (HF order), with gradients and AdamW moments alike, and their bf16 splits (lora.cuh).
//
// Step. Per micro-batch: embedding into the fp32 residual; per layer, the layer's input residual is the only
// activation kept (activation checkpointing; optionally in pinned host memory); the head runs chunked over
// tokens (loss.cuh); the backward recomputes each layer's forward from its checkpoint (every recomputed layer but
// the last, whose shared buffers still hold its forward's), then runs its backward.
// Without recompute every layer keeps its activations (faster, about 0.34 GB per layer of gemma2-9b at 2 x 1024;
// the bf16 attention output, o_proj's input, is rounded again from the kept fp32 one instead); with
// recompute_mlp_only a layer keeps the outputs of its attention block and down_proj (about 0.10 GB) and the
// backward recomputes only its MLP's input half (the norms, gate|up, GeGLU); with recompute_num_layers n only the
// first n layers are recomputed and the others keep everything, or with recompute_mlp_only their gate|up output
// (0.12 GB), the norms and GeGLU rebuilt from it: the same bits in every mode.
// Adapter gradients accumulate in fp32 over the micro-batches, each scaled by 1 / (the step's scored targets).
// The rounding points are those of the reference's `fast` policy (fast/README.md lists them per kernel).
#include "fast/engine.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <map>
#include <string>

#include "fast/adamw.cuh"
#include "fast/attention_sm90.cuh"
#include "fast/embedding.cuh"
#include "fast/fast.hpp"
#include "fast/gemm.cuh"
#include "fast/layer.cuh"
#include "fast/lora.cuh"
#include "fast/loss.cuh"
#include "fast/nf4.cuh"
#include "fast/profiler.cuh"
#include "fast/rmsnorm.cuh"
#include "fast/rope.cuh"
#include "fast/synthetic.cuh"
#include "fast/weights.cuh"
#include "fast/workspace.cuh"
#include "model/dtype.hpp"
#include "model/errors.hpp"
#include "model/synthetic.hpp"

namespace gemma::fast {

struct Engine::Impl : Dims {
  Config cfg;
  AdapterConfig ad;
  EngineOptions opt;
  MemoryTracker mem;
  cudaStream_t stream = nullptr;
  std::unique_ptr<Blas> blas;
  BaseWeights base;
  AdapterState lora;
  Workspace ws;
  CheckpointOffload offl;
  Profiler prof;
  const char* phase = "fwd";  // the forward's profile segments: "fwd", or "recompute" in the backward
  bool recomputing = false;   // layer_forward is the backward's recomputation
  const OpPin* probe_pin = nullptr;  // a gate probe's pins while probe_layer runs (LayerRun::pin); else null
  int64_t layers_rebuilt = 0; // layer recomputations of the current forward_backward (Pass::layers_rebuilt)

  void mark(const std::string& name) { prof.mark(name, stream); }

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
    check_recompute_num_layers(opt.recompute_num_layers);
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
    GEMMA_CUDA(cudaStreamCreateWithFlags(&offl.copy, cudaStreamNonBlocking));
    for (int i = 0; i < 2; ++i) {
      GEMMA_CUDA(cudaEventCreateWithFlags(&offl.written[i], cudaEventDisableTiming));
      GEMMA_CUDA(cudaEventCreateWithFlags(&offl.copied[i], cudaEventDisableTiming));
      GEMMA_CUDA(cudaEventCreateWithFlags(&offl.freed[i], cudaEventDisableTiming));
      GEMMA_CUDA(cudaEventCreateWithFlags(&offl.loaded[i], cudaEventDisableTiming));
    }
    blas = std::make_unique<Blas>(stream, mem);
    prof = Profiler::from_environment();

    base.embed = DeviceArray<bf16>(size_t(Vp * D), "the embedding (vocabulary padded to a multiple of 128)", mem);
    base.layers.resize(size_t(L));
    base.nf4 = nf4_base;
    auto projections = [&](LayerWeights& lw, const std::string& what) {
      lw.qkv = DeviceArray<bf16>(size_t(QKV * D), "q|k|v_proj weights" + what, mem);
      lw.o = DeviceArray<bf16>(size_t(D * HD), "o_proj weight" + what, mem);
      lw.gu = DeviceArray<bf16>(size_t(2 * I * D), "gate|up_proj weights" + what, mem);
      lw.down = DeviceArray<bf16>(size_t(D * I), "down_proj weight" + what, mem);
    };
    if (base.nf4) projections(base.staged, " (one layer dequantized from NF4)");
    for (auto& lw : base.layers) {
      if (!base.nf4) projections(lw, "");
      lw.scale = DeviceArray<float>(size_t(4 * D), "RMSNorm scales", mem);
    }
    base.final_scale = DeviceArray<float>(size_t(D), "final norm scale", mem);

    int64_t off = 0;
    for (const WeightSpec& w : adapter_weight_specs(cfg, ad)) {
      lora.tensors.push_back({w.name, w.shape, off});
      off += shape_numel(w.shape);
    }
    lora.n_params = off;
    lora.params = DeviceArray<float>(size_t(lora.n_params), "LoRA adapters (fp32)", mem);
    lora.grads = DeviceArray<float>(size_t(lora.n_params), "LoRA gradients (fp32)", mem);
    // With the weights, not on first use: a step sized by reserve (fit_recompute_num_layers) allocates nothing more.
    lora.sumsq_work = DeviceArray<double>(size_t(kSumSqBlocks + 1), "gradient norm partial sums", mem);
    lora.adam_m = DeviceArray<float>(size_t(lora.n_params), "AdamW first moments", mem);
    lora.adam_v = DeviceArray<float>(size_t(lora.n_params), "AdamW second moments", mem);
    GEMMA_CUDA(cudaMemsetAsync(lora.grads.get(), 0, size_t(lora.n_params) * 4, stream));
    GEMMA_CUDA(cudaMemsetAsync(lora.adam_m.get(), 0, size_t(lora.n_params) * 4, stream));
    GEMMA_CUDA(cudaMemsetAsync(lora.adam_v.get(), 0, size_t(lora.n_params) * 4, stream));
    wire_groups();
  }

  void wire_groups() {
    lora.groups.assign(size_t(L), {});
    auto align8 = [](int64_t n) { return (n + 7) / 8 * 8; };
    int64_t per_layer = 0;
    // Two passes: count the bf16 split elements, then hand out pointers. Every layer's splits use the same slot,
    // filled by ensure_splits(l) before the layer's products (1.2 GiB at 9b for all 42 layers at once; 29 MB).
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t l = 0; l < L; ++l) {
        int64_t at = 0;
        auto& G = lora.groups[size_t(l)];
        G[kQKV].in = D;
        G[kQKV].out_total = QKV;
        G[kO].in = HD;
        G[kO].out_total = D;
        G[kGU].in = D;
        G[kGU].out_total = 2 * I;
        G[kDown].in = I;
        G[kDown].out_total = D;
        if (pass == 1) {
          const LayerWeights& lw = base.nf4 ? base.staged : base.layers[size_t(l)];
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
            const int64_t oa = lora.offset(lora_weight_name(l, p, 'A')), ob = lora.offset(lora_weight_name(l, p, 'B'));
            P.A = lora.params.get() + oa;
            P.B = lora.params.get() + ob;
            P.gA = lora.grads.get() + oa;
            P.gB = lora.grads.get() + ob;
            P.Bfwd = lora.splits.get() + at;
          }
          at += align8(P.out * 6 * r);
          G[size_t(gi)].projs.push_back(P);
        }
        for (auto& g : G) {
          const int64_t np = int64_t(g.projs.size());
          lora.np_max = std::max<int>(lora.np_max, int(np));
          lora.gpart_max = std::max(lora.gpart_max, lora_gpart_elems(g, int(r)));
          if (pass == 1) g.Abwd = lora.splits.get() + at;
          at += align8(6 * r * np * g.in);
        }
        per_layer = std::max(per_layer, at);
      }
      if (pass == 0) lora.splits = DeviceArray<bf16>(size_t(std::max<int64_t>(per_layer, 1)), "LoRA bf16 splits (one layer's)", mem);
    }
    invalidate_splits();
  }

  // The adapters changed (loaded, generated, an optimizer step): the slot's splits are stale.
  void invalidate_splits() { lora.splits_layer = -1; }

  // Layer l's adapters as their bf16 split terms (lora.cuh) in the shared slot, unless it holds them already.
  void ensure_splits(int64_t l) {
    if (lora.splits_layer == l) return;
    const auto& groups = lora.groups[size_t(l)];
    lora_prepare(groups.data(), int(groups.size()), r, stream);
    lora.splits_layer = l;
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
    synthetic_bf16(base.embed.get() + from * D, Vp - from, D, D, stream_key(0, kEmbedPaddingName),
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
    if (!base.nf4 || base.staged_layer == l) return;
    LayerWeights& w = base.layers[size_t(l)];
    for (Proj p : kAllProj) {
      const size_t i = size_t(p);
      if (!w.nf4[i].empty())
        nf4_dequantize(proj_dst(base.staged, p), w.nf4[i].q, stream);
      else
        GEMMA_CUDA(cudaMemcpyAsync(proj_dst(base.staged, p), w.plain[i].get(), w.plain[i].size() * 2,
                                   cudaMemcpyDeviceToDevice, stream));
    }
    base.staged_layer = l;
    mark("NF4 dequantization");
  }

  void load(const Checkpoint& ck) {
    auto need = [&](const std::string& name) -> const Tensor& {
      auto it = ck.weights.find(name);
      if (it == ck.weights.end()) throw InputError("fast: checkpoint has no tensor '" + name + "'");
      return it->second;
    };
    upload_bf16(base.embed.get(), need(kEmbedName));
    int64_t given = 0;
    if (auto it = ck.weights.find(kEmbedPaddingName); it != ck.weights.end()) {
      if (it->second.shape.size() != 2 || it->second.shape[1] != D)
        throw InputError("fast: padding rows '" + std::string(kEmbedPaddingName) + "' must be (P, hidden_size)");
      upload_bf16(base.embed.get() + V * D, it->second);
      given = it->second.shape[0];
    }
    fill_padding(V + given);
    DeviceArray<unsigned long long> count;
    if (base.nf4) count = DeviceArray<unsigned long long>(1, "NF4 comparison counter", mem);
    for (int64_t l = 0; l < L; ++l) {
      LayerWeights& w = base.layers[size_t(l)];
      for (Proj p : kAllProj) {
        const std::string name = proj_weight_name(l, p);
        if (!base.nf4) {
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
        upload_bf16(proj_dst(base.staged, p), t);
        if (const unsigned long long bad = nf4_mismatches(proj_dst(base.staged, p), w.nf4[i].q, count.get(), stream))
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
    upload_norm(base.final_scale.get(), need(kFinalNormName));
    for (const auto& t : lora.tensors) upload_f32(lora.params.get() + t.offset, need(t.name));
    invalidate_splits();
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    base.staged_layer = -1;  // the staging buffers served as scratch
  }

  void generate(uint64_t seed) {
    auto gen = [&](bf16* dst, const std::string& name, int64_t rows, int64_t cols) {
      synthetic_bf16(dst, rows, cols, cols, stream_key(seed, name), std::sqrt(3.0) * synthetic_std(cfg, name), stream);
    };
    gen(base.embed.get(), kEmbedName, V, D);
    fill_padding(V);
    DeviceArray<bf16> tmp(size_t(D), "norm weight generation", mem);
    auto norm = [&](float* scale, const std::string& name) {
      gen(tmp.get(), name, 1, D);
      norm_scale(scale, tmp.get(), D, stream);
    };
    // NF4: each projection generated into the staging buffer, then quantized as QLoRA does (blocksize 64, double
    // quantization): the bits of quantize_nf4 applied to synthetic_weights.
    DeviceArray<float> absmax;
    if (base.nf4) absmax = DeviceArray<float>(size_t((std::max(QKV, 2 * I) * D + kNF4Blocksize - 1) / kNF4Blocksize),
                                         "NF4 quantization absmax", mem);
    for (int64_t l = 0; l < L; ++l) {
      LayerWeights& w = base.layers[size_t(l)];
      for (Proj p : kAllProj) {
        const std::string name = proj_weight_name(l, p);
        const int64_t rows = proj_out(cfg, p), cols = proj_in(cfg, p);
        gen(proj_dst(base.nf4 ? base.staged : w, p), name, rows, cols);
        if (base.nf4)
          w.nf4[size_t(p)] = nf4_quantize_device(proj_dst(base.staged, p), Shape{rows, cols}, kNF4Blocksize, true,
                                                 absmax.get(), name + " (NF4)", mem, stream);
      }
      for (Norm n : kAllNorms) norm(w.scale.get() + int64_t(n) * D, norm_weight_name(l, n));
    }
    norm(base.final_scale.get(), kFinalNormName);
    // synthetic_adapters: A uniform with std 1/sqrt(in), B with std 0.25/sqrt(r), both rounded to bf16.
    for (const auto& t : lora.tensors) {
      const bool is_a = t.name.find("lora_A") != std::string::npos;
      const double sd = is_a ? 1.0 / std::sqrt(double(t.shape[1])) : 0.25 / std::sqrt(double(ad.r));
      synthetic_f32(lora.params.get() + t.offset, shape_numel(t.shape), stream_key(seed, t.name), std::sqrt(3.0) * sd,
                    stream);
    }
    invalidate_splits();
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    base.staged_layer = -1;  // the staging buffers served as scratch
  }

  ~Impl() {
    if (stream) cudaStreamSynchronize(stream);
    if (offl.copy) cudaStreamSynchronize(offl.copy);
    blas.reset();
    if (offl.host) cudaFreeHost(offl.host);  // not release_host: a destructor does not throw
    for (int i = 0; i < 2; ++i) {
      if (offl.written[i]) cudaEventDestroy(offl.written[i]);
      if (offl.copied[i]) cudaEventDestroy(offl.copied[i]);
      if (offl.freed[i]) cudaEventDestroy(offl.freed[i]);
      if (offl.loaded[i]) cudaEventDestroy(offl.loaded[i]);
    }
    if (offl.copy) cudaStreamDestroy(offl.copy);
    if (stream) cudaStreamDestroy(stream);
  }

  // ------------------------------------------------------------------------------------------------------
  // Work buffers

  void release_work() {
    ws.release();
    offl.release_host();
  }

  void check_recompute_num_layers(int64_t n) const {
    if (n == -1) return;
    if (!opt.recompute)
      throw InputError("fast: recompute_num_layers chooses which layers activation checkpointing recomputes; this "
                       "run has no recompute");
    if (n < 0 || n > cfg.num_hidden_layers)
      throw InputError("fast: recompute_num_layers " + std::to_string(n) + " is outside 0 .. num_hidden_layers " +
                       std::to_string(cfg.num_hidden_layers) + " (or -1 for every layer)");
  }
  void set_recompute_num_layers(int64_t n) {
    check_recompute_num_layers(n);
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    GEMMA_CUDA(cudaStreamSynchronize(offl.copy));
    release_work();
    ws.capB = ws.capT = ws.capN = 0;
    opt.recompute_num_layers = n;
  }
  // What the fit leaves free when the limit is the device itself: CUDA loads kernels lazily and NCCL sets up its
  // buffers at the first all-reduce, outside the engine's count.
  static constexpr size_t kFitMargin = size_t(1) << 30;

  int64_t fit_recompute_num_layers(int64_t B, int64_t T) {
    if (!opt.recompute)
      throw InputError("fast: choosing recompute_num_layers needs recompute (activation checkpointing)");
    struct RestoreLimit {
      size_t& limit;
      size_t saved;
      ~RestoreLimit() { limit = saved; }
    } restore{mem.limit, mem.limit};
    if (mem.limit == 0) {
      size_t free_b = 0, total_b = 0;
      GEMMA_CUDA(cudaMemGetInfo(&free_b, &total_b));
      mem.limit = mem.current + free_b - std::min(free_b, kFitMargin);
    }
    std::string why;
    auto fits = [&](int64_t n) {
      set_recompute_num_layers(n);
      return reserve(B, T, &why);
    };
    if (!fits(L))
      throw OutOfMemory("fast: micro-batches of " + std::to_string(B) + " x " + std::to_string(T) +
                        " tokens do not fit even with every layer recomputed: " + why);
    if (fits(0)) return 0;
    int64_t lo = 0, hi = L;  // lo does not fit, hi does
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      (fits(mid) ? hi : lo) = mid;
    }
    if (!fits(hi)) throw std::logic_error("fast: recompute_num_layers " + std::to_string(hi) + " no longer fits: " + why);
    return hi;
  }

  void ensure(int64_t B, int64_t T) {
    if (B <= ws.capB && T <= ws.capT) return;
    prof.skip = true;  // a step that allocates is not a step to time
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    GEMMA_CUDA(cudaStreamSynchronize(offl.copy));
    release_work();
    ws.capB = std::max(ws.capB, B);
    ws.capT = std::max(ws.capT, T);
    // A failed allocation leaves no capacity behind: the next call allocates again instead of using freed buffers.
    try {
      allocate_work();
    } catch (...) {
      release_work();
      ws.capB = ws.capT = ws.capN = 0;
      throw;
    }
  }

  // Every buffer of a step of capB x capT tokens (ensure).
  void allocate_work() {
    const int64_t N = ws.capB * ws.capT;
    ws.capN = N;
    auto F = [&](int64_t n, const std::string& what) { return DeviceArray<float>(size_t(std::max<int64_t>(n, 1)), what, mem); };
    auto Hf = [&](int64_t n, const std::string& what) { return DeviceArray<bf16>(size_t(std::max<int64_t>(n, 1)), what, mem); };
    ws.ids = DeviceArray<int32_t>(size_t(N), "token ids", mem);
    ws.targets = DeviceArray<int32_t>(size_t(N), "targets", mem);
    ws.slots = DeviceArray<int>(size_t(N), "logit row slots", mem);
    ws.pos = DeviceArray<int32_t>(size_t(N), "RoPE positions", mem);
    ws.doc = DeviceArray<int32_t>(size_t(N), "document ids", mem);
    ws.key_ok = DeviceArray<uint8_t>(size_t(N), "padding mask", mem);
    ws.rope_rows = 0;
    ensure_rope(ws.capT);
    const int64_t nck = opt.offload ? 2 : L + 1;
    for (int64_t i = 0; i < nck; ++i) ws.ckpt.push_back(F(N * D, "activation checkpoints (an fp32 residual per layer)"));
    if (opt.offload) {
      offl.host_bytes = size_t(L) * size_t(N * D) * 4;
      const cudaError_t e = cudaMallocHost(&offl.host, offl.host_bytes);
      if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        offl.host = nullptr;
        throw OutOfMemory("fast: out of pinned host memory for offloaded activation checkpoints (" +
                          std::to_string(offl.host_bytes >> 20) + " MiB); hint: fewer sequences per micro-batch");
      }
      GEMMA_CUDA(e);
    }
    // Each activation buffer is a layer's own, or one that the layers sharing it overwrite in their forwards and
    // rebuild in the backward; recompute_mlp_only keeps the attention block's and down_proj's outputs per layer, and
    // a layer that is not recomputed (no recompute, or past recompute_num_layers) keeps all of its own, except with
    // recompute_mlp_only, where it keeps the gate|up product's output and the backward rebuilds the norms and GeGLU
    // from it (half the memory of keeping them at 9b; 0.45 ms a layer, and 2.9 more where gate|up is recomputed).
    ws.acts.assign(size_t(L), Acts{});
    const bool mlp_only = opt.recompute_mlp_only;
    // kind: which layers own the activation. kAll: those not recomputed, and none with recompute_mlp_only, whose
    // layers all rebuild the norms and GeGLU; kGate: those not recomputed; kKept: those, and every layer with
    // recompute_mlp_only; kStats: those, and every layer when the statistics outlive the recomputation; kShared:
    // none, one buffer for every layer.
    enum Kind { kAll, kGate, kKept, kStats, kShared };
    auto own = [&](int64_t l, Kind kind) {
      switch (kind) {
        case kAll: return !recomputed(l) && !mlp_only;
        case kGate: return !recomputed(l);
        case kKept: return !recomputed(l) || mlp_only;
        case kStats: return !recomputed(l) || keep_stats();
        case kShared: return false;
      }
      return true;
    };
    // One allocation: a slice per layer that owns the activation, then one slice the others share.
    auto slices = [&](Kind kind) {
      int64_t owners = 0;
      for (int64_t l = 0; l < L; ++l) owners += own(l, kind);
      return owners + (owners < L ? 1 : 0);
    };
    auto place = [&](auto* base, int64_t n, Kind kind, auto&& set) {
      const int64_t shared = slices(kind) - 1;  // the last slice, when some layer does not own one
      int64_t next = 0;
      for (int64_t l = 0; l < L; ++l) set(l, base + (own(l, kind) ? next++ : shared) * n);
    };
    auto per = [&](auto& bufs, auto Acts::*field, Kind kind, int64_t n, const std::string& what) {
      bufs.emplace_back(size_t(std::max<int64_t>(n * slices(kind), 1)), what, mem);
      place(bufs.back().get(), n, kind, [&](int64_t l, auto* p) { ws.acts[size_t(l)].*field = p; });
    };
    per(ws.act_bf16, &Acts::xn1, kAll, N * D, "activations: input_layernorm output");
    per(ws.act_bf16, &Acts::qkv, kKept, N * QKV, "activations: q|k|v");
    // The bf16 attention output is o_proj's input: the backward rounds o32 again where a later forward has
    // overwritten it (LayerRun::att_current), the kernels' own rounding of the same values, so no layer keeps it.
    per(ws.act_bf16, &Acts::att, kShared, N * HD, "activations: attention output");
    per(ws.act_f32, &Acts::o32, kKept, N * HD, "activations: attention output (fp32)");
    // With recompute, every layer's softmax statistics (8 bytes per token, head and layer) outlive the shared
    // activations, and the recomputed forward leaves them as the first forward wrote them (attn_params, stats_in;
    // it computes the same bits). This saved the two-pass forward's first pass; the one-pass forward gains nothing
    // from it, so it is memory a later change can give back. Not with offload, the mode for the longest sequences,
    // where they would cost 0.7 GiB of 80 at 9b, T = 131072.
    per(ws.act_f32, &Acts::m, kStats, ws.capB * H * ws.capT, "activations: softmax max");
    per(ws.act_f32, &Acts::l, kStats, ws.capB * H * ws.capT, "activations: softmax sum");
    per(ws.act_bf16, &Acts::o, kKept, N * D, "activations: o_proj output");
    per(ws.act_f32, &Acts::x_mid, kAll, N * D, "activations: mid-layer residual");
    per(ws.act_bf16, &Acts::xn2, kAll, N * D, "activations: pre_feedforward_layernorm output");
    per(ws.act_bf16, &Acts::gu, kGate, N * 2 * I, "activations: gate|up");
    per(ws.act_bf16, &Acts::act, kAll, N * I, "activations: GeGLU output");
    per(ws.act_bf16, &Acts::down, kKept, N * D, "activations: down_proj output");
    per(ws.act_f32, &Acts::rstd, kKept, 4 * N, "activations: RMSNorm 1/rms");
    const auto& G = lora.groups.empty() ? std::array<LoraGroupDev, 4>{} : lora.groups[0];
    for (int g = 0; g < 4; ++g) {
      const int64_t n = N * 6 * r * int64_t(G[size_t(g)].projs.size());
      const Kind kind = g == kGU ? kGate : kKept;  // gate|up's splits are recomputed with its product
      ws.act_bf16.emplace_back(size_t(std::max<int64_t>(n * slices(kind), 1)), "activations: LoRA splits", mem);
      place(ws.act_bf16.back().get(), n, kind, [&](int64_t l, bf16* p) { ws.acts[size_t(l)].L[size_t(g)] = p; });
    }
    ws.x_scratch = F(N * D, "recomputed layer output");
    ws.dres = Hf(N * D, "residual gradient");
    ws.dsmall = Hf(N * D, "norm-input gradient");
    // Logits chunks of about 512 MiB (fp32 logits and bf16 gradients): the (N, V) matrix never exists at once.
    // At most kCeMaxRows (loss.cuh's grid), which only small vocabularies reach (Vp <= 1280 and N > 65535).
    ws.chunk_rows = std::clamp<int64_t>((int64_t(512) << 20) / (Vp * 6), 1,
                                        std::max<int64_t>(1, std::min(N, kCeMaxRows)));
    // The logits chunk shares two buffers whose uses never overlap it in time: the head runs after the last
    // layer's forward and before the first layer's backward (micro_step). With dacc no longer sized for gate|up's
    // whole output, these four buffers take 0.94 GiB less at gemma2-9b 2 x 4096 tokens (the chunk fits in them),
    // 0.33 GiB less at 2 x 1024 and 0.73 GiB less at gemma2-27b 2 x 1024.
    ws.dgu = Hf(std::max(N * 2 * I, ws.chunk_rows * Vp), "gate|up gradient; logits-gradient chunk (bf16)");
    ws.datt = Hf(N * HD, "attention-output gradient");
    ws.dqkv = Hf(N * QKV, "q|k|v gradient");
    // Backward: the fp32 product sums of the input gradients (N x the widest group input: D, HD or I); forward: the
    // fp32 adapter terms of a group's output where the fused add does not apply, in blocks of rows
    // (group_forward: at least one row of the widest output); the head: the fp32 logits chunk.
    ws.dacc = F(std::max({N * std::max({D, I, HD}), std::max({QKV, D, 2 * I}), ws.chunk_rows * Vp}),
                "fp32 product sums (input gradients, adapter terms); logits chunk (fp32)");
    ws.dQ = F(N * HD, "dq (fp32)");
    ws.dK = F(N * KVHD, "dk (fp32)");
    ws.dV = F(N * KVHD, "dv (fp32)");
    ws.Dv = F(ws.capB * H * ws.capT, "attention rowsum(dO O)");
    ws.tile_stats = F(attn_tile_stats_count(ws.capB, H, ws.capT), "attention statistics a 64-query tile at a time");
    ws.part = F(N * 3 * r * lora.np_max, "LoRA partial products");
    ws.Lb = Hf(N * 6 * r * lora.np_max, "LoRA backward splits");
    ws.gpart = F(lora.gpart_max, "LoRA gradient partials");
    ws.xf = Hf(N * D, "final norm output");
    ws.dxf = Hf(N * D, "final norm output gradient");
    ws.rstd_f = F(N, "final norm 1/rms");
    ws.row_loss = F(N, "per-token losses");
    ws.ce_stats = F(ws.chunk_rows * ce_parts(Vp) * 2, "loss block statistics");
  }

  // RoPE tables for positions 0..rows-1 (rebuilt when a micro-batch's positions go further).
  void ensure_rope(int64_t rows) {
    if (rows <= ws.rope_rows) return;
    std::vector<float> c, sn;
    rope_tables(rows, hd, cfg.rope_theta, c, sn);
    ws.cosv = DeviceArray<float>(c.size(), "RoPE cos table", mem);
    ws.sinv = DeviceArray<float>(sn.size(), "RoPE sin table", mem);
    h2d(ws.cosv.get(), c.data(), c.size() * 4);
    h2d(ws.sinv.get(), sn.data(), sn.size() * 4);
    ws.rope_rows = rows;
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
    h2d(ws.pos.get(), ph.data(), size_t(N) * 4);
    ws.has_doc = mb.packed();
    if (ws.has_doc) {
      const std::vector<int32_t> d = mb.document_ids();
      h2d(ws.doc.get(), d.data(), size_t(N) * 4);
    }
    ws.has_mask = !mb.attention_mask.empty();
    if (ws.has_mask) h2d(ws.key_ok.get(), mb.attention_mask.data(), size_t(N));
  }

  bool reserve(int64_t B, int64_t T, std::string* why) {
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    GEMMA_CUDA(cudaStreamSynchronize(offl.copy));
    release_work();
    ws.capB = ws.capT = ws.capN = 0;
    try {
      ensure(B, T);
      mem.peak = mem.current;  // a search's failed attempts are not a step's peak
      return true;
    } catch (const OutOfMemory& e) {
      if (why) *why = e.what();
      release_work();
      ws.capB = ws.capT = ws.capN = 0;
      return false;
    }
  }

  void ensure_slots(int64_t n) {
    if (n <= ws.cap_slots) return;
    ws.capped = DeviceArray<float>(size_t(n * V), "requested logit rows", mem);
    ws.cap_slots = n;
  }

  // ------------------------------------------------------------------------------------------------------
  // Layers

  Acts& acts_for(int64_t l) { return ws.acts[size_t(l)]; }
  // Every layer's softmax statistics kept across the recomputation (allocate_work).
  bool keep_stats() const { return opt.recompute && !opt.offload; }
  // The layers checkpointed and recomputed in the backward: 0 .. n_recomputed() - 1 (recompute_num_layers: the
  // first ones); the others keep their forward's activations (all, or with recompute_mlp_only gate|up's output).
  int64_t n_recomputed() const {
    return !opt.recompute ? 0 : opt.recompute_num_layers < 0 ? L : opt.recompute_num_layers;
  }
  bool recomputed(int64_t l) const { return l < n_recomputed(); }
  // Whether the backward must rebuild layer l's activations: a layer's that shares buffers with the others, except
  // the last such layer's, whose forward wrote them last (the layers after it own theirs, the head writes only the
  // workspace, and a backward only the workspace and the attention output, which att_current follows). So the full
  // recompute rebuilds L - 1 layers and recompute_num_layers n rebuilds n - 1; with recompute_mlp_only every layer
  // shares the norms' and GeGLU's buffers, so L - 1 layers are rebuilt, without the gate|up product where the
  // layer's own is still there (gate_up_current).
  bool rebuilt(int64_t l) const {
    if (!opt.recompute) return false;
    if (opt.recompute_mlp_only) return l < L - 1;
    return l < n_recomputed() - 1;
  }
  // Whether layer l's gate|up output and its adapter splits still hold its own when its backward runs: a layer
  // that is not recomputed owns them, and the last recomputed layer's forward wrote the shared ones last.
  bool gate_up_current(int64_t l) const { return !recomputed(l) || l == n_recomputed() - 1; }
  // Whether layer l's bf16 attention output (one buffer for every layer) still holds its own when its backward
  // runs: the last layer's forward wrote it last, and a full recomputation writes it again.
  bool att_current(int64_t l) const { return l == L - 1 || (rebuilt(l) && !opt.recompute_mlp_only); }

  LayerRun layer_run(int64_t l) {
    const bool gate_up_kept = recomputing && opt.recompute_mlp_only && gate_up_current(l);
    // A pinned probe's backward follows its forward on the same layer, whose attention output (pinned) is current.
    return LayerRun{cfg, *this, opt.softcap, blas->h, stream, ws, prof, phase, recomputing, keep_stats(),
                    opt.recompute_mlp_only, gate_up_kept, probe_pin ? true : att_current(l), probe_pin};
  }
  // Layer l's weights in place (NF4 staged, adapter splits prepared), then its pass (layer.cuh).
  void layer_forward(int64_t l, const float* x_in, float* x_out, int64_t B, int64_t T) {
    stage(l);
    ensure_splits(l);
    fast::layer_forward(layer_run(l), l, base.layers[size_t(l)], lora.groups[size_t(l)], acts_for(l), x_in, x_out, B, T);
  }
  void layer_backward(int64_t l, const float* x_in, int64_t B, int64_t T) {
    stage(l);
    ensure_splits(l);
    fast::layer_backward(layer_run(l), l, base.layers[size_t(l)], lora.groups[size_t(l)], acts_for(l), x_in, B, T);
  }

  // Final norm, then the LM head and the loss chunk by chunk, then the final norm's backward: dres holds the
  // gradient of the residual x (N, D) entering the final norm. pin (a gate probe's, else null): "xf", the LM head's input.
  void head(int64_t N, const float* x, float grad_scale, const OpPin* pin = nullptr) {
    rmsnorm_forward_in(ws.xf.get(), ws.rstd_f.get(), x, base.final_scale.get(), N, D, eps, stream);
    mark("fwd norms");
    if (pin) (*pin)("xf", ws.xf.get(), N, D, D, false);
    for (int64_t c0 = 0; c0 < N; c0 += ws.chunk_rows) {
      LossChunk c;
      c.xf = ws.xf.get() + c0 * D;
      c.E = base.embed.get();
      c.target = ws.targets.get() + c0;
      c.capped_slot = ws.slots.get() + c0;
      c.rows = std::min(ws.chunk_rows, N - c0);
      c.D = D;
      c.V = V;
      c.Vp = Vp;
      c.cap_on = opt.softcap.logits;
      c.cap = float(cfg.final_logit_softcapping.value_or(1.0));
      c.grad_scale = grad_scale;
      c.logits = ws.dacc.get();  // the chunk lives in these two (allocate_work)
      c.dlog = ws.dgu.get();
      c.stats = reinterpret_cast<float2*>(ws.ce_stats.get());
      c.row_loss = ws.row_loss.get() + c0;
      c.capped_out = ws.capped.get();
      c.dxf = ws.dxf.get() + c0 * D;
      lm_head_loss_chunk(blas->h, c, stream);
    }
    mark("LM head + softcap + cross-entropy (fwd and bwd)");
    rmsnorm_backward_final(ws.dres.get(), ws.dxf.get(), x, ws.rstd_f.get(), base.final_scale.get(), N, D, stream);
    mark("bwd norms");
  }

  // ------------------------------------------------------------------------------------------------------
  // Checkpoints: L + 1 device buffers, or two device slots backed by pinned host memory.

  float* ck_dev(int64_t l) { return opt.offload ? ws.ckpt[size_t(l % 2)].get() : ws.ckpt[size_t(l)].get(); }
  float* ck_host(int64_t l, int64_t N) { return offl.host + size_t(l) * size_t(N * D); }

  void micro_step(int64_t B, int64_t T, float grad_scale) {
    const int64_t N = B * T;
    const size_t ck_bytes = size_t(N * D) * 4;
    auto saved = [&](int64_t l) {  // checkpoint l is written: copy it out
      if (!opt.offload || l >= L) return;
      GEMMA_CUDA(cudaEventRecord(offl.written[l % 2], stream));
      GEMMA_CUDA(cudaStreamWaitEvent(offl.copy, offl.written[l % 2], 0));
      GEMMA_CUDA(cudaMemcpyAsync(ck_host(l, N), ck_dev(l), ck_bytes, cudaMemcpyDeviceToHost, offl.copy));
      GEMMA_CUDA(cudaEventRecord(offl.copied[l % 2], offl.copy));
    };
    embed_forward(ck_dev(0), ws.ids.get(), base.embed.get(), N, D, normalizer, stream);
    saved(0);
    mark("embedding");
    phase = "fwd";
    for (int64_t l = 0; l < L; ++l) {
      if (opt.offload && l + 1 >= 2) GEMMA_CUDA(cudaStreamWaitEvent(stream, offl.copied[(l + 1) % 2], 0));
      layer_forward(l, ck_dev(l), ck_dev(l + 1), B, T);
      saved(l + 1);
    }

    head(N, ck_dev(L), grad_scale);
    if (opt.offload) GEMMA_CUDA(cudaEventRecord(offl.freed[L % 2], stream));
    phase = "recompute";

    for (int64_t l = L - 1; l >= 0; --l) {
      if (opt.offload) {
        if (l <= L - 2) GEMMA_CUDA(cudaStreamWaitEvent(stream, offl.loaded[l % 2], 0));
        if (l >= 1) {  // prefetch checkpoint l - 1 into the slot the layer above has finished with
          GEMMA_CUDA(cudaStreamWaitEvent(offl.copy, offl.freed[(l - 1) % 2], 0));
          GEMMA_CUDA(cudaMemcpyAsync(ck_dev(l - 1), ck_host(l - 1, N), ck_bytes, cudaMemcpyHostToDevice, offl.copy));
          GEMMA_CUDA(cudaEventRecord(offl.loaded[(l - 1) % 2], offl.copy));
        }
      }
      if (opt.offload && l <= L - 2) mark("offload: waiting for a checkpoint");
      if (rebuilt(l)) {
        layers_rebuilt += !gate_up_current(l);  // not the norms and GeGLU alone (recompute_mlp_only)
        // Cleared however layer_forward ends: a forward after a failed one must compute its own statistics.
        struct Recomputing {
          bool& flag;
          explicit Recomputing(bool& f) : flag(f) { flag = true; }
          ~Recomputing() { flag = false; }
        } scope(recomputing);
        layer_forward(l, ck_dev(l), ws.x_scratch.get(), B, T);
      }
      layer_backward(l, ck_dev(l), B, T);
      if (opt.offload) GEMMA_CUDA(cudaEventRecord(offl.freed[l % 2], stream));
    }
  }

  // A micro-batch's token ids, targets, positions, documents and padding on the device, and the slots of the
  // requested logit rows (rows row0.. of the flattened step are this micro-batch's); returns those rows.
  std::vector<int64_t> upload_inputs(const Batch& mb, const std::vector<int64_t>& logit_rows, int64_t row0) {
    ensure(mb.B, mb.T);
    const int64_t N = mb.B * mb.T;
    ws.ids_h.assign(size_t(N), 0);
    ws.tgt_h.assign(size_t(N), -100);
    ws.slot_h.assign(size_t(N), -1);
    for (int64_t n = 0; n < N; ++n) {
      ws.ids_h[size_t(n)] = int32_t(mb.input_ids[size_t(n)]);
      ws.tgt_h[size_t(n)] = int32_t(mb.target(n / mb.T, n % mb.T));
    }
    std::vector<int64_t> slot_rows;
    for (int64_t row : logit_rows)
      if (row >= row0 && row < row0 + N && ws.slot_h[size_t(row - row0)] < 0) {
        ws.slot_h[size_t(row - row0)] = int(slot_rows.size());
        slot_rows.push_back(row);
      }
    ensure_slots(int64_t(slot_rows.size()));
    GEMMA_CUDA(cudaMemcpyAsync(ws.ids.get(), ws.ids_h.data(), size_t(N) * 4, cudaMemcpyHostToDevice, stream));
    GEMMA_CUDA(cudaMemcpyAsync(ws.targets.get(), ws.tgt_h.data(), size_t(N) * 4, cudaMemcpyHostToDevice, stream));
    GEMMA_CUDA(cudaMemcpyAsync(ws.slots.get(), ws.slot_h.data(), size_t(N) * 4, cudaMemcpyHostToDevice, stream));
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

  // A gate probe's OpPin (layer.cuh): the operation's own output into `own` by name, the pin from `pins` in its place.
  OpPin pin_from(const std::map<std::string, std::vector<float>>& pins, std::map<std::string, std::vector<float>>& own) {
    return [this, &pins, &own](const char* name, void* ptr, int64_t rows, int64_t cols, int64_t ld, bool fp32) {
      const auto it = pins.find(name);
      if (it == pins.end()) throw InputError(std::string("fast: probe pins have no '") + name + "'");
      if (int64_t(it->second.size()) != rows * cols)
        throw InputError(std::string("fast: probe pin '") + name + "' is not (" + std::to_string(rows) + ", " +
                         std::to_string(cols) + ")");
      const size_t esz = fp32 ? 4 : 2, width = size_t(cols) * esz, pitch = size_t(ld) * esz;
      std::vector<uint16_t> raw;
      const void* src = it->second.data();
      if (fp32) {
        own[name] = d2h(static_cast<const float*>(ptr), rows * cols, ld, cols);
      } else {
        own[name] = d2h(static_cast<const bf16*>(ptr), rows * cols, ld, cols);
        raw.resize(it->second.size());
        for (size_t i = 0; i < raw.size(); ++i) raw[i] = float_to_bf16(it->second[i]);
        src = raw.data();
      }
      GEMMA_CUDA(cudaMemcpy2DAsync(ptr, pitch, src, width, width, size_t(rows), cudaMemcpyHostToDevice, stream));
      GEMMA_CUDA(cudaStreamSynchronize(stream));
    };
  }

  std::map<std::string, std::vector<float>> probe_layer(int64_t l, const Batch& mb, const std::vector<float>& x,
                                                        const std::vector<float>& dy,
                                                        const std::map<std::string, std::vector<float>>& pins) {
    upload_inputs(mb, {}, 0);
    const int64_t N = mb.B * mb.T;
    if (int64_t(x.size()) != N * D || int64_t(dy.size()) != N * D) throw InputError("fast: probe inputs must be (N, D)");
    float* xin = ck_dev(0);
    h2d(xin, x.data(), size_t(N * D) * 4);
    GEMMA_CUDA(cudaMemsetAsync(lora.grads.get(), 0, size_t(lora.n_params) * 4, stream));
    // Pinned, each operation's own output is taken where it is made, before its pin replaces it.
    std::map<std::string, std::vector<float>> out;
    const OpPin pin = pin_from(pins, out);
    probe_pin = pins.empty() ? nullptr : &pin;
    struct Unpin {
      const OpPin*& p;
      ~Unpin() { p = nullptr; }
    } unpin{probe_pin};
    layer_forward(l, xin, ws.x_scratch.get(), mb.B, mb.T);
    Acts& A = acts_for(l);
    auto unless_pinned = [&](const char* name, auto get) {
      if (!out.count(name)) out[name] = get();
    };
    unless_pinned("xn1", [&] { return d2h(A.xn1, N * D); });
    unless_pinned("q", [&] { return d2h(A.qkv, N * HD, QKV, HD); });
    unless_pinned("k", [&] { return d2h(A.qkv + HD, N * KVHD, QKV, KVHD); });
    unless_pinned("v", [&] { return d2h(A.qkv + HD + KVHD, N * KVHD, QKV, KVHD); });
    unless_pinned("att", [&] { return d2h(A.att, N * HD); });
    unless_pinned("o", [&] { return d2h(A.o, N * D); });
    unless_pinned("x_mid", [&] { return d2h(A.x_mid, N * D); });
    unless_pinned("xn2", [&] { return d2h(A.xn2, N * D); });
    unless_pinned("gate", [&] { return d2h(A.gu, N * I, 2 * I, I); });
    unless_pinned("up", [&] { return d2h(A.gu + I, N * I, 2 * I, I); });
    unless_pinned("act", [&] { return d2h(A.act, N * I); });
    unless_pinned("down", [&] { return d2h(A.down, N * D); });
    out["x_out"] = d2h(ws.x_scratch.get(), N * D);
    std::vector<uint16_t> dyb(dy.size());
    for (size_t i = 0; i < dy.size(); ++i) dyb[i] = float_to_bf16(dy[i]);
    h2d(ws.dres.get(), dyb.data(), dyb.size() * 2);
    layer_backward(l, xin, mb.B, mb.T);
    out["dx"] = d2h(ws.dres.get(), N * D);
    unless_pinned("d_o", [&] { return d2h(ws.dsmall.get(), N * D); });
    unless_pinned("d_gate", [&] { return d2h(ws.dgu.get(), N * I, 2 * I, I); });
    unless_pinned("d_up", [&] { return d2h(ws.dgu.get() + I, N * I, 2 * I, I); });
    unless_pinned("d_att", [&] { return d2h(ws.datt.get(), N * HD); });
    unless_pinned("dq", [&] { return d2h(ws.dqkv.get(), N * HD, QKV, HD); });
    unless_pinned("dk", [&] { return d2h(ws.dqkv.get() + HD, N * KVHD, QKV, KVHD); });
    unless_pinned("dv", [&] { return d2h(ws.dqkv.get() + HD + KVHD, N * KVHD, QKV, KVHD); });
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    for (auto& [name, t] : download(lora.grads.get()))
      if (name.rfind(pre, 0) == 0) {
        const float* f = reinterpret_cast<const float*>(t.bytes.get());
        out[name] = std::vector<float>(f, f + t.numel());
      }
    return out;
  }

  std::map<std::string, std::vector<float>> probe_head(const Batch& mb, const std::vector<float>& x,
                                                       const std::vector<float>& xf, float grad_scale) {
    upload_inputs(mb, {}, 0);
    const int64_t N = mb.B * mb.T;
    if (int64_t(x.size()) != N * D || (!xf.empty() && int64_t(xf.size()) != N * D))
      throw InputError("fast: probe inputs must be (N, D)");
    float* xin = ck_dev(0);
    h2d(xin, x.data(), size_t(N * D) * 4);
    std::map<std::string, std::vector<float>> out;
    const std::map<std::string, std::vector<float>> pins = {{"xf", xf}};
    const OpPin pin = pin_from(pins, out);
    head(N, xin, grad_scale, xf.empty() ? nullptr : &pin);
    out["row_loss"] = d2h(ws.row_loss.get(), N);
    if (!out.count("xf")) out["xf"] = d2h(ws.xf.get(), N * D);
    out["dxf"] = d2h(ws.dxf.get(), N * D);
    out["dx"] = d2h(ws.dres.get(), N * D);
    return out;
  }

  std::vector<float> probe_embedding(const Batch& mb) {
    upload_inputs(mb, {}, 0);
    const int64_t N = mb.B * mb.T;
    embed_forward(ck_dev(0), ws.ids.get(), base.embed.get(), N, D, normalizer, stream);
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
    prof.begin(stream);
    GEMMA_CUDA(cudaMemsetAsync(lora.grads.get(), 0, size_t(lora.n_params) * 4, stream));
    const float grad_scale = float(1.0 / double(total));
    Pass out;
    layers_rebuilt = 0;
    for (const Batch& b : micro) out.tokens += b.count_targets();
    int64_t row0 = 0;
    for (const Batch& mb : micro) {
      const int64_t N = mb.B * mb.T;
      const std::vector<int64_t> slot_rows = upload_inputs(mb, logit_rows, row0);
      mark("inputs");
      micro_step(mb.B, mb.T, grad_scale);
      ws.loss_h.assign(size_t(N), 0.0f);
      GEMMA_CUDA(cudaMemcpyAsync(ws.loss_h.data(), ws.row_loss.get(), size_t(N) * 4, cudaMemcpyDeviceToHost, stream));
      GEMMA_CUDA(cudaStreamSynchronize(stream));
      for (float x : ws.loss_h) out.loss_sum += double(x);
      for (size_t k = 0; k < slot_rows.size(); ++k) {
        std::vector<float> row(static_cast<size_t>(V));
        GEMMA_CUDA(cudaMemcpy(row.data(), ws.capped.get() + int64_t(k) * V, size_t(V) * 4, cudaMemcpyDeviceToHost));
        out.logits[slot_rows[k]] = std::move(row);
      }
      row0 += N;
    }
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    prof.end(stream);
    prof.count_step();
    out.layers_rebuilt = layers_rebuilt;
    return out;
  }

  void adamw_step(const AdamWHyper& hp) {
    prof.begin(stream);
    ++lora.adam_t;
    adamw_update(lora.params.get(), lora.grads.get(), lora.adam_m.get(), lora.adam_v.get(), lora.n_params,
                 adamw_scalars(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, lora.adam_t, hp.grad_scale), stream);
    invalidate_splits();
    mark("AdamW");
    prof.end(stream);
  }

  double grad_norm() {
    sum_squares(lora.grads.get(), lora.n_params, lora.sumsq_work.get(), stream);
    double sq = 0;
    GEMMA_CUDA(cudaMemcpyAsync(&sq, lora.sumsq_work.get() + kSumSqBlocks, sizeof sq, cudaMemcpyDeviceToHost, stream));
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    return std::sqrt(sq);
  }

  std::string profile() const { return prof.report(); }

  TensorMap download(const float* src) const {
    std::vector<float> all(static_cast<size_t>(lora.n_params));
    GEMMA_CUDA(cudaStreamSynchronize(stream));
    GEMMA_CUDA(cudaMemcpy(all.data(), src, all.size() * 4, cudaMemcpyDeviceToHost));
    TensorMap m;
    for (const auto& t : lora.tensors) {
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
  return {impl_->lora.grads.get(), impl_->lora.n_params, impl_->stream};
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
                                                              const std::vector<float>& dy,
                                                              const std::map<std::string, std::vector<float>>& pins) {
  GEMMA_ON_DEVICE();
  return impl_->probe_layer(l, mb, x, dy, pins);
}
std::map<std::string, std::vector<float>> Engine::probe_head(const Batch& mb, const std::vector<float>& x,
                                                             const std::vector<float>& xf, float grad_scale) {
  GEMMA_ON_DEVICE();
  return impl_->probe_head(mb, x, xf, grad_scale);
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
  return impl_->download(impl_->lora.params.get());
}
TensorMap Engine::grads() const {
  GEMMA_ON_DEVICE();
  return impl_->download(impl_->lora.grads.get());
}
size_t Engine::peak_bytes() const { return impl_->mem.peak; }
bool Engine::reserve(int64_t B, int64_t T, std::string* why) {
  GEMMA_ON_DEVICE();
  return impl_->reserve(B, T, why);
}
void Engine::set_memory_limit(size_t bytes) { impl_->mem.limit = bytes; }
void Engine::set_recompute_num_layers(int64_t n) {
  GEMMA_ON_DEVICE();
  impl_->set_recompute_num_layers(n);
}
int64_t Engine::fit_recompute_num_layers(int64_t B, int64_t T) {
  GEMMA_ON_DEVICE();
  return impl_->fit_recompute_num_layers(B, T);
}
std::string Engine::profile() const { return impl_->profile(); }

}  // namespace gemma::fast
