// Host buffers for the solver's N x k matrices: 2 MiB-aligned anonymous mappings advised to
// transparent huge pages, kept in a bounded cache when freed so that the next refine of the same
// size reuses pages the process already owns (see host_cache.cpp for why).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ppu_cpu {

struct HostBlock {
  void* base = nullptr;  // 2 MiB-aligned (Linux), nullptr when empty
  size_t size = 0;       // bytes mapped: a multiple of 2 MiB
};

struct HostCacheStats {
  size_t cached_bytes = 0;   // held by the cache, not in use
  size_t cached_blocks = 0;
  size_t limit_bytes = 0;    // the most the cache holds
  uint64_t hits = 0;         // requests served from the cache
  uint64_t misses = 0;       // requests that mapped fresh memory
};

// A block of at least `nbytes` bytes: a cached one of a close size (at most a quarter larger
// than the request rounded up to 2 MiB, that bound rounded down to 2 MiB) when there is one, else
// a fresh mapping (after releasing the cache, when the first try fails). Throws std::bad_alloc
// when the mapping fails or nbytes is beyond any address space.
HostBlock host_acquire(size_t nbytes);
// Back to the cache (most recent first), or unmapped when it does not fit under the limit; the
// oldest cached blocks are unmapped to make room.
void host_release(HostBlock block);
// Unmaps every cached block (memory in use is not affected).
void host_empty_cache();
void host_set_limit(size_t bytes);
HostCacheStats host_cache_stats();
// Whether host_acquire maps memory here (Linux); elsewhere callers use their own allocator.
bool host_cache_available();

}  // namespace ppu_cpu
