// gate-mutants: how many deliberately broken builds of fast/ the gate kills, and whether it passes harmless ones.
//
//   gate-mutants --model gemma2-27b --softcap all --mutants DIR [--json FILE] [--timeout SECONDS]
//
// DIR holds one libgemma_fast_gate.so per build, named <mutant>.so (tools/mutants builds them from
// tests/mutations/*.patch; "harmless-*" builds must pass, "none" is the unmodified source, every other one must
// fail). The harness runs exactly the checks `verify --model PRESET --softcap ... --backend both` runs on the fast
// trainer (check/fast_backend.cpp: gate_reference, gate_judge; the released presets' companions gemma2-odd, also
// with its base in NF4 for the first combination only, gemma2-hd128 and gemma2-hd256 included), but computes the
// reference side once: it is the same for every build. Each build is loaded into its own child process (a crash or a hang kills the
// child, not the harness) and judged setting by setting until a check fails by 3 times its tolerance
// (judge_build). The reference's own checks (goldens, finite differences) do not involve fast/ and are left out.
// Exit 0 when every mutant is killed at value / tolerance >= 3 and no harmless build is flagged.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "check/fast_backend.hpp"
#include "check/inputs.hpp"
#include "check/parallel.hpp"
#include "check/report.hpp"
#include "check/setting.hpp"
#include "model/errors.hpp"

using namespace gemma;
using namespace gemma::check;
namespace fs = std::filesystem;

namespace {

struct Case {
  std::string prefix;  // "[attn,logits] ", "[odd attn,logits] "
  const Inputs* in;
  Softcap sc;
  std::shared_ptr<const GateReference> ref;
};

struct Verdict {
  std::string name;
  bool caught = false;
  double ratio = 0;   // the failing (or, for a pass, the worst) check's value / tolerance
  std::string check;  // that check
  double seconds = 0;
};

// A mutant counts as killed robustly when a check fails at this multiple of its tolerance or more: a thinner kill
// could turn into a pass with other inputs or another device.
constexpr double kKillMargin = 3.0;

// In the child: load the build, ask every case's questions until one fails by kKillMargin. A thinner failure is
// kept while the remaining settings are asked (verify asks them all too), and the strongest failure is the verdict:
// the companion that runs first (gemma2-hd128) decides most builds, but a bug it sees only faintly (the mma.sync
// kernels' D from the bf16 output, a bf16 residual) shows fully in gemma2-odd or the released setting.
nlohmann::json judge_build(const std::string& so, const std::vector<Case>& cases) {
  using Entry = int (*)(fast::GateRunArgs*, char*, size_t);
  void* h = ::dlopen(so.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) return {{"error", std::string("dlopen: ") + ::dlerror()}};
  auto entry = reinterpret_cast<Entry>(::dlsym(h, "gemma_fast_gate_run"));
  if (!entry) return {{"error", "no gemma_fast_gate_run in " + so}};
  double worst = 0;
  std::string worst_check;
  bool failed = false;
  for (const Case& c : cases) {
    const GateQuestions q = gate_questions(*c.ref);
    fast::Options opt;
    opt.softcap = c.sc;
    opt.logit_rows = *q.rows;
    fast::GateOutput out;
    fast::GateRunArgs args{&c.in->model, q.micro, &opt, q.adamw, q.layers, q.heads, &out};
    char err[512] = {};
    if (entry(&args, err, sizeof err) != 0)
      return {{"caught", true}, {"ratio", INFINITY}, {"check", c.prefix + "the trainer failed: " + err}};
    Report r;
    gate_judge(r, c.prefix, *c.ref, out);
    for (const Check& k : r.checks) {
      // A NaN value fails its check (Report::add) and counts as an infinite failure here, so that a later, smaller
      // value does not overwrite it (NaN compares false with everything).
      const double q2 = std::isnan(k.value) && !k.unresolved ? INFINITY
                        : k.tolerance > 0    ? k.value / k.tolerance
                        : k.value > 0        ? INFINITY
                                             : 0.0;
      if (!(q2 <= worst)) {
        worst = q2;
        worst_check = k.name + " (" + k.why.substr(0, 160) + ")";
      }
    }
    failed |= !r.all_pass();
    if (failed && worst >= kKillMargin) break;
  }
  return {{"caught", failed}, {"ratio", worst}, {"check", worst_check}};
}

Verdict run_child(const std::string& name, const std::string& so, const std::vector<Case>& cases, int timeout) {
  Verdict v;
  v.name = name;
  const auto t0 = std::chrono::steady_clock::now();
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("pipe failed");
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    // The judge prints its tables; the child's only answer is the JSON line on the pipe.
    if (const int null = ::open("/dev/null", O_WRONLY); null >= 0) ::dup2(null, 1);
    ::alarm(unsigned(timeout));
    std::string out;
    try {
      out = judge_build(so, cases).dump();
    } catch (const std::exception& e) {
      out = nlohmann::json{{"caught", true}, {"ratio", INFINITY}, {"check", std::string("exception: ") + e.what()}}.dump();
    }
    for (size_t done = 0; done < out.size();) {
      const ssize_t n = ::write(fds[1], out.data() + done, out.size() - done);
      if (n <= 0) break;
      done += size_t(n);
    }
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, size_t(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  v.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (WIFSIGNALED(status) || text.empty()) {
    // A build that crashes or hangs fails verify too (a signal, or a CI timeout): caught, with no ratio to report.
    v.caught = true;
    v.ratio = INFINITY;
    v.check = WIFSIGNALED(status) ? std::string("the trainer died: ") + ::strsignal(WTERMSIG(status)) : "no answer";
    return v;
  }
  const nlohmann::json j = nlohmann::json::parse(text);
  if (j.contains("error")) throw std::runtime_error(name + ": " + j["error"].get<std::string>());
  v.caught = j["caught"].get<bool>();
  v.ratio = j["ratio"].is_number() ? j["ratio"].get<double>() : INFINITY;
  v.check = j["check"].get<std::string>();
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"gate-mutants: the gate's kill table over builds of fast/ (tests/mutations)"};
  InputSpec spec;
  std::string softcap = "all", dir;
  std::optional<std::string> json_path;
  int timeout = 600;
  app.add_option("--model", spec.model, "preset (the gate's setting)")->required();
  app.add_option("--softcap", softcap, "none | attn | logits | attn,logits | all");
  app.add_option("--mutants", dir, "directory of <name>.so builds")->required();
  app.add_option("--json", json_path, "write the kill table as JSON");
  app.add_option("--timeout", timeout, "seconds one build may take");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "gate-mutants: %s\n", e.what());
    return 2;
  }
  try {
    std::vector<Softcap> combos;
    if (softcap == "all") {
      // The combination with both caps first: most bugs show there, and a killed build stops at its first failure.
      combos = {{true, true}, {true, false}, {false, true}, {false, false}};
    } else {
      combos.push_back(parse_softcap(softcap, "--softcap"));
    }
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".so") names.push_back(e.path().stem().string());
    std::sort(names.begin(), names.end());
    if (names.empty()) fail("--mutants", "no .so build in " + dir);

    const auto t0 = std::chrono::steady_clock::now();
    // One setting per preset run: its inputs, its tag in the table, and whether only the first softcap combination
    // is asked of it.
    struct Setting {
      std::unique_ptr<Inputs> in;
      std::string tag;
      bool first_only = false;
    };
    std::vector<Setting> settings;
    settings.push_back({std::make_unique<Inputs>(load_inputs(spec)), "", false});
    // The companions verify runs with the trainer (check/inputs.hpp gate_companions), gemma2-hd256's asked last
    // (settings run from the back): a build another setting kills keeps the verdict and deciding check it had
    // before that companion existed.
    for (const GateCompanion& c : gate_companions(spec, true)) {
      const bool last = c.tag == "hd256 ";
      settings.insert(last ? settings.begin() : settings.end(),
                      {std::make_unique<Inputs>(load_inputs(c.spec)), c.tag, c.first_combination_only});
    }
    // The companion first: its cases take a second each, and most broken builds fail there already.
    std::vector<Case> cases;
    for (size_t s = settings.size(); s-- > 0;)
      for (size_t k = 0; k < (settings[s].first_only ? 1 : combos.size()); ++k) {
        const Softcap sc = combos[k];
        check_softcap_available(settings[s].in->model.config, sc, "--softcap");
        cases.push_back({"[" + settings[s].tag + softcap_name(sc) + "] ", settings[s].in.get(), sc, nullptr});
      }
    // The reference side of each setting's combinations side by side (check/parallel.hpp), as far as memory allows;
    // one setting after the other, so that the companion's quick cases do not hold threads the big ones could use.
    for (size_t s = settings.size(); s-- > 0;) {
      std::vector<std::function<void()>> tasks;
      for (Case& c : cases)
        if (c.in == settings[s].in.get())
          tasks.push_back([k = &c] {
            set_progress_tag(k->prefix);
            progress("reference side: " + k->in->source);
            ref::Output f64;  // filled by a task of the gate's own reference side
            k->ref = gate_reference(*k->in, k->sc, &f64, [&f64, k] {
              ref::RunOptions o;
              o.softcap = k->sc;
              o.keep_logits = true;
              f64 = ref::run(k->in->model, k->in->batch, o, k->in->micro_rows);
            });
          });
      run_tasks(std::move(tasks), workers_for_memory(working_set_bytes(*settings[s].in, true)));
    }
    const double ref_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("gate-mutants: %s, softcap %s, %zu builds; reference side %.1f s\n", spec.model->c_str(), softcap.c_str(),
                names.size(), ref_seconds);
    std::printf("%-34s %-9s %-7s %10s  %s\n", "build", "expected", "result", "value/tol", "check");
    std::vector<Verdict> vs;
    // The table is rewritten after every build, so that a run cut short by a time limit still leaves what it found.
    auto write_table = [&](bool complete) {
      if (!json_path) return;
      nlohmann::json j = nlohmann::json::array();
      for (const Verdict& v : vs)
        j.push_back({{"build", v.name}, {"caught", v.caught}, {"ratio", std::isfinite(v.ratio) ? nlohmann::json(v.ratio) : nlohmann::json("inf")},
                     {"check", v.check}, {"seconds", v.seconds}});
      write_json(*json_path, {{"model", *spec.model}, {"softcap", softcap}, {"builds", j}, {"complete", complete},
                              {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()},
                              {"reference_seconds", ref_seconds}});
    };
    int killed = 0, mutants = 0, harmless_ok = 0, harmless = 0;
    bool ok = true;
    for (const std::string& name : names) {
      progress("build " + name);
      Verdict v = run_child(name, (fs::path(dir) / (name + ".so")).string(), cases, timeout);
      const bool should_pass = name == "none" || name.rfind("harmless", 0) == 0;
      const bool good = should_pass ? !v.caught : (v.caught && v.ratio >= kKillMargin);
      ok &= good;
      if (should_pass) {
        ++harmless;
        harmless_ok += !v.caught;
      } else {
        ++mutants;
        killed += v.caught;
      }
      std::printf("%-34s %-9s %-7s %10.3g  %s%s\n", name.c_str(), should_pass ? "pass" : "fail",
                  v.caught ? "FAILED" : "passed", v.ratio, v.check.substr(0, 150).c_str(), good ? "" : "   <-- WRONG");
      std::fflush(stdout);
      vs.push_back(std::move(v));
      write_table(false);
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%d/%d mutants killed, %d/%d harmless builds passed; %.1f s\n", killed, mutants, harmless_ok, harmless, secs);
    write_table(true);
    return ok ? 0 : 1;
  } catch (const InputError& e) {
    std::fprintf(stderr, "gate-mutants: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gate-mutants: internal error: %s\n", e.what());
    return 3;
  }
}
