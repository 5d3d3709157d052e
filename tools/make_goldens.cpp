// make-goldens: (re)generates goldens/reference from the float64 reference and records every golden, the HF
// cross-check cases included, in goldens/MANIFEST.json with its sha256 and provenance. A golden whose
// values changed is not overwritten unless --force is given: the changes are printed, check by check.
#include <CLI/CLI.hpp>
#include <Eigen/Core>
#include <H5Cpp.h>
#include <boost/version.hpp>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>

#include "model/casefile.hpp"
#include "model/errors.hpp"
#include "check/golden.hpp"

using namespace gemma;
using namespace gemma::check;
namespace fs = std::filesystem;

namespace {

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  char b[32];
  std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return b;
}

std::string git_commit() {
  FILE* p = ::popen("git rev-parse --short HEAD 2>/dev/null", "r");
  if (!p) return "unknown";
  char b[64] = {0};
  const bool ok = std::fgets(b, sizeof b, p) != nullptr;
  ::pclose(p);
  std::string s = ok ? b : "unknown";
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  return s;
}

std::string versions() {
  unsigned maj = 0, min = 0, rel = 0;
  H5get_libversion(&maj, &min, &rel);
  char b[256];
  std::snprintf(b, sizeof b, "g++ %s; Eigen %d.%d.%d; Boost %d.%d; HDF5 %u.%u.%u; project commit %s", __VERSION__,
                EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION, BOOST_VERSION / 100000,
                BOOST_VERSION / 100 % 1000, maj, min, rel, git_commit().c_str());
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"make-goldens: regenerate goldens/reference and goldens/MANIFEST.json"};
  std::string only;
  bool force = false;
  app.add_option("--only", only, "regenerate only goldens whose file name contains this text");
  app.add_flag("--force", force, "overwrite goldens whose values changed (say why in the commit message)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "make-goldens: %s\n", e.what());
    return 2;
  }
  std::string command = "tools/make-goldens";
  for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];
  try {
    if (!fs::exists("goldens")) fail("make-goldens", "run from the repository root (no goldens/ here)");
    fs::create_directories(kGoldenDir);
    const std::string ver = versions(), date = utc_now();
    int written = 0, unchanged = 0, refused = 0;
    for (const GoldenRecipe& rc : standard_goldens()) {
      const std::string path = std::string(kGoldenDir) + "/" + rc.file_name();
      if (!only.empty() && path.find(only) == std::string::npos) continue;
      std::printf("%s\n", path.c_str());
      std::fflush(stdout);
      const Inputs in = load_inputs(rc.input_spec());
      ref::RunOptions opt;
      opt.softcap = rc.softcap;
      opt.keep_logits = true;
      const ref::Output out = ref::run(in.model, in.batch, opt, in.micro_rows);
      Golden g = golden_from(rc, in.batch, in.model.config.vocab_size, out);
      g.provenance = {{"generator", "tools/make-goldens (float64 reference)"},
                      {"versions", ver},
                      {"date", date},
                      {"command", command}};
      if (fs::exists(path)) {
        const Golden old = read_golden(path);
        Report r;
        compare_golden(r, "  ", old, g, GoldenTolerances{});
        if (r.all_pass()) {
          std::printf("  unchanged (every value within the reference's golden tolerance)\n");
          ++unchanged;
          continue;
        }
        if (!force) {
          std::printf("  CHANGED: %zu of %zu values moved beyond tolerance; not overwritten (use --force if the change "
                      "is intended)\n",
                      r.checks.size() - size_t(r.passed()), r.checks.size());
          ++refused;
          continue;
        }
        std::printf("  overwritten (--force)\n");
      }
      write_golden(path, g);
      record_in_manifest(path, g.provenance);
      ++written;
    }
    // The HF cross-check cases are made on the GPU host by tools/hf_crosscheck.py; record them as they are.
    for (const auto& e : fs::directory_iterator("goldens/hf")) {
      if (e.path().extension() != ".h5") continue;
      const std::string path = e.path().string();
      if (!only.empty() && path.find(only) == std::string::npos) continue;
      const CaseFile cf = read_case(path);
      std::map<std::string, std::string> prov = cf.provenance;
      prov["recorded"] = date;
      record_in_manifest(path, prov);
    }
    std::printf("%d written, %d unchanged, %d changed but kept\n", written, unchanged, refused);
    return refused ? 1 : 0;
  } catch (const InputError& e) {
    std::fprintf(stderr, "make-goldens: %s\n", e.what());
    return 2;
  }
}
