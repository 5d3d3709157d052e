// Option checks the command-line tools share (CLI11 validators).
#pragma once
#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdlib>
#include <string>

namespace gemma {

// CLI11 reads a seed with strtoull and checks neither its sign nor its range: "-1" became 2^64 - 1, and
// 18446744073709551616 (or any larger number) was clamped to 2^64 - 1, without a word. A user who typed either
// meant another seed. The range check reads the value as CLI11 then does (base 0: 0x.. and 0.. too).
inline const CLI::Validator kNonNegativeSeed(
    [](std::string& v) {
      if (v.find('-') != std::string::npos) return "a seed is a non-negative integer, got " + v;
      errno = 0;
      char* end = nullptr;
      std::strtoull(v.c_str(), &end, 0);
      if (errno == ERANGE) return "a seed is at most 2^64 - 1 = 18446744073709551615, got " + v;
      return std::string();
    },
    "SEED");

// "--lr ''" or "--lr=": CLI11 reads an empty value into a number as 0, or leaves the default, without a word (a
// probe trained at learning rate 0, saved nothing with --save-adapter '', ran the default --layers with --layers '').
// Returns "--flag: empty value" for the first option given one, else "". Every option of these tools takes a
// non-empty value (a file name, a number, a list), so none is exempt.
inline std::string empty_value_error(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--", 0) != 0 || a == "--") continue;
    const size_t eq = a.find('=');
    if (eq != std::string::npos) {
      if (eq + 1 == a.size()) return a.substr(0, eq) + ": empty value";
    } else if (i + 1 < argc && argv[i + 1][0] == '\0') {
      return a + ": empty value";
    }
  }
  return "";
}

}  // namespace gemma
