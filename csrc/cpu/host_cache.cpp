// A bounded cache of host buffers for the solver's N x k matrices.
//
// Why: the kernel zeroes every page a process touches for the first time, and a refine writes a
// fresh N x k result. With glibc's allocator that first touch was paid or not depending on the
// heap's history: in a loop holding each result until the next call returned, a 50,000 x 100
// refine took 9.6 ms in one process and 13.5 ms (306 page faults per call) in another, and every
// buffer above glibc's largest mmap threshold (32 MiB) came from, and went back to, the kernel on
// each call (1,000,000 x 100: 158 ms, against 143 ms from this cache; docs/solver.md). Here every
// buffer is its own mapping, 2 MiB-aligned and advised to transparent huge pages before anything
// touches it (one fault per 2 MiB instead of 512), and a freed buffer stays mapped in a cache, up
// to a limit, for the next request of a close size: the same idea as PyTorch's CUDA caching
// allocator, with ppu_fast.empty_host_cache() as its torch.cuda.empty_cache().
#include "host_cache.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace ppu_cpu {
namespace {

constexpr size_t kHuge = size_t(1) << 21;

size_t round_up(size_t n) { return (n + kHuge - 1) / kHuge * kHuge; }

#if defined(__linux__)
// The memory limit of this process's cgroup (v2 memory.max, else v1 memory.limit_in_bytes), or 0
// when there is none: in a container, _SC_PHYS_PAGES reports the host's memory.
size_t cgroup_limit() {
  for (const char* path : {"/sys/fs/cgroup/memory.max",
                           "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::FILE* f = std::fopen(path, "r");
    if (f == nullptr) continue;
    unsigned long long v = 0;
    const int got = std::fscanf(f, "%llu", &v);  // "max" (no limit) reads nothing
    std::fclose(f);
    if (got == 1 && v > 0) return static_cast<size_t>(v);
  }
  return 0;
}
#endif

// The smaller of 4 GiB and an eighth of the memory this process may use.
size_t default_limit() {
  size_t limit = size_t(4) << 30;
#if defined(__linux__)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) limit = std::min(limit, size_t(pages) * size_t(page) / 8);
  const size_t cg = cgroup_limit();
  if (cg > 0) limit = std::min(limit, cg / 8);
#endif
  return limit;
}

struct State {
  std::mutex mu;
  std::vector<HostBlock> blocks;  // cached, oldest first
  size_t cached = 0;
  size_t limit = default_limit();
  uint64_t hits = 0, misses = 0;
};

State* g_state = nullptr;
std::once_flag g_once;

#if defined(__linux__)
// fork() while another thread holds the mutex would leave the child a locked copy: the handlers
// hold it across the fork, and both sides release it (the forking thread owns it in the child
// too). The child keeps the parent's cached blocks, which are its own copy-on-write mappings.
void lock_before_fork() { g_state->mu.lock(); }
void unlock_after_fork() { g_state->mu.unlock(); }
#endif

State& state() {
  std::call_once(g_once, [] {
    g_state = new State();
#if defined(__linux__)
    pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork);
#endif
  });
  return *g_state;
}

// Moves the oldest cached blocks to `out` until `more` bytes fit under the limit (or none is
// left); the caller unmaps them outside the lock. Call with s.mu held.
void evict_for(State& s, size_t more, std::vector<HostBlock>& out) {
  size_t drop = 0;
  while (drop < s.blocks.size() && s.cached + more > s.limit) {
    s.cached -= s.blocks[drop].size;
    out.push_back(s.blocks[drop++]);
  }
  s.blocks.erase(s.blocks.begin(), s.blocks.begin() + static_cast<std::ptrdiff_t>(drop));
}

void unmap(const HostBlock& b) {
#if defined(__linux__)
  munmap(b.base, b.size);
#endif
}

HostBlock map_fresh(size_t size) {
#if defined(__linux__)
  // Map one huge page more than needed and trim the two ends, so the block starts on a 2 MiB
  // boundary: only whole, aligned 2 MiB ranges can be backed by huge pages.
  const size_t span = size + kHuge;
  void* p = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  const uintptr_t aligned = (start + kHuge - 1) & ~uintptr_t(kHuge - 1);
  if (aligned > start) munmap(p, aligned - start);
  const size_t tail = (start + span) - (aligned + size);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + size), tail);
#if defined(MADV_HUGEPAGE)
  madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);  // refused under THP "never"
#endif
  return HostBlock{reinterpret_cast<void*>(aligned), size};
#else
  (void)size;
  throw std::bad_alloc();
#endif
}

}  // namespace

bool host_cache_available() {
#if defined(__linux__)
  return true;
#else
  return false;
#endif
}

HostBlock host_acquire(size_t nbytes) {
  // Beyond this, rounding up (and mmap's extra huge page) would wrap around.
  if (nbytes > static_cast<size_t>(PTRDIFF_MAX) - 2 * kHuge) throw std::bad_alloc();
  const size_t need = round_up(std::max<size_t>(nbytes, 1));
  State& s = state();
  {
    std::lock_guard<std::mutex> lk(s.mu);
    // The smallest cached block that fits and is at most a quarter larger than the request
    // (rounded down to 2 MiB, so a block of 2 or 4 MiB serves its own size only); the most
    // recently freed one among equals (its pages are the likeliest to be in cache).
    const size_t most = std::max(need, (need + need / 4) / kHuge * kHuge);
    size_t best = s.blocks.size();
    for (size_t i = s.blocks.size(); i-- > 0;) {
      const size_t sz = s.blocks[i].size;
      if (sz >= need && sz <= most && (best == s.blocks.size() || sz < s.blocks[best].size))
        best = i;
    }
    if (best != s.blocks.size()) {
      HostBlock b = s.blocks[best];
      s.blocks.erase(s.blocks.begin() + static_cast<std::ptrdiff_t>(best));
      s.cached -= b.size;
      ++s.hits;
      return b;
    }
    ++s.misses;
  }
  try {
    return map_fresh(need);
  } catch (const std::bad_alloc&) {
    // Cached blocks that could not serve this request may be what stands in the way (an address
    // space or memory limit): release them and try once more, as PyTorch's CUDA allocator does.
    host_empty_cache();
    return map_fresh(need);
  }
}

void host_release(HostBlock block) {
  if (block.base == nullptr) return;
  std::vector<HostBlock> evicted;
  State& s = state();
  {
    std::lock_guard<std::mutex> lk(s.mu);
    if (block.size > s.limit) {
      evicted.push_back(block);
    } else {
      evict_for(s, block.size, evicted);
      s.blocks.push_back(block);
      s.cached += block.size;
    }
  }
  for (const HostBlock& b : evicted) unmap(b);  // outside the lock: munmap of 1 GB takes a while
}

void host_empty_cache() {
  std::vector<HostBlock> evicted;
  State& s = state();
  {
    std::lock_guard<std::mutex> lk(s.mu);
    evicted.swap(s.blocks);
    s.cached = 0;
  }
  for (const HostBlock& b : evicted) unmap(b);
}

void host_set_limit(size_t bytes) {
  // Blocks above the new limit go now, oldest first.
  std::vector<HostBlock> evicted;
  State& s = state();
  {
    std::lock_guard<std::mutex> lk(s.mu);
    s.limit = bytes;
    evict_for(s, 0, evicted);
  }
  for (const HostBlock& b : evicted) unmap(b);
}

HostCacheStats host_cache_stats() {
  State& s = state();
  std::lock_guard<std::mutex> lk(s.mu);
  HostCacheStats out;
  out.cached_bytes = s.cached;
  out.cached_blocks = s.blocks.size();
  out.limit_bytes = s.limit;
  out.hits = s.hits;
  out.misses = s.misses;
  return out;
}

}  // namespace ppu_cpu
