// Shared by the harnesses: the readers under test take paths, so each input goes through a file.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace gemma::fuzz {

// One scratch file per process under /dev/shm (memory-backed: the harnesses write it on every input).
inline const std::string& scratch_path(const char* suffix) {
  static const std::string p = "/dev/shm/gemma-fuzz-" + std::to_string(::getpid()) + suffix;
  return p;
}

inline void write_file(const std::string& path, const uint8_t* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();  // the harness itself failing is not a finding about the reader
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
}

}  // namespace gemma::fuzz
