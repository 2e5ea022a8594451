// Host-side emulation of the CUDA subset used by csrc/cuda (tests only; never part of the build
// of ppu_fast._cuda: CMake globs csrc/cuda/*.cu and *.cpp, not this folder).
//
// With -DPPU_CUDA_EMULATE the kernels compile as plain C++ (g++ -x c++) and run on the CPU: each
// block's threads are cooperative fibers (ucontext) on one OS thread, blocks run one after the
// other. __syncthreads, named barriers (bar.sync id, n), and warp shuffles / votes are barriers
// among the participating fibers, so the emulation runs the kernels' real control flow, index
// arithmetic and reduction orders; it reports a barrier that not every participant reaches
// (divergent __syncthreads, a shuffle without the full warp) as a deadlock, and global-memory
// accesses can run under AddressSanitizer. It does not model timing, the memory model between
// fibers that skip a barrier, or float rounding of the device's expf / logf (the host's libm is
// used). __shared__ becomes a function-local static: shared by the block's fibers, but it keeps
// its contents from the previous block.
//
// Used by csrc/cuda/emu/build.sh (a Python module _cuda from the same sources, on CPU pointers) and
// tests/test_backend_cuda.py::test_emulated_* (opt-in: PPU_FAST_CUDA_EMU=1).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- language -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

namespace ppu_emu {
inline dim3& tidx() { static dim3 v; return v; }
inline dim3& bidx() { static dim3 v; return v; }
inline dim3& bdim() { static dim3 v; return v; }
inline dim3& gdim() { static dim3 v; return v; }
}  // namespace ppu_emu
#define threadIdx (::ppu_emu::tidx())
#define blockIdx (::ppu_emu::bidx())
#define blockDim (::ppu_emu::bdim())
#define gridDim (::ppu_emu::gdim())

// ---- half / bfloat16 ------------------------------------------------------------------------
struct __half {
  _Float16 v;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u)  // NaN stays a (quiet) NaN
    return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// ---- math and bit intrinsics ----------------------------------------------------------------
using std::fabs;
using std::fmax;
using std::fmaxf;
using std::isfinite;
using std::isnan;
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __double2float_rn(double d) { return static_cast<float>(d); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, 8);
  return d;
}
inline long long __double_as_longlong(double d) {
  long long v;
  std::memcpy(&v, &d, 8);
  return v;
}
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline int __float_as_int(float f) {
  int v;
  std::memcpy(&v, &f, 4);
  return v;
}

// ---- the fiber scheduler --------------------------------------------------------------------
namespace ppu_emu {

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int state = 0;  // 0 runnable, 1 waiting, 2 done
  Barrier* wait_on = nullptr;
  uint64_t wait_gen = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t main;
  int cur = -1;
  Barrier block_bar;
  std::vector<Barrier> warp_bars;
  std::map<int, Barrier> named;
  std::vector<uint64_t> xch;  // 32 words per warp
  std::function<void()> body;
};

inline Block*& current() {
  static Block* b = nullptr;
  return b;
}

inline size_t stack_size() { return 256 * 1024; }

// Fiber stacks, allocated once (uninitialised) for the largest block seen.
inline char* stacks(int nt) {
  static char* mem = nullptr;
  static int have = 0;
  if (nt > have) {
    delete[] mem;
    mem = new char[static_cast<size_t>(nt) * stack_size()];
    have = nt;
  }
  return mem;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "ppu_emu: %s\n", what);
  std::abort();
}

inline void fiber_entry() {
  Block* b = current();
  b->body();
  b->fibers[b->cur].state = 2;
  swapcontext(&b->fibers[b->cur].ctx, &b->main);
}

// Arrive at barrier `bar` (expected participants set by the caller) and wait for the others.
inline void arrive(Barrier& bar, int expected) {
  Block* b = current();
  if (bar.arrived == 0) bar.expected = expected;
  if (bar.expected != expected) fail("barrier participant count mismatch");
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.gen;
    return;  // the others become runnable (their generation moved on)
  }
  Fiber& f = b->fibers[b->cur];
  f.state = 1;
  f.wait_on = &bar;
  f.wait_gen = bar.gen;
  swapcontext(&f.ctx, &b->main);
}

inline void run_block(dim3 block, const std::function<void()>& body) {
  Block b;
  const int nt = static_cast<int>(block.x * block.y * block.z);
  b.fibers.resize(nt);
  char* stk = stacks(nt);
  b.warp_bars.resize((nt + 31) / 32);
  b.xch.assign(static_cast<size_t>((nt + 31) / 32) * 32, 0);
  b.body = body;
  Block* prev = current();
  current() = &b;
  for (int t = 0; t < nt; ++t) {
    Fiber& f = b.fibers[t];
    f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stk + static_cast<size_t>(t) * stack_size();
    f.ctx.uc_stack.ss_size = stack_size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  int done = 0;
  while (done < nt) {
    bool progressed = false;
    for (int t = 0; t < nt; ++t) {
      Fiber& f = b.fibers[t];
      if (f.state == 2) continue;
      if (f.state == 1) {
        if (f.wait_on->gen == f.wait_gen) continue;
        f.state = 0;
      }
      b.cur = t;
      tidx() = f.tid;
      swapcontext(&b.main, &f.ctx);
      progressed = true;
      if (f.state == 2) ++done;
    }
    if (!progressed) {
      current() = prev;
      throw std::runtime_error("emu: deadlock (a barrier or warp collective that not every "
                               "participant reaches)");
    }
  }
  current() = prev;
}

inline int lane_id() { return static_cast<int>(tidx().x) & 31; }
inline int warp_id() { return static_cast<int>(tidx().x) >> 5; }

inline void warp_sync_all(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp collectives are modelled");
  Block* b = current();
  arrive(b->warp_bars[warp_id()], 32);
}

template <typename T>
T shfl_generic(unsigned mask, T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  Block* b = current();
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  const int base = warp_id() * 32;
  b->xch[base + lane_id()] = raw;
  warp_sync_all(mask);
  const uint64_t got = b->xch[base + (src_lane & 31)];
  warp_sync_all(mask);  // everyone read before the slots are reused
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

inline void named_barrier(int id, int count) { arrive(current()->named[id], count); }

// Kernel registry: cudaLaunchKernel gets a plain pointer; the invoker unpacks the argument array
// with the kernel's own parameter types.
using Invoker = std::function<void(void**)>;
inline std::map<const void*, Invoker>& registry() {
  static std::map<const void*, Invoker> r;
  return r;
}

template <typename... A, size_t... I>
void invoke(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <typename... A>
const void* kernel_ptr(void (*f)(A...)) {
  const void* key = reinterpret_cast<const void*>(f);
  registry()[key] = [f](void** args) { invoke(f, args, std::index_sequence_for<A...>{}); };
  return key;
}

// Emulated device: SM count and blocks per SM (small, so that grid-stride loops iterate).
inline int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : dflt;
}

}  // namespace ppu_emu

inline void __syncthreads() {
  ppu_emu::Block* b = ppu_emu::current();
  ppu_emu::arrive(b->block_bar, static_cast<int>(b->fibers.size()));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return ppu_emu::shfl_generic(mask, v, ppu_emu::lane_id() ^ lane_mask);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  const int src = ppu_emu::lane_id() + static_cast<int>(delta);
  const T got = ppu_emu::shfl_generic(mask, v, src < 32 ? src : ppu_emu::lane_id());
  return src < 32 ? got : v;
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  return ppu_emu::shfl_generic(mask, v, src_lane);
}
inline int __any_sync(unsigned mask, int pred) {
  int any = 0;
  for (int off = 1; off < 32; off <<= 1) {
    // butterfly OR through the shuffle exchange
    pred = pred | ppu_emu::shfl_generic(mask, pred, ppu_emu::lane_id() ^ off);
  }
  any = pred;
  return any != 0;
}

// ---- runtime API ------------------------------------------------------------------------------
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr int cudaDevAttrMultiProcessorCount = 16;
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulation error"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* c) {
  *c = 1;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, int, int) {
  *v = ppu_emu::env_int("PPU_EMU_SMS", 3);
  return cudaSuccess;
}
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* v, const void*, int, size_t) {
  *v = ppu_emu::env_int("PPU_EMU_BLOCKS_PER_SM", 2);
  return cudaSuccess;
}
inline cudaError_t cudaLaunchKernel(const void* func, dim3 grid, dim3 block, void** args, size_t,
                                    cudaStream_t) {
  auto it = ppu_emu::registry().find(func);
  if (it == ppu_emu::registry().end()) throw std::logic_error("emu: unregistered kernel");
  const ppu_emu::Invoker inv = it->second;
  ppu_emu::bdim() = block;
  ppu_emu::gdim() = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        ppu_emu::bidx() = dim3(x, y, z);
        ppu_emu::run_block(block, [&inv, args]() { inv(args); });
      }
  return cudaSuccess;
}
