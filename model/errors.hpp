// Errors every reader and tool shares. An InputError is bad input (a file, tensor, flag or value the tool
// cannot use): tools print its message as one line and exit 2. Anything else escaping is a bug.
#pragma once
#include <stdexcept>
#include <string>

namespace gemma {

struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "where: what" is the one format for every input error, so a user always sees the file (or flag) first.
[[noreturn]] inline void fail(const std::string& where, const std::string& what) {
  throw InputError(where + ": " + what);
}

}  // namespace gemma
