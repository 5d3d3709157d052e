// Every CUDA layer of the fast trainer against the float64 reference's own layer functions, run under the
// `fast` precision policy (the kernels' cast points) and under f64 (exact math), on fresh random inputs with
// every output poisoned with NaN before the kernel runs.
//
// What may differ from the `fast`-policy reference is fp32 arithmetic only (accumulation order, fp32 exp/tanh).
// So the bounds are derived from that, not from bf16:
//  - bf16 outputs: every element equals the reference's bf16 value or is one bf16 ulp away (the fp32 result
//    landed on the other side of a rounding boundary), plus an absolute slack of 1e-5 of the tensor's largest
//    value for results that cancel far below their terms; and such flips are rare: an fp32 error of k units
//    crosses a boundary with probability about k 2^-15, so for k up to ~100 at most 1% of the elements.
//  - bf16 outputs of long sums over terms the policy itself rounds to bf16 upstream (attention output, dxf,
//    the adapted projections' output): see expect_bf16_match.
//  - fp32 outputs: rel L2 below a bound stated per test from the length of the sums involved.
// The error against f64 is printed beside it: it is the size of the bf16 effects the policy models, and what
// a kernel would show if it rounded somewhere the policy does not say.
// Without a CUDA device every test skips with the reason.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>

#include <unistd.h>

#include "fast/fast.hpp"
#include "fast/kernels.hpp"
#include "fast/testing.hpp"
#include "model/nf4.hpp"
#include "reference/adamw.hpp"
#include "reference/gemma2.hpp"

using namespace gemma;
using namespace gemma::ref;
namespace fk = gemma::fast::kernels;
using gemma::fast::testing::compare;
using gemma::fast::testing::describe;
using gemma::fast::testing::Diff;
using gemma::fast::testing::random;
using gemma::fast::testing::to_double;

namespace {

class FastKernel : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!gemma::fast::device_available(&why)) GTEST_SKIP() << why;
  }
};

// The reference under a policy, with everything the layer functions read.
struct RefCtx {
  Config cfg;
  Policy policy;
  Semantics sem;
  Mat<double> cosv, sinv;
  std::unique_ptr<Ctx<double>> ctx;
  RefCtx(const Config& c, const Policy& p, int64_t B, int64_t T, bool attn_cap_on = false, bool final_cap_on = false)
      : cfg(c), policy(p) {
    ctx = std::make_unique<Ctx<double>>(plain_ctx<double>(cfg, policy, sem, B, T, attn_cap_on, final_cap_on,
                                                          cfg.attn_logit_softcapping.value_or(1.0),
                                                          cfg.final_logit_softcapping.value_or(1.0),
                                                          1.0 / std::sqrt(cfg.query_pre_attn_scalar)));
  }
};

Mat<double> mat(const std::vector<float>& v, int64_t rows, int64_t cols) {
  Mat<double> m(rows, cols);
  for (int64_t i = 0; i < rows * cols; ++i) m.data()[i] = v[size_t(i)];
  return m;
}
Vec<double> vec(const std::vector<float>& v) {
  Vec<double> x(int64_t(v.size()));
  for (size_t i = 0; i < v.size(); ++i) x(int64_t(i)) = v[i];
  return x;
}
std::vector<double> flat(const Mat<double>& m) { return std::vector<double>(m.data(), m.data() + m.size()); }
std::vector<double> flat(const Vec<double>& m) { return std::vector<double>(m.data(), m.data() + m.size()); }

// A bf16 output whose only rounding is its own, of an fp32 value computed from exact inputs over short sums: no
// NaN, nothing beyond one ulp (+ slack), at most 1% of the elements one ulp off (file comment).
// With `one_rounding` false, the output sums many terms, some of them bf16 values the policy rounds upstream (the
// probabilities P, the logit gradients, the base product under the adapter term): those inherit the terms' rare
// flips, each moving one term by a bf16 ulp, and a long fp32 sum crosses rounding boundaries more often (its
// error grows like sqrt(terms)). Then a few elements may sit beyond one ulp (at most 0.1%, or 2), and the
// aggregate must stay well inside one bf16 rounding: rel L2 at most half the policy's own distance from f64.
void expect_bf16_match(const char* what, const std::vector<float>& got, const std::vector<double>& ref,
                       const std::vector<double>& ref64, bool one_rounding = true) {
  const Diff d = compare(got, ref), d64 = compare(got, ref64);
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (ref[i] - ref64[i]) * (ref[i] - ref64[i]);
    den += ref64[i] * ref64[i];
  }
  const double policy = den > 0 ? std::sqrt(num / den) : 0;
  std::printf("  %-28s vs fast policy: %s\n  %-28s vs f64:         rel L2 %.2e (fast policy vs f64: %.2e)\n", what,
              describe(d).c_str(), "", d64.rel_l2, policy);
  EXPECT_EQ(d.nan, 0) << what << ": elements left unwritten (NaN) or non-finite";
  if (one_rounding) {
    EXPECT_EQ(d.beyond_ulp, 0) << what << ": " << describe(d);
    EXPECT_LE(double(d.differ), 0.01 * double(d.n)) << what << ": " << describe(d);
  } else {
    EXPECT_LE(double(d.beyond_ulp), std::max(2.0, 1e-3 * double(d.n))) << what << ": " << describe(d);
    EXPECT_LE(d.rel_l2, 0.5 * policy) << what << ": " << describe(d);
  }
}

void expect_f32_match(const char* what, const std::vector<float>& got, const std::vector<double>& ref,
                      const std::vector<double>& ref64, double tol) {
  const Diff d = compare(got, ref), d64 = compare(got, ref64);
  std::printf("  %-28s vs fast policy: rel L2 %.2e (bound %.1e), max |diff| %.2e; vs f64: rel L2 %.2e\n", what,
              d.rel_l2, tol, d.max_abs, d64.rel_l2);
  EXPECT_EQ(d.nan, 0) << what << ": elements left unwritten (NaN) or non-finite";
  EXPECT_LE(d.rel_l2, tol) << what << ": " << describe(d);
}

// Two runs that must give the same bits (a NaN must be the same NaN position, never a stand-in for a value).
void expect_same_bits(const char* what, const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t differ = 0, first = got.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0 && ++differ == 1) first = i;
  std::printf("  %-28s %zu of %zu elements differ in their bits\n", what, differ, got.size());
  EXPECT_EQ(differ, 0u) << what << ": first at " << first << ": " << got[first] << " vs " << want[first];
}

Config small_config(int64_t D) {
  Config c = preset("gemma2-tiny");
  c.hidden_size = D;
  return c;
}

}  // namespace

// ------------------------------------------------------------------------------------------------------
// Embedding

TEST_F(FastKernel, EmbeddingTimesBf16NormalizerIsExact) {
  for (const char* name : {"gemma2-2b", "gemma2-9b", "gemma2-27b"}) {
    const Config c = preset(name);
    const int64_t D = c.hidden_size, V = 1000, N = 9;
    const std::vector<float> E = random(size_t(V * D), 0.05, 1, "E", true);
    std::vector<int32_t> ids(N);
    for (int64_t n = 0; n < N; ++n) ids[size_t(n)] = int32_t((n * 389 + 7) % V);
    const Policy p = policy_fast();
    const double normalizer = cast(p, Cast::normalizer, std::sqrt(double(D)));
    std::printf("%s: normalizer %.4f\n", name, normalizer);
    // The released widths' bf16 normalizers (docs/model.md).
    EXPECT_EQ(normalizer, D == 2304 ? 48.0 : D == 3584 ? 59.75 : 68.0);
    const std::vector<float> got = fk::embed(ids, E, D, float(normalizer));
    int64_t mismatched = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < D; ++j) {
        const double want = cast(p, Cast::embed_scaled, cast(p, Cast::embed_out, double(E[size_t(ids[size_t(n)] * D + j)])) * normalizer);
        mismatched += got[size_t(n * D + j)] != want;
      }
    // A product of two bf16 values is exact in fp32: nothing may differ.
    EXPECT_EQ(mismatched, 0) << name;
  }
}

// ------------------------------------------------------------------------------------------------------
// RMSNorm

TEST_F(FastKernel, RmsNormForwardBothKinds) {
  // 333: the one-element-per-step kernels; the others (multiples of 8) the eight-wide ones.
  for (int64_t D : {200, 333, 3584, 4608}) {
    const int64_t N = 7;
    const Config c = small_config(D);
    RefCtx rf(c, policy_fast(), 1, N), r64(c, policy_f64(), 1, N);
    const std::vector<float> x = random(size_t(N * D), 2.0, 10 + D, "x", false);
    const std::vector<float> xb = random(size_t(N * D), 3.0, 11 + D, "xb", true);
    const std::vector<float> res = random(size_t(N * D), 4.0, 12 + D, "res", false);
    const std::vector<float> w = random(size_t(D), 0.5, 13 + D, "w", true);
    std::printf("D = %lld\n", (long long)D);
    {  // input norms: fp32 residual in, bf16 (the product input) out
      const fk::Norm got = fk::rmsnorm_input(N, D, x, w, c.rms_norm_eps);
      Mat<double> out, out64;
      Vec<double> rstd, rstd64;
      rmsnorm_forward(mat(x, N, D), vec(w), *rf.ctx, out, rstd);
      cast(rf.policy, Cast::matmul_in, out);
      rmsnorm_forward(mat(x, N, D), vec(w), *r64.ctx, out64, rstd64);
      expect_bf16_match("input norm out", got.out, flat(out), flat(out64));
      // 1/rms from an fp32 sum of D squares: a few fp32 ulps.
      expect_f32_match("input norm 1/rms", got.rstd, flat(rstd), flat(rstd64), 1e-6);
    }
    {  // post norms: bf16 product in, fp32 residual + norm out
      const fk::Norm got = fk::rmsnorm_post(N, D, xb, w, res, c.rms_norm_eps);
      Mat<double> h, h64;
      Vec<double> rstd, rstd64;
      rmsnorm_forward(mat(xb, N, D), vec(w), *rf.ctx, h, rstd);
      Mat<double> out = mat(res, N, D) + h;
      cast(rf.policy, Cast::residual, out);
      rmsnorm_forward(mat(xb, N, D), vec(w), *r64.ctx, h64, rstd64);
      const Mat<double> out64 = mat(res, N, D) + h64;
      // Three fp32 roundings per element (x r, times scale, plus the residual) with a few-ulp 1/rms.
      expect_f32_match("post norm residual out", got.out, flat(out), flat(out64), 1e-6);
    }
  }
}

TEST_F(FastKernel, RmsNormBackwardWithWeightGradient) {
  // 333: the one-element-per-step kernels; 3584 (gemma2-9b): the eight-wide ones.
  for (int64_t D : {333, 3584}) {
    const int64_t N = 13;
    const Config c = small_config(D);
    RefCtx rf(c, policy_fast(), 1, N), r64(c, policy_f64(), 1, N);
    const std::vector<float> w = random(size_t(D), 0.5, 20, "w", true);
    for (fk::NormKind kind : {fk::NormKind::post, fk::NormKind::input, fk::NormKind::final}) {
      const char* name = kind == fk::NormKind::post ? "post" : kind == fk::NormKind::input ? "input" : "final";
      const bool x_bf16 = kind == fk::NormKind::post, dout_f32 = kind == fk::NormKind::input;
      const std::vector<float> x = random(size_t(N * D), 2.0, 21, name, x_bf16);
      const std::vector<float> dout = random(size_t(N * D), 1e-3, 22, name, !dout_f32);
      const std::vector<float> dres = random(size_t(N * D), 1e-3, 23, name, true);
      Mat<double> fwd;
      Vec<double> rstd;
      rmsnorm_forward(mat(x, N, D), vec(w), *r64.ctx, fwd, rstd);
      std::vector<float> rstd_f(static_cast<size_t>(N));
      for (int64_t n = 0; n < N; ++n) rstd_f[size_t(n)] = float(rstd(n));
      const fk::NormGrad got = fk::rmsnorm_backward(kind, N, D, dout, x, rstd_f, w, dres);
      // The reference reads the gradient as bf16 (grad_act) and the 1/rms the kernel is given.
      Mat<double> dd = mat(dout, N, D);
      cast(rf.policy, Cast::grad_act, dd);
      Vec<double> rs(N);
      for (int64_t n = 0; n < N; ++n) rs(n) = rstd_f[size_t(n)];
      Mat<double> dx, dx64;
      Vec<double> dw = Vec<double>::Zero(D), dw64 = Vec<double>::Zero(D);
      rmsnorm_backward(dd, mat(x, N, D), rs, vec(w), *rf.ctx, dx, &dw);
      rmsnorm_backward(mat(dout, N, D), mat(x, N, D), rs, vec(w), *r64.ctx, dx64, &dw64);
      if (kind == fk::NormKind::input) {
        dx += mat(dres, N, D);
        cast(rf.policy, Cast::grad_act, dx);
        dx64 += mat(dres, N, D);
      }
      std::printf("%s norm backward, D = %lld\n", name, (long long)D);
      expect_bf16_match("dx", got.dx, flat(dx), flat(dx64));
      // dw: fp32 sums of N products; their terms are of either sign, so 1e-5 of the norm leaves room for
      // cancellation while a missing (1 + w) or dropped term is off by 1e-2 or more.
      expect_f32_match("dw (weight gradient)", got.dw, flat(dw), flat(dw64), 1e-5);
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// RoPE

TEST_F(FastKernel, RopeForwardAndBackward) {
  for (int64_t hd : {16, 128, 256}) {
    Config c = preset("gemma2-tiny");
    c.head_dim = hd;
    const int64_t B = 2, T = 37, heads = 3, N = B * T;
    RefCtx rf(c, policy_fast(), B, T), r64(c, policy_f64(), B, T);
    const std::vector<float> x = random(size_t(N * heads * hd), 3.0, 30 + hd, "x", true);
    const std::vector<float> dx = random(size_t(N * heads * hd), 1e-2, 31 + hd, "dx", false);
    std::printf("head_dim %lld\n", (long long)hd);
    {
      Mat<double> r = mat(x, N, heads * hd), r6 = r;
      rope_apply(r, heads, *rf.ctx, false);
      cast(rf.policy, Cast::rope_out, r);
      rope_apply(r6, heads, *r64.ctx, false);
      expect_bf16_match("rope forward", fk::rope_forward(N, T, heads, hd, c.rope_theta, x), flat(r), flat(r6));
    }
    {
      Mat<double> r = mat(dx, N, heads * hd), r6 = r;
      rope_apply(r, heads, *rf.ctx, true);
      cast(rf.policy, Cast::grad_act, r);
      rope_apply(r6, heads, *r64.ctx, true);
      expect_bf16_match("rope backward", fk::rope_backward(N, T, heads, hd, c.rope_theta, dx), flat(r), flat(r6));
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// Attention

struct AttnCase {
  int64_t B, T, H, KV, hd;
  bool cap_on;
  bool sliding;
  int64_t window;
  double qpas;
};

class FastAttention : public FastKernel, public ::testing::WithParamInterface<AttnCase> {};

TEST_P(FastAttention, ForwardAndBackwardMatchTheReference) {
  const AttnCase a = GetParam();
  Config c = preset("gemma2-tiny");
  c.num_attention_heads = a.H;
  c.num_key_value_heads = a.KV;
  c.head_dim = a.hd;
  c.query_pre_attn_scalar = a.qpas;
  c.sliding_window = a.window;
  c.layer_types = {LayerType::sliding, LayerType::full};
  const int64_t layer = a.sliding ? 0 : 1, N = a.B * a.T;
  RefCtx rf(c, policy_fast(), a.B, a.T, a.cap_on), r64(c, policy_f64(), a.B, a.T, a.cap_on);
  Policy keep_out = policy_fast();
  keep_out[Cast::attn_out] = DType::f64;  // the fp32 sum before its rounding, to check o32
  RefCtx ro(c, keep_out, a.B, a.T, a.cap_on);
  // Inputs scaled so the scores spread over about a quarter of the cap: the cap bends them (a missing sech^2 is
  // off by several percent) and the softmax is neither flat nor one-hot.
  const double cap = *c.attn_logit_softcapping, scale = 1.0 / std::sqrt(a.qpas);
  const double amp = std::sqrt(0.25 * cap * 3.0 / (scale * std::sqrt(double(a.hd))));
  const uint64_t seed = uint64_t(a.B * 1000003 + a.T * 1009 + a.H * 101 + a.KV * 11 + a.hd + a.cap_on + 2 * a.sliding);
  const std::vector<float> q = random(size_t(N * a.H * a.hd), amp, seed, "q", true);
  const std::vector<float> k = random(size_t(N * a.KV * a.hd), amp, seed, "k", true);
  const std::vector<float> v = random(size_t(N * a.KV * a.hd), 1.0, seed, "v", true);
  const std::vector<float> dout = random(size_t(N * a.H * a.hd), 1e-2, seed, "dout", true);
  fk::AttnShape s;
  s.B = a.B;
  s.T = a.T;
  s.H = a.H;
  s.KV = a.KV;
  s.hd = a.hd;
  s.scale = scale;
  s.cap_on = a.cap_on;
  s.cap = cap;
  s.window = a.sliding ? a.window : 0;

  Mat<double> out, out64, outo, dq, dk, dv, dq6, dk6, dv6;
  AttnCache<double> cache, cache64, cacheo;
  attention_forward(mat(q, N, a.H * a.hd), mat(k, N, a.KV * a.hd), mat(v, N, a.KV * a.hd), layer, *rf.ctx, out, cache);
  attention_forward(mat(q, N, a.H * a.hd), mat(k, N, a.KV * a.hd), mat(v, N, a.KV * a.hd), layer, *r64.ctx, out64,
                    cache64);
  attention_forward(mat(q, N, a.H * a.hd), mat(k, N, a.KV * a.hd), mat(v, N, a.KV * a.hd), layer, *ro.ctx, outo, cacheo);
  attention_backward(mat(dout, N, a.H * a.hd), mat(q, N, a.H * a.hd), mat(k, N, a.KV * a.hd), mat(v, N, a.KV * a.hd),
                     cache, layer, *rf.ctx, dq, dk, dv);
  attention_backward(mat(dout, N, a.H * a.hd), mat(q, N, a.H * a.hd), mat(k, N, a.KV * a.hd), mat(v, N, a.KV * a.hd),
                     cache64, layer, *r64.ctx, dq6, dk6, dv6);
  // Both kernel families: the Hopper ones (attention_sm90.cuh, head_dim 128 and 256) and the mma.sync ones.
  for (const bool mma_only : {false, true}) {
  const fk::Attention got = fk::attention(s, q, k, v, dout, mma_only);
  std::printf("B %lld T %lld H %lld KV %lld hd %lld, cap %s, %s, %s kernels\n", (long long)a.B, (long long)a.T,
              (long long)a.H, (long long)a.KV, (long long)a.hd, a.cap_on ? "on" : "off",
              a.sliding ? ("sliding W=" + std::to_string(a.window)).c_str() : "global",
              mma_only || (a.hd != 128 && a.hd != 256) ? "mma.sync" : "default (wgmma on sm_90a)");
  expect_bf16_match("out (bf16)", got.out, flat(out), flat(out64), false);
  // o32 is an fp32 sum of T products of bf16 values: its error against the policy is the rare P whose fp32
  // value rounded to the other bf16 neighbour (a 2^-8 change of one term; see the file comment).
  expect_f32_match("out before rounding (fp32)", got.o32, flat(outo), flat(out64), 2e-4);
  // The gradients add to that fp32 accumulation of dS (exact three-way split) over T keys; 1e-3 keeps a 10x
  // margin above the estimate (P flips contribute about sqrt(1e-3) 2^-8 = 1e-4), and is far below the
  // missing-sech^2 error (several 1e-2) and the bf16 effects the f64 column shows.
  expect_f32_match("dq", got.dq, flat(dq), flat(dq6), 1e-3);
  expect_f32_match("dk", got.dk, flat(dk), flat(dk6), 1e-3);
  expect_f32_match("dv", got.dv, flat(dv), flat(dv6), 1e-3);
  expect_same_bits("recomputed forward, out", got.out_recomputed, got.out);
  expect_same_bits("recomputed forward, o32", got.o32_recomputed, got.o32);
  }
}

// The Hopper kernels against the mma.sync ones (each held to the reference above) where the reference test does
// not reach: packed documents, padding keys and queries that see no key, sequences of many tiles, windows that
// cut tiles; and, without documents or padding, the tiles every score of which is visible, whose per-score code the
// Hopper kernels specialise (attn_tile_kind), with the cap on and off. Both implement the same cast points, so they
// differ only by fp32 accumulation order inside the products: by bf16 probabilities that round the other way (a
// 2^-8 change of one term), the o32 bound of the test above, and by what those flips move in the gradients, its
// 1e-3 (on the fp32 values, where the reference test compares with the float64 emulation). Queries that see no
// key must get exact zeros from both.
TEST_F(FastKernel, HopperAttentionAgreesWithTheMmaKernelsOnDocumentsPaddingAndLongSequences) {
  struct Shape {
    int64_t B, T, H, KV, hd, window;
  };
  enum Kind { kDocuments, kPlainCapped, kPlainUncapped };
  for (const Shape& sh : {Shape{2, 1000, 4, 2, 256, 300}, Shape{1, 1100, 2, 1, 256, 0}, Shape{2, 777, 8, 4, 128, 130}})
  for (const Kind kind : {kDocuments, kPlainCapped, kPlainUncapped}) {
    const int64_t N = sh.B * sh.T;
    fk::AttnShape s;
    s.B = sh.B;
    s.T = sh.T;
    s.H = sh.H;
    s.KV = sh.KV;
    s.hd = sh.hd;
    s.scale = 1.0 / 16.0;
    s.cap_on = kind != kPlainUncapped;
    s.cap = 50;
    s.window = sh.window;
    // Documents of 97 tokens with a one-token document now and then; padding at the start of each sequence (its
    // first queries see no key) and every 61st token.
    if (kind == kDocuments) {
      s.doc.resize(size_t(N));
      s.key_ok.resize(size_t(N));
      for (int64_t n = 0; n < N; ++n) {
        const int64_t t = n % sh.T;
        s.doc[size_t(n)] = int32_t(t / 97 + (t % 250 == 3 ? 1000 : 0));
        s.key_ok[size_t(n)] = uint8_t(!(t < 5 || t % 61 == 7));
      }
    }
    const uint64_t seed = uint64_t(sh.T * 31 + sh.hd);
    const double amp = 3.0;  // scaled scores with a spread of about 3: a softmax neither flat nor one-hot
    const std::vector<float> q = random(size_t(N * sh.H * sh.hd), amp, seed, "q", true);
    const std::vector<float> k = random(size_t(N * sh.KV * sh.hd), amp, seed, "k", true);
    const std::vector<float> v = random(size_t(N * sh.KV * sh.hd), 1.0, seed, "v", true);
    const std::vector<float> dout = random(size_t(N * sh.H * sh.hd), 1e-2, seed, "dout", true);
    const fk::Attention hop = fk::attention(s, q, k, v, dout, false), mma = fk::attention(s, q, k, v, dout, true);
    std::printf("B %lld T %lld H %lld KV %lld hd %lld window %lld, %s\n", (long long)sh.B, (long long)sh.T,
                (long long)sh.H, (long long)sh.KV, (long long)sh.hd, (long long)sh.window,
                kind == kDocuments ? "documents and padding" : kind == kPlainCapped ? "cap on" : "cap off");
    auto rel = [](const std::vector<float>& a, const std::vector<float>& b, const char* what) {
      double num = 0, den = 0;
      size_t nan = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        if (std::isnan(a[i]) || std::isnan(b[i])) ++nan;
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
      }
      EXPECT_EQ(nan, 0u) << what;
      EXPECT_GT(den, 0.0) << what;
      const double r = std::sqrt(num / den);
      std::printf("  %-4s rel L2 %.3g\n", what, r);
      return r;
    };
    EXPECT_LE(rel(hop.o32, mma.o32, "o32"), 2e-4);
    for (const fk::Attention* a : {&hop, &mma}) {
      expect_same_bits("recomputed forward, out", a->out_recomputed, a->out);
      expect_same_bits("recomputed forward, o32", a->o32_recomputed, a->o32);
    }
    EXPECT_LE(rel(hop.dq, mma.dq, "dq"), 1e-3);
    EXPECT_LE(rel(hop.dk, mma.dk, "dk"), 1e-3);
    EXPECT_LE(rel(hop.dv, mma.dv, "dv"), 1e-3);
    // The first five tokens of each sequence are padding, so its first queries see no key at all.
    for (int64_t b = 0; b < sh.B && kind == kDocuments; ++b)
      for (int64_t t = 0; t < 5; ++t)
        for (int64_t d = 0; d < sh.H * sh.hd; ++d) {
          const size_t i = size_t((b * sh.T + t) * sh.H * sh.hd + d);
          ASSERT_EQ(hop.o32[i], 0.0f) << "query " << t << " of sequence " << b << " sees no key";
          ASSERT_EQ(hop.dq[i], 0.0f) << "query " << t << " of sequence " << b << " sees no key";
        }
  }
}

// T = 37 and 150 are multiples of no tile (64 query rows, 32 keys); 37 and 150 exceed the window; 1, 2 and 4
// query heads per kv head; head_dim 6 (not a multiple of 8: the scalar load path), 16, 128 (27b), 256 (2b, 9b).
INSTANTIATE_TEST_SUITE_P(
    Shapes, FastAttention,
    ::testing::Values(AttnCase{2, 37, 4, 2, 16, true, true, 8, 24}, AttnCase{2, 37, 4, 2, 16, false, true, 8, 24},
                      AttnCase{2, 37, 4, 2, 16, true, false, 8, 24}, AttnCase{2, 37, 4, 2, 16, false, false, 8, 24},
                      AttnCase{1, 37, 4, 4, 16, true, true, 8, 24}, AttnCase{1, 37, 4, 1, 16, true, true, 8, 24},
                      AttnCase{2, 21, 2, 1, 6, true, true, 3, 8}, AttnCase{1, 150, 4, 1, 256, true, true, 64, 256},
                      AttnCase{1, 150, 4, 2, 256, true, false, 64, 256}, AttnCase{1, 150, 8, 4, 128, true, true, 100, 144},
                      AttnCase{2, 77, 2, 1, 128, false, false, 4096, 144},
                      // Several 128-query and 64-key tiles of the Hopper kernels: window edges inside tiles,
                      // a second sequence, a last tile cut by T.
                      AttnCase{2, 300, 4, 2, 256, true, true, 100, 256}, AttnCase{1, 300, 2, 1, 256, true, false, 100, 256},
                      AttnCase{2, 200, 4, 2, 128, false, true, 70, 144}),
    [](const auto& info) {
      const AttnCase& a = info.param;
      return "B" + std::to_string(a.B) + "_T" + std::to_string(a.T) + "_H" + std::to_string(a.H) + "_KV" +
             std::to_string(a.KV) + "_hd" + std::to_string(a.hd) + (a.cap_on ? "_cap" : "_nocap") +
             (a.sliding ? "_W" + std::to_string(a.window) : "_global");
    });

// ------------------------------------------------------------------------------------------------------
// GeGLU

TEST_F(FastKernel, GegluForwardAndBackward) {
  // I = 333: the one-element-per-thread kernels; 336 (a multiple of 8): the eight-per-thread ones.
  for (const int64_t I : {int64_t(333), int64_t(336)}) {
  const int64_t N = 5;
  std::printf("I = %lld\n", (long long)I);
  const Policy p = policy_fast();
  // Gate values up to +-12: GELU's left tail, where a naive sigmoid overflows exp.
  const std::vector<float> gu = random(size_t(N * 2 * I), 12.0, 40, "gate_up", true);
  const std::vector<float> dact = random(size_t(N * I), 1e-2, 41, "dact", false);
  std::vector<double> act(size_t(N * I)), act64(act.size()), dgu(size_t(N * 2 * I)), dgu64(dgu.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < I; ++j) {
      const double g = gu[size_t(n * 2 * I + j)], u = gu[size_t(n * 2 * I + I + j)];
      const size_t i = size_t(n * I + j);
      act[i] = cast(p, Cast::geglu, cast(p, Cast::gelu, gelu_tanh(g)) * u);
      act64[i] = gelu_tanh(g) * u;
      const double d = cast(p, Cast::grad_act, double(dact[i]));
      dgu[size_t(n * 2 * I + j)] = cast(p, Cast::grad_act, d * u * gelu_tanh_grad(g));
      dgu[size_t(n * 2 * I + I + j)] = cast(p, Cast::grad_act, d * cast(p, Cast::gelu, gelu_tanh(g)));
      dgu64[size_t(n * 2 * I + j)] = double(dact[i]) * u * gelu_tanh_grad(g);
      dgu64[size_t(n * 2 * I + I + j)] = double(dact[i]) * gelu_tanh(g);
    }
  expect_bf16_match("geglu forward", fk::geglu_forward(N, I, gu), act, act64);
  expect_bf16_match("geglu backward", fk::geglu_backward(N, I, dact, gu), dgu, dgu64);
  }
}

// ------------------------------------------------------------------------------------------------------
// LM head + final softcap + cross-entropy

struct LossCase {
  int64_t N, D, V, chunk;
  bool cap_on;
};

class FastLoss : public FastKernel, public ::testing::WithParamInterface<LossCase> {};

TEST_P(FastLoss, ChunkedFusedLossMatchesTheReference) {
  const LossCase a = GetParam();
  Config c = preset("gemma2-tiny");
  c.hidden_size = a.D;
  c.vocab_size = a.V;
  // Logits spread over half the final cap (model/synthetic.hpp's design), so the cap bends them.
  const double cap = *c.final_logit_softcapping;
  const double amp = std::sqrt(0.5 * cap * 3.0 / std::sqrt(double(a.D)));
  const uint64_t seed = uint64_t(a.V * 7 + a.N + a.cap_on);
  const std::vector<float> xf = random(size_t(a.N * a.D), amp, seed, "xf", true);
  const std::vector<float> E = random(size_t(a.V * a.D), amp, seed, "E", true);
  // Targets: spread over the vocabulary (the first and last ids included), every third row ignored.
  std::vector<int32_t> tgt(size_t(a.N));
  int64_t scored = 0;
  for (int64_t n = 0; n < a.N; ++n) {
    tgt[size_t(n)] = n % 3 == 1 ? -100 : int32_t((n * 7919 + (n == 0 ? 0 : a.V - 1)) % a.V);
    scored += tgt[size_t(n)] >= 0;
  }
  const double grad_scale = 1.0 / double(scored + 5);  // as if other micro-batches scored 5 more
  const std::vector<int64_t> rows = {0, 1, a.N - 1};
  const fk::Loss got = fk::loss(a.N, a.D, a.V, xf, E, tgt, a.cap_on, cap, grad_scale, a.chunk, rows);

  // Reference: logits = xf E^T exactly, then the policy's casts, loss_forward_backward, dxf = dlogits E.
  Batch b;
  b.B = 1;
  b.T = a.N + 1;
  b.labels.assign(size_t(a.N + 1), -100);
  b.input_ids.assign(size_t(a.N + 1), 0);
  for (int64_t n = 0; n < a.N; ++n) b.labels[size_t(n + 1)] = tgt[size_t(n)];
  auto reference = [&](const Policy& p, double& loss, std::vector<double>& dxf, Mat<double>& capped) {
    RefCtx r(c, p, 1, a.N + 1, false, a.cap_on);
    const Mat<double> X = mat(xf, a.N, a.D), Em = mat(E, a.V, a.D);
    Mat<double> logits = X * Em.transpose(), pad(a.N, 0);
    cast(p, Cast::logits, logits);
    loss = loss_forward_backward(logits, pad, b, *r.ctx, grad_scale, &capped);
    cast(p, Cast::grad_act, logits);
    Mat<double> dx = logits * Em;
    cast(p, Cast::grad_act, dx);
    dxf = flat(dx);
  };
  double loss_f = 0, loss_64 = 0;
  std::vector<double> dxf_f, dxf_64;
  Mat<double> cap_f, cap_64;
  reference(policy_fast(), loss_f, dxf_f, cap_f);
  reference(policy_f64(), loss_64, dxf_64, cap_64);
  double sum = 0;
  for (float l : got.row_loss) sum += l;
  std::printf("N %lld D %lld V %lld (padded to %lld), chunks of %lld rows, cap %s\n", (long long)a.N, (long long)a.D,
              (long long)a.V, (long long)((a.V + 127) / 128 * 128), (long long)a.chunk, a.cap_on ? "on" : "off");
  std::printf("  loss sum %.9g, fast policy %.9g (rel %.2e), f64 %.9g (rel %.2e)\n", sum, loss_f,
              std::fabs(sum - loss_f) / loss_f, loss_64, std::fabs(sum - loss_64) / loss_64);
  // Per row: an fp32 logsumexp of V terms and a difference of two values near 10: about 1e-6 absolute, so
  // 1e-5 relative on the sum. A padded column left in the softmax changes it by 1e-2 or more.
  EXPECT_LE(std::fabs(sum - loss_f) / loss_f, 1e-5);
  for (int64_t n = 0; n < a.N; ++n)
    if (tgt[size_t(n)] < 0) {
      EXPECT_EQ(got.row_loss[size_t(n)], 0.0f) << "ignored row " << n;
      for (int64_t j = 0; j < a.D; ++j) ASSERT_EQ(got.dxf[size_t(n * a.D + j)], 0.0f) << "ignored row " << n;
    }
  expect_bf16_match("dxf", got.dxf, dxf_f, dxf_64, false);
  for (int64_t row : rows) {
    std::vector<double> want(cap_f.row(row).data(), cap_f.row(row).data() + a.V);
    std::vector<double> want64(cap_64.row(row).data(), cap_64.row(row).data() + a.V);
    // fp32 GEMM over D terms, then fp32 tanh: a few 1e-7.
    expect_f32_match(("capped logits row " + std::to_string(row)).c_str(), got.capped.at(row), want, want64, 2e-6);
  }
}

// The real 256000 vocabulary (a multiple of 128: no padding; 32 blocks of kCePart = 8192 columns per row, the last
// one 2048), a small odd one (389 -> 512: 123 padded columns with nonzero rows, one block), and 16389 -> 16512,
// whose third block holds 5 columns of the vocabulary and the 123 padded ones; several chunks; rows 1, 4, 7, ...
// ignored.
INSTANTIATE_TEST_SUITE_P(Vocab, FastLoss,
                         ::testing::Values(LossCase{6, 64, 256000, 4, true}, LossCase{6, 64, 256000, 6, false},
                                           LossCase{40, 48, 389, 7, true}, LossCase{40, 48, 389, 40, false},
                                           LossCase{9, 32, 16389, 4, true}),
                         [](const auto& info) {
                           return "V" + std::to_string(info.param.V) + "_chunk" + std::to_string(info.param.chunk) +
                                  (info.param.cap_on ? "_cap" : "_nocap");
                         });

// ------------------------------------------------------------------------------------------------------
// Projections with LoRA

TEST_F(FastKernel, LoraGroupForwardBackwardAreFp32Accurate) {
  struct G {
    int64_t N, in, r;
    std::vector<int64_t> outs;
    std::vector<bool> adapter;
  };
  // q|k|v of tiny; gate|up with one projection not adapted; 9b's q|k|v widths at rank 32; rank 8 with rows and
  // widths that are no multiple of the fused adapter kernel's 128 x 128 tile; rank 8 with widths that are no
  // multiple of 8 (the kernel's element-wise tail: outputs at columns 36 and 54 of a row of 72); then groups whose
  // blocks walk several row tiles, with the first projection's last column tile a piece of 4 or 5 columns:
  // 4133 rows at ranks 8 and 64, and 4000 rows, where the grid's last block row has fewer tiles than the others,
  // at ranks 12 (K = 72: the Hopper kernel pads K to 128), 16, 24 (K = 144, padded to 192), 48 and 64, two of
  // them with an odd total width (1153), so y goes element by element. Which kernel each takes on the H200 is
  // asserted below; rank 5 (K = 30) takes neither: the fp32 product and lora_add_kernel. A group's adapters share
  // one fused launch (their column tiles side by side) and, where widths are equal (k and v; gate and up, as in
  // the 200 | 200 group), batched backward products: the three-adapter groups and the 200 | 200 one cover both.
  struct Expect {
    int64_t r, N, out, ldl;
    const char* plan;  // on the H200 (132 multiprocessors)
  };
  if (fk::hopper_kernels() && fk::multiprocessors() == 132) {
    for (const Expect& e : {Expect{4, 37, 64, 72, "lora_out_add_wg_kernel<64, 0> tiles 1 iters 1"},
                            Expect{5, 21, 160, 30, "unfused"},
                            Expect{8, 4133, 1100, 96, "lora_out_add_wg_kernel<64, 0> tiles 22 iters 2"},
                            Expect{64, 4133, 1100, 768, "lora_out_add_kernel<1> tiles 130 iters 9"},
                            Expect{12, 4000, 1100, 144, "lora_out_add_wg_kernel<128, 0> tiles 21 iters 2"},
                            Expect{16, 4000, 1101, 192, "lora_out_add_wg_kernel<64, 1> tiles 21 iters 2"},
                            Expect{24, 4000, 1100, 288, "lora_out_add_wg_kernel<192, 0> tiles 32 iters 3"},
                            Expect{32, 16, 4096, 576, "lora_out_add_wg_kernel<128, 2> tiles 1 iters 1"},
                            Expect{48, 4000, 1100, 576, "lora_out_add_kernel<2> tiles 63 iters 5"},
                            Expect{64, 4000, 1101, 768, "lora_out_add_kernel<1> tiles 125 iters 9"}})
      EXPECT_EQ(fk::lora_out_kernel(e.r, e.N, e.out, e.ldl), e.plan) << "rank " << e.r << ", " << e.N << " rows";
  } else {
    std::printf("not an H200 (132 multiprocessors) with the sm_90a kernels: which kernel runs is not asserted\n");
  }
  for (const G& g : {G{37, 64, 4, {64, 32, 32}, {true, true, true}}, G{21, 64, 5, {160, 160}, {false, true}},
                     G{16, 3584, 32, {4096, 2048, 2048}, {true, true, true}},
                     G{300, 256, 8, {200, 72}, {true, true}}, G{300, 256, 8, {200, 200}, {true, true}},
                     G{130, 64, 8, {36, 18, 18}, {true, true, true}},
                     G{4133, 64, 8, {1100, 52}, {true, true}}, G{4133, 64, 64, {1100, 52}, {true, true}},
                     G{4000, 64, 12, {1100, 52}, {true, true}}, G{4000, 64, 16, {1101, 52}, {true, true}},
                     G{4000, 64, 24, {1100, 52}, {true, true}}, G{4000, 64, 48, {1100, 52}, {true, true}},
                     G{4000, 64, 64, {1101, 52}, {true, true}}}) {
    const double s = 2.0;  // alpha = 2r (tools' synthetic adapters)
    std::vector<fk::LoraProj> projs;
    int64_t out_total = 0;
    for (size_t i = 0; i < g.outs.size(); ++i) {
      fk::LoraProj p;
      p.out = g.outs[i];
      p.W = random(size_t(p.out * g.in), 1.0 / std::sqrt(double(g.in)), 50 + i, "W", true);
      if (g.adapter[i]) {
        // fp32 masters that are not bf16 values (as after optimizer steps): the splits matter.
        p.A = random(size_t(g.r * g.in), 1.0 / std::sqrt(double(g.in)), 51 + i, "A", false);
        p.B = random(size_t(p.out * g.r), 0.25 / std::sqrt(double(g.r)), 52 + i, "B", false);
      }
      out_total += p.out;
      projs.push_back(p);
    }
    const std::vector<float> x = random(size_t(g.N * g.in), 1.0, 53, "x", true);
    const std::vector<float> dy = random(size_t(g.N * out_total), 1e-2, 54, "dy", true);
    const fk::LoraGroup got = fk::lora_group(g.N, g.in, g.r, s, projs, x, dy);
    std::printf("group: N %lld, in %lld, r %lld, %zu projections\n", (long long)g.N, (long long)g.in, (long long)g.r,
                projs.size());
    Mat<double> dx = Mat<double>::Zero(g.N, g.in), dx64 = dx;
    std::vector<double> y, y64;
    std::vector<std::vector<double>> dA, dB, dA64, dB64;
    int64_t col = 0;
    for (const fk::LoraProj& p : projs) {
      for (int pass = 0; pass < 2; ++pass) {
        const Policy pol = pass == 0 ? policy_fast() : policy_f64();
        Weight<double> W;
        W.rows = p.out;
        W.cols = g.in;
        W.value = mat(p.W, p.out, g.in);
        Lora<double> lo;
        if (!p.A.empty()) {
          lo.A = mat(p.A, g.r, g.in);
          lo.B = mat(p.B, p.out, g.r);
        }
        Mat<double> yy, xa;
        projection_forward(mat(x, g.N, g.in), W, lo, s, pol, yy, xa);
        Mat<double> dys = mat(dy, g.N, out_total).middleCols(col, p.out);
        Lora<double> dl;
        if (lo.present()) {
          dl.A = Mat<double>::Zero(g.r, g.in);
          dl.B = Mat<double>::Zero(p.out, g.r);
        }
        projection_backward<double>(dys, mat(x, g.N, g.in), W, lo, s, pol, xa, pass == 0 ? dx : dx64, nullptr,
                            lo.present() ? &dl : nullptr);
        auto& yo = pass == 0 ? y : y64;
        yo.resize(size_t(g.N * out_total));
        for (int64_t n = 0; n < g.N; ++n)
          for (int64_t j = 0; j < p.out; ++j) yo[size_t(n * out_total + col + j)] = yy(n, j);
        if (lo.present()) {
          (pass == 0 ? dA : dA64).push_back(flat(dl.A));
          (pass == 0 ? dB : dB64).push_back(flat(dl.B));
        }
      }
      col += p.out;
    }
    expect_bf16_match("y (base + adapter)", got.y, y, y64, false);
    // fp32 sums of exact products over out_total (dx) or N (dA, dB) terms, and the split pairs dropped below
    // 2^-24: a few 1e-7 at these lengths; 1e-5 leaves a 10x margin and is 400x below one bf16 rounding.
    expect_f32_match("dx (fp32 product sum)", got.dx, flat(dx), flat(dx64), 1e-5);
    for (size_t i = 0; i < dA.size(); ++i) {
      expect_f32_match(("dA[" + std::to_string(i) + "]").c_str(), got.dA[i], dA[i], dA64[i], 1e-5);
      expect_f32_match(("dB[" + std::to_string(i) + "]").c_str(), got.dB[i], dB[i], dB64[i], 1e-5);
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// AdamW

TEST_F(FastKernel, AdamWMatchesTheReferenceOptimizer) {
  const int64_t nA = 300, nB = 77, n = nA + nB;
  std::vector<float> p = random(size_t(n), 0.1, 60, "p", false), m(size_t(n), 0.0f), v(size_t(n), 0.0f);
  AdamWConfig h;
  h.lr = 1e-2;
  h.weight_decay = 0.1;
  // The reference optimizer on a model whose only trainable tensors are one adapter's A and B.
  Model<double> model;
  model.config.num_hidden_layers = 1;
  model.layers.resize(1);
  model.layers[0].lora[0].A = Mat<double>(1, nA);
  model.layers[0].lora[0].B = Mat<double>(nB, 1);
  for (int64_t i = 0; i < nA; ++i) model.layers[0].lora[0].A(0, i) = p[size_t(i)];
  for (int64_t i = 0; i < nB; ++i) model.layers[0].lora[0].B(i, 0) = p[size_t(nA + i)];
  Grads<double> g;
  g.layers.resize(1);
  g.layers[0].lora[0].A = Mat<double>(1, nA);
  g.layers[0].lora[0].B = Mat<double>(nB, 1);
  AdamWState<double> state;
  for (int64_t t = 1; t <= 4; ++t) {
    const std::vector<float> gr = random(size_t(n), 1e-3 * double(t), 61 + uint64_t(t), "g", false);
    for (int64_t i = 0; i < nA; ++i) g.layers[0].lora[0].A(0, i) = gr[size_t(i)];
    for (int64_t i = 0; i < nB; ++i) g.layers[0].lora[0].B(i, 0) = gr[size_t(nA + i)];
    adamw_step(model, g, state, h, policy_fast());
    fk::adamw(p, gr, m, v, t, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay);
  }
  std::vector<double> want(static_cast<size_t>(n));
  for (int64_t i = 0; i < nA; ++i) want[size_t(i)] = model.layers[0].lora[0].A(0, i);
  for (int64_t i = 0; i < nB; ++i) want[size_t(nA + i)] = model.layers[0].lora[0].B(i, 0);
  std::vector<double> m_want(state.m[0]), v_want(state.v[0]);
  m_want.insert(m_want.end(), state.m[1].begin(), state.m[1].end());
  v_want.insert(v_want.end(), state.v[1].begin(), state.v[1].end());
  // Four fp32 updates of a few operations each: a few fp32 ulps of the parameters.
  expect_f32_match("parameters after 4 steps", p, want, want, 1e-6);
  expect_f32_match("first moments", m, m_want, m_want, 1e-6);
  expect_f32_match("second moments", v, v_want, v_want, 1e-6);
}

// ------------------------------------------------------------------------------------------------------
// NF4 (QLoRA's base weights)

namespace {

std::vector<uint16_t> bits_as_bf16(const Tensor& t) {  // a float tensor's values rounded to bf16 (the weights cast)
  std::vector<uint16_t> b;
  for (double v : t.to_double()) b.push_back(float_to_bf16(float(v)));
  return b;
}

}  // namespace

// The device quantizer and dequantizer against model/nf4.cpp's (bitsandbytes' definitions), bit for bit: both are
// exact functions of their inputs (a max, one IEEE reciprocal, one product and comparisons; one product and one
// sum, then roundings), so any difference is a bug, not noise.
TEST_F(FastKernel, Nf4QuantizeAndDequantizeGiveTheHostsBits) {
  // 7 x 2749 = 19243 values: 300 full blocks of 64 and a short one, an odd count (the last low nibble is padding),
  // two nested blocks of 256 (the one-byte-a-thread kernel only); and 48 x 1000, a multiple of 16 as every Gemma 2
  // projection is (the engine's 16-value kernel, and the other for comparison). Block scales spread over
  // 2^-6..2^3 so the absmax codes use much of their map, and one all-zero block (absmax 0: codes 0, as
  // bitsandbytes' NaN path gives).
  for (const Shape& shape : {Shape{7, 2749}, Shape{48, 1000}}) {
    const int64_t n = shape_numel(shape);
    std::vector<double> x(static_cast<size_t>(n));
    const uint64_t key = stream_key(5, "nf4 test weight");
    for (int64_t i = 0; i < n; ++i) {
      const int64_t blk = i / 64;
      x[size_t(i)] = blk == 3 ? 0.0 : std::ldexp(stream_uniform(key, uint64_t(i)), int(blk % 10) - 6);
    }
    const Tensor w = tensor_from_doubles(DType::bf16, shape, x);
    const std::vector<uint16_t> w_bits = bits_as_bf16(w);
    for (int64_t blocksize : {64, 128})
      for (bool nested : {false, true}) {
        SCOPED_TRACE(std::to_string(n) + " values, blocksize " + std::to_string(blocksize) +
                     (nested ? ", double quantization" : ""));
        const Nf4Weight host = quantize_nf4(w, blocksize, nested);
        const Nf4Weight dev = fk::nf4_quantize(w_bits, shape, blocksize, nested);
        EXPECT_EQ(dev.packed, host.packed);
        ASSERT_EQ(dev.nested, host.nested);
        auto same_floats = [](const std::vector<float>& a, const std::vector<float>& b) {
          if (a.size() != b.size()) return false;
          for (size_t i = 0; i < a.size(); ++i)
            if (float_bits(a[i]) != float_bits(b[i])) return false;
          return true;
        };
        EXPECT_TRUE(same_floats(dev.absmax, host.absmax));
        EXPECT_EQ(dev.absmax_codes, host.absmax_codes);
        EXPECT_TRUE(same_floats(dev.nested_absmax, host.nested_absmax));
        EXPECT_TRUE(same_floats(dev.nested_quant_map, host.nested_quant_map));
        EXPECT_EQ(float_bits(dev.nested_offset), float_bits(host.nested_offset));
        // Dequantization in every dtype a quant state may have; what the trainer uses is that value cast to bf16.
        for (DType dt : {DType::bf16, DType::f16, DType::f32}) {
          Nf4Weight q = host;
          q.dtype = dt;
          const std::vector<uint16_t> want = bits_as_bf16(dequantize_nf4(q));
          for (bool generic : {false, true}) {
            const std::vector<uint16_t> got = fk::nf4_dequantize(q, generic);
            ASSERT_EQ(got.size(), want.size());
            int64_t differ = 0;
            for (size_t i = 0; i < want.size(); ++i) differ += got[i] != want[i];
            EXPECT_EQ(differ, 0) << dtype_name(dt) << (generic ? ", generic kernel" : ", staging kernel")
                                 << ": dequantized values differ from dequantize_nf4's";
          }
          // The engine's load checks: silent on the weight and absmax the form gives, each counts a single change.
          EXPECT_EQ(fk::nf4_mismatches(q, want), 0u);
          std::vector<uint16_t> changed = want;
          changed[1234] ^= 1;
          EXPECT_EQ(fk::nf4_mismatches(q, changed), 1u);
          std::vector<float> absmax = nf4_absmax(q);
          EXPECT_EQ(fk::nf4_absmax_mismatches(q, absmax), 0u);
          absmax[5] = std::nextafter(absmax[5], 1e9f);
          EXPECT_EQ(fk::nf4_absmax_mismatches(q, absmax), 1u);
        }
      }
  }
}

// ------------------------------------------------------------------------------------------------------
// Device plumbing

TEST_F(FastKernel, DeviceSyntheticWeightsAreTheHostBits) {
  const Config c = preset("gemma2-9b");
  for (const std::string& name : {std::string(kEmbedName), proj_weight_name(0, Proj::q_proj), norm_weight_name(3, Norm::input_layernorm)}) {
    const uint64_t key = stream_key(7, name);
    const double hw = std::sqrt(3.0) * synthetic_std(c, name);
    const int64_t n = 200003;
    const std::vector<uint16_t> dev = fk::synthetic_bf16(key, hw, n);
    int64_t differ = 0;
    for (int64_t i = 0; i < n; ++i) differ += dev[size_t(i)] != float_to_bf16(float(hw * stream_uniform(key, uint64_t(i))));
    EXPECT_EQ(differ, 0) << name;
  }
}

TEST_F(FastKernel, OutOfMemoryIsAnInputErrorWithTheSizeAndAHint) {
  try {
    fk::allocate(size_t(1) << 50);  // 1 PiB
    FAIL() << "a 1 PiB allocation succeeded";
  } catch (const gemma::fast::OutOfMemory& e) {
    const std::string msg = e.what();
    std::printf("message: %s\n", msg.c_str());
    EXPECT_NE(msg.find("1048576.00 GiB"), std::string::npos) << msg;
    EXPECT_NE(msg.find("hint"), std::string::npos) << msg;
    const InputError* as_input = dynamic_cast<const InputError*>(&e);
    EXPECT_NE(as_input, nullptr) << "tools exit 2 on an InputError";
  }
  fk::allocate(size_t(1) << 20);  // the device is still usable afterwards
}

// tma.cuh's bounded barrier wait: a wait nothing will complete ends the launch (a trap) after 4 s instead of hanging
// the process. The trap leaves the CUDA context unusable, so the launch runs in a child process (gtest's
// "threadsafe" death test re-executes this binary for the one statement). The child creates its CUDA context
// before the clock starts (a small allocation), then exits 0 only on the trap's error between 3.5 and 10 s: a bound of
// 0, or a trap for another reason, answers at once; a bound far above 4 s answers late; a wait with no bound at all
// is ended by the alarm at 30 s (SIGALRM, not an exit, so the test fails instead of hanging).
TEST_F(FastKernel, ABarrierWaitThatNeverCompletesFailsTheLaunchAfterItsBound) {
  if (!fk::hopper_kernels())
    GTEST_SKIP() << "the barrier waits are sm_90a code: they need a GEMMA_FAST_WGMMA build on a Hopper GPU";
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        ::alarm(30);
        fk::allocate(256);  // the CUDA context, created outside the timed span
        const auto t0 = std::chrono::steady_clock::now();
        const std::string err = fk::stuck_barrier_wait();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(stderr, "the launch ended with %s after %.2f s\n", err.c_str(), s);
        std::exit(err == "cudaErrorLaunchFailure" && s >= 3.5 && s <= 10 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "the launch ended with");
}
