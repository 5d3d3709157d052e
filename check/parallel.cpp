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

// MemAvailable of /proc/meminfo in bytes, or 0 when unknown.
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
}  // namespace

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
    workers = std::max(1, std::min<int>(workers, int(queue_.size())));
  }
  // Takes tasks until none is queued or running (a running task may still add some), and keeps the first error.
  std::exception_ptr first;
  auto drain = [&] {
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
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
  };
  if (workers == 1) {
    drain();  // here, in the order the tasks were added, with the whole budget
  } else {
    // Every worker gets the same share (the remainder of the budget idles): which worker takes which task depends
    // on timing, and a task's threads must not, since Eigen's products block their sums by the thread count.
    const int share = budget / workers;
    const std::string tag = tls_tag;
    std::vector<std::thread> pool;
    for (int w = 0; w < workers; ++w)
      pool.emplace_back([&] {
        // A new thread's OpenMP settings are the process defaults, not the parent's: set its share explicitly.
        omp_set_num_threads(share);
        tls_tag = tag;
        drain();
      });
    for (auto& t : pool) t.join();
  }
  if (first) std::rethrow_exception(first);
}

void run_tasks(std::vector<std::function<void()>> tasks, int max_workers) {
  TaskGroup g;
  for (auto& t : tasks) g.add(std::move(t));
  g.run(max_workers);
}

int workers_for_memory(double bytes_each) {
  const double free_bytes = available_memory_bytes();
  return free_bytes > 0 && bytes_each > 0 ? std::max(1, int(free_bytes / bytes_each)) : 1;
}

}  // namespace gemma::check
