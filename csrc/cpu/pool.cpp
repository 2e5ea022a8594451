// A small thread pool for the CPU kernels, in place of an OpenMP parallel-for.
//
// Why not OpenMP: a `#pragma omp parallel for` ends in a barrier that waits for every thread of
// the team, including one the OS has not scheduled yet. On a machine where another process keeps
// a core busy, that made 2 threads 10-50x slower than 1 on small problems (the worker had to be
// woken, scheduled and to arrive, every call). Here the calling thread claims ranges too, helpers
// join only while the job is open, and the caller waits only for helpers that already joined (and
// so are running): a helper that wakes late finds the job closed and goes back to sleep, and the
// caller has done its share. Ranges are fixed by (n, k) and their partial sums combined in range
// order by the caller of this pool, so results never depend on who ran which range.
#include <pthread.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>
#include <atomic>

#include "params.h"

namespace ppu_cpu {
namespace {

class Pool {
 public:
  // Runs the job on the caller plus up to `helpers` pool threads. Returns false (nothing run)
  // when another thread is using the pool; the caller then runs the job alone.
  bool run(int64_t nranges, int helpers, RangeFn fn, const void* ctx) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      // A refusal may have been a moment's (other processes held the limit's threads then): a
      // later call tries again, at most once per kRetryAfter, so that a process that met it once
      // does not stay on fewer threads for good, nor pays a failed thread creation every call.
      if (refused_ && std::chrono::steady_clock::now() - refused_at_ >= kRetryAfter)
        refused_ = false;
      while (static_cast<int>(threads_.size()) < helpers && !refused_) {
        try {
          threads_.emplace_back([this] { worker(); });
        } catch (const std::system_error&) {
          // The OS refuses another thread (a container's or ulimit's process limit): run with
          // the helpers there are, as a smaller num_threads would, rather than fail the call.
          refused_ = true;
          refused_at_ = std::chrono::steady_clock::now();
          break;
        }
        threads_.back().detach();
      }
      if (static_cast<int>(threads_.size()) < helpers) helpers = static_cast<int>(threads_.size());
      fn_ = fn;
      ctx_ = ctx;
      nranges_ = nranges;
      next_.store(0, std::memory_order_relaxed);
      want_ = helpers;
      joined_ = 0;
      open_ = true;
      ++gen_;
    }
    cv_work_.notify_all();
    claim(fn, ctx, nranges);
    std::unique_lock<std::mutex> lk(mu_);
    open_ = false;  // helpers not yet started stay out; wait for those that joined
    cv_done_.wait(lk, [this] { return active_ == 0; });
    return true;
  }

  int size() {
    std::lock_guard<std::mutex> lk(mu_);
    return static_cast<int>(threads_.size());
  }

 private:
  void claim(RangeFn fn, const void* ctx, int64_t nranges) {
    for (;;) {
      const int64_t r = next_.fetch_add(1, std::memory_order_relaxed);
      if (r >= nranges) return;
      fn(ctx, r);
    }
  }

  void worker() {
    std::unique_lock<std::mutex> lk(mu_);
    uint64_t seen = 0;
    for (;;) {
      cv_work_.wait(lk, [&] { return open_ && gen_ != seen && joined_ < want_; });
      seen = gen_;
      ++joined_;
      ++active_;
      const RangeFn fn = fn_;
      const void* ctx = ctx_;
      const int64_t nranges = nranges_;
      lk.unlock();
      claim(fn, ctx, nranges);
      lk.lock();
      if (--active_ == 0) cv_done_.notify_all();
    }
  }

  std::mutex run_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> threads_;
  RangeFn fn_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t nranges_ = 0;
  std::atomic<int64_t> next_{0};
  uint64_t gen_ = 0;
  int want_ = 0, joined_ = 0, active_ = 0;
  bool open_ = false;
  bool refused_ = false;  // thread creation failed at refused_at_
  std::chrono::steady_clock::time_point refused_at_;
  static constexpr std::chrono::seconds kRetryAfter{1};
};

// Never destroyed: its threads are detached and blocked on a condition variable at exit. A forked
// child gets a fresh pool (the parent's threads do not exist there, and a mutex may have been
// copied locked).
Pool* g_pool = nullptr;
std::once_flag g_once;

void reset_after_fork() { g_pool = new Pool(); }

Pool& pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, reset_after_fork);
  });
  return *g_pool;
}

}  // namespace

int pool_threads() { return pool().size(); }

void parallel_ranges(int64_t nranges, int nthreads, RangeFn fn, const void* ctx) {
  const int64_t helpers = (nthreads < nranges ? nthreads : nranges) - 1;
  if (helpers < 1 || !pool().run(nranges, static_cast<int>(helpers), fn, ctx)) {
    for (int64_t r = 0; r < nranges; ++r) fn(ctx, r);
  }
}

}  // namespace ppu_cpu
