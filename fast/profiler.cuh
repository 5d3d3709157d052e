// The engine's profile (GEMMA_FAST_PROFILE=1): device time between consecutive marks on the compute stream, summed
// per segment name (the name of the mark that closes the segment), reported per step. Off, every call returns at
// once, so the marks cost nothing in a timed run.
#pragma once
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "fast/common.cuh"

namespace gemma::fast {
namespace {

struct Profiler {
  bool on = false;
  bool skip = false;   // the current step allocated its buffers: not a step to time
  int64_t steps = 0;   // steps summed into ms
  std::vector<std::pair<std::string, cudaEvent_t>> marks;
  std::map<std::string, double> ms;

  static Profiler from_environment() {
    Profiler p;
    const char* v = std::getenv("GEMMA_FAST_PROFILE");
    p.on = v && std::string(v) == "1";
    return p;
  }

  // The segment since the previous mark ends here and is called `name`.
  void mark(const std::string& name, cudaStream_t st) {
    if (!on) return;
    cudaEvent_t e;
    GEMMA_CUDA(cudaEventCreate(&e));
    GEMMA_CUDA(cudaEventRecord(e, st));
    marks.emplace_back(name, e);
  }
  void begin(cudaStream_t st) {
    if (!on) return;
    marks.clear();
    mark("", st);
  }
  // Waits for the stream, adds the segments' times (unless skip), frees the events.
  void end(cudaStream_t st) {
    if (!on) return;
    GEMMA_CUDA(cudaStreamSynchronize(st));
    for (size_t i = 1; i < marks.size() && !skip; ++i) {
      float t = 0;
      GEMMA_CUDA(cudaEventElapsedTime(&t, marks[i - 1].second, marks[i].second));
      ms[marks[i].first] += t;
    }
    for (auto& m : marks) GEMMA_CUDA(cudaEventDestroy(m.second));
    marks.clear();
  }
  // A forward-backward pass ended: it counts as a step unless it allocated.
  void count_step() {
    if (on && !skip) ++steps;
    skip = false;
  }

  // Segments by time per step, largest first, with their shares; empty when off or before a counted step.
  std::string report() const {
    if (!on || steps == 0) return "";
    double total = 0;
    std::vector<std::pair<double, std::string>> rows;
    for (const auto& [name, t] : ms) {
      total += t;
      rows.emplace_back(t / double(steps), name);
    }
    std::sort(rows.rbegin(), rows.rend());
    std::ostringstream o;
    char b[160];
    std::snprintf(b, sizeof b, "device time per step, %lld steps (events between segments):\n", (long long)steps);
    o << b;
    for (const auto& [t, name] : rows) {
      std::snprintf(b, sizeof b, "  %-52s %9.2f ms %5.1f%%\n", name.c_str(), t, 100.0 * t * double(steps) / total);
      o << b;
    }
    std::snprintf(b, sizeof b, "  %-52s %9.2f ms\n", "total", total / double(steps));
    o << b;
    return o.str();
  }
};

}  // namespace
}  // namespace gemma::fast
