// libFuzzer harness: one .safetensors file, then the checkpoint validation every loader applies (against
// the tiny test config, so a mutated copy of a valid seed reaches the shape, name and finiteness checks).
// Every tensor's bytes are read: an offset the reader failed to bound shows as a fault here.
#include <cstdint>
#include <string>

#include "model/errors.hpp"
#include "model/safetensors.hpp"
#include "tests/fuzz/fuzz_util.hpp"
#include "tests/tiny_case.hpp"

using namespace gemma;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = fuzz::scratch_path(".safetensors");
  fuzz::write_file(path, data, size);
  try {
    Checkpoint ck;
    ck.config = test::tiny_config();
    ck.weights = read_safetensors(path);
    volatile double sink = 0;
    for (const auto& [name, t] : ck.weights)
      for (int64_t i = 0; i < t.numel(); ++i) sink = sink + t.at(i);
    validate_checkpoint(ck, path);
  } catch (const InputError&) {
  }
  return 0;
}
