#include "check/parallel.hpp"

#include <omp.h>

#include <algorithm>
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

void TaskGroup::add(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(m_);
    queue_.push_back(std::move(task));
  }
  cv_.notify_one();
}

void TaskGroup::run(int max_workers) {
  const int budget = std::max(1, omp_get_max_threads());
  int workers = budget;
  if (max_workers > 0) workers = std::min(workers, max_workers);
  {
    std::lock_guard<std::mutex> lock(m_);
    workers = std::min<int>(workers, int(queue_.size()));
  }
  // One worker: the tasks run here, in the order they were added, with the whole budget.
  if (workers <= 1) {
    std::exception_ptr first;
    for (;;) {
      std::function<void()> t;
      {
        std::lock_guard<std::mutex> lock(m_);
        if (queue_.empty()) break;
        t = std::move(queue_.front());
        queue_.pop_front();
      }
      try {
        t();
      } catch (...) {
        if (!first) first = std::current_exception();
      }
    }
    if (first) std::rethrow_exception(first);
    return;
  }
  // Every worker gets the same share (the remainder of the budget idles): which worker takes which task depends on
  // timing, and a task's threads must not, since Eigen's products block their sums by the thread count.
  const int share = budget / workers;
  std::exception_ptr first;
  const std::string tag = tls_tag;
  std::vector<std::thread> pool;
  for (int w = 0; w < workers; ++w)
    pool.emplace_back([&] {
      // A new thread's OpenMP settings are the process defaults, not the parent's: set its share explicitly.
      omp_set_num_threads(share);
      tls_tag = tag;
      std::unique_lock<std::mutex> lock(m_);
      for (;;) {
        // Wait while nothing is queued but a running task may still add work.
        cv_.wait(lock, [&] { return !queue_.empty() || running_ == 0; });
        if (queue_.empty()) break;
        std::function<void()> t = std::move(queue_.front());
        queue_.pop_front();
        ++running_;
        lock.unlock();
        try {
          t();
        } catch (...) {
          lock.lock();
          if (!first) first = std::current_exception();
          lock.unlock();
        }
        lock.lock();
        --running_;
        cv_.notify_all();
      }
      cv_.notify_all();
    });
  for (auto& t : pool) t.join();
  if (first) std::rethrow_exception(first);
}

void run_tasks(std::vector<std::function<void()>> tasks, int max_workers) {
  TaskGroup g;
  for (auto& t : tasks) g.add(std::move(t));
  g.run(max_workers);
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
