#include "check/parallel.hpp"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

namespace gemma::check {

namespace {
thread_local std::string tls_tag;
}

void set_progress_tag(const std::string& tag) { tls_tag = tag; }
const std::string& progress_tag() { return tls_tag; }

void run_tasks(std::vector<std::function<void()>> tasks, int max_workers) {
  const int budget = std::max(1, omp_get_max_threads());
  int workers = std::min<int>(budget, int(tasks.size()));
  if (max_workers > 0) workers = std::min(workers, max_workers);
  if (workers <= 1) {
    for (auto& t : tasks) t();
    return;
  }
  // Every worker gets the same share (the remainder of the budget idles): which worker takes which task depends on
  // timing, and a task's threads must not, since Eigen's products block their sums by the thread count.
  const int share = budget / workers;
  std::atomic<size_t> next{0};
  std::exception_ptr first;
  std::mutex m;
  const std::string tag = tls_tag;
  std::vector<std::thread> pool;
  for (int w = 0; w < workers; ++w)
    pool.emplace_back([&] {
      // A new thread's OpenMP settings are the process defaults, not the parent's: set its share explicitly.
      omp_set_num_threads(share);
      tls_tag = tag;
      for (size_t i; (i = next.fetch_add(1)) < tasks.size();) {
        try {
          tasks[i]();
        } catch (...) {
          std::lock_guard<std::mutex> lock(m);
          if (!first) first = std::current_exception();
        }
      }
    });
  for (auto& t : pool) t.join();
  if (first) std::rethrow_exception(first);
}

double available_memory_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("MemAvailable:", 0) == 0) {
      std::istringstream s(line.substr(13));
      double kb = 0;
      if (s >> kb) return kb * 1024.0;
    }
  return 0;
}

}  // namespace gemma::check
