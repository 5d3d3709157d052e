// One decoder layer's forward and backward as free functions (in the manner of llm.c's layer passes): they read
// the layer's weights and adapters, write its activations (Acts), and use the step's workspace; the engine
// (engine.cu) owns all of it and decides the schedule (checkpoints, recomputation, offload). Shapes: N = B T tokens
// in rows; x_in, x_out the fp32 residual (N, D); every activation row-major (N, width).
//
// Cast points are the reference's `fast` policy (fast/README.md lists them per kernel); reference/gemma2.hpp's
// layer_forward / layer_backward is the same layer in float64.
#pragma once
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>

#include "fast/attention_sm90.cuh"
#include "fast/geglu.cuh"
#include "fast/lora.cuh"
#include "fast/profiler.cuh"
#include "fast/rmsnorm.cuh"
#include "fast/rope.cuh"
#include "fast/weights.cuh"
#include "fast/workspace.cuh"
#include "model/config.hpp"

namespace gemma::fast {
namespace {

// A gate probe's pin (LayerProbeInput::pins, ref::kPinnedOps): called right after the operation that wrote tensor
// `name`, (rows, cols) at ptr with leading dimension ld elements, fp32 or bf16; it keeps the operation's own output
// and writes the pinned value in its place, so the next operation runs on the gate's emulation's input. Synchronous
// with the host: probes only.
using OpPin = std::function<void(const char* name, void* ptr, int64_t rows, int64_t cols, int64_t ld, bool fp32)>;

// What a layer's passes run with besides the layer's own weights and activations.
struct LayerRun {
  const Config& cfg;
  const Dims& d;
  Softcap softcap;
  cublasHandle_t blas;
  cudaStream_t stream;
  Workspace& ws;
  Profiler& prof;
  std::string phase;         // the forward's profile segments: "fwd" or "recompute"
  bool recomputing = false;  // this forward is the backward's recomputation
  bool keep_stats = false;   // each layer's softmax statistics outlive its activations: a recomputation reads them
  bool mlp_only = false;     // recompute_mlp_only: the attention block's and down_proj's outputs are the layer's own
  bool gate_up_kept = false;  // this recomputation's layer keeps its gate|up output: only the norms and GeGLU run
  bool att_current = true;    // A.att holds this layer's bf16 attention output; if not, the backward rounds A.o32
  const OpPin* pin = nullptr;  // a gate probe's pins (then att_current: A.att holds the pinned output); else null

  void mark(const std::string& name) const { prof.mark(name, stream); }
  void pinned(const char* name, void* ptr, int64_t rows, int64_t cols, int64_t ld, bool fp32 = false) const {
    if (pin) (*pin)(name, ptr, rows, cols, ld, fp32);
  }
};

// The attention kernels' arguments for layer l on activations A (fast/attention.cuh, AttnParams).
inline AttnParams attn_params(const LayerRun& run, int64_t l, int64_t B, int64_t T, const Acts& A) {
  const Config& cfg = run.cfg;
  const Dims& d = run.d;
  Workspace& ws = run.ws;
  AttnParams p;
  p.q = A.qkv;
  p.k = A.qkv + d.HD;
  p.v = A.qkv + d.HD + d.KVHD;
  p.ld_qkv = d.QKV;
  p.B = int(B);
  p.T = int(T);
  p.H = int(d.H);
  p.KV = int(d.KV);
  p.hd = int(d.hd);
  p.scale = float(1.0 / std::sqrt(cfg.query_pre_attn_scalar));
  p.cap_on = run.softcap.attn;
  p.cap = float(cfg.attn_logit_softcapping.value_or(1.0));
  const bool sliding = cfg.layer_types[size_t(l)] == LayerType::sliding && cfg.sliding_window.has_value();
  p.window = attn_window(sliding, cfg.sliding_window.value_or(0));
  p.doc = ws.has_doc ? ws.doc.get() : nullptr;
  p.key_ok = ws.has_mask ? ws.key_ok.get() : nullptr;
  p.drop_sech2 = faults().softcap_grad_missing;
  p.att = A.att;
  p.o32 = A.o32;
  p.ld_o = d.HD;
  p.m = A.m;
  p.l = A.l;
  p.stats_in = run.recomputing && run.keep_stats;
  p.dout = ws.datt.get();
  p.Dv = ws.Dv.get();
  p.tile_stats = ws.tile_stats.get();
  p.dq = ws.dQ.get();
  p.dk = ws.dK.get();
  p.dv = ws.dV.get();
  p.ld_dkv = d.KVHD;
  return p;
}

// Layer l's forward: x_out = x_mid + post_feedforward_layernorm(down(GeGLU(gate|up(xn2)))), x_mid = x_in +
// post_attention_layernorm(o(attention(RoPE(q|k|v(xn1))))), xn1, xn2 the input norms; activations into A. In a
// recompute_mlp_only recomputation the attention block and down_proj are skipped (A holds them), and gate|up too
// where the layer keeps it (gate_up_kept), and x_out is not written. W: the layer's norm scales; G: its projection
// groups (base weights and adapters, splits prepared). With run.pin (a gate probe), every operation's output is
// replaced by its pin before the next operation reads it (reference/gemma2.hpp's layer_forward pins the same ones).
inline void layer_forward(const LayerRun& run, int64_t l, const LayerWeights& W, const std::array<LoraGroupDev, 4>& G,
                          const Acts& A, const float* x_in, float* x_out, int64_t B, int64_t T) {
  const Dims& d = run.d;
  Workspace& ws = run.ws;
  const int64_t N = B * T, D = d.D, I = d.I, HD = d.HD, KVHD = d.KVHD, QKV = d.QKV;
  const int r = d.r;
  const float s = d.s, eps = d.eps;
  cudaStream_t stream = run.stream;
  cublasHandle_t h = run.blas;
  const std::string& ph = run.phase;
  const bool kept = run.recomputing && run.mlp_only;
  float* const delta = ws.dacc.get();  // the adapter terms where the fused add does not apply (group_forward)
  const int64_t delta_n = int64_t(ws.dacc.size());
  rmsnorm_forward_in(A.xn1, A.rstd, x_in, W.scale.get(), N, D, eps, stream);
  run.mark(ph + " norms");
  run.pinned("xn1", A.xn1, N, D, D);
  if (!kept) {
    group_forward(h, G[kQKV], r, s, A.xn1, N, A.qkv, A.L[kQKV], ws.part.get(), delta, delta_n, stream,
                  [&] { run.mark(ph + " q|k|v_proj (base product)"); });
    run.mark(ph + " q|k|v_proj LoRA terms");
    // q's H heads and k's KV heads are adjacent in a q|k|v row: one launch rotates both.
    rope_forward(A.qkv, d.QKV, N, T, ws.pos.get(), int(d.H + d.KV), int(d.hd), ws.cosv.get(), ws.sinv.get(), stream);
    run.mark(ph + " rope");
    run.pinned("q", A.qkv, N, HD, QKV);
    run.pinned("k", A.qkv + HD, N, KVHD, QKV);
    run.pinned("v", A.qkv + HD + KVHD, N, KVHD, QKV);
    attention_forward(attn_params(run, l, B, T, A), stream);
    run.mark(ph + " attention");
    run.pinned("att", A.att, N, HD, HD);
    group_forward(h, G[kO], r, s, A.att, N, A.o, A.L[kO], ws.part.get(), delta, delta_n, stream,
                  [&] { run.mark(ph + " o_proj (base product)"); });
    run.mark(ph + " o_proj LoRA terms");
    run.pinned("o", A.o, N, D, D);
  }
  rmsnorm_forward_post(A.x_mid, A.rstd + N, A.o, W.scale.get() + D, x_in, N, D, eps, stream);
  run.pinned("x_mid", A.x_mid, N, D, D, true);
  rmsnorm_forward_in(A.xn2, A.rstd + 2 * N, A.x_mid, W.scale.get() + 2 * D, N, D, eps, stream);
  run.mark(ph + " norms");
  run.pinned("xn2", A.xn2, N, D, D);
  if (!run.gate_up_kept) {
    group_forward(h, G[kGU], r, s, A.xn2, N, A.gu, A.L[kGU], ws.part.get(), delta, delta_n, stream,
                  [&] { run.mark(ph + " gate|up_proj (base product)"); });
    run.mark(ph + " gate|up_proj LoRA terms");
  }
  run.pinned("gate", A.gu, N, I, 2 * I);
  run.pinned("up", A.gu + I, N, I, 2 * I);
  geglu_forward(A.act, A.gu, N, I, stream);
  run.mark(ph + " geglu");
  run.pinned("act", A.act, N, I, I);
  if (kept) return;  // down_proj's output and the last norm's 1/rms are kept; the layer's output is not needed
  group_forward(h, G[kDown], r, s, A.act, N, A.down, A.L[kDown], ws.part.get(), delta, delta_n, stream,
                [&] { run.mark(ph + " down_proj (base product)"); });
  run.mark(ph + " down_proj LoRA terms");
  run.pinned("down", A.down, N, D, D);
  rmsnorm_forward_post(x_out, A.rstd + 3 * N, A.down, W.scale.get() + 3 * D, A.x_mid, N, D, eps, stream);
  run.mark(ph + " norms");
}

// Layer l's backward on the activations of its forward (A): ws.dres holds d(layer output) on entry and
// d(layer input) on exit (bf16, (N, D)); the adapters' gradients accumulate into G's fp32 gradient buffers.
inline void layer_backward(const LayerRun& run, int64_t l, const LayerWeights& W, const std::array<LoraGroupDev, 4>& G,
                           const Acts& A, const float* x_in, int64_t B, int64_t T) {
  const Dims& d = run.d;
  Workspace& ws = run.ws;
  const int64_t N = B * T, D = d.D, I = d.I, H = d.H, KV = d.KV, hd = d.hd, QKV = d.QKV, HD = d.HD, KVHD = d.KVHD;
  const int r = d.r;
  const float s = d.s;
  cudaStream_t stream = run.stream;
  cublasHandle_t h = run.blas;
  // x_out = x_mid + post_feedforward_layernorm(down)
  rmsnorm_backward_post(ws.dsmall.get(), ws.dres.get(), A.down, A.rstd + 3 * N, W.scale.get() + 3 * D, N, D, stream);
  run.mark("bwd norms");
  group_backward(h, G[kDown], r, s, A.act, ws.dsmall.get(), A.L[kDown], N, ws.dacc.get(), ws.part.get(), ws.Lb.get(),
                 ws.gpart.get(), stream, [&] { run.mark("bwd down_proj (base product)"); },
                 [&] { run.mark("bwd down_proj LoRA terms"); });
  run.mark("bwd down_proj LoRA terms");
  geglu_backward(ws.dgu.get(), ws.dacc.get(), A.gu, N, I, stream);
  run.mark("bwd geglu");
  run.pinned("d_gate", ws.dgu.get(), N, I, 2 * I);
  run.pinned("d_up", ws.dgu.get() + I, N, I, 2 * I);
  group_backward(h, G[kGU], r, s, A.xn2, ws.dgu.get(), A.L[kGU], N, ws.dacc.get(), ws.part.get(), ws.Lb.get(),
                 ws.gpart.get(), stream, [&] { run.mark("bwd gate|up_proj (base product)"); },
                 [&] { run.mark("bwd gate|up_proj LoRA terms"); });
  run.mark("bwd gate|up_proj LoRA terms");
  rmsnorm_backward_in(ws.dres.get(), ws.dacc.get(), A.x_mid, A.rstd + 2 * N, W.scale.get() + 2 * D, N, D, stream);
  // x_mid = x + post_attention_layernorm(o_proj(attention(...)))
  rmsnorm_backward_post(ws.dsmall.get(), ws.dres.get(), A.o, A.rstd + N, W.scale.get() + D, N, D, stream);
  run.mark("bwd norms");
  run.pinned("d_o", ws.dsmall.get(), N, D, D);
  if (!run.att_current) {  // the attention kernels' rounding of the same fp32 values: the same bits
    to_bf16(A.att, HD, A.o32, HD, N, HD, stream);
    run.mark("bwd attention output to bf16");
  }
  group_backward(h, G[kO], r, s, A.att, ws.dsmall.get(), A.L[kO], N, ws.dacc.get(), ws.part.get(), ws.Lb.get(),
                 ws.gpart.get(), stream, [&] { run.mark("bwd o_proj (base product)"); },
                 [&] { run.mark("bwd o_proj LoRA terms"); });
  to_bf16(ws.datt.get(), HD, ws.dacc.get(), HD, N, HD, stream);
  run.mark("bwd o_proj LoRA terms");
  run.pinned("d_att", ws.datt.get(), N, HD, HD);
  attention_backward(attn_params(run, l, B, T, A), stream);
  run.mark("bwd attention");
  rope_backward(ws.dqkv.get(), QKV, ws.dQ.get(), HD, N, T, ws.pos.get(), int(H), int(hd), ws.cosv.get(),
                ws.sinv.get(), stream);
  rope_backward(ws.dqkv.get() + HD, QKV, ws.dK.get(), KVHD, N, T, ws.pos.get(), int(KV), int(hd), ws.cosv.get(),
                ws.sinv.get(), stream);
  to_bf16(ws.dqkv.get() + HD + KVHD, QKV, ws.dV.get(), KVHD, N, KVHD, stream);
  run.mark("bwd rope, dv to bf16");
  run.pinned("dq", ws.dqkv.get(), N, HD, QKV);
  run.pinned("dk", ws.dqkv.get() + HD, N, KVHD, QKV);
  run.pinned("dv", ws.dqkv.get() + HD + KVHD, N, KVHD, QKV);
  group_backward(h, G[kQKV], r, s, A.xn1, ws.dqkv.get(), A.L[kQKV], N, ws.dacc.get(), ws.part.get(), ws.Lb.get(),
                 ws.gpart.get(), stream, [&] { run.mark("bwd q|k|v_proj (base product)"); },
                 [&] { run.mark("bwd q|k|v_proj LoRA terms"); });
  run.mark("bwd q|k|v_proj LoRA terms");
  rmsnorm_backward_in(ws.dres.get(), ws.dacc.get(), x_in, A.rstd, W.scale.get(), N, D, stream);
  run.mark("bwd norms");
}

}  // namespace
}  // namespace gemma::fast
