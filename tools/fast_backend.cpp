#include "tools/fast_backend.hpp"

#include <cmath>
#include <cstdio>

#include "model/errors.hpp"
#include "tools/compare.hpp"

#ifdef GEMMA_HAVE_FAST
#include "fast/fast.hpp"
#endif

namespace gemma::tools {

bool fast_available(std::string* why) {
#ifdef GEMMA_HAVE_FAST
  return fast::device_available(why);
#else
  if (why) *why = "this build has no CUDA backend (nvcc was not found at configure time)";
  return false;
#endif
}

namespace {

struct Family {
  std::string name;
  double max_abs = 0, rel_l2_policy = 0, rel_l2_f64 = 0, policy_vs_f64 = 0;
};

double max_abs(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

}  // namespace

FastResult compare_fast(Report& r, const std::string& prefix, const Inputs& in, Softcap sc, const ref::Output* f64) {
  FastResult res;
#ifndef GEMMA_HAVE_FAST
  (void)r, (void)prefix, (void)in, (void)sc, (void)f64;
  fail("--backend", "this build has no CUDA backend");
#else
  if (!in.model.adapter) fail("--backend", "the fast backend trains LoRA adapters: this run has none (--lora-r 0?)");
  const int64_t N = in.batch.B * in.batch.T, V = in.model.config.vocab_size;
  const std::vector<int64_t> rows = {0, N / 2, N - 1};

  progress("reference forward + backward under the fast precision policy");
  ref::RunOptions po;
  po.softcap = sc;
  po.numerics.policy = ref::policy_fast();
  po.keep_logits = true;
  const ref::Output pol = ref::run(in.model, in.batch, po);

  progress("fast backend (CUDA) forward + backward");
  fast::Options fo;
  fo.softcap = sc;
  fo.logit_rows = rows;
  const fast::Output out = fast::run(in.model, in.batch, fo);
  res.loss = out.loss;
  res.tokens = out.tokens;
  res.seconds = out.seconds;
  res.peak_device_bytes = double(out.peak_device_bytes);
  res.loss_fast_policy = pol.loss;

  std::vector<Family> fams;
  auto row_logits = [&](const std::vector<double>& all) {
    std::vector<double> v;
    for (int64_t n : rows) v.insert(v.end(), all.begin() + n * V, all.begin() + (n + 1) * V);
    return v;
  };
  {
    Family f{"loss"};
    f.max_abs = std::fabs(out.loss - pol.loss);
    f.rel_l2_policy = rel_err(out.loss, pol.loss);
    if (f64) {
      f.rel_l2_f64 = rel_err(out.loss, f64->loss);
      f.policy_vs_f64 = rel_err(pol.loss, f64->loss);
    }
    fams.push_back(f);
  }
  {
    std::vector<double> got;
    for (int64_t n : rows) {
      const auto& v = out.logits.at(n);
      got.insert(got.end(), v.begin(), v.end());
    }
    const std::vector<double> want = row_logits(pol.logits);
    Family f{"logits (rows 0, N/2, N-1)"};
    f.max_abs = max_abs(got, want);
    f.rel_l2_policy = rel_l2(got, want);
    if (f64) {
      const std::vector<double> exact = row_logits(f64->logits);
      f.rel_l2_f64 = rel_l2(got, exact);
      f.policy_vs_f64 = rel_l2(want, exact);
    }
    fams.push_back(f);
  }
  for (const auto& [name, t] : pol.grads) {
    auto it = out.grads.find(name);
    if (it == out.grads.end()) fail("fast backend", "returned no gradient for '" + name + "'");
    const std::vector<double> got = it->second.to_double(), want = t.to_double();
    Family f{"grad " + name};
    f.max_abs = max_abs(got, want);
    f.rel_l2_policy = rel_l2(got, want);
    if (f64) {
      const std::vector<double> exact = f64->grads.at(name).to_double();
      f.rel_l2_f64 = rel_l2(got, exact);
      f.policy_vs_f64 = rel_l2(want, exact);
    }
    fams.push_back(f);
  }

  // Against the fast-policy reference, the two sides round at the same points; what remains is fp32
  // accumulation order (~1e-7 relative), which now and then moves a value across a bf16 rounding boundary
  // (2^-8 relative). Most rows then agree to ~1e-7, but a flip inside an ill-conditioned row (attention with
  // near-tied top keys) carries that row to its full bf16-vs-float64 distance (docs/fast.md). So: loss 1e-4
  // relative (the target, met everywhere measured); gradients the 1e-3 or a quarter of the
  // fast policy's own distance to float64, whichever is larger (measured 5e-5..0.19 of that distance on
  // passing cases; cuBLAS's double rounding of a bf16 beta=1 add, a real bug, measured 0.4..1);
  // logits are bf16 outputs, one flipped rounding is 2^-8: rel L2 4e-3.
  // Against float64: the fast policy's own measured distance to float64 (the bf16 error every correct
  // bf16 trainer makes), times 2 for the accumulation differences on top, plus the policy tolerance.
  std::printf("  %-62s %10s %12s %9s %12s %9s\n", "fast backend, per tensor family", "max abs", "relL2 fastpol", "tol",
              "relL2 f64", "tol");
  for (const Family& f : fams) {
    const bool is_loss = f.name == "loss", is_logits = f.name.rfind("logits", 0) == 0;
    const double tol_pol = is_loss ? 1e-4 : is_logits ? 4e-3 : std::max(1e-3, 0.25 * f.policy_vs_f64);
    const double tol_f64 = 2.0 * f.policy_vs_f64 + tol_pol;
    std::printf("  %-62s %10.3e %12.3e %9.1e %12.3e %9.2e  %s\n", f.name.c_str(), f.max_abs, f.rel_l2_policy, tol_pol,
                f64 ? f.rel_l2_f64 : std::nan(""), f64 ? tol_f64 : std::nan(""),
                (f.rel_l2_policy <= tol_pol && (!f64 || f.rel_l2_f64 <= tol_f64)) ? "OK" : "FAIL");
  }
  for (const Family& f : fams) {
    const bool is_loss = f.name == "loss", is_logits = f.name.rfind("logits", 0) == 0;
    const double tol_pol = is_loss ? 1e-4 : is_logits ? 4e-3 : std::max(1e-3, 0.25 * f.policy_vs_f64);
    r.add(prefix + "fast vs fast-policy reference: " + f.name, f.rel_l2_policy, tol_pol,
          "same rounding points; fp32 accumulation order only (max abs " + std::to_string(f.max_abs) + ")", false);
    if (f64)
      r.add(prefix + "fast vs float64: " + f.name, f.rel_l2_f64, 2.0 * f.policy_vs_f64 + tol_pol,
            "2 x the fast policy's own distance to float64 (" + std::to_string(f.policy_vs_f64) + ") + the policy tolerance",
            false);
  }
  std::printf("  tolerances: vs the fast-policy reference (same rounding points, fp32 accumulation order only): loss 1e-4,\n"
              "  gradients max(1e-3, 1/4 of the fast policy's own distance to float64), logits 4e-3 (one bf16 flip);\n"
              "  vs float64: 2 x the fast policy's own distance to float64 plus that tolerance.\n");
#endif
  return res;
}

}  // namespace gemma::tools
