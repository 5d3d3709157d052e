// Goldens as a gate: every kept golden is reproduced by the reference; the four softcap combinations differ
// from each other by far more than the tolerance (a switch that silently does nothing cannot pass); and the
// real verify binary exits 1 on a golden perturbed by 1e-9 and 2 on one whose hash no longer matches.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "model/synthetic.hpp"
#include "check/golden.hpp"

namespace gemma::check {
// Names the recipe in test listings instead of dumping its bytes.
void PrintTo(const GoldenRecipe& r, std::ostream* os) { *os << r.file_name(); }
}  // namespace gemma::check

using namespace gemma;
using namespace gemma::check;
namespace fs = std::filesystem;

namespace {

Golden recompute(const GoldenRecipe& rc) {
  const Inputs in = load_inputs(rc.input_spec());
  ref::RunOptions opt;
  opt.softcap = rc.softcap;
  opt.keep_logits = true;
  return golden_from(rc, in.batch, in.model.config.vocab_size, ref::run(in.model, in.batch, opt, in.micro_rows));
}

std::string golden_path(const GoldenRecipe& rc) { return std::string(kGoldenDir) + "/" + rc.file_name(); }

// Runs the real verify in `dir` and returns its exit status; its output goes to `log`.
int run_verify(const fs::path& dir, const std::string& args, const fs::path& log) {
  const std::string cmd = "cd '" + dir.string() + "' && '" + std::string(VERIFY_BIN) + "' " + args + " > '" + log.string() + "' 2>&1";
  const int st = std::system(cmd.c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

class GoldenReproduction : public ::testing::TestWithParam<GoldenRecipe> {};

TEST_P(GoldenReproduction, ReferenceReproducesTheKeptGolden) {
  const GoldenRecipe rc = GetParam();
  const std::string path = golden_path(rc);
  ASSERT_TRUE(fs::exists(path)) << path << " is missing: run tools/make-goldens";
  check_manifest(path);
  const Golden expected = read_golden(path);
  ASSERT_TRUE(expected.recipe == rc);
  Report r;
  compare_golden(r, "", expected, recompute(rc), GoldenTolerances{});
  EXPECT_TRUE(r.all_pass());
  EXPECT_GE(r.checks.size(), 3u);
}

namespace {

std::vector<GoldenRecipe> small_goldens() {
  std::vector<GoldenRecipe> r;
  for (const auto& g : standard_goldens())
    if (g.model == "gemma2-tiny" || g.model == "gemma2-micro" || g.model == "gemma2-odd") r.push_back(g);
  return r;
}

std::string recipe_name(const ::testing::TestParamInfo<GoldenRecipe>& info) {
  std::string n = info.param.file_name();
  n = n.substr(0, n.size() - 3);
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
}

}  // namespace

INSTANTIATE_TEST_SUITE_P(SmallPresets, GoldenReproduction, ::testing::ValuesIn(small_goldens()), recipe_name);

// One real-width golden in the default suite (about 15 s): the 27b shape with both caps, verify's default.
INSTANTIATE_TEST_SUITE_P(TrueWidths, GoldenReproduction,
                         ::testing::Values(GoldenRecipe{"gemma2-27b", kDefaultPresetLayers, 2, 48, 8, 0, {true, true}}),
                         recipe_name);

TEST(Goldens, TheFourSoftcapCombinationsDifferByFarMoreThanTheTolerance) {
  for (const auto& group : {std::string("gemma2-tiny_lora8"), std::string("gemma2-micro_full"), std::string("gemma2-27b_lora8")}) {
    std::vector<Golden> g;
    for (const auto& rc : standard_goldens())
      if (rc.file_name().rfind(group + "_", 0) == 0) g.push_back(read_golden(golden_path(rc)));
    ASSERT_EQ(g.size(), 4u) << group;
    const GoldenTolerances tol;
    for (size_t i = 0; i < g.size(); ++i)
      for (size_t j = i + 1; j < g.size(); ++j) {
        const double d = std::fabs(g[i].loss - g[j].loss) / std::fabs(g[j].loss);
        std::printf("%s: %s vs %s: loss differs by %.2e relative (tolerance %.0e)\n", group.c_str(),
                    softcap_name(g[i].recipe.softcap).c_str(), softcap_name(g[j].recipe.softcap).c_str(), d, tol.loss);
        // A thousand times the tolerance: no rounding-level accident can make two combinations look alike.
        EXPECT_GT(d, 1e3 * tol.loss);
      }
  }
}

class GoldenGate : public ::testing::Test {
 protected:
  // A copy of the repository's goldens in a scratch directory, so that tampering stays there.
  fs::path dir;
  GoldenRecipe rc{"gemma2-tiny", 2, 2, 20, 8, 0, {true, true}};
  void SetUp() override {
    dir = fs::temp_directory_path() / ("gemma_golden_gate_" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir / kGoldenDir);
    fs::copy_file(golden_path(rc), dir / golden_path(rc));
    fs::copy_file(kManifest, dir / kManifest);
  }
  void TearDown() override { fs::remove_all(dir); }
};

TEST_F(GoldenGate, UntouchedGoldenPasses) {
  EXPECT_EQ(run_verify(dir, "--model gemma2-tiny --softcap attn,logits", dir / "log"), 0) << slurp(dir / "log");
}

// Run outside the repository root, a standard recipe's golden is not looked for. The line used to say "no golden
// for this recipe", which was false (found by a probe, 2026-12-05); it now says why, warns on stderr, and the JSON
// records it. With the manifest there, the golden is compared and the JSON says so.
TEST_F(GoldenGate, AGoldenNotLookedForIsSaidToBeSo) {
  const fs::path away = dir / "elsewhere";
  fs::create_directories(away);
  EXPECT_EQ(run_verify(away, "--model gemma2-tiny --softcap attn,logits --json result.json", away / "log"), 0)
      << slurp(away / "log");
  const std::string log = slurp(away / "log");
  EXPECT_NE(log.find("warning: the golden of this standard recipe"), std::string::npos) << log;
  EXPECT_NE(log.find("run verify from the repository root"), std::string::npos) << log;
  const auto golden_of = [](const fs::path& p) {
    return nlohmann::json::parse(slurp(p))["results"].value("golden", std::string("(none)"));
  };
  EXPECT_EQ(golden_of(away / "result.json").rfind("not found: no goldens/MANIFEST.json", 0), 0u) << golden_of(away / "result.json");
  EXPECT_EQ(run_verify(dir, "--model gemma2-tiny --softcap attn,logits --json result.json", dir / "log"), 0);
  EXPECT_EQ(golden_of(dir / "result.json"), "compared: " + golden_path(rc));
}

TEST_F(GoldenGate, LossPerturbedByOnePartInABillionFailsWithExitOne) {
  Golden g = read_golden(golden_path(rc));
  g.loss *= 1.0 + 1e-9;
  const fs::path p = dir / golden_path(rc);
  fs::remove(p);
  write_golden(p.string(), g);
  const fs::path cwd = fs::current_path();
  fs::current_path(dir);  // the manifest records paths relative to the repository root
  record_in_manifest(golden_path(rc), g.provenance);
  fs::current_path(cwd);
  const int st = run_verify(dir, "--model gemma2-tiny --softcap attn,logits", dir / "log");
  const std::string log = slurp(dir / "log");
  EXPECT_EQ(st, 1) << log;
  EXPECT_NE(log.find("golden loss (rel)"), std::string::npos);
  EXPECT_NE(log.find("FAIL"), std::string::npos);
}

TEST_F(GoldenGate, GoldenWhoseHashDoesNotMatchTheManifestIsReportedAsSuch) {
  Golden g = read_golden(golden_path(rc));
  g.loss *= 1.0 + 1e-9;
  const fs::path p = dir / golden_path(rc);
  fs::remove(p);
  write_golden(p.string(), g);  // changed, but the manifest still holds the old hash
  const int st = run_verify(dir, "--model gemma2-tiny --softcap attn,logits", dir / "log");
  const std::string log = slurp(dir / "log");
  EXPECT_EQ(st, 2) << log;
  EXPECT_NE(log.find("does not match goldens/MANIFEST.json"), std::string::npos) << log;
}
