// Option checks the command-line tools share (CLI11 validators).
#pragma once
#include <CLI/CLI.hpp>
#include <string>

namespace gemma {

// CLI11 reads "-1" into an unsigned seed as 2^64 - 1 without a word; a user who typed it meant something else.
inline const CLI::Validator kNonNegativeSeed(
    [](std::string& v) { return v.find('-') != std::string::npos ? "a seed is a non-negative integer, got " + v : std::string(); },
    "SEED");

}  // namespace gemma
