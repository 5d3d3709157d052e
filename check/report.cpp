#include "check/report.hpp"

#include "model/atomic_file.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "check/parallel.hpp"
#include "model/errors.hpp"

namespace gemma::check {

const Check& Report::add(std::string name, double value, double tolerance, std::string why, bool print) {
  Check c{std::move(name), value, tolerance, std::move(why), std::isfinite(value) && value <= tolerance};
  checks.push_back(c);
  if (print) std::printf("  %-72s %11.3e  tol %9.2e  %s\n", c.name.c_str(), c.value, c.tolerance, c.pass ? "OK" : "FAIL");
  std::fflush(stdout);
  return checks.back();
}

const Check& Report::add_unresolved(std::string name, double value, double tolerance, std::string why) {
  Check c{std::move(name), value, tolerance, std::move(why), false, true};
  checks.push_back(c);
  std::printf("  %-72s %11.3e  tol %9.2e  UNRESOLVED\n", c.name.c_str(), c.value, c.tolerance);
  std::fflush(stdout);
  return checks.back();
}

bool Report::all_pass() const { return passed() + unresolved() == int(checks.size()); }

int Report::unresolved() const {
  int n = 0;
  for (const auto& c : checks) n += c.unresolved;
  return n;
}

int Report::passed() const {
  int n = 0;
  for (const auto& c : checks) n += c.pass;
  return n;
}

void Report::print_summary() const {
  if (unresolved() > 0)
    std::printf("%d/%zu checks passed, %d unresolved (not a failure: the check could not decide)\n", passed(),
                checks.size(), unresolved());
  else
    std::printf("%d/%zu checks passed\n", passed(), checks.size());
}

double rel_err(double a, double b) {
  const double d = std::fabs(a - b);
  return b == 0 ? d : d / std::fabs(b);
}

std::string xml_escape(const std::string& s) {
  std::string r;
  for (char ch : s) {
    switch (ch) {
      case '&': r += "&amp;"; break;
      case '<': r += "&lt;"; break;
      case '>': r += "&gt;"; break;
      case '"': r += "&quot;"; break;
      default: r += ch;
    }
  }
  return r;
}


namespace {

}  // namespace

void check_output_path(const std::string& path, const std::string& flag) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (path.empty()) fail(flag, "empty file name");
  if (fs::is_directory(path, ec)) fail(flag, "'" + path + "' is a directory, expected a file name");
  const fs::path dir = fs::path(path).parent_path();
  if (!dir.empty() && !fs::is_directory(dir, ec))
    fail(flag, "cannot write '" + path + "': directory '" + dir.string() + "' does not exist");
}

void check_output_paths(const std::vector<std::pair<std::string, std::string>>& files,
                        const std::vector<std::pair<std::string, std::string>>& dirs) {
  for (const auto& [flag, path] : files) check_output_path(path, flag);
  std::vector<std::pair<std::string, std::string>> all = files;
  all.insert(all.end(), dirs.begin(), dirs.end());
  for (size_t i = 0; i < all.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (std::error_code e1, e2; std::filesystem::weakly_canonical(all[i].second, e1) ==
                                  std::filesystem::weakly_canonical(all[j].second, e2))
        fail(all[i].first, "'" + all[i].second + "' is also the path of " + all[j].first);
}

void write_junit(const std::string& path, const std::string& suite, const Report& r) {
  std::string x = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  x += "<testsuites>\n<testsuite name=\"" + xml_escape(suite) + "\" tests=\"" + std::to_string(r.checks.size()) +
       "\" failures=\"" + std::to_string(r.checks.size() - size_t(r.passed() + r.unresolved())) + "\" skipped=\"" +
       std::to_string(r.unresolved()) + "\">\n";
  for (const auto& c : r.checks) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "value %.6e, tolerance %.3e", c.value, c.tolerance);
    x += "  <testcase classname=\"" + xml_escape(suite) + "\" name=\"" + xml_escape(c.name) + "\">";
    if (c.unresolved) x += "<skipped message=\"unresolved: " + xml_escape(buf) + "\"/>";
    else if (!c.pass) x += "<failure message=\"" + xml_escape(buf) + "\">" + xml_escape(c.why) + "</failure>";
    x += "<system-out>" + xml_escape(std::string(buf) + "; " + c.why) + "</system-out></testcase>\n";
  }
  x += "</testsuite>\n</testsuites>\n";
  write_text_file_atomically(path, x);
}

void write_json(const std::string& path, const nlohmann::json& j) {
  // NaN and infinity are not JSON: they are written as null.
  const std::string text = j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  if (path == "-") {
    std::cout << text;
    return;
  }
  write_text_file_atomically(path, text);
}

nlohmann::json checks_json(const Report& r) {
  nlohmann::json a = nlohmann::json::array();
  for (const auto& c : r.checks) {
    nlohmann::json o = {{"name", c.name}, {"tolerance", c.tolerance}, {"pass", c.pass}, {"unresolved", c.unresolved},
                        {"why", c.why}};
    o["value"] = std::isfinite(c.value) ? nlohmann::json(c.value) : nlohmann::json(nullptr);
    a.push_back(o);
  }
  return a;
}

void print_warnings(const std::string& tool, const std::vector<std::string>& warnings) {
  for (const std::string& w : warnings) std::fprintf(stderr, "%s: warning: %s\n", tool.c_str(), w.c_str());
  std::fflush(stderr);
}

void progress(const std::string& message) {
  static const auto t0 = std::chrono::steady_clock::now();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "[%6.1fs] %s%s\n", s, progress_tag().c_str(), message.c_str());
  std::fflush(stderr);
}

double peak_rss_bytes() {
  struct rusage u {};
  ::getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) * 1024.0;
}

}  // namespace gemma::check
