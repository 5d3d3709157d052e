// Checks and how they are reported: one line per check with value, tolerance and OK/FAIL, then
// "N/M checks passed" (the shape of ggml's test-backend-ops), plus JSON and JUnit XML for CI systems.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace gemma::check {

struct Check {
  std::string name;
  double value = 0;      // the measured error (NaN fails)
  double tolerance = 0;  // passes when value <= tolerance
  std::string why;       // where the tolerance comes from
  bool pass = false;
  // The check could not decide (a finite-difference estimate too uncertain to tell the two values apart): its own
  // line and JSON field, neither a pass nor a failure, so it never fails correct code and never passes a bug.
  bool unresolved = false;
};

struct Report {
  std::vector<Check> checks;

  // Records and prints a check; a NaN value never passes.
  const Check& add(std::string name, double value, double tolerance, std::string why, bool print = true);
  // Records and prints a check that could not decide (Check::unresolved).
  const Check& add_unresolved(std::string name, double value, double tolerance, std::string why);
  bool all_pass() const;  // no check failed (unresolved ones do not fail)
  int passed() const;
  int unresolved() const;
  void print_summary() const;  // "N/M checks passed" (and ", K unresolved")
};

// Relative error |a - b| / |b| (absolute when b is 0).
double rel_err(double a, double b);

// Refuses an output path before any work is done: its directory must exist and the path must not be a
// directory. `flag` names the option in the error ("--json: ...").
void check_output_path(const std::string& path, const std::string& flag);

// A tool's outputs, each (flag, path), refused before any work is done: every file by check_output_path, and any two
// (files or directories) that name one path ("--report: 'x' is also the path of --log"), which would otherwise
// leave only the last one written.
// `inputs`, each (flag, path) too: an output naming an input's path is refused, since writing it would replace
// the input (a probe's --json over its own --case file, --log over --data).
void check_output_paths(const std::vector<std::pair<std::string, std::string>>& files,
                        const std::vector<std::pair<std::string, std::string>>& dirs = {},
                        const std::vector<std::pair<std::string, std::string>>& inputs = {});

// `s` with &, <, > and " as XML / HTML entities (attribute values and text).
std::string xml_escape(const std::string& s);
// JUnit XML with one testcase per check; written atomically.
void write_junit(const std::string& path, const std::string& suite, const Report& r);
// Writes JSON text atomically to `path`, or to stdout for "-".
void write_json(const std::string& path, const nlohmann::json& j);
nlohmann::json checks_json(const Report& r);

// "<tool>: warning: <line>" on stderr for each of an input's warnings (Checkpoint::warnings): a key nobody knows,
// a key HF ignores that disagrees with one it reads. They never stop a run, and are never dropped.
void print_warnings(const std::string& tool, const std::vector<std::string>& warnings);

// "[ 12.3s] message" on stderr: progress for runs that take a while.
void progress(const std::string& message);
// Peak resident memory of this process in bytes.
double peak_rss_bytes();

}  // namespace gemma::check
