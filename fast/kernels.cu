// Host entry points to each CUDA layer (kernels.hpp), for the GPU tests. Everything runs on the legacy default
// stream, so each call is ordered with the synchronous copies around it.
#include "fast/kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "fast/adamw.cuh"
#include "fast/attention_sm90.cuh"
#include "fast/embedding.cuh"
#include "fast/geglu.cuh"
#include "fast/gemm.cuh"
#include "fast/lora.cuh"
#include "fast/loss.cuh"
#include "fast/nf4.cuh"
#include "fast/rmsnorm.cuh"
#include "fast/rope.cuh"
#include "fast/synthetic.cuh"
#include "model/dtype.hpp"
#include "model/synthetic.hpp"

namespace gemma::fast::kernels {

namespace {

constexpr cudaStream_t kStream = nullptr;

DeviceArray<bf16> up_bf16(const std::vector<float>& v, MemoryTracker& m) {
  DeviceArray<bf16> d(std::max<size_t>(v.size(), 1), "test input", m);
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = float_to_bf16(v[i]);
  GEMMA_CUDA(cudaMemcpy(d.get(), b.data(), b.size() * 2, cudaMemcpyHostToDevice));
  return d;
}

template <class T>
DeviceArray<T> up(const std::vector<T>& v, MemoryTracker& m) {
  DeviceArray<T> d(std::max<size_t>(v.size(), 1), "test input", m);
  GEMMA_CUDA(cudaMemcpy(d.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// NaN in every element (all bits set is a NaN in fp32 and in bf16).
template <class T>
DeviceArray<T> poisoned(size_t n, MemoryTracker& m) {
  DeviceArray<T> d(std::max<size_t>(n, 1), "test output", m);
  GEMMA_CUDA(cudaMemset(d.get(), 0xff, std::max<size_t>(n, 1) * sizeof(T)));
  return d;
}

std::vector<float> down_bf16(const bf16* p, size_t n) {
  std::vector<uint16_t> b(n);
  GEMMA_CUDA(cudaMemcpy(b.data(), p, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = bf16_to_float(b[i]);
  return f;
}

std::vector<float> down_f32(const float* p, size_t n) {
  std::vector<float> f(n);
  GEMMA_CUDA(cudaMemcpy(f.data(), p, n * 4, cudaMemcpyDeviceToHost));
  return f;
}

void done() { GEMMA_CUDA(cudaDeviceSynchronize()); }

DeviceArray<float> scale_of(const std::vector<float>& w, MemoryTracker& m) {
  DeviceArray<bf16> wd = up_bf16(w, m);
  DeviceArray<float> sc = poisoned<float>(w.size(), m);
  norm_scale(sc.get(), wd.get(), int64_t(w.size()), kStream);
  return sc;
}

}  // namespace

std::vector<float> embed(const std::vector<int32_t>& ids, const std::vector<float>& E, int64_t D, float normalizer) {
  MemoryTracker m;
  const int64_t N = int64_t(ids.size());
  auto id = up(ids, m);
  auto e = up_bf16(E, m);
  auto x = poisoned<float>(size_t(N * D), m);
  embed_forward(x.get(), id.get(), e.get(), N, D, normalizer, kStream);
  done();
  return down_f32(x.get(), size_t(N * D));
}

Norm rmsnorm_input(int64_t N, int64_t D, const std::vector<float>& x, const std::vector<float>& w, double eps) {
  MemoryTracker m;
  auto xd = up(x, m);
  auto sc = scale_of(w, m);
  auto out = poisoned<bf16>(size_t(N * D), m);
  auto rstd = poisoned<float>(size_t(N), m);
  rmsnorm_forward_in(out.get(), rstd.get(), xd.get(), sc.get(), N, D, float(eps), kStream);
  done();
  return {down_bf16(out.get(), size_t(N * D)), down_f32(rstd.get(), size_t(N))};
}

Norm rmsnorm_post(int64_t N, int64_t D, const std::vector<float>& x, const std::vector<float>& w,
                  const std::vector<float>& res, double eps) {
  MemoryTracker m;
  auto xd = up_bf16(x, m);
  auto rd = up(res, m);
  auto sc = scale_of(w, m);
  auto out = poisoned<float>(size_t(N * D), m);
  auto rstd = poisoned<float>(size_t(N), m);
  rmsnorm_forward_post(out.get(), rstd.get(), xd.get(), sc.get(), rd.get(), N, D, float(eps), kStream);
  done();
  return {down_f32(out.get(), size_t(N * D)), down_f32(rstd.get(), size_t(N))};
}

NormGrad rmsnorm_backward(NormKind kind, int64_t N, int64_t D, const std::vector<float>& dout,
                          const std::vector<float>& x, const std::vector<float>& rstd, const std::vector<float>& w,
                          const std::vector<float>& dres) {
  MemoryTracker m;
  auto sc = scale_of(w, m);
  auto rs = up(rstd, m);
  auto dw = DeviceArray<float>(size_t(D), "dw", m);
  GEMMA_CUDA(cudaMemset(dw.get(), 0, size_t(D) * 4));  // dw accumulates: it starts at zero
  NormGrad g;
  switch (kind) {
    case NormKind::post: {
      auto dd = up_bf16(dout, m);
      auto xd = up_bf16(x, m);
      auto dx = poisoned<bf16>(size_t(N * D), m);
      rmsnorm_backward_post(dx.get(), dd.get(), xd.get(), rs.get(), sc.get(), N, D, kStream);
      rmsnorm_dw<bf16, bf16>(dw.get(), dd.get(), xd.get(), rs.get(), N, D, kStream);
      done();
      g.dx = down_bf16(dx.get(), size_t(N * D));
      break;
    }
    case NormKind::input: {
      auto dd = up(dout, m);
      auto xd = up(x, m);
      auto dx = up_bf16(dres, m);  // accumulated into: the residual gradient so far
      rmsnorm_backward_in(dx.get(), dd.get(), xd.get(), rs.get(), sc.get(), N, D, kStream);
      rmsnorm_dw<float, float>(dw.get(), dd.get(), xd.get(), rs.get(), N, D, kStream);
      done();
      g.dx = down_bf16(dx.get(), size_t(N * D));
      break;
    }
    case NormKind::final: {
      auto dd = up_bf16(dout, m);
      auto xd = up(x, m);
      auto dx = poisoned<bf16>(size_t(N * D), m);
      rmsnorm_backward_final(dx.get(), dd.get(), xd.get(), rs.get(), sc.get(), N, D, kStream);
      rmsnorm_dw<bf16, float>(dw.get(), dd.get(), xd.get(), rs.get(), N, D, kStream);
      done();
      g.dx = down_bf16(dx.get(), size_t(N * D));
      break;
    }
  }
  g.dw = down_f32(dw.get(), size_t(D));
  return g;
}

std::vector<float> rope_forward(int64_t N, int64_t T, int64_t heads, int64_t hd, double theta,
                                const std::vector<float>& x) {
  MemoryTracker m;
  std::vector<float> c, s;
  rope_tables(T, hd, theta, c, s);
  auto cd = up(c, m), sd = up(s, m);
  auto xd = up_bf16(x, m);  // rotated in place, as in the engine
  gemma::fast::rope_forward(xd.get(), heads * hd, N, T, nullptr, int(heads), int(hd), cd.get(), sd.get(), kStream);
  done();
  return down_bf16(xd.get(), size_t(N * heads * hd));
}

std::vector<float> rope_backward(int64_t N, int64_t T, int64_t heads, int64_t hd, double theta,
                                 const std::vector<float>& dx) {
  MemoryTracker m;
  std::vector<float> c, s;
  rope_tables(T, hd, theta, c, s);
  auto cd = up(c, m), sd = up(s, m);
  auto dd = up(dx, m);
  auto out = poisoned<bf16>(size_t(N * heads * hd), m);
  gemma::fast::rope_backward(out.get(), heads * hd, dd.get(), heads * hd, N, T, nullptr, int(heads), int(hd), cd.get(), sd.get(), kStream);
  done();
  return down_bf16(out.get(), size_t(N * heads * hd));
}

namespace {

// One attention call on the engine's fused q|k|v layout: q|k|v (N, H*hd + 2 KV*hd) and dout (N, H*hd) on the device,
// the outputs allocated here (NaN-poisoned), the parameters filled from the shape but for the window, masks and
// faults, which the caller sets.
struct AttnRun {
  DeviceArray<bf16> att;
  DeviceArray<float> o32, m, l, Dv, tile_stats, dq, dk, dv;
  AttnParams p;
  AttnRun(const AttnShape& s, const bf16* qkv, const bf16* dout, bool mma_only, MemoryTracker& mem) {
    const int64_t N = s.B * s.T, HD = s.H * s.hd, KVHD = s.KV * s.hd;
    att = poisoned<bf16>(size_t(N * HD), mem);
    o32 = poisoned<float>(size_t(N * HD), mem);
    m = poisoned<float>(size_t(N * s.H), mem);
    l = poisoned<float>(size_t(N * s.H), mem);
    Dv = poisoned<float>(size_t(N * s.H), mem);
    tile_stats = poisoned<float>(size_t(attn_tile_stats_count(s.B, s.H, s.T)), mem);
    dq = poisoned<float>(size_t(N * HD), mem);
    dk = poisoned<float>(size_t(N * KVHD), mem);
    dv = poisoned<float>(size_t(N * KVHD), mem);
    p.q = qkv;
    p.k = qkv + HD;
    p.v = qkv + HD + KVHD;
    p.ld_qkv = HD + 2 * KVHD;
    p.B = int(s.B);
    p.T = int(s.T);
    p.H = int(s.H);
    p.KV = int(s.KV);
    p.hd = int(s.hd);
    p.scale = float(s.scale);
    p.cap_on = s.cap_on;
    p.cap = float(s.cap);
    p.att = att.get();
    p.o32 = o32.get();
    p.ld_o = HD;
    p.m = m.get();
    p.l = l.get();
    p.dout = dout;
    p.Dv = Dv.get();
    p.tile_stats = tile_stats.get();
    p.dq = dq.get();
    p.dk = dk.get();
    p.dv = dv.get();
    p.ld_dkv = KVHD;
    p.mma_only = mma_only;
  }
};

}  // namespace

Attention attention(const AttnShape& s, const std::vector<float>& q, const std::vector<float>& k,
                    const std::vector<float>& v, const std::vector<float>& dout, bool mma_only) {
  MemoryTracker m;
  const int64_t N = s.B * s.T, HD = s.H * s.hd, KVHD = s.KV * s.hd, QKV = HD + 2 * KVHD;
  // The engine's fused q|k|v layout, so the strides are the shipped ones.
  std::vector<float> qkv(static_cast<size_t>(N * QKV));
  for (int64_t n = 0; n < N; ++n) {
    std::memcpy(&qkv[size_t(n * QKV)], &q[size_t(n * HD)], size_t(HD) * 4);
    std::memcpy(&qkv[size_t(n * QKV + HD)], &k[size_t(n * KVHD)], size_t(KVHD) * 4);
    std::memcpy(&qkv[size_t(n * QKV + HD + KVHD)], &v[size_t(n * KVHD)], size_t(KVHD) * 4);
  }
  auto qd = up_bf16(qkv, m);
  auto dd = up_bf16(dout, m);
  AttnRun a(s, qd.get(), dd.get(), mma_only, m);
  AttnParams& p = a.p;
  p.window = attn_window(s.window > 0, s.window);
  p.drop_sech2 = faults().softcap_grad_missing;
  DeviceArray<int32_t> doc;
  DeviceArray<uint8_t> key_ok;
  if (!s.doc.empty()) {
    if (int64_t(s.doc.size()) != N) throw std::invalid_argument("kernels::attention: doc is not B*T long");
    doc = up(s.doc, m);
    p.doc = doc.get();
  }
  if (!s.key_ok.empty()) {
    if (int64_t(s.key_ok.size()) != N) throw std::invalid_argument("kernels::attention: key_ok is not B*T long");
    key_ok = up(s.key_ok, m);
    p.key_ok = key_ok.get();
  }
  attention_forward(p, kStream);
  attention_backward(p, kStream);
  // The engine's recomputed forward: the same inputs with the saved m and l (stats_in), into fresh poisoned outputs.
  auto att2 = poisoned<bf16>(size_t(N * HD), m);
  auto o32_2 = poisoned<float>(size_t(N * HD), m);
  AttnParams p2 = p;
  p2.att = att2.get();
  p2.o32 = o32_2.get();
  p2.stats_in = true;
  attention_forward(p2, kStream);
  done();
  Attention r;
  r.out = down_bf16(a.att.get(), size_t(N * HD));
  r.o32 = down_f32(a.o32.get(), size_t(N * HD));
  r.dq = down_f32(a.dq.get(), size_t(N * HD));
  r.dk = down_f32(a.dk.get(), size_t(N * KVHD));
  r.dv = down_f32(a.dv.get(), size_t(N * KVHD));
  r.out_recomputed = down_bf16(att2.get(), size_t(N * HD));
  r.o32_recomputed = down_f32(o32_2.get(), size_t(N * HD));
  return r;
}

namespace {

// Median device time of f() in milliseconds over `iters` runs after one warm-up.
template <class F>
double median_ms(int iters, F&& f) {
  cudaEvent_t a, b;
  GEMMA_CUDA(cudaEventCreate(&a));
  GEMMA_CUDA(cudaEventCreate(&b));
  f();
  std::vector<float> ms;
  for (int i = 0; i < iters; ++i) {
    GEMMA_CUDA(cudaEventRecord(a, kStream));
    f();
    GEMMA_CUDA(cudaEventRecord(b, kStream));
    GEMMA_CUDA(cudaEventSynchronize(b));
    float t = 0;
    GEMMA_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  GEMMA_CUDA(cudaEventDestroy(a));
  GEMMA_CUDA(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms.empty() ? 0.0 : double(ms[ms.size() / 2]);
}

}  // namespace

AttnTiming time_attention(const AttnShape& s, int iters, bool mma_only) {
  MemoryTracker m;
  const int64_t N = s.B * s.T, HD = s.H * s.hd, KVHD = s.KV * s.hd, QKV = HD + 2 * KVHD;
  DeviceArray<bf16> qkv(size_t(N * QKV), "q|k|v", m), dout(size_t(N * HD), "dout", m);
  gemma::fast::synthetic_bf16(qkv.get(), N, QKV, QKV, 11, 1.0, kStream);
  gemma::fast::synthetic_bf16(dout.get(), N, HD, HD, 12, 0.01, kStream);
  AttnRun a(s, qkv.get(), dout.get(), mma_only, m);
  a.p.window = int(s.window);
  const AttnParams& p = a.p;
  AttnTiming r;
  r.forward_ms = median_ms(iters, [&] { attention_forward(p, kStream); });
  r.backward_ms = median_ms(iters, [&] { attention_backward(p, kStream); });
  AttnParams again = p;  // m and l now hold these inputs' statistics
  again.stats_in = true;
  r.recomputed_forward_ms = median_ms(iters, [&] { attention_forward(again, kStream); });
  done();
  return r;
}

double gemm_tflops(int64_t n, int iters) {
  MemoryTracker m;
  DeviceArray<bf16> a(size_t(n * n), "A", m), b(size_t(n * n), "B", m), c(size_t(n * n), "C", m);
  gemma::fast::synthetic_bf16(a.get(), n, n, n, 21, 1.0, kStream);
  gemma::fast::synthetic_bf16(b.get(), n, n, n, 22, 1.0, kStream);
  Blas blas(kStream, m);
  const double ms = median_ms(iters, [&] {
    gemm(blas.h, n, n, n, Operand{a.get(), n, false}, Operand{b.get(), n, false}, c.get(), false, n, 1.0f, 0.0f);
  });
  done();
  return 2.0 * double(n) * double(n) * double(n) / (ms * 1e-3) / 1e12;
}

std::vector<float> geglu_forward(int64_t N, int64_t I, const std::vector<float>& gate_up) {
  MemoryTracker m;
  auto gu = up_bf16(gate_up, m);
  auto act = poisoned<bf16>(size_t(N * I), m);
  gemma::fast::geglu_forward(act.get(), gu.get(), N, I, kStream);
  done();
  return down_bf16(act.get(), size_t(N * I));
}

std::vector<float> geglu_backward(int64_t N, int64_t I, const std::vector<float>& dact,
                                  const std::vector<float>& gate_up) {
  MemoryTracker m;
  auto gu = up_bf16(gate_up, m);
  auto da = up(dact, m);
  auto dgu = poisoned<bf16>(size_t(N * 2 * I), m);
  gemma::fast::geglu_backward(dgu.get(), da.get(), gu.get(), N, I, kStream);
  done();
  return down_bf16(dgu.get(), size_t(N * 2 * I));
}

Loss loss(int64_t N, int64_t D, int64_t V, const std::vector<float>& xf, const std::vector<float>& E,
          const std::vector<int32_t>& targets, bool cap_on, double cap, double grad_scale, int64_t chunk_rows,
          const std::vector<int64_t>& capped_rows) {
  MemoryTracker m;
  Blas blas(kStream, m);
  const int64_t Vp = padded_vocab(V);
  auto xd = up_bf16(xf, m);
  DeviceArray<bf16> e(size_t(Vp * D), "test embedding", m);
  {
    std::vector<uint16_t> b(E.size());
    for (size_t i = 0; i < E.size(); ++i) b[i] = float_to_bf16(E[i]);
    GEMMA_CUDA(cudaMemcpy(e.get(), b.data(), b.size() * 2, cudaMemcpyHostToDevice));
    double ss = 0;
    for (float x : E) ss += double(x) * x;
    // Padding rows as the engine fills them: nonzero, at the embedding's own scale.
    if (Vp > V)
      gemma::fast::synthetic_bf16(e.get() + V * D, Vp - V, D, D, stream_key(0, "test padding"),
                     std::sqrt(3.0) * std::sqrt(ss / double(E.size())), kStream);
  }
  auto tg = up(targets, m);
  std::vector<int> slot(size_t(N), -1);
  for (size_t k = 0; k < capped_rows.size(); ++k) slot[size_t(capped_rows[k])] = int(k);
  auto sl = up(slot, m);
  auto logits = poisoned<float>(size_t(chunk_rows * Vp), m);
  auto dlog = poisoned<bf16>(size_t(chunk_rows * Vp), m);
  auto stats = poisoned<float>(size_t(chunk_rows * ce_parts(Vp) * 2), m);
  auto rl = poisoned<float>(size_t(N), m);
  auto capped = poisoned<float>(std::max<size_t>(capped_rows.size(), 1) * size_t(V), m);
  auto dxf = poisoned<bf16>(size_t(N * D), m);
  for (int64_t c0 = 0; c0 < N; c0 += chunk_rows) {
    LossChunk c;
    c.xf = xd.get() + c0 * D;
    c.E = e.get();
    c.target = tg.get() + c0;
    c.capped_slot = sl.get() + c0;
    c.rows = std::min(chunk_rows, N - c0);
    c.D = D;
    c.V = V;
    c.Vp = Vp;
    c.cap_on = cap_on;
    c.cap = float(cap);
    c.grad_scale = float(grad_scale);
    c.logits = logits.get();
    c.dlog = dlog.get();
    c.stats = reinterpret_cast<float2*>(stats.get());
    c.row_loss = rl.get() + c0;
    c.capped_out = capped.get();
    c.dxf = dxf.get() + c0 * D;
    lm_head_loss_chunk(blas.h, c, kStream);
  }
  done();
  Loss r;
  r.row_loss = down_f32(rl.get(), size_t(N));
  r.dxf = down_bf16(dxf.get(), size_t(N * D));
  for (size_t k = 0; k < capped_rows.size(); ++k) r.capped[capped_rows[k]] = down_f32(capped.get() + k * V, size_t(V));
  return r;
}

LoraGroup lora_group(int64_t N, int64_t in, int64_t r, double scaling, const std::vector<LoraProj>& projs,
                     const std::vector<float>& x, const std::vector<float>& dy) {
  MemoryTracker m;
  Blas blas(kStream, m);
  int64_t out_total = 0, np = 0;
  for (const auto& p : projs) {
    out_total += p.out;
    np += p.A.empty() ? 0 : 1;
  }
  std::vector<float> W;
  for (const auto& p : projs) W.insert(W.end(), p.W.begin(), p.W.end());
  auto Wd = up_bf16(W, m);
  std::vector<DeviceArray<float>> masters, grads;
  DeviceArray<bf16> Abwd(size_t(std::max<int64_t>(6 * r * np * in, 1)), "test Abwd", m);
  std::vector<DeviceArray<bf16>> Bfwd;
  LoraGroupDev g;
  g.in = in;
  g.out_total = out_total;
  g.W = Wd.get();
  g.Abwd = Abwd.get();
  int64_t col = 0;
  for (const auto& p : projs) {
    if (!p.A.empty()) {
      LoraProjDev P;
      P.out = p.out;
      P.col = col;
      masters.push_back(up(p.A, m));
      P.A = masters.back().get();
      masters.push_back(up(p.B, m));
      P.B = masters.back().get();
      grads.emplace_back(size_t(r * in), "test dA", m);
      GEMMA_CUDA(cudaMemset(grads.back().get(), 0, size_t(r * in) * 4));
      P.gA = grads.back().get();
      grads.emplace_back(size_t(p.out * r), "test dB", m);
      GEMMA_CUDA(cudaMemset(grads.back().get(), 0, size_t(p.out * r) * 4));
      P.gB = grads.back().get();
      Bfwd.emplace_back(size_t(p.out * 6 * r), "test Bfwd", m);
      P.Bfwd = Bfwd.back().get();
      g.projs.push_back(P);
    }
    col += p.out;
  }
  lora_prepare(&g, 1, int(r), kStream);
  auto xd = up_bf16(x, m);
  auto dyd = up_bf16(dy, m);
  auto y = poisoned<bf16>(size_t(N * out_total), m);
  auto L = poisoned<bf16>(size_t(std::max<int64_t>(N * 6 * r * np, 1)), m);
  auto part = poisoned<float>(size_t(std::max<int64_t>(N * 3 * r * np, 1)), m);
  auto Lb = poisoned<bf16>(size_t(std::max<int64_t>(N * 6 * r * np, 1)), m);
  auto gpart = poisoned<float>(size_t(std::max<int64_t>(lora_gpart_elems(g, int(r)), 1)), m);
  auto dx = poisoned<float>(size_t(N * in), m);
  // Room for 8 rows of adapter terms, as the engine's delta holds fewer rows than N: the path without the fused add
  // then takes its rows in blocks (8, 8 and 5 of the 21 rows of the test's rank 5 group).
  const int64_t delta_n = std::min<int64_t>(N, 8) * out_total;
  auto delta = poisoned<float>(size_t(delta_n), m);
  group_forward(blas.h, g, int(r), float(scaling), xd.get(), N, y.get(), L.get(), part.get(), delta.get(), delta_n,
                kStream);
  group_backward(blas.h, g, int(r), float(scaling), xd.get(), dyd.get(), L.get(), N, dx.get(), part.get(), Lb.get(),
                 gpart.get(), kStream);
  done();
  LoraGroup res;
  res.y = down_bf16(y.get(), size_t(N * out_total));
  res.dx = down_f32(dx.get(), size_t(N * in));
  size_t k = 0;
  for (const auto& p : projs) {
    if (p.A.empty()) continue;
    res.dA.push_back(down_f32(grads[2 * k].get(), size_t(r * in)));
    res.dB.push_back(down_f32(grads[2 * k + 1].get(), size_t(p.out * r)));
    ++k;
  }
  return res;
}

std::string lora_out_kernel(int64_t r, int64_t N, int64_t out, int64_t ldl) {
  const LoraOutPlan p = lora_out_plan(int(r), N, out, ldl, nullptr, nullptr);
  if (!p.kernel) return "unfused";
  return std::string(p.kernel) + " tiles " + std::to_string(p.row_tiles) + " iters " + std::to_string(p.iters);
}

namespace {
// One thread waits on an mbarrier that nothing arrives on: tma.cuh's bounded wait must trap.
__global__ void stuck_wait_kernel() {
  __shared__ alignas(8) uint64_t bar;
  const uint32_t a = smem_addr(&bar);
  mbar_init(a, 1);
  mbar_init_fence();
  mbar_wait(a, 0);
}
}  // namespace

std::string stuck_barrier_wait() {
  stuck_wait_kernel<<<1, 1, 0, kStream>>>();
  GEMMA_CUDA(cudaGetLastError());
  return cudaGetErrorName(cudaStreamSynchronize(kStream));
}

bool hopper_kernels() {
#ifdef GEMMA_FAST_WGMMA
  return device_sm90();
#else
  return false;
#endif
}

int multiprocessors() { return device_sms(); }

void adamw(std::vector<float>& p, const std::vector<float>& g, std::vector<float>& mo, std::vector<float>& v,
           int64_t t, double lr, double beta1, double beta2, double eps, double weight_decay) {
  MemoryTracker m;
  auto pd = up(p, m), gd = up(g, m), md = up(mo, m), vd = up(v, m);
  adamw_update(pd.get(), gd.get(), md.get(), vd.get(), int64_t(p.size()),
               adamw_scalars(lr, beta1, beta2, eps, weight_decay, t), kStream);
  done();
  p = down_f32(pd.get(), p.size());
  mo = down_f32(md.get(), mo.size());
  v = down_f32(vd.get(), v.size());
}

std::vector<uint16_t> synthetic_bf16(uint64_t key, double half_width, int64_t n) {
  MemoryTracker m;
  auto out = poisoned<bf16>(size_t(n), m);
  gemma::fast::synthetic_bf16(out.get(), 1, n, n, key, half_width, kStream);
  done();
  std::vector<uint16_t> b(static_cast<size_t>(n));
  GEMMA_CUDA(cudaMemcpy(b.data(), out.get(), size_t(n) * 2, cudaMemcpyDeviceToHost));
  return b;
}

Nf4Weight nf4_quantize(const std::vector<uint16_t>& x, const Shape& shape, int64_t blocksize, bool double_quant) {
  MemoryTracker m;
  DeviceArray<bf16> xd(std::max<size_t>(x.size(), 1), "test input", m);
  GEMMA_CUDA(cudaMemcpy(xd.get(), x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  const int64_t n = int64_t(x.size()), blocks = (n + blocksize - 1) / blocksize;
  DeviceArray<float> absmax = poisoned<float>(size_t(blocks), m);
  Nf4Stored s = nf4_quantize_device(xd.get(), shape, blocksize, double_quant, absmax.get(), "test NF4", m, kStream);
  done();
  // Read back what the device holds, field by field, into the host form.
  Nf4Weight q;
  q.shape = shape;
  q.blocksize = blocksize;
  q.nested = s.q.nested;
  q.packed.resize(size_t((n + 1) / 2));
  GEMMA_CUDA(cudaMemcpy(q.packed.data(), s.q.packed, q.packed.size(), cudaMemcpyDeviceToHost));
  if (q.nested) {
    q.absmax_codes.resize(size_t(blocks));
    q.nested_absmax.resize(size_t((blocks + s.q.nested_blocksize - 1) / s.q.nested_blocksize));
    q.nested_quant_map.resize(256);
    q.nested_blocksize = s.q.nested_blocksize;
    q.nested_offset = s.q.nested_offset;
    GEMMA_CUDA(cudaMemcpy(q.absmax_codes.data(), s.q.absmax_codes, q.absmax_codes.size(), cudaMemcpyDeviceToHost));
    GEMMA_CUDA(cudaMemcpy(q.nested_absmax.data(), s.q.nested_absmax, q.nested_absmax.size() * 4, cudaMemcpyDeviceToHost));
    GEMMA_CUDA(cudaMemcpy(q.nested_quant_map.data(), s.q.nested_quant_map, 256 * 4, cudaMemcpyDeviceToHost));
  } else {
    q.absmax.resize(size_t(blocks));
    GEMMA_CUDA(cudaMemcpy(q.absmax.data(), s.q.absmax, q.absmax.size() * 4, cudaMemcpyDeviceToHost));
  }
  return q;
}

std::vector<uint16_t> nf4_dequantize(const Nf4Weight& q, bool generic) {
  MemoryTracker m;
  Nf4Stored s = nf4_upload(q, "test NF4", m, kStream);
  auto w = poisoned<bf16>(size_t(q.numel()), m);
  gemma::fast::nf4_dequantize(w.get(), s.q, kStream, generic);
  done();
  std::vector<uint16_t> b(static_cast<size_t>(q.numel()));
  GEMMA_CUDA(cudaMemcpy(b.data(), w.get(), b.size() * 2, cudaMemcpyDeviceToHost));
  return b;
}

uint64_t nf4_mismatches(const Nf4Weight& q, const std::vector<uint16_t>& w) {
  MemoryTracker m;
  Nf4Stored s = nf4_upload(q, "test NF4", m, kStream);
  DeviceArray<bf16> wd(std::max<size_t>(w.size(), 1), "test input", m);
  GEMMA_CUDA(cudaMemcpy(wd.get(), w.data(), w.size() * 2, cudaMemcpyHostToDevice));
  DeviceArray<unsigned long long> count(1, "test counter", m);
  return gemma::fast::nf4_mismatches(wd.get(), s.q, count.get(), kStream);
}

uint64_t nf4_absmax_mismatches(const Nf4Weight& q, const std::vector<float>& want) {
  MemoryTracker m;
  Nf4Stored s = nf4_upload(q, "test NF4", m, kStream);
  auto wd = up(want, m);
  DeviceArray<unsigned long long> count(1, "test counter", m);
  return gemma::fast::nf4_absmax_mismatches(s.q, wd.get(), count.get(), kStream);
}

void allocate(size_t bytes) {
  MemoryTracker m;
  DeviceArray<unsigned char> a(bytes, "a test allocation", m);
}

}  // namespace gemma::fast::kernels
