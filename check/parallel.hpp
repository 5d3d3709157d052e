// Independent pieces of reference work side by side, within the calling thread's OpenMP thread budget.
//
// The float64 reference's products are Eigen GEMMs of a few dozen rows (the gate's micro-batches), whose own
// threading stops scaling long before a 16-core host is busy; the gate's reference side is many such computations
// that do not depend on each other (the softcap combinations, the precision policy's correct variants, the
// layer-by-layer probes). Running them as tasks, each with a share of the threads, is where the cores go.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

namespace gemma::check {

// Runs every task and returns when all have finished. The calling thread's budget (omp_get_max_threads(), which
// is OMP_NUM_THREADS or the core count) is split: min(tasks, budget) workers take tasks in order, each worker's
// OpenMP regions (the reference's loops, Eigen's products) using budget / workers threads (the same for every
// worker, so a task's arithmetic does not depend on which worker took it), so that a task calling run_tasks again
// splits its own share. With a budget of 1 the tasks run here, one after another. The first
// exception a task throws is rethrown here after every worker has stopped (the other tasks still run).
// `max_workers` (0: no limit) caps the workers, e.g. by memory.
void run_tasks(std::vector<std::function<void()>> tasks, int max_workers = 0);

// Tasks that may add further tasks: a task that others depend on adds them when it is done, so that no worker
// waits for a whole phase to finish. run() returns when no task is queued or running; the thread budget is split
// as by run_tasks, among min(budget, max_workers, tasks queued when run() starts) workers (one task runs at a time
// on each), every worker with the same share. The first exception a task throws is rethrown by run() after every
// worker has stopped.
class TaskGroup {
 public:
  void add(std::function<void()> task);  // from any thread, a running task's included
  void run(int max_workers = 0);

 private:
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  int running_ = 0;
};

// A label that progress() puts in front of this thread's messages ("[attn,logits] "), inherited by the workers
// of run_tasks called from this thread. Empty by default.
void set_progress_tag(const std::string& tag);
const std::string& progress_tag();

// How many tasks of `bytes_each` the memory available to new allocations (MemAvailable of /proc/meminfo) holds side
// by side: at least 1; 1 when unknown. For run_tasks' max_workers.
int workers_for_memory(double bytes_each);

}  // namespace gemma::check
