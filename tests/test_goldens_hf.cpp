// The float64 reference against Hugging Face transformers' own Gemma2 (float64, eager attention, its float32
// islands patched to float64), for every case under goldens/hf and every softcap combination it holds,
// through the same comparison verify uses.
#include <gtest/gtest.h>

#include <filesystem>

#include "check/compare.hpp"

using namespace gemma;
using namespace gemma::check;

namespace {

std::vector<std::string> hf_cases() {
  std::vector<std::string> r;
  for (const auto& e : std::filesystem::directory_iterator("goldens/hf"))
    if (e.path().extension() == ".h5") r.push_back(e.path().string());
  std::sort(r.begin(), r.end());
  return r;
}

}  // namespace

TEST(HfGoldens, ReferenceMatchesHfFloat64OnEveryCaseAndCombination) {
  const auto cases = hf_cases();
  ASSERT_GE(cases.size(), 5u) << "goldens/hf is missing its cases (run from the repository root)";
  int combos = 0;
  double worst_loss = 0, worst_grad = 0;
  for (const auto& path : cases) {
    const CaseFile cf = read_case(path);
    ASSERT_EQ(cf.provenance.count("expected_kind"), 1u) << path;
    EXPECT_EQ(cf.provenance.at("expected_kind"), "hf-float64-patched") << path;
    ASSERT_EQ(cf.expected.size(), 4u) << path << ": all four softcap combinations";
    const Tolerances tol = tolerances_for(cf.provenance);
    for (const auto& [combo, ex] : cf.expected) {
      ref::RunOptions opt;
      opt.softcap = {combo == "attn" || combo == "attn_logits", combo == "logits" || combo == "attn_logits"};
      opt.keep_logits = true;
      const ref::Output out = ref::run(cf.model, cf.batch, opt);
      Report r;
      std::printf("%s [%s]\n", path.c_str(), combo.c_str());
      compare_expected(r, "", out, ex, tol, cf.batch);
      EXPECT_TRUE(r.all_pass()) << path << " " << combo;
      EXPECT_EQ(r.checks.size(), 2 + ex.grads.size());
      for (const auto& c : r.checks) {
        if (c.name.rfind("loss", 0) == 0) worst_loss = std::max(worst_loss, c.value);
        if (c.name.rfind("grad", 0) == 0) worst_grad = std::max(worst_grad, c.value);
      }
      ++combos;
    }
  }
  std::printf("%zu cases, %d combinations: worst loss rel %.2e, worst gradient rel L2 %.2e\n", cases.size(), combos,
              worst_loss, worst_grad);
}
