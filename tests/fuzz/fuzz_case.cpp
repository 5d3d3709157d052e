// libFuzzer harness: one HDF5 case file through read_case, the reader verify and train use. It must return
// a validated case or throw InputError; anything else (another exception, a crash, a sanitizer report, a
// hang) is a finding.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "model/casefile.hpp"
#include "model/errors.hpp"
#include "tests/fuzz/fuzz_util.hpp"

using namespace gemma;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = fuzz::scratch_path(".h5");
  fuzz::write_file(path, data, size);
  try {
    (void)read_case(path);
  } catch (const InputError&) {
  }
  return 0;
}

// A corrupt global heap can make libhdf5 spin forever; read_case's child gives up after this much CPU time.
// At the default (20 s) a few such inputs would eat a short fuzzing run; valid seeds need 10 ms.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  setenv("GEMMA_HDF5_CPU_SECONDS", "0.25", 0);
  return 0;
}
