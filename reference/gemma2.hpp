// The float64 reference of Gemma 2: forward and backward pass, LoRA, in one readable file.
// Templated on the scalar type (Real): double for the reference, a 50-digit Boost.Multiprecision number
// for the oracle. Every layer is a pair of free functions, layer_forward / layer_backward; gradients are
// named d + the name of what they are the gradient of.
//
// Axis names (docs/model.md):
//   B batch, T sequence, N = B*T rows, D hidden, H query heads, KV key/value heads, hd head_dim,
//   I intermediate, V vocabulary, r LoRA rank. Activations are row-major (N, features).
//
// Frozen base weights stay in their file format and are converted block by block (Weight::load_rows),
// so real 27b widths fit in memory. Each value that a low-precision trainer would store is passed
// through cast(point, ...), a no-op under the f64 policy (policy.hpp).
#pragma once
#include <Eigen/Dense>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/errors.hpp"
#include "model/synthetic.hpp"
#include "reference/policy.hpp"
#include "reference/scalar.hpp"

namespace gemma::ref {

template <class Real>
using Mat = Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Real>
using Vec = Eigen::Matrix<Real, Eigen::Dynamic, 1>;

// ----------------------------------------------------------------------------------------------------
// Casts

template <class Real>
inline Real round_scalar(DType d, const Real& x) {
  if (d == DType::f64) return x;
  return Real(round_to(d, static_cast<double>(x)));
}

// The policy's jitter: x (1 +- jitter), the sign a hash of x's bits and the cast point, so that a run is
// still deterministic. A value that fp32 holds exactly is left alone: an fp32 trainer given the same inputs
// produces it exactly too (the embedding's bf16 row times a bf16 normalizer, sums of few bf16 products), so
// perturbing it would model a difference no correct trainer has.
template <class Real>
inline Real jittered(const Policy& p, Cast c, const Real& x) {
  if (p.jitter == 0) return x;
  const double v = static_cast<double>(x);
  if (double(float(v)) == v) return x;
  if (p.jitter_toward_boundary) {
    // Toward the rounding boundary nearer to v: every value within the jitter of a tie of its cast's format
    // rounds the other way (Policy::jitter_toward_boundary).
    const double r = round_to(p[c], v);
    if (r == v) return x;
    return Real(v + (v > r ? 1.0 : -1.0) * p.jitter * std::abs(v));
  }
  uint64_t b;
  std::memcpy(&b, &v, 8);
  // SplitMix64's finalizer over the value's bits, the cast point and the seed: every output bit depends on every
  // input bit. (A single multiply-xorshift was too weak: on the structured values of a real run, some seeds gave
  // the same sign to whole clusters of values, a systematic bias no correct trainer has.)
  b ^= (uint64_t(c) + 64 * p.jitter_seed + 1) * 0x9e3779b97f4a7c15ull;
  b = (b ^ (b >> 30)) * 0xbf58476d1ce4e5b9ull;
  b = (b ^ (b >> 27)) * 0x94d049bb133111ebull;
  b ^= b >> 31;
  return Real(v * (1.0 + (b >> 63 ? p.jitter : -p.jitter)));
}

template <class Real>
inline Real cast(const Policy& p, Cast c, const Real& x) {
  if (p[c] == DType::f64) return x;
  return round_scalar(p[c], jittered(p, c, x));
}

// c tanh(x / c), rounded inside where the policy says (Cast::softcap_steps: HF eager's x / c and tanh(x / c));
// exactly softcap(x, c) where it does not.
template <class Real>
inline Real policy_softcap(const Policy& p, const Real& x, const Real& c) {
  using std::tanh;
  if (p[Cast::softcap_steps] == DType::f64) return softcap(x, c);
  return c * cast(p, Cast::softcap_steps, Real(tanh(cast(p, Cast::softcap_steps, Real(x / c)))));
}

template <class Real, class Derived>
inline void cast(const Policy& p, Cast c, Eigen::MatrixBase<Derived>& m) {
  const DType d = p[c];
  if (d == DType::f64) return;
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) m(i, j) = round_scalar(d, jittered(p, c, Real(m(i, j))));
}

template <class Real>
inline void cast(const Policy& p, Cast c, Mat<Real>& m) {
  const DType d = p[c];
  if (d == DType::f64) return;
  Real* x = m.data();
  const int64_t n = m.size();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] = round_scalar(d, jittered(p, c, x[i]));
}

template <class Real>
inline void cast(const Policy& p, Cast c, Vec<Real>& v) {
  const DType d = p[c];
  if (d == DType::f64) return;
  for (Eigen::Index i = 0; i < v.size(); ++i) v(i) = round_scalar(d, jittered(p, c, v(i)));
}

// ----------------------------------------------------------------------------------------------------
// Parameters

// A weight matrix [out, in]: frozen in its file format (converted on use), or materialised in Real
// (trainable, or small).
template <class Real>
struct Weight {
  const Tensor* raw = nullptr;
  Mat<Real> value;
  int64_t rows = 0, cols = 0;

  bool materialised() const { return raw == nullptr; }

  // Rows [r0, r0 + n) as Real, into `out` (n, cols).
  void load_rows(int64_t r0, int64_t n, Mat<Real>& out) const {
    out.resize(n, cols);
    if (materialised()) {
      out = value.middleRows(r0, n);
      return;
    }
    if constexpr (std::is_same_v<Real, double>) {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) raw->to_double((r0 + i) * cols, cols, out.data() + i * cols);
    } else if constexpr (std::is_same_v<Real, float>) {
#pragma omp parallel
      {
        std::vector<double> buf(static_cast<size_t>(cols));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
          raw->to_double((r0 + i) * cols, cols, buf.data());
          for (int64_t j = 0; j < cols; ++j) out(i, j) = float(buf[size_t(j)]);
        }
      }
    } else {
      std::vector<double> buf(static_cast<size_t>(cols));
      for (int64_t i = 0; i < n; ++i) {
        raw->to_double((r0 + i) * cols, cols, buf.data());
        for (int64_t j = 0; j < cols; ++j) out(i, j) = Real(buf[size_t(j)]);
      }
    }
  }
  // Rows converted per block: about 8 MB of float64 at a time.
  int64_t block_rows() const { return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, cols)); }
};

// A LoRA adapter on one projection: A (r, in), B (out, r); empty when the projection has none. Each module has
// its own rank and scaling (PEFT's rank_pattern and alpha_pattern).
template <class Real>
struct Lora {
  Mat<Real> A, B;
  Real scaling = Real(0);  // lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilised LoRA
  bool present() const { return A.size() > 0; }
};

template <class Real>
struct Layer {
  std::array<Weight<Real>, kNumProj> proj;  // indexed by Proj
  std::array<Vec<Real>, 4> norm;            // indexed by Norm
  std::array<Lora<Real>, kNumProj> lora;
};

// Holds pointers into the Checkpoint it was made from (frozen weights), which must outlive it.
template <class Real>
struct Model {
  Model() = default;
  Model(Model&&) = default;
  Model& operator=(Model&&) = default;
  Model(const Model&) = delete;

  Config config;
  Weight<Real> embed_tokens;  // (V, D), also the LM head
  std::vector<Layer<Real>> layers;
  Vec<Real> norm;  // final norm (D)
  // LM-head rows beyond the vocabulary (a padded head, e.g. the 256128 rows of the original JAX checkpoints,
  // or a kernel's multiple of 128). No token maps to them; their logits are masked out of the softmax.
  Weight<Real> embed_pad;  // (P, D), P = 0 when the head is not padded
  bool train_all = false;  // gradients for every weight (no adapters) or for the adapters only
  bool train_norms = false;  // with adapters: the RMSNorm weights train too (cheap at any width)
  TensorMap owned;         // tensors made here (rounded by the `weights` cast, padding rows), kept alive
};

// Pads the LM head with `rows` (P, D) beyond the vocabulary; trainable (and reported, with its gradient that
// must come out exactly zero) when the model trains every weight.
template <class Real>
void pad_vocab(Model<Real>& m, const Tensor& rows) {
  m.owned["padding"] = rows;
  const Tensor& t = m.owned["padding"];
  Weight<Real>& w = m.embed_pad;
  w.rows = t.rows();
  w.cols = t.cols();
  if (w.cols != m.config.hidden_size) throw InputError("padding rows: width " + std::to_string(w.cols) + " is not hidden_size");
  if (!m.train_all) {
    w.raw = &t;
    return;
  }
  w.raw = nullptr;
  w.value.resize(w.rows, w.cols);
  const std::vector<double> v = t.to_double();
  for (int64_t i = 0; i < t.numel(); ++i) w.value.data()[i] = Real(v[size_t(i)]);
}

// Builds the model from a validated checkpoint. Without adapters every weight is trainable and held in
// Real; with adapters the base is frozen in its file format. The policy's `weights` and `adapters` casts are
// applied here, once.
template <class Real>
Model<Real> make_model(const Checkpoint& ck, const Policy& policy);

template <class Real>
struct LayerGrads {
  std::array<Mat<Real>, kNumProj> proj;
  std::array<Vec<Real>, 4> norm;
  std::array<Lora<Real>, kNumProj> lora;
};

// Gradients of the trainable weights; tensors of frozen weights stay empty.
template <class Real>
struct Grads {
  Mat<Real> embed_tokens;
  Mat<Real> embed_pad;  // (P, D) when the head is padded and every weight trains
  std::vector<LayerGrads<Real>> layers;
  Vec<Real> norm;
};

template <class Real>
Grads<Real> zero_grads(const Model<Real>& m);

// Calls f(name, shape, param, grad, n) for every trainable tensor, in HF state-dict order, with pointers to
// the parameter's and the gradient's n values (const when the model is).
template <class M, class G, class F>
void for_each_trainable(M& m, G& g, F&& f) {
  const Config& c = m.config;
  if (m.train_all) {
    f(std::string(kEmbedName), Shape{c.vocab_size, c.hidden_size}, m.embed_tokens.value.data(), g.embed_tokens.data(),
      int64_t(m.embed_tokens.value.size()));
    if (m.embed_pad.rows > 0)
      f(std::string(kEmbedPaddingName), Shape{m.embed_pad.rows, c.hidden_size}, m.embed_pad.value.data(), g.embed_pad.data(),
        int64_t(m.embed_pad.value.size()));
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto& L = m.layers[size_t(l)];
    auto& Gl = g.layers[size_t(l)];
    auto norm = [&](Norm n) {
      if (m.train_all || m.train_norms)
        f(norm_weight_name(l, n), Shape{c.hidden_size}, L.norm[size_t(n)].data(), Gl.norm[size_t(n)].data(),
          int64_t(L.norm[size_t(n)].size()));
    };
    auto proj = [&](Proj p) {
      auto& w = L.proj[size_t(p)];
      if (m.train_all)
        f(proj_weight_name(l, p), Shape{w.rows, w.cols}, w.value.data(), Gl.proj[size_t(p)].data(), int64_t(w.value.size()));
      auto& a = L.lora[size_t(p)];
      if (a.present()) {
        auto& ga = Gl.lora[size_t(p)];
        f(lora_weight_name(l, p, 'A'), Shape{a.A.rows(), a.A.cols()}, a.A.data(), ga.A.data(), int64_t(a.A.size()));
        f(lora_weight_name(l, p, 'B'), Shape{a.B.rows(), a.B.cols()}, a.B.data(), ga.B.data(), int64_t(a.B.size()));
      }
    };
    norm(Norm::input_layernorm);
    for (Proj p : {Proj::q_proj, Proj::k_proj, Proj::v_proj, Proj::o_proj}) proj(p);
    norm(Norm::post_attention_layernorm);
    norm(Norm::pre_feedforward_layernorm);
    for (Proj p : {Proj::gate_proj, Proj::up_proj, Proj::down_proj}) proj(p);
    norm(Norm::post_feedforward_layernorm);
  }
  if (m.train_all || m.train_norms)
    f(std::string(kFinalNormName), Shape{c.hidden_size}, m.norm.data(), g.norm.data(), int64_t(m.norm.size()));
}

// ----------------------------------------------------------------------------------------------------
// One run's settings

struct RunOptions {
  Softcap softcap;
  Numerics numerics;
  bool keep_logits = false;  // return the (capped) logits, e.g. to compare with /expected
  bool keep_gate_stats = false;  // return the mean and standard deviation of each layer's gate_proj output
  // Added to every position (the batch's position_ids, or 0..T-1), as for a chunk from deep inside a long
  // document. Exact RoPE only sees position differences, so the offset changes nothing but the rounding of
  // positions and angles (what the rope-bf16 bug gets wrong).
  int64_t position_offset = 0;
  // PEFT's lora_dropout in training mode (train's reference backend; verify computes gradients without it). Each
  // adapter's input x becomes x * keep / (1 - p) before lora_A, the base projection still sees x (peft
  // tuners/lora/layer.py: result + lora_B(lora_A(dropout(x))) * scaling). keep is a counter-based draw
  // (lora_dropout_keep): a function of (seed, step, layer, projection, row of the step's batch, token, feature), so
  // the same step gives the same masks whatever its micro-batch split, and a resumed run the same as an
  // uninterrupted one. row_offset: the micro-batch's first row within the step's batch.
  struct LoraDropout {
    double p = 0;
    uint64_t seed = 0;
    int64_t step = 0, row_offset = 0;
  } lora_dropout;
};

// Whether lora_dropout keeps element `feature` of token `token` of row `row` (of the step's batch) at the input of
// layer `layer`'s adapter on `proj`: a SplitMix64 hash of the key, uniform in [0, 1) with 53 bits, against p.
inline bool lora_dropout_keep(const RunOptions::LoraDropout& d, int64_t layer, Proj proj, int64_t row, int64_t token,
                              int64_t feature) {
  uint64_t k = splitmix64(d.seed ^ 0x6c6f72615f64726full);  // "lora_dro"
  k = splitmix64(k ^ uint64_t(d.step));
  k = splitmix64(k ^ (uint64_t(layer) << 8 | uint64_t(proj)));
  k = splitmix64(k ^ uint64_t(row));
  k = splitmix64(k ^ uint64_t(token));
  k = splitmix64(k ^ uint64_t(feature));
  return double(k >> 11) * 0x1.0p-53 >= d.p;
}

template <class Real>
struct Result {
  Real loss_sum = Real(0);  // sum of per-token losses over the scored targets
  int64_t tokens = 0;       // scored targets (labels != -100)
  Mat<Real> logits;         // (N, V) after the final cap, when RunOptions::keep_logits
  // Per layer, over every position and intermediate unit, when RunOptions::keep_gate_stats: the GELU's inputs,
  // where the tanh and erf forms differ (gelu-exact).
  std::vector<double> gate_mean, gate_std;
};

// Fixed per-run quantities the layer functions share.
template <class Real>
struct Ctx {
  const Config& cfg;
  const Policy& policy;
  const Semantics& sem;
  int64_t B, T;
  bool attn_cap_on, final_cap_on;
  Real attn_cap, final_cap;
  Real scale;  // query_pre_attn_scalar^-0.5
  Mat<Real> rope_cos, rope_sin;  // (N, hd/2): each token's own position
  std::vector<int32_t> doc;      // (N) document of each token (packed rows), all 0 otherwise
  std::vector<uint8_t> key_ok;   // (N) 0 for padding tokens, never attended; empty: none
  RunOptions::LoraDropout dropout;  // p = 0: none

  bool sliding(int64_t layer) const {
    if (sem.no_sliding_window) return false;
    const bool s = cfg.layer_types[size_t(layer)] == LayerType::sliding;
    return sem.sliding_odd_layers ? !s : s;
  }
  // Key j is visible to query i of sequence b: causal, same document, not padding, and within the window on
  // sliding layers. HF counts the window in token indices (masking_utils.sliding_window_overlay), which inside one
  // document are position differences.
  bool visible(int64_t layer, int64_t b, int64_t i, int64_t j) const {
    if (j > i) return false;
    const size_t qi = size_t(b * T + i), kj = size_t(b * T + j);
    if (doc[qi] != doc[kj]) return false;
    if (!key_ok.empty() && !key_ok[kj]) return false;
    if (!sliding(layer)) return true;
    return i - j <= *cfg.sliding_window + sem.window_extra - 1;
  }
};

// ----------------------------------------------------------------------------------------------------
// RMSNorm: out = x * rsqrt(mean(x^2) + eps) * (1 + w), per row.

// Gemma stores w for a gain of 1 + w (weights start at zero); rmsnorm-plain-weight uses w itself, as Llama does.
template <class Real>
Real norm_gain(const Real& w, const Semantics& sem) {
  return sem.rmsnorm_plain_weight ? w : Real(1) + w;
}

template <class Real>
void rmsnorm_forward(const Mat<Real>& x,  // (N, D) input
                     const Vec<Real>& w,  // (D) weight, scale is 1 + w
                     const Ctx<Real>& ctx,
                     Mat<Real>& out,    // (N, D)
                     Vec<Real>& rstd) { // (N) 1 / rms, kept for the backward
  using std::sqrt;
  const Policy& p = ctx.policy;
  const int64_t N = x.rows(), D = x.cols();
  out.resize(N, D);
  rstd.resize(N);
  Vec<Real> scale(D);
  for (int64_t j = 0; j < D; ++j) scale(j) = cast(p, Cast::norm_scale, norm_gain(w(j), ctx.sem));
  const Real eps = Real(ctx.cfg.rms_norm_eps);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    Real ss = Real(0);
    for (int64_t j = 0; j < D; ++j) {
      const Real v = cast(p, Cast::norm_in, x(i, j));
      ss += v * v;
    }
    const Real r = Real(1) / sqrt(ss / Real(D) + eps);
    rstd(i) = r;
    for (int64_t j = 0; j < D; ++j) {
      const Real xhat = cast(p, Cast::norm_normed, cast(p, Cast::norm_in, x(i, j)) * r);
      out(i, j) = cast(p, Cast::norm_out, xhat * scale(j));
    }
  }
}

// dx = r (dxhat - xhat mean(dxhat * xhat)), dxhat = dout (1 + w); dw = sum over rows of dout * xhat.
template <class Real>
void rmsnorm_backward(const Mat<Real>& dout,  // (N, D)
                      const Mat<Real>& x,     // (N, D) forward input
                      const Vec<Real>& rstd,  // (N)
                      const Vec<Real>& w,     // (D)
                      const Ctx<Real>& ctx,
                      Mat<Real>& dx,          // (N, D), overwritten
                      Vec<Real>* dw) {        // (D), accumulated; null when w is frozen
  const Policy& p = ctx.policy;
  const int64_t N = x.rows(), D = x.cols();
  dx.resize(N, D);
  Mat<Real> xhat(N, D);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    Real dot = Real(0);
    for (int64_t j = 0; j < D; ++j) {
      xhat(i, j) = cast(p, Cast::norm_in, x(i, j)) * rstd(i);
      dot += dout(i, j) * norm_gain(w(j), ctx.sem) * xhat(i, j);
    }
    const Real mean = dot / Real(D);
    for (int64_t j = 0; j < D; ++j) dx(i, j) = rstd(i) * (dout(i, j) * norm_gain(w(j), ctx.sem) - xhat(i, j) * mean);
  }
  if (dw && !ctx.sem.rmsnorm_no_weight_grad) {
    for (int64_t j = 0; j < D; ++j) {
      Real s = Real(0);
      for (int64_t i = 0; i < N; ++i) s += dout(i, j) * xhat(i, j);
      (*dw)(j) += s;
    }
  }
  cast(p, Cast::grad_act, dx);
}

// ----------------------------------------------------------------------------------------------------
// Projections (HF nn.Linear, no bias) with an optional LoRA adapter: y = x W^T + s (x A^T) B^T.

// Tensor-core accumulation (Policy::accum_jitter). A GPU product of K terms accumulates in steps of 16 products
// (one mma instruction each), and NVIDIA's tensor cores align the addends and truncate rather than round (Fasi,
// Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021): each step may lose up to
// one fp32 ulp of the running sum, and the losses share a sign. A running sum of terms of mixed signs is about as
// large as their root-sum-square, so a correct GPU result can sit about ceil(K / 16) 2^-24 sqrt(sum_k (a_k b_k)^2)
// from the exact one: negligible for a projection's few hundred steps, a thousandth of the result for the LM head's
// backward (256000 terms that cancel: the softmax gradient sums to zero). Measured on the H200 (2026-11-30,
// gemma2-2b widths, the head's backward): the trainer sat at rel L2 8.4e-4 from the emulation, where this model
// gives about 1e-3 and jitter alone 1e-4. y (n values, before their cast) moves by a deterministic pseudo-random
// fraction in [-1, 1) of that size; q holds sqrt(sum_k (a_k b_k)^2) for each.
// One value's move: y, the i-th of its array, a sum of K terms whose root-sum-square is q.
template <class Real>
Real accum_noised(const Policy& p, const Real& y, const Real& q, int64_t i, int64_t K) {
  const double v = static_cast<double>(y);
  uint64_t b;
  std::memcpy(&b, &v, 8);
  b ^= (uint64_t(i) + 0x5bd1e995ull * (p.jitter_seed + 1)) * 0x9e3779b97f4a7c15ull;
  b = (b ^ (b >> 30)) * 0xbf58476d1ce4e5b9ull;  // SplitMix64's finalizer, as in jittered()
  b = (b ^ (b >> 27)) * 0x94d049bb133111ebull;
  b ^= b >> 31;
  const double r = double(b >> 11) * 0x1.0p-52 - 1.0;
  const double bound = p.accum_jitter * 0x1p-24 * double((K + 15) / 16);
  return Real(v + r * bound * static_cast<double>(q));
}

template <class Real>
void accum_noise(const Policy& p, Real* y, const Real* q, int64_t n, int64_t K) {
  if (p.accum_jitter == 0) return;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = accum_noised(p, y[i], q[i], i, K);
}

// sqrt(a^2 b^2), elementwise squares: the root-sum-square of the products of a b.
template <class Real, class A, class B>
Mat<Real> product_rss(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  Mat<Real> q = a.array().square().matrix() * b.array().square().matrix();
  return q.cwiseSqrt();
}

// y = a b (a (N, K), b (K, M)) with tensor-core accumulation noise when the policy asks for it.
template <class Real, class A, class B>
void product(const Policy* p, const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b, Mat<Real>& y) {
  y.noalias() = a * b;
  if (p && p->accum_jitter != 0) {
    const Mat<Real> q = product_rss<Real>(a, b);
    accum_noise(*p, y.data(), q.data(), y.size(), a.cols());
  }
}

template <class Real>
void linear_forward(const Mat<Real>& x, const Weight<Real>& W, Mat<Real>& y,  // (N, in) -> (N, out)
                    const Policy* p = nullptr) {
  y.resize(x.rows(), W.rows);
  const bool noisy = p && p->accum_jitter != 0;
  Mat<Real> q;
  if (noisy) q.resize(x.rows(), W.rows);
  if (W.materialised()) {
    y.noalias() = x * W.value.transpose();
    if (noisy) q = product_rss<Real>(x, W.value.transpose());
  } else {
    Mat<Real> blk;
    const int64_t R = W.block_rows();
    for (int64_t r0 = 0; r0 < W.rows; r0 += R) {
      const int64_t n = std::min(R, W.rows - r0);
      W.load_rows(r0, n, blk);
      y.middleCols(r0, n).noalias() = x * blk.transpose();
      if (noisy) q.middleCols(r0, n) = product_rss<Real>(x, blk.transpose());
    }
  }
  if (noisy) accum_noise(*p, y.data(), q.data(), y.size(), W.cols);
}

template <class Real>
void linear_backward_input(const Mat<Real>& dy, const Weight<Real>& W, Mat<Real>& dx,  // dx (N, in) += dy W
                           const Policy* p = nullptr) {
  const bool noisy = p && p->accum_jitter != 0;
  Mat<Real> t, q2;  // with noise: the product apart, and its sum of squared terms
  Mat<Real>& out = noisy ? t : dx;
  if (noisy) {
    t = Mat<Real>::Zero(dx.rows(), dx.cols());
    q2 = Mat<Real>::Zero(dx.rows(), dx.cols());
  }
  if (W.materialised()) {
    out.noalias() += dy * W.value;
    if (noisy) q2.noalias() += dy.array().square().matrix() * W.value.array().square().matrix();
  } else {
    Mat<Real> blk;
    const int64_t R = W.block_rows();
    for (int64_t r0 = 0; r0 < W.rows; r0 += R) {
      const int64_t n = std::min(R, W.rows - r0);
      W.load_rows(r0, n, blk);
      out.noalias() += dy.middleCols(r0, n) * blk;
      if (noisy) q2.noalias() += dy.middleCols(r0, n).array().square().matrix() * blk.array().square().matrix();
    }
  }
  if (noisy) {
    const Mat<Real> q = q2.cwiseSqrt();
    accum_noise(*p, t.data(), q.data(), t.size(), W.rows);
    dx += t;
  }
}

template <class Real>
void projection_forward(const Mat<Real>& x,        // (N, in), already cast to the matmul input format
                        const Weight<Real>& W,     // (out, in)
                        const Lora<Real>& lora,
                        const Real& s,             // LoRA scaling
                        const Policy& p,
                        Mat<Real>& y,              // (N, out)
                        Mat<Real>& xa,             // (N, r) x A^T, kept for the backward
                        const Mat<Real>* drop = nullptr) {  // (N, in) lora_dropout's 0 or 1/(1-p); null: none
  linear_forward(x, W, y, &p);
  cast(p, Cast::matmul_out, y);
  if (!lora.present()) return;
  if (drop)
    product(&p, Mat<Real>(x.cwiseProduct(*drop)), lora.A.transpose(), xa);
  else
    product(&p, x, lora.A.transpose(), xa);
  cast(p, Cast::lora_mid, xa);
  Mat<Real> delta = (xa * lora.B.transpose()) * s;
  cast(p, Cast::lora_out, delta);
  y += delta;
  cast(p, Cast::matmul_out, y);
}

template <class Real>
void projection_backward(const Mat<Real>& dy,   // (N, out)
                         const Mat<Real>& x,    // (N, in) forward input
                         const Weight<Real>& W, const Lora<Real>& lora, const Real& s, const Policy& p,
                         const Mat<Real>& xa,   // (N, r)
                         Mat<Real>& dx,         // (N, in), accumulated
                         Mat<Real>* dW,         // (out, in), accumulated; null when frozen
                         Lora<Real>* dlora,     // accumulated; null when there is no adapter
                         const Mat<Real>* drop = nullptr) {  // the forward's lora_dropout multiplier; null: none
  linear_backward_input(dy, W, dx, &p);
  if (dW) dW->noalias() += dy.transpose() * x;
  if (!lora.present()) return;
  Mat<Real> dxa;
  product(&p, dy, lora.B, dxa);
  dxa *= s;  // (N, r)
  if (drop) {
    // The adapter saw x * drop: its input gradient is masked and scaled the same way.
    dx.noalias() += Mat<Real>((dxa * lora.A).cwiseProduct(*drop));
    if (dlora) {
      dlora->B.noalias() += (dy.transpose() * xa) * s;
      dlora->A.noalias() += dxa.transpose() * Mat<Real>(x.cwiseProduct(*drop));
    }
    return;
  }
  dx.noalias() += dxa * lora.A;
  if (dlora) {
    dlora->B.noalias() += (dy.transpose() * xa) * s;
    dlora->A.noalias() += dxa.transpose() * x;
  }
}

// ----------------------------------------------------------------------------------------------------
// Rotary embeddings, half-split convention: pairs (j, j + hd/2) rotate by angle t * inv_freq[j].

// cos and sin of every token's angles (N, hd/2): position * inv_freq, the position from the batch's position_ids
// (0..T-1 without them) plus `offset`.
template <class Real>
void rope_tables(const Config& cfg, const Policy& p, const Batch& batch, int64_t offset, Mat<Real>& cosv, Mat<Real>& sinv) {
  using std::cos;
  using std::pow;
  using std::sin;
  const int64_t half = cfg.head_dim / 2, N = batch.B * batch.T;
  cosv.resize(N, half);
  sinv.resize(N, half);
  for (int64_t k = 0; k < half; ++k) {
    const Real inv_freq =
        cast(p, Cast::rope_inputs, Real(1) / pow(Real(cfg.rope_theta), Real(2 * k) / Real(cfg.head_dim)));
    for (int64_t n = 0; n < N; ++n) {
      const int64_t pos = offset + batch.position(n / batch.T, n % batch.T);
      const Real angle = cast(p, Cast::rope_angle, cast(p, Cast::rope_inputs, Real(pos)) * inv_freq);
      cosv(n, k) = cast(p, Cast::rope_cossin, Real(cos(angle)));
      sinv(n, k) = cast(p, Cast::rope_cossin, Real(sin(angle)));
    }
  }
}

// A context for rows of B sequences of T tokens with positions 0..T-1, one document each and no padding (the layer
// functions' tests use it; forward_backward builds its own from the batch).
template <class Real>
Ctx<Real> plain_ctx(const Config& cfg, const Policy& p, const Semantics& sem, int64_t B, int64_t T, bool attn_on,
                    bool final_on, Real attn_cap, Real final_cap, Real scale) {
  Ctx<Real> c{cfg, p, sem, B, T, attn_on, final_on, attn_cap, final_cap, scale, {}, {}, std::vector<int32_t>(size_t(B * T), 0), {}, {}};
  Batch shape;
  shape.B = B;
  shape.T = T;
  rope_tables(cfg, p, shape, 0, c.rope_cos, c.rope_sin);
  return c;
}

// Rotates every head of x (N, heads*hd) in place; `inverse` applies the transpose (the backward).
template <class Real>
void rope_apply(Mat<Real>& x, int64_t heads, const Ctx<Real>& ctx, bool inverse) {
  const int64_t hd = ctx.cfg.head_dim, half = hd / 2, N = x.rows();
  const Real sign = inverse ? Real(-1) : Real(1);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t k = 0; k < half; ++k) {
        const Real c = ctx.rope_cos(n, k), s = sign * ctx.rope_sin(n, k);
        Real& a = x(n, h * hd + k);
        Real& b = x(n, h * hd + k + half);
        const Real a0 = a, b0 = b;
        a = a0 * c - b0 * s;
        b = b0 * c + a0 * s;
      }
  }
}

// ----------------------------------------------------------------------------------------------------
// Attention: s = scale q.k, capped s = c tanh(s / c) before the mask, softmax over visible keys, o = P v.

template <class Real>
struct AttnCache {
  std::vector<Mat<Real>> S;  // B*H of (T, T): scale * q.k before the cap (visible entries)
  std::vector<Mat<Real>> P;  // B*H of (T, T): probabilities, exactly 0 where masked
  // B*H of (T, T), only under Policy::attn_probs_blockwise (else empty): the weights the forward's P V used, which
  // then differ from P by a bf16 rounding each. The backward's row sum D = sum_j W dP is a fused kernel's dO . O.
  std::vector<Mat<Real>> W;
};

template <class Real>
void attention_forward(const Mat<Real>& q,  // (N, H*hd) after RoPE
                       const Mat<Real>& k,  // (N, KV*hd) after RoPE
                       const Mat<Real>& v,  // (N, KV*hd)
                       int64_t layer, const Ctx<Real>& ctx,
                       Mat<Real>& out,      // (N, H*hd)
                       AttnCache<Real>& cache) {
  using std::exp;
  const Config& c = ctx.cfg;
  const Policy& p = ctx.policy;
  const int64_t B = ctx.B, T = ctx.T, H = c.num_attention_heads, hd = c.head_dim, G = c.kv_groups();
  out.setZero(B * T, H * hd);
  cache.S.assign(size_t(B * H), Mat<Real>());
  cache.P.assign(size_t(B * H), Mat<Real>());
  cache.W.assign(p.attn_probs_blockwise ? size_t(B * H) : 0, Mat<Real>());
#pragma omp parallel for schedule(dynamic)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H, g = h / G;  // query head h reads kv head h / (H / KV)
    Mat<Real>& S = cache.S[size_t(bh)];
    Mat<Real>& P = cache.P[size_t(bh)];
    S.setZero(T, T);
    P.setZero(T, T);
    if (p.attn_probs_blockwise) cache.W[size_t(bh)].setZero(T, T);
    for (int64_t i = 0; i < T; ++i) {
      Real mx = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j <= i; ++j) {
        if (!ctx.visible(layer, b, i, j)) continue;
        Real dot = Real(0);
        for (int64_t d = 0; d < hd; ++d) dot += q(b * T + i, h * hd + d) * k(b * T + j, g * hd + d);
        S(i, j) = cast(p, Cast::attn_scores, dot * ctx.scale);
        const Real s = cast(p, Cast::attn_capped, ctx.attn_cap_on ? policy_softcap(p, S(i, j), ctx.attn_cap) : S(i, j));
        P(i, j) = s;  // capped score for now, probability below
        if (s > mx) mx = s;
      }
      Real sum = Real(0);
      for (int64_t j = 0; j <= i; ++j)
        if (ctx.visible(layer, b, i, j)) sum += exp(P(i, j) - mx);
      if (p.attn_probs_blockwise) {  // the one-pass order (Policy::attn_probs_blockwise), from the capped scores
        Real m_run = -std::numeric_limits<double>::infinity();
        for (int64_t j0 = 0; j0 <= i; j0 += kAttnKeyBlock) {
          const int64_t j1 = std::min(i + 1, j0 + kAttnKeyBlock);
          for (int64_t j = j0; j < j1; ++j)
            if (ctx.visible(layer, b, i, j) && P(i, j) > m_run) m_run = P(i, j);
          for (int64_t j = j0; j < j1; ++j) {
            if (!ctx.visible(layer, b, i, j)) continue;
            const Real w = cast(p, Cast::attn_probs, Real(exp(P(i, j) - m_run))) * exp(m_run - mx) / sum;
            cache.W[size_t(bh)](i, j) = w;
            for (int64_t d = 0; d < hd; ++d) out(b * T + i, h * hd + d) += w * v(b * T + j, g * hd + d);
          }
        }
      }
      for (int64_t j = 0; j <= i; ++j) {
        if (!ctx.visible(layer, b, i, j)) continue;
        P(i, j) = cast(p, Cast::attn_probs, Real(exp(P(i, j) - mx) / sum));
        if (!p.attn_probs_blockwise)
          for (int64_t d = 0; d < hd; ++d) out(b * T + i, h * hd + d) += P(i, j) * v(b * T + j, g * hd + d);
      }
    }
  }
  cast(p, Cast::attn_out, out);
}

template <class Real>
void attention_backward(const Mat<Real>& dout,  // (N, H*hd)
                        const Mat<Real>& q, const Mat<Real>& k, const Mat<Real>& v, const AttnCache<Real>& cache,
                        int64_t layer, const Ctx<Real>& ctx,
                        Mat<Real>& dq,  // (N, H*hd)
                        Mat<Real>& dk,  // (N, KV*hd)
                        Mat<Real>& dv) {  // (N, KV*hd)
  using std::sqrt;
  const Config& c = ctx.cfg;
  const Policy& p = ctx.policy;
  const int64_t B = ctx.B, T = ctx.T, H = c.num_attention_heads, KV = c.num_key_value_heads, hd = c.head_dim,
                G = c.kv_groups();
  dq.setZero(B * T, H * hd);
  dk.setZero(B * T, KV * hd);
  dv.setZero(B * T, KV * hd);
  // Tensor-core accumulation (Policy::accum_jitter) in the backward's sums: dP = dO v (hd terms), the row's
  // sum D = sum_j P dP (its keys), and dq, dk, dv (their keys or queries). A fused kernel computes D from the fp32
  // output instead and dS in fp32, so its D is off by about as much, and D matters most: dS = P (dP - D) cancels
  // to a small dq where dP hardly varies over the keys, and an error in D moves dq by D's error times the row's
  // mean key, unattenuated. Without this the correct variants agreed with the emulation on dq nearly bit for bit
  // on probed layers, and the H200's correct kernels differed in 6.1% of dq values (gemma2-2b; docs/verification.md).
  const bool noisy = p.accum_jitter != 0;
  Mat<Real> rq, rk, rv;  // the sums of squares of dq's, dk's and dv's terms
  Mat<int64_t> nq, nkv;  // how many terms each row of dq (per query head) and of dk, dv (per kv head) summed
  if (noisy) {
    rq.setZero(B * T, H * hd);
    rk.setZero(B * T, KV * hd);
    rv.setZero(B * T, KV * hd);
    nq.setZero(B * T, H);
    nkv.setZero(B * T, KV);
  }
  // One task per (sequence, kv head): it owns that head's dk and dv and its query heads' dq.
#pragma omp parallel for schedule(dynamic)
  for (int64_t bg = 0; bg < B * KV; ++bg) {
    const int64_t b = bg / KV, g = bg % KV;
    std::vector<Real> dP(static_cast<size_t>(T));
    std::vector<Real> o_row(noisy ? static_cast<size_t>(hd) : 0);  // the fp32 output row O = W v, for D's bound
    for (int64_t h = g * G; h < (g + 1) * G; ++h) {
      const Mat<Real>& S = cache.S[size_t(b * H + h)];
      const Mat<Real>& P = cache.P[size_t(b * H + h)];
      const Mat<Real>& W = cache.W.empty() ? P : cache.W[size_t(b * H + h)];  // the weights of O = W v
      for (int64_t i = 0; i < T; ++i) {
        Real rowdot = Real(0), rowdot_sq = Real(0);
        int64_t keys = 0;
        for (int64_t j = 0; j <= i; ++j) {
          if (!ctx.visible(layer, b, i, j)) continue;
          Real d = Real(0), d_sq = Real(0);
          for (int64_t e = 0; e < hd; ++e) {
            const Real t = dout(b * T + i, h * hd + e) * v(b * T + j, g * hd + e);
            d += t;
            if (noisy) d_sq += t * t;
          }
          if (noisy) d = accum_noised(p, d, Real(sqrt(d_sq)), ((b * H + h) * T + i) * T + j, hd);
          dP[size_t(j)] = d;
          rowdot += W(i, j) * d;
          if (noisy) rowdot_sq += W(i, j) * d * W(i, j) * d;
          ++keys;
        }
        if (noisy && keys) {
          // A fused kernel sums D = dO . O over head_dim instead, O being its fp32 output: the bound takes both
          // forms of the sum (keys and head_dim steps), since either is a correct kernel's.
          std::fill(o_row.begin(), o_row.end(), Real(0));
          for (int64_t j = 0; j <= i; ++j)
            if (ctx.visible(layer, b, i, j))
              for (int64_t e = 0; e < hd; ++e) o_row[size_t(e)] += W(i, j) * v(b * T + j, g * hd + e);
          Real o_sq = Real(0);
          for (int64_t e = 0; e < hd; ++e) {
            const Real t = dout(b * T + i, h * hd + e) * o_row[size_t(e)];
            o_sq += t * t;
          }
          const Real bound = Real(double((keys + 15) / 16)) * sqrt(rowdot_sq) + Real(double((hd + 15) / 16)) * sqrt(o_sq);
          rowdot = accum_noised(p, rowdot, bound, (b * H + h) * T + i, 16);
          nq(b * T + i, h) = keys;
        }
        for (int64_t j = 0; j <= i; ++j) {
          if (!ctx.visible(layer, b, i, j)) continue;
          for (int64_t e = 0; e < hd; ++e) {
            const Real t = P(i, j) * dout(b * T + i, h * hd + e);
            dv(b * T + j, g * hd + e) += t;
            if (noisy) rv(b * T + j, g * hd + e) += t * t;
          }
          Real dS = P(i, j) * (dP[size_t(j)] - rowdot);  // softmax backward
          if (ctx.attn_cap_on && !ctx.sem.attn_softcap_grad_missing) dS *= softcap_grad(S(i, j), ctx.attn_cap);
          dS *= ctx.scale;
          for (int64_t e = 0; e < hd; ++e) {
            const Real tq = dS * k(b * T + j, g * hd + e), tk = dS * q(b * T + i, h * hd + e);
            dq(b * T + i, h * hd + e) += tq;
            dk(b * T + j, g * hd + e) += tk;
            if (noisy) {
              rq(b * T + i, h * hd + e) += tq * tq;
              rk(b * T + j, g * hd + e) += tk * tk;
            }
          }
          if (noisy) ++nkv(b * T + j, g);
        }
      }
    }
  }
  if (!noisy) return;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < B * T; ++n) {
    for (int64_t x = 0; x < H * hd; ++x)
      dq(n, x) = accum_noised(p, dq(n, x), Real(sqrt(rq(n, x))), n * H * hd + x, nq(n, x / hd));
    for (int64_t x = 0; x < KV * hd; ++x) {
      dk(n, x) = accum_noised(p, dk(n, x), Real(sqrt(rk(n, x))), n * KV * hd + x, nkv(n, x / hd));
      dv(n, x) = accum_noised(p, dv(n, x), Real(sqrt(rv(n, x))), (B * T + n) * KV * hd + x, nkv(n, x / hd));
    }
  }
}

// ----------------------------------------------------------------------------------------------------
// Decoder layer

template <class Real>
struct LayerCache {
  Mat<Real> x;                     // (N, D) residual stream entering the layer
  Mat<Real> xn1;                   // (N, D) input_layernorm output (the q/k/v input)
  Vec<Real> rstd1, rstd2, rstd3, rstd4;
  std::array<Mat<Real>, kNumProj> xa;  // (N, r) per adapted projection
  std::array<Mat<Real>, kNumProj> drop;  // (N, in) lora_dropout's multiplier (0 or 1/(1-p)); empty without dropout
  Mat<Real> q, k, v;               // (N, H*hd), (N, KV*hd) x2; q and k after RoPE
  AttnCache<Real> attn;
  Mat<Real> att;                   // (N, H*hd) attention output (the o_proj input)
  Mat<Real> o;                     // (N, D) o_proj output (post_attention_layernorm input)
  Mat<Real> x_mid;                 // (N, D) residual after the attention block
  Mat<Real> xn2;                   // (N, D) pre_feedforward_layernorm output
  Mat<Real> gate, up;              // (N, I)
  Mat<Real> act;                   // (N, I) gelu(gate) * up (the down_proj input)
  Mat<Real> down;                  // (N, D) down_proj output (post_feedforward_layernorm input)
};

// What a probe of one layer records (the gate's layer-by-layer comparison, check/fast_backend.cpp): the forward's
// intermediates, the layer's output, and the backward's activation gradients at the points where a trainer
// hands them from one kernel to the next (each after its grad_act cast).
template <class Real>
struct LayerTrace {
  LayerCache<Real> cache;  // forward intermediates as the next operation used them; cache.x is the layer's input
  Mat<Real> x_out;         // (N, D) the layer's output
  Mat<Real> dy;            // (N, D) gradient of the output: the backward's input
  Mat<Real> dx;            // (N, D) gradient of the input
  Mat<Real> d_o;           // (N, D) gradient of the o_proj output (post_attention_layernorm's input)
  Mat<Real> d_gate, d_up;  // (N, I) gradients of the gate_proj and up_proj outputs
  Mat<Real> d_att;         // (N, H*hd) gradient of the attention output
  Mat<Real> dq, dk, dv;    // gradients of the q/k/v_proj outputs (after the RoPE backward)
  // A pinned probe's own outputs (probe_layer): by kPinnedOps name, what the operation computed before the pin
  // replaced it with the emulation's value. Empty when nothing was pinned.
  std::map<std::string, Mat<Real>> own;
};

// The tensors a pinned probe replaces, each right after the operation that makes it (probe_layer): the forward's
// in the order the layer computes them, then the backward's. A layer's output and its input gradient are not
// pinned: nothing in the layer reads them.
inline constexpr std::array<const char*, 19> kPinnedOps = {"xn1",   "q",    "k",      "v",    "att",  "o",  "x_mid",
                                                          "xn2",   "gate", "up",     "act",  "down", "d_gate", "d_up",
                                                          "d_o",   "d_att", "dq",    "dk",   "dv"};

// What layer operation `name` computed: a pinned probe's own value, else the one the layer went on with (`used`).
template <class Real>
const Mat<Real>& probed(const LayerTrace<Real>& t, const std::string& name, const Mat<Real>& used) {
  const auto it = t.own.find(name);
  return it != t.own.end() ? it->second : used;
}

// The values a pinned probe runs a layer's operations on (probe_layer), by kPinnedOps name, each (N, width).
template <class Real>
using LayerPins = std::map<std::string, Mat<Real>>;

// The pins for a probe of the layer `t` traced (the emulation's values at every operation), in Real.
template <class Real, class From>
LayerPins<Real> pins_from(const LayerTrace<From>& t) {
  const LayerCache<From>& c = t.cache;
  const std::map<std::string, const Mat<From>*> at = {
      {"xn1", &c.xn1},     {"q", &c.q},       {"k", &c.k},     {"v", &c.v},       {"att", &c.att},
      {"o", &c.o},         {"x_mid", &c.x_mid}, {"xn2", &c.xn2}, {"gate", &c.gate}, {"up", &c.up},
      {"act", &c.act},     {"down", &c.down}, {"d_gate", &t.d_gate}, {"d_up", &t.d_up}, {"d_o", &t.d_o},
      {"d_att", &t.d_att}, {"dq", &t.dq},     {"dk", &t.dk},   {"dv", &t.dv}};
  LayerPins<Real> p;
  for (const char* name : kPinnedOps) p[name] = at.at(name)->template cast<Real>();
  return p;
}

// A pinned probe's step after operation `name`: its own output v goes to own[name] and v becomes the pin, so the
// next operation runs on the emulation's value and no correct kernel's rounding reaches it. No-op without pins.
template <class Real>
void pin_op(const char* name, Mat<Real>& v, const LayerPins<Real>* pins, std::map<std::string, Mat<Real>>* own) {
  if (!pins) return;
  const auto it = pins->find(name);
  if (it == pins->end()) throw std::logic_error(std::string("pin_op: no pin for ") + name);
  if (it->second.rows() != v.rows() || it->second.cols() != v.cols())
    throw std::logic_error(std::string("pin_op: the pin for ") + name + " has another shape than the operation's output");
  (*own)[name] = std::move(v);
  v = it->second;
}

// A whole micro-batch traced: the embedding output, every layer, and the head.
template <class Real>
struct Trace {
  Mat<Real> x0;                      // (N, D) embedding times normalizer
  std::vector<LayerTrace<Real>> layers;
  Mat<Real> x_final;                 // (N, D) residual entering the final norm
  Mat<Real> xf;                      // (N, D) final norm output (the LM head's input, pinned where probe_head was given one)
  Mat<Real> xf_own;                  // (N, D) a pinned head probe's own final norm output; empty otherwise
  Mat<Real> dxf;                     // (N, D) its gradient
  Mat<Real> dx_final;                // (N, D) gradient of the residual entering the final norm
  std::vector<Real> row_loss;        // (N) per-position losses
};

template <class Real>
Real activation(const Real& x, const Semantics& sem) {
  return sem.gelu_exact ? gelu_erf(x) : gelu_tanh(x);
}
template <class Real>
Real activation_grad(const Real& x, const Semantics& sem) {
  return sem.gelu_exact ? gelu_erf_grad(x) : gelu_tanh_grad(x);
}

// One decoder layer (HF Gemma2DecoderLayer.forward) on the residual x, its intermediates kept in c for the
// backward. pins (a probe's, else null): each operation's output is replaced by pins' value of it before the next
// operation reads it, the layer's own going to *own (pin_op); c holds the pinned values, so the backward is the
// layer's on the values its operations saw.
template <class Real>
void layer_forward(const Layer<Real>& L, int64_t layer, const Ctx<Real>& ctx,
                   Mat<Real>& x,  // (N, D) residual stream, updated in place
                   LayerCache<Real>& c, const LayerPins<Real>* pins = nullptr,
                   std::map<std::string, Mat<Real>>* own = nullptr) {
  const Policy& p = ctx.policy;
  const auto P = [](Proj q) { return size_t(q); };
  // Each projection with its own adapter, scaled by that module's own scaling; with lora_dropout, the adapter's
  // input is masked by this projection's own draw (PEFT gives every LoRA module its own nn.Dropout).
  const auto project = [&](Proj q, const Mat<Real>& in, Mat<Real>& out) {
    Mat<Real>& drop = c.drop[P(q)];
    drop.resize(0, 0);
    if (ctx.dropout.p > 0 && L.lora[P(q)].present()) {
      drop.resize(in.rows(), in.cols());
      const Real kept = Real(1) / Real(1 - ctx.dropout.p);
#pragma omp parallel for schedule(static)
      for (int64_t n = 0; n < in.rows(); ++n)
        for (int64_t f = 0; f < in.cols(); ++f)
          drop(n, f) = lora_dropout_keep(ctx.dropout, layer, q, ctx.dropout.row_offset + n / ctx.T, n % ctx.T, f)
                           ? kept
                           : Real(0);
    }
    projection_forward(in, L.proj[P(q)], L.lora[P(q)], L.lora[P(q)].scaling, p, out, c.xa[P(q)],
                       drop.size() ? &drop : nullptr);
  };
  c.x = x;
  rmsnorm_forward(x, L.norm[size_t(Norm::input_layernorm)], ctx, c.xn1, c.rstd1);
  cast(p, Cast::matmul_in, c.xn1);
  pin_op("xn1", c.xn1, pins, own);
  project(Proj::q_proj, c.xn1, c.q);
  project(Proj::k_proj, c.xn1, c.k);
  project(Proj::v_proj, c.xn1, c.v);
  rope_apply(c.q, ctx.cfg.num_attention_heads, ctx, false);
  rope_apply(c.k, ctx.cfg.num_key_value_heads, ctx, false);
  cast(p, Cast::rope_out, c.q);
  cast(p, Cast::rope_out, c.k);
  pin_op("q", c.q, pins, own);
  pin_op("k", c.k, pins, own);
  pin_op("v", c.v, pins, own);
  attention_forward(c.q, c.k, c.v, layer, ctx, c.att, c.attn);
  cast(p, Cast::matmul_in, c.att);
  pin_op("att", c.att, pins, own);
  project(Proj::o_proj, c.att, c.o);
  pin_op("o", c.o, pins, own);
  Mat<Real> h;
  rmsnorm_forward(c.o, L.norm[size_t(Norm::post_attention_layernorm)], ctx, h, c.rstd2);
  x += h;
  cast(p, Cast::residual, x);
  pin_op("x_mid", x, pins, own);
  c.x_mid = x;

  rmsnorm_forward(x, L.norm[size_t(Norm::pre_feedforward_layernorm)], ctx, c.xn2, c.rstd3);
  cast(p, Cast::matmul_in, c.xn2);
  pin_op("xn2", c.xn2, pins, own);
  project(Proj::gate_proj, c.xn2, c.gate);
  project(Proj::up_proj, c.xn2, c.up);
  pin_op("gate", c.gate, pins, own);
  pin_op("up", c.up, pins, own);
  c.act.resize(c.gate.rows(), c.gate.cols());
  const int64_t n = c.gate.size();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const Real a = cast(p, Cast::gelu, activation(c.gate.data()[i], ctx.sem));
    c.act.data()[i] = cast(p, Cast::geglu, a * c.up.data()[i]);
  }
  cast(p, Cast::matmul_in, c.act);
  pin_op("act", c.act, pins, own);
  project(Proj::down_proj, c.act, c.down);
  pin_op("down", c.down, pins, own);
  rmsnorm_forward(c.down, L.norm[size_t(Norm::post_feedforward_layernorm)], ctx, h, c.rstd4);
  x += h;
  cast(p, Cast::residual, x);
}

template <class Real>
void layer_backward(const Layer<Real>& L, int64_t layer, const Ctx<Real>& ctx, const LayerCache<Real>& c,
                    Mat<Real>& dx,  // (N, D) gradient of the layer output in, of the layer input out
                    LayerGrads<Real>* g, bool train_all, bool train_norms, LayerTrace<Real>* trace = nullptr,
                    const LayerPins<Real>* pins = nullptr) {  // layer_forward's, for the backward's tensors
  if (pins && !trace) throw std::logic_error("layer_backward: a pinned backward keeps its own values in a trace");
  std::map<std::string, Mat<Real>>* own = trace ? &trace->own : nullptr;
  const Policy& p = ctx.policy;
  const auto P = [](Proj q) { return size_t(q); };
  auto dW = [&](Proj q) { return (g && train_all) ? &g->proj[P(q)] : nullptr; };
  auto dN = [&](Norm n) { return (g && train_norms) ? &g->norm[size_t(n)] : nullptr; };
  auto dA = [&](Proj q) { return (g && L.lora[P(q)].present()) ? &g->lora[P(q)] : nullptr; };
  // Each projection's backward with its own adapter and that module's own scaling.
  const auto project_back = [&](Proj q, const Mat<Real>& dy, const Mat<Real>& in, Mat<Real>& din) {
    projection_backward(dy, in, L.proj[P(q)], L.lora[P(q)], L.lora[P(q)].scaling, p, c.xa[P(q)], din, dW(q), dA(q),
                        c.drop[P(q)].size() ? &c.drop[P(q)] : nullptr);
  };

  // x_out = x_mid + post_feedforward_layernorm(down)
  Mat<Real> ddown;
  rmsnorm_backward(dx, c.down, c.rstd4, L.norm[size_t(Norm::post_feedforward_layernorm)], ctx, ddown,
                   dN(Norm::post_feedforward_layernorm));
  Mat<Real> dact = Mat<Real>::Zero(c.act.rows(), c.act.cols());
  project_back(Proj::down_proj, ddown, c.act, dact);
  cast(p, Cast::grad_act, dact);
  Mat<Real> dgate(c.gate.rows(), c.gate.cols()), dup(c.up.rows(), c.up.cols());
  const int64_t n = c.gate.size();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const Real gt = c.gate.data()[i];
    dgate.data()[i] = dact.data()[i] * c.up.data()[i] * activation_grad(gt, ctx.sem);
    dup.data()[i] = dact.data()[i] * cast(p, Cast::gelu, activation(gt, ctx.sem));
  }
  cast(p, Cast::grad_act, dgate);
  cast(p, Cast::grad_act, dup);
  pin_op("d_gate", dgate, pins, own);
  pin_op("d_up", dup, pins, own);
  if (trace) {
    trace->d_gate = dgate;
    trace->d_up = dup;
  }
  Mat<Real> dxn2 = Mat<Real>::Zero(c.xn2.rows(), c.xn2.cols());
  project_back(Proj::gate_proj, dgate, c.xn2, dxn2);
  project_back(Proj::up_proj, dup, c.xn2, dxn2);
  cast(p, Cast::grad_act, dxn2);
  Mat<Real> dtmp;
  rmsnorm_backward(dxn2, c.x_mid, c.rstd3, L.norm[size_t(Norm::pre_feedforward_layernorm)], ctx, dtmp,
                   dN(Norm::pre_feedforward_layernorm));
  dx += dtmp;  // now d x_mid
  cast(p, Cast::grad_act, dx);

  // x_mid = x + post_attention_layernorm(o_proj(attention(...)))
  Mat<Real> d_o;
  rmsnorm_backward(dx, c.o, c.rstd2, L.norm[size_t(Norm::post_attention_layernorm)], ctx, d_o,
                   dN(Norm::post_attention_layernorm));
  pin_op("d_o", d_o, pins, own);
  if (trace) trace->d_o = d_o;
  Mat<Real> datt = Mat<Real>::Zero(c.att.rows(), c.att.cols());
  project_back(Proj::o_proj, d_o, c.att, datt);
  cast(p, Cast::grad_act, datt);
  pin_op("d_att", datt, pins, own);
  if (trace) trace->d_att = datt;
  Mat<Real> dq, dk, dv;
  attention_backward(datt, c.q, c.k, c.v, c.attn, layer, ctx, dq, dk, dv);
  rope_apply(dq, ctx.cfg.num_attention_heads, ctx, true);
  rope_apply(dk, ctx.cfg.num_key_value_heads, ctx, true);
  cast(p, Cast::grad_act, dq);
  cast(p, Cast::grad_act, dk);
  cast(p, Cast::grad_act, dv);
  pin_op("dq", dq, pins, own);
  pin_op("dk", dk, pins, own);
  pin_op("dv", dv, pins, own);
  if (trace) {
    trace->dq = dq;
    trace->dk = dk;
    trace->dv = dv;
  }
  Mat<Real> dxn1 = Mat<Real>::Zero(c.xn1.rows(), c.xn1.cols());
  project_back(Proj::q_proj, dq, c.xn1, dxn1);
  project_back(Proj::k_proj, dk, c.xn1, dxn1);
  project_back(Proj::v_proj, dv, c.xn1, dxn1);
  cast(p, Cast::grad_act, dxn1);
  rmsnorm_backward(dxn1, c.x, c.rstd1, L.norm[size_t(Norm::input_layernorm)], ctx, dtmp, dN(Norm::input_layernorm));
  dx += dtmp;
  cast(p, Cast::grad_act, dx);
}

// ----------------------------------------------------------------------------------------------------
// Final softcap + cross-entropy, fused per row: z = c tanh(l / c); loss = logsumexp(z) - z_y;
// d loss / d l_j = scale (softmax(z)_j - [j == y]) sech^2(l_j / c).

template <class Real>
Real loss_forward_backward(Mat<Real>& logits,  // (N, V) raw LM-head output; overwritten with d/d logits
                           Mat<Real>& pad,     // (N, P) logits of padded rows (P may be 0); overwritten likewise
                           const Batch& batch, const Ctx<Real>& ctx,
                           const Real& grad_scale,  // 1 / (targets normalising the mean); 0: forward only
                           Mat<Real>* capped,       // (N, V) logits after the cap, when wanted
                           std::vector<Real>* row_losses = nullptr) {  // (N) each position's loss (0 unscored)
  using std::exp;
  using std::log;
  const Policy& p = ctx.policy;
  const int64_t N = logits.rows(), V = logits.cols(), P = pad.cols();
  // Padded columns are excluded from the softmax (their probability is exactly 0), not set to 0: a capped
  // logit of 0 would still take probability mass (docs/model.md, vocabulary padding).
  const bool pad_in_softmax = ctx.sem.padded_vocab_unmasked && P > 0;
  if (capped) capped->resize(N, V);
  std::vector<Real> row_loss(size_t(N), Real(0));
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int64_t y = batch.target(n / ctx.T, n % ctx.T);
    const int64_t cols = pad_in_softmax ? V + P : V;
    auto raw = [&](int64_t j) -> Real { return j < V ? logits(n, j) : pad(n, j - V); };
    std::vector<Real> z(static_cast<size_t>(cols));
    Real mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < cols; ++j) {
      const Real l = raw(j);
      z[size_t(j)] = cast(p, Cast::logits_capped, ctx.final_cap_on ? policy_softcap(p, l, ctx.final_cap) : l);
      if (z[size_t(j)] > mx) mx = z[size_t(j)];
    }
    if (capped)
      for (int64_t j = 0; j < V; ++j) (*capped)(n, j) = z[size_t(j)];
    if (y == kIgnoreIndex) {
      logits.row(n).setZero();
      if (P) pad.row(n).setZero();
      continue;
    }
    Real sum = Real(0);
    for (int64_t j = 0; j < cols; ++j) sum += exp(z[size_t(j)] - mx);
    const Real lse = mx + log(sum);
    row_loss[size_t(n)] = lse - z[size_t(y)];
    for (int64_t j = 0; j < cols; ++j) {
      Real d = exp(z[size_t(j)] - lse) - (j == y ? Real(1) : Real(0));
      if (ctx.final_cap_on && !ctx.sem.logit_softcap_grad_missing) d *= softcap_grad(raw(j), ctx.final_cap);
      (j < V ? logits(n, j) : pad(n, j - V)) = d * grad_scale;
    }
    if (!pad_in_softmax && P) pad.row(n).setZero();  // masked: no gradient reaches the padded rows
  }
  Real total = Real(0);
  for (int64_t n = 0; n < N; ++n) total = cast(p, Cast::loss, total + row_loss[size_t(n)]);
  if (row_losses) *row_losses = std::move(row_loss);
  return total;
}

// ----------------------------------------------------------------------------------------------------
// The whole model

// The fixed quantities of one run over `batch` (positions, documents, padding, scale, caps); refers to `opt`.
template <class Real>
Ctx<Real> run_ctx(const Config& cfg, const RunOptions& opt, const Batch& batch) {
  using std::sqrt;
  const Semantics& sem = opt.numerics.semantics;
  Ctx<Real> ctx{cfg, opt.numerics.policy, sem, batch.B, batch.T, opt.softcap.attn, opt.softcap.logits,
                Real(cfg.attn_logit_softcapping.value_or(1.0)), Real(cfg.final_logit_softcapping.value_or(1.0)),
                Real(0), {}, {}, batch.document_ids(), batch.attention_mask, opt.lora_dropout};
  ctx.scale = Real(1) / sqrt(Real(sem.query_pre_attn_scalar.value_or(cfg.query_pre_attn_scalar)));
  rope_tables(cfg, opt.numerics.policy, batch, opt.position_offset, ctx.rope_cos, ctx.rope_sin);
  return ctx;
}

// Final norm, LM head (padded rows masked), final softcap and cross-entropy; with g, the backward down to the
// residual entering the final norm (dx, (N, D)). Returns the sum of the per-token losses. xf_pin (a probe's, else
// null): (N, D), the LM head's input in place of the final norm's own output, which goes to trace->xf_own.
template <class Real>
Real head_forward_backward(const Model<Real>& m, const Batch& batch, const Ctx<Real>& ctx, const Mat<Real>& x,
                           const Real& grad_scale, Grads<Real>* g, Mat<Real>* capped, Mat<Real>* dx,
                           Trace<Real>* trace, const Mat<Real>* xf_pin = nullptr) {
  const Policy& p = ctx.policy;
  const int64_t N = x.rows(), D = x.cols();
  Mat<Real> xf;
  Vec<Real> rstd_f;
  rmsnorm_forward(x, m.norm, ctx, xf, rstd_f);
  cast(p, Cast::matmul_in, xf);
  if (xf_pin) {
    if (!trace || xf_pin->rows() != N || xf_pin->cols() != D)
      throw std::logic_error("head_forward_backward: a pinned xf is (N, D) and its own value goes to a trace");
    trace->xf_own = std::move(xf);
    xf = *xf_pin;
  }
  // The real vocabulary's logits are computed exactly as without padding, so padding cannot change them.
  Mat<Real> logits, pad_logits(N, 0);
  linear_forward(xf, m.embed_tokens, logits, &p);
  cast(p, Cast::logits, logits);
  if (m.embed_pad.rows > 0) {
    linear_forward(xf, m.embed_pad, pad_logits, &p);
    cast(p, Cast::logits, pad_logits);
  }
  const Real loss_sum = loss_forward_backward(logits, pad_logits, batch, ctx, g ? grad_scale : Real(0), capped,
                                              trace ? &trace->row_loss : nullptr);
  if (trace) {
    trace->x_final = x;
    trace->xf = xf;
  }
  if (!g) return loss_sum;

  Mat<Real>& dlogits = logits;
  cast(p, Cast::grad_act, dlogits);
  Mat<Real> dxf = Mat<Real>::Zero(N, D);
  linear_backward_input(dlogits, m.embed_tokens, dxf, &p);
  if (m.embed_pad.rows > 0 && ctx.sem.padded_vocab_unmasked) linear_backward_input(pad_logits, m.embed_pad, dxf, &p);
  if (m.train_all) {
    g->embed_tokens.noalias() += dlogits.transpose() * xf;
    if (m.embed_pad.rows > 0) g->embed_pad.noalias() += pad_logits.transpose() * xf;
  }
  cast(p, Cast::grad_act, dxf);
  rmsnorm_backward(dxf, x, rstd_f, m.norm, ctx, *dx, (m.train_all || m.train_norms) ? &g->norm : nullptr);
  if (trace) {
    trace->dxf = dxf;
    trace->dx_final = *dx;
  }
  return loss_sum;
}

// Forward (and, when g is given, backward) over one batch. The loss is returned as a sum over scored
// targets; gradients are accumulated into g scaled by grad_scale, so that micro-batches of one step are
// normalised by the step's total target count (docs/model.md, loss). g must come from zero_grads(m). With
// `trace`, every layer's inputs, intermediates and gradients are recorded (the gate's layer-by-layer check).
template <class Real>
Result<Real> forward_backward(const Model<Real>& m, const Batch& batch, const RunOptions& opt, const Real& grad_scale,
                              Grads<Real>* g, Trace<Real>* trace = nullptr) {
  using std::sqrt;
  const Config& cfg = m.config;
  const Policy& p = opt.numerics.policy;
  const Ctx<Real> ctx = run_ctx<Real>(cfg, opt, batch);
  const int64_t N = batch.B * batch.T, D = cfg.hidden_size;

  // Embedding times sqrt(D) (rounded to the activation format where the policy says so).
  const Real normalizer = cast(p, Cast::normalizer, Real(sqrt(Real(D))));
  Mat<Real> x(N, D);
  {
    Mat<Real> row;
    for (int64_t n = 0; n < N; ++n) {
      m.embed_tokens.load_rows(batch.id(n / batch.T, n % batch.T), 1, row);
      for (int64_t j = 0; j < D; ++j)
        x(n, j) = cast(p, Cast::embed_scaled, cast(p, Cast::embed_out, row(0, j)) * normalizer);
    }
  }
  if (trace) {
    trace->x0 = x;
    trace->layers.assign(size_t(cfg.num_hidden_layers), LayerTrace<Real>());
  }

  std::vector<LayerCache<Real>> caches(size_t(cfg.num_hidden_layers));
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    layer_forward(m.layers[size_t(l)], l, ctx, x, caches[size_t(l)]);
    if (trace) trace->layers[size_t(l)].x_out = x;
  }
  Result<Real> r;
  if (opt.keep_gate_stats)
    for (const LayerCache<Real>& c : caches) {
      double sum = 0, sq = 0;
      for (int64_t i = 0; i < c.gate.size(); ++i) {
        const double v = double(c.gate.data()[i]);
        sum += v;
        sq += v * v;
      }
      const double n = double(c.gate.size()), mean = sum / n;
      r.gate_mean.push_back(mean);
      r.gate_std.push_back(std::sqrt(std::max(0.0, sq / n - mean * mean)));
    }

  r.tokens = batch.count_targets();
  Mat<Real> dx;
  r.loss_sum = head_forward_backward<Real>(m, batch, ctx, x, grad_scale, g, opt.keep_logits ? &r.logits : nullptr, &dx, trace);
  if (!g) return r;

  for (int64_t l = cfg.num_hidden_layers - 1; l >= 0; --l) {
    LayerTrace<Real>* lt = trace ? &trace->layers[size_t(l)] : nullptr;
    if (lt) lt->dy = dx;
    layer_backward(m.layers[size_t(l)], l, ctx, caches[size_t(l)], dx, &g->layers[size_t(l)], m.train_all,
                   m.train_all || m.train_norms, lt);
    if (lt) {
      lt->dx = dx;
      lt->cache = std::move(caches[size_t(l)]);
    }
  }

  // HF builds the embedding as nn.Embedding(..., padding_idx=pad_token_id): the pad row gets no gradient
  // from lookups (its LM-head gradient above still counts, since the head is the same tensor). A config with
  // pad_token_id null has no padding index: every row gets its lookups.
  if (m.train_all)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t id = batch.id(n / batch.T, n % batch.T);
      if (!cfg.pad_token_id || id != *cfg.pad_token_id) g->embed_tokens.row(id) += dx.row(n) * normalizer;
    }
  return r;
}

// One layer on given inputs (x: the residual entering it, dy: the gradient of its output), forward and backward,
// traced, with its gradients accumulated into g: how the gate measures a layer's own bf16 noise (jittered
// policies) on exactly the inputs the fast trainer's layer was given. pins (or null): every operation of the layer
// runs on the emulation's values of its inputs (layer_forward, layer_backward; the operations' own outputs go to
// t.own), so that a correct implementation's rounding flips stay in the operation that made them and each tensor
// is judged on its own operation (docs/verification.md, "Every operation pinned").
template <class Real>
LayerTrace<Real> probe_layer(const Model<Real>& m, const Batch& batch, const RunOptions& opt, int64_t l, const Mat<Real>& x,
                             const Mat<Real>& dy, LayerGrads<Real>* g, const LayerPins<Real>* pins = nullptr) {
  const Ctx<Real> ctx = run_ctx<Real>(m.config, opt, batch);
  LayerTrace<Real> t;
  Mat<Real> xx = x;
  layer_forward(m.layers[size_t(l)], l, ctx, xx, t.cache, pins, &t.own);
  t.x_out = xx;
  t.dy = dy;
  Mat<Real> d = dy;
  layer_backward(m.layers[size_t(l)], l, ctx, t.cache, d, g, m.train_all, m.train_all || m.train_norms, &t, pins);
  t.dx = d;
  return t;
}

// The head on a given final residual x: per-position losses, the final norm's output and the gradients. xf_pin (or
// null): the LM head's input in place of the final norm's own (which goes to t.xf_own), as probe_layer's pins.
template <class Real>
Trace<Real> probe_head(const Model<Real>& m, const Batch& batch, const RunOptions& opt, const Mat<Real>& x,
                       const Real& grad_scale, const Mat<Real>* xf_pin = nullptr) {
  const Ctx<Real> ctx = run_ctx<Real>(m.config, opt, batch);
  Trace<Real> t;
  Grads<Real> g = zero_grads(m);
  Mat<Real> dx;
  head_forward_backward<Real>(m, batch, ctx, x, grad_scale, &g, nullptr, &dx, &t, xf_pin);
  return t;
}

// Mean loss and its gradients over one step made of micro-batches: every micro-batch's gradient is scaled
// by 1 / (targets in the whole step), the correct normalisation (docs/model.md). With `results`, each micro-batch's
// Result (its logits and gate statistics, as RunOptions asks) is appended to it.
template <class Real>
Real step_loss_and_grads(const Model<Real>& m, const std::vector<Batch>& micro, const RunOptions& opt, Grads<Real>& g,
                         std::vector<Result<Real>>* results = nullptr) {
  auto keep = [&](Result<Real>&& r) {
    const Real loss = r.loss_sum;
    if (results) results->push_back(std::move(r));
    return loss;
  };
  int64_t total = 0;
  for (const Batch& b : micro) total += b.count_targets();
  if (total == 0) throw InputError("batch: every label is ignored (-100): the mean loss is undefined (0/0)");
  Real mean = Real(0);
  if (opt.numerics.semantics.grad_accum_mean_of_means) {
    // The pre-October-2024 HF Trainer normalisation: a micro-batch with one target weighs as much as one
    // with a thousand.
    const Real k = Real(int64_t(micro.size()));
    for (const Batch& b : micro) {
      const int64_t n = b.count_targets();
      if (n == 0) {
        if (results) keep(forward_backward<Real>(m, b, opt, Real(0), nullptr));  // no gradient, but its forward
        continue;
      }
      mean += keep(forward_backward(m, b, opt, Real(1) / (Real(n) * k), &g)) / (Real(n) * k);
    }
  } else {
    // The bug loss-normalised-by-tokens divides the gradients by every position of the step, scored or not (the
    // loss it reports stays the mean over targets, as the trainers that had it reported).
    int64_t positions = 0;
    for (const Batch& b : micro) positions += b.B * b.T;
    const Real scale = Real(1) / Real(opt.numerics.semantics.loss_normalised_by_tokens ? positions : total);
    Real sum = Real(0);
    for (const Batch& b : micro) sum += keep(forward_backward(m, b, opt, scale, &g));
    mean = sum / Real(total);
  }
  if (!opt.numerics.policy.exact()) {
    for_each_trainable(m, g, [&](const std::string&, const Shape&, const Real*, Real* gr, int64_t n) {
      for (int64_t i = 0; i < n; ++i) gr[i] = cast(opt.numerics.policy, Cast::grads, gr[i]);
    });
  }
  return mean;
}

// ----------------------------------------------------------------------------------------------------
// Construction

template <class Real>
Model<Real> make_model(const Checkpoint& ck, const Policy& policy) {
  const Config& c = ck.config;
  Model<Real> m;
  m.config = c;
  m.train_all = !ck.adapter.has_value();

  auto tensor = [&](const std::string& name) -> const Tensor& {
    auto it = ck.weights.find(name);
    if (it == ck.weights.end()) throw InputError("checkpoint: missing tensor '" + name + "'");
    return it->second;
  };
  // The `weights` cast: re-store a frozen tensor once in the policy's format (a no-op for bf16 weights
  // under a bf16 policy).
  auto frozen = [&](const std::string& name) -> const Tensor* {
    const Tensor& t = tensor(name);
    const DType d = policy[Cast::weights];
    if (d == DType::f64 || d == t.dtype) return &t;
    std::vector<double> v = t.to_double();
    m.owned[name] = tensor_from_doubles(d, t.shape, v);
    return &m.owned[name];
  };
  auto matrix = [&](const std::string& name, Weight<Real>& w) {
    const Tensor& t = tensor(name);
    w.rows = t.rows();
    w.cols = t.cols();
    if (!m.train_all) {
      w.raw = frozen(name);
      return;
    }
    w.value.resize(w.rows, w.cols);
    std::vector<double> v = t.to_double();
    for (int64_t i = 0; i < t.numel(); ++i) w.value.data()[i] = cast(policy, Cast::weights, Real(v[size_t(i)]));
  };
  auto vector = [&](const std::string& name, Vec<Real>& out) {
    std::vector<double> v = tensor(name).to_double();
    out.resize(int64_t(v.size()));
    for (size_t i = 0; i < v.size(); ++i) out(int64_t(i)) = cast(policy, Cast::weights, Real(v[i]));
  };
  auto adapter = [&](const std::string& name, Mat<Real>& out) {
    const Tensor& t = tensor(name);
    std::vector<double> v = t.to_double();
    out.resize(t.rows(), t.cols());
    for (int64_t i = 0; i < t.numel(); ++i) out.data()[i] = cast(policy, Cast::adapters, Real(v[size_t(i)]));
  };

  matrix(kEmbedName, m.embed_tokens);
  m.layers.resize(size_t(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    Layer<Real>& L = m.layers[size_t(l)];
    for (Proj p : kAllProj) {
      matrix(proj_weight_name(l, p), L.proj[size_t(p)]);
      if (const LoraModule lm = ck.adapter ? ck.adapter->module(l, p) : LoraModule{}; lm.adapted()) {
        adapter(lora_weight_name(l, p, 'A'), L.lora[size_t(p)].A);
        adapter(lora_weight_name(l, p, 'B'), L.lora[size_t(p)].B);
        L.lora[size_t(p)].scaling = Real(lm.scaling);  // this module's own rank and alpha
      }
    }
    for (Norm n : kAllNorms) vector(norm_weight_name(l, n), L.norm[size_t(n)]);
  }
  vector(kFinalNormName, m.norm);
  if (auto it = ck.weights.find(kEmbedPaddingName); it != ck.weights.end()) pad_vocab(m, it->second);
  return m;
}

template <class Real>
Grads<Real> zero_grads(const Model<Real>& m) {
  const Config& c = m.config;
  Grads<Real> g;
  if (m.train_all) {
    g.embed_tokens = Mat<Real>::Zero(c.vocab_size, c.hidden_size);
    g.embed_pad = Mat<Real>::Zero(m.embed_pad.rows, c.hidden_size);
  }
  if (m.train_all || m.train_norms) g.norm = Vec<Real>::Zero(c.hidden_size);
  g.layers.resize(m.layers.size());
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const Layer<Real>& L = m.layers[l];
    LayerGrads<Real>& G = g.layers[l];
    for (Proj p : kAllProj) {
      const auto i = size_t(p);
      if (m.train_all) G.proj[i] = Mat<Real>::Zero(L.proj[i].rows, L.proj[i].cols);
      if (L.lora[i].present()) {
        G.lora[i].A = Mat<Real>::Zero(L.lora[i].A.rows(), L.lora[i].A.cols());
        G.lora[i].B = Mat<Real>::Zero(L.lora[i].B.rows(), L.lora[i].B.cols());
      }
    }
    if (m.train_all || m.train_norms)
      for (Norm n : kAllNorms) G.norm[size_t(n)] = Vec<Real>::Zero(c.hidden_size);
  }
  return g;
}

}  // namespace gemma::ref
