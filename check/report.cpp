#include "check/report.hpp"

#include "model/atomic_file.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
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
  // XML 1.0 holds only #x9, #xA, #xD, #x20-#xD7FF, #xE000-#xFFFD and #x10000-#x10FFFF, as UTF-8; a file name may
  // hold anything (a probe's case path with \x01 or a lone \xff made the JUnit file unreadable to xmllint). Each
  // byte sequence that is not such a character becomes U+FFFD, as JSON's writer does (error_handler_t::replace).
  std::string r;
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = b[i];
    if (c < 0x80) {
      switch (c) {
        case '&': r += "&amp;"; break;
        case '<': r += "&lt;"; break;
        case '>': r += "&gt;"; break;
        case '"': r += "&quot;"; break;
        default: r += (c >= 0x20 || c == '\t' || c == '\n' || c == '\r') ? std::string(1, char(c)) : "\xEF\xBF\xBD";
      }
      ++i;
      continue;
    }
    // The length and the smallest code point of a well-formed sequence starting with c (0: not a lead byte).
    const size_t len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    uint32_t cp = len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
    bool ok = len != 0 && i + len <= n;
    for (size_t k = 1; ok && k < len; ++k) {
      ok = (b[i + k] & 0xC0) == 0x80;
      cp = (cp << 6) | (b[i + k] & 0x3F);
    }
    const uint32_t least = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
    ok = ok && cp >= least && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF) && cp != 0xFFFE && cp != 0xFFFF;
    if (ok) {
      r.append(s, i, len);
      i += len;
    } else {
      r += "\xEF\xBF\xBD";
      ++i;
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
  if (path == "-") fail(flag, "'-' (standard output) is not supported here: give a file name");
  if (fs::is_directory(path, ec)) fail(flag, "'" + path + "' is a directory, expected a file name");
  const fs::path dir = fs::path(path).parent_path();
  if (!dir.empty() && !fs::is_directory(dir, ec))
    fail(flag, "cannot write '" + path + "': directory '" + dir.string() + "' does not exist");
  // The file is written through a temporary one beside it: its directory must take new files.
  if (::access(dir.empty() ? "." : dir.c_str(), W_OK | X_OK) != 0)
    fail(flag, "cannot write '" + path + "': " + std::strerror(errno));
}

// A directory output (--output-dir, --save-adapter, --save-base), refused before the run as files are.
void check_output_dir(const std::string& path, const std::string& flag) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (path.empty()) fail(flag, "empty directory name");
  if (path == "-") fail(flag, "'-' is not a directory name");
  if (fs::exists(path, ec) && !fs::is_directory(path, ec)) fail(flag, "'" + path + "' exists and is not a directory");
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty() && !fs::is_directory(parent, ec))
    fail(flag, "cannot create '" + path + "': directory '" + parent.string() + "' does not exist");
  const std::string where = fs::is_directory(path, ec) ? path : parent.empty() ? "." : parent.string();
  if (::access(where.c_str(), W_OK | X_OK) != 0) fail(flag, "cannot write into '" + where + "': " + std::strerror(errno));
}

void check_output_paths(const std::vector<std::pair<std::string, std::string>>& files,
                        const std::vector<std::pair<std::string, std::string>>& dirs,
                        const std::vector<std::pair<std::string, std::string>>& inputs) {
  for (const auto& [flag, path] : files) check_output_path(path, flag);
  for (const auto& [flag, path] : dirs) check_output_dir(path, flag);
  std::vector<std::pair<std::string, std::string>> all = files;
  all.insert(all.end(), dirs.begin(), dirs.end());
  const auto same = [](const std::string& a, const std::string& b) {
    std::error_code e1, e2;
    return std::filesystem::weakly_canonical(a, e1) == std::filesystem::weakly_canonical(b, e2);
  };
  for (size_t i = 0; i < all.size(); ++i) {
    for (size_t j = 0; j < i; ++j)
      if (same(all[i].second, all[j].second)) fail(all[i].first, "'" + all[i].second + "' is also the path of " + all[j].first);
    for (const auto& [flag, path] : inputs)
      if (same(all[i].second, path))
        fail(all[i].first, "'" + all[i].second + "' is also the path of the input " + flag + ": writing it would replace it");
  }
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
