// The fast trainer as a shared library with one C entry point, for the mutation harness (tools/gate_mutants.cpp):
// each deliberately broken build of fast/ is one such library, loaded into a child process of the harness and
// asked the gate's questions. Built only with -DGEMMA_FAST_MUTANT_LIB=ON; linked -Bsymbolic so that its calls into
// its own (mutated) code never resolve to the harness's copy of the trainer.
#include <cstdio>
#include <cstring>
#include <exception>

#include "fast/fast.hpp"

// 0 on success; otherwise the error's message in err (err_len bytes at most).
extern "C" __attribute__((visibility("default"))) int gemma_fast_gate_run(gemma::fast::GateRunArgs* args, char* err,
                                                                          size_t err_len) {
  gemma::fast::GateRunArgs& a = *args;
  try {
    *a.out = gemma::fast::gate_run(*a.ck, *a.micro, *a.opt, *a.adamw, *a.layers, *a.heads);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
  } catch (...) {
    std::snprintf(err, err_len, "unknown exception");
  }
  return 1;
}
