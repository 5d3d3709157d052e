// Errors every reader and tool shares. An InputError is bad input (a file, tensor, flag or value the tool
// cannot use): tools print its message as one line and exit 2. Anything else escaping is a bug.
#pragma once
#include <stdexcept>
#include <string>

namespace gemma {

struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An input error is printed as one line: names taken from a file (a tensor called "a\nb", a JSON key) must
// not break it, nor flood the terminal. Control bytes are escaped and the message is cut at 1000 bytes.
inline std::string one_line(const std::string& s) {
  static const char* hex = "0123456789abcdef";
  std::string r;
  for (unsigned char ch : s) {
    if (r.size() >= 1000) return r + "... (" + std::to_string(s.size()) + " bytes in all)";
    if (ch < 0x20 || ch == 0x7f) {
      r += "\\x";
      r += hex[ch >> 4];
      r += hex[ch & 15];
    } else {
      r += char(ch);
    }
  }
  return r;
}

// "where: what" is the one format for every input error, so a user always sees the file (or flag) first.
[[noreturn]] inline void fail(const std::string& where, const std::string& what) {
  throw InputError(one_line(where + ": " + what));
}

}  // namespace gemma
