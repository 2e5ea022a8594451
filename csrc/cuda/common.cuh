// Shared device and host helpers of ppu_fast._cuda (included by kernels.cu and prepare.cu).
//
// Conventions every kernel follows (see docs/cuda_notes.md for the reasoning):
//  * arithmetic is float32 with the accurate libdevice expf / logf and IEEE division or
//    reciprocal (no fast-math intrinsics); the shift x = log_p - inv_c * alpha is one explicit
//    fmaf, so that two kernels (or two passes) computing the same x get the same bits;
//  * sums over rows are float64, fed by float32 partial sums over at most a few dozen rows (all of
//    non-negative terms, so a partial's relative error stays a few ulps);
//  * no float atomics: every block writes its own row of a float64 workspace, and a second kernel
//    combines the rows in block order, so two runs on one device give bit-identical results;
//  * 1 - q of a row's maximum comes from the row's other entries (the contract's Hessian
//    diagonal, ppu_fast/backends/base.py): a row's entries equal to its max x_m are "top";
//    with r = sum of the other entries' exp(x - x_m) and c = the number of top entries,
//    s = r + c, q_top = 1 / s and 1 - q_top = (r + c - 1) / s, without cancellation.
#pragma once

#ifdef PPU_CUDA_EMULATE
// Host-side emulation of the CUDA features used here (tests only: csrc/cuda/emu/).
#include "emu/emu_cuda.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "ppu_cuda.h"

namespace ppu_cuda {
namespace detail {

constexpr int kBlock = 256;  // threads per block of every kernel but the reductions' tails
constexpr int kWarps = kBlock / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxBlocksPerSM = 8;  // bounds persistent grids (and so the workspaces)
// The most float64 partial rows (one per block or row group) a workspace holds: 32 MB. Rows of
// tens of thousands of classes would otherwise make a persistent grid's partials gigabytes.
constexpr int64_t kMaxWorkspacePartials = int64_t{1} << 22;

// Kernel function pointers for cudaLaunchKernel / the occupancy API (the emulation registers
// the kernel's signature here).
#ifdef PPU_CUDA_EMULATE
#define PPU_KERNEL(...) ::ppu_emu::kernel_ptr(__VA_ARGS__)
#else
#define PPU_KERNEL(...) reinterpret_cast<const void*>(__VA_ARGS__)
#endif

// ---------------------------------------------------------------------------------------------
// Host side.

// Every CUDA call is checked; a failure becomes std::runtime_error (Python RuntimeError) naming
// the call and the CUDA error, e.g. "cudaErrorInsufficientDriver (35)".
inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("ppu_fast._cuda: ") + what + " failed: " +
                             cudaGetErrorName(err) + " (" + std::to_string(static_cast<int>(err)) +
                             "): " + cudaGetErrorString(err));
  }
}

// Makes `device` current for the runtime linked into this module (it keeps its own current
// device, separate from torch's) and restores the previous one on exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);  // best effort: a destructor must not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of kernel `func` (launched with `threads` threads and its static shared memory) resident
// on `device` at once, at most kMaxBlocksPerSM per SM. Asked of the runtime once per (kernel,
// block size, device) and cached: it is fixed for a device, so grids built from it are too.
inline int64_t resident_blocks(const void* func, int threads, int device) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, int64_t> cache;
  const auto key = std::make_tuple(func, threads, device);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int sms = 0, per_sm = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute(MultiProcessorCount)");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, func, threads, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (per_sm < 1) per_sm = 1;
  if (per_sm > kMaxBlocksPerSM) per_sm = kMaxBlocksPerSM;
  const int64_t blocks = static_cast<int64_t>(per_sm) * (sms > 0 ? sms : 1);
  std::lock_guard<std::mutex> lock(mutex);
  cache[key] = blocks;
  return blocks;
}

// min(blocks needed for n rows at rows_per_block per sweep, resident blocks), at least 1.
inline int64_t persistent_grid(const void* func, int threads, int64_t n, int64_t rows_per_block,
                               int device) {
  const int64_t cap = resident_blocks(func, threads, device);
  const int64_t need = ceil_div(n, rows_per_block);
  return need < 1 ? 1 : (need > cap ? cap : need);
}

// Buckets of the register-resident kernels: KMAX for k <= 32 (one row per thread) and EPL,
// entries per lane, for 32 < k <= kRowK (one row per warp).
inline int kmax_for(int64_t k) { return k <= 4 ? 4 : k <= 8 ? 8 : k <= 16 ? 16 : 32; }
inline int epl_for(int64_t k) {
  return k <= 64 ? 2 : k <= 128 ? 4 : k <= 256 ? 8 : k <= 512 ? 16 : 32;
}

// ---------------------------------------------------------------------------------------------
// Device side: element access.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(double v) { return __double2float_rn(v); }

// The output dtype is a runtime switch (uniform across the grid): it keeps the number of kernel
// instantiations down, and a uniform branch per store is cheap next to the store itself.
__device__ __forceinline__ void store(void* out, int64_t off, int dtype, float q) {
  switch (dtype) {
    case kFloat32: static_cast<float*>(out)[off] = q; break;
    case kFloat16: static_cast<__half*>(out)[off] = __float2half_rn(q); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(out)[off] = __float2bfloat16_rn(q); break;
    default: static_cast<double*>(out)[off] = static_cast<double>(q); break;
  }
}

// A float64 q stored with one rounding (float64 out keeps it whole).
__device__ __forceinline__ void store_d(void* out, int64_t off, int dtype, double q) {
  if (dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16) {
    store(out, off, dtype, __double2float_rn(q));
  } else {
    static_cast<double*>(out)[off] = q;
  }
}

// The value a store of q into dtype `dtype` keeps, read back as float.
__device__ __forceinline__ float round_to(int dtype, float q) {
  switch (dtype) {
    case kFloat16: return __half2float(__float2half_rn(q));
    case kBFloat16: return __bfloat162float(__float2bfloat16_rn(q));
    default: return q;
  }
}

// x = log_p - inv_c * alpha as ONE rounding (fmaf): every kernel and both passes of a two-pass
// kernel compute the same bits, which the "top" test (x == row max) relies on.
__device__ __forceinline__ float shifted(float v, float w, float a) { return __fmaf_rn(-w, a, v); }

// ---------------------------------------------------------------------------------------------
// Device side: warp reductions. All lanes of the warp must call them (full mask); xor
// butterflies leave the same bits in every lane (each step adds the same two values).

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ double warp_sum_double(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ long long warp_min_ll(long long v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const long long o = __shfl_xor_sync(kFullMask, v, off);
    v = o < v ? o : v;
  }
  return v;
}

// Column sums of a warp's 32 rows (one row per lane, v[j] = column j, K a power of two <= 32)
// by recursive halving: step s exchanges half of the remaining columns with lane ^ (1 << s) and
// keeps the half selected by lane bit s. Returns, in every lane, the warp's sum of column
// c(lane) = bit-reverse of (lane mod K) over log2 K bits; lanes with equal lane mod K hold the
// same column. K - 1 + (5 - log2 K) shuffles per lane instead of 5 K. Destroys v.
template <int K, bool kMax = false>
__device__ __forceinline__ float warp_colreduce(float (&v)[K]) {
  static_assert(K == 1 || K == 2 || K == 4 || K == 8 || K == 16 || K == 32, "K: a power of 2");
  constexpr int kLog = K == 1 ? 0 : K == 2 ? 1 : K == 4 ? 2 : K == 8 ? 3 : K == 16 ? 4 : 5;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int s = 0; s < kLog; ++s) {
    const int half = K >> (s + 1);
    const bool upper = (lane >> s) & 1;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[i] : v[i + half];
      const float keep = upper ? v[i + half] : v[i];
      const float got = __shfl_xor_sync(kFullMask, send, 1 << s);
      v[i] = kMax ? fmaxf(keep, got) : keep + got;
    }
  }
  float r = v[0];
#pragma unroll
  for (int off = K; off < 32; off <<= 1) {
    const float got = __shfl_xor_sync(kFullMask, r, off);
    r = kMax ? fmaxf(r, got) : r + got;
  }
  return r;
}

// The column warp_colreduce<K> leaves in `lane`.
template <int K>
__device__ __forceinline__ int colreduce_column(int lane) {
  if (K == 1) return 0;
  constexpr int kBits = K == 2 ? 1 : K == 4 ? 2 : K == 8 ? 3 : K == 16 ? 4 : 5;
  return static_cast<int>(__brev(static_cast<unsigned>(lane & (K - 1))) >> (32 - kBits));
}

// Deterministic block sum of one double per thread (fixed shuffle tree, then the warps in
// order). Every thread of the block must call it; the result is valid in thread 0. `sred` holds
// at least blockDim.x / 32 doubles.
__device__ __forceinline__ double block_sum(double v, double* sred) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
  if (lane == 0) sred[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    const int nwarps = blockDim.x >> 5;
    for (int w = 0; w < nwarps; ++w) total += sred[w];
  }
  __syncthreads();  // sred may be reused by the next call
  return total;
}

// ---------------------------------------------------------------------------------------------
// Online softmax with the "top" bookkeeping, for rows streamed in chunks.
// State: m = max so far, r = sum of exp(x - m) over entries below m, c = entries equal to m.
// (-inf, 0, 0) is empty. A row's sum is s = r + c, log Z = m + log s, and the accurate
// 1 - q_top = (r + c - 1) / s. Entries equal to -inf while m is still -inf count in c; the first
// finite maximum rescales them by exp(-inf) = 0, so no -inf - -inf is ever evaluated.

struct Online {
  float m;
  float r;
  int c;
};

__device__ __forceinline__ Online online_empty() { return Online{-INFINITY, 0.0f, 0}; }

// Folds a chunk whose maximum is cm into the state: rescales when the maximum grows. Branch-free
// (selects; the unused expf of -inf - -inf is discarded): a conditional expf compiles to a branch
// with a convergence barrier around it.
__device__ __forceinline__ void online_rescale(Online& st, float cm) {
  const bool grow = cm > st.m;
  const float scale = expf(st.m - cm);
  st.r = grow ? (st.r + static_cast<float>(st.c)) * scale : st.r;
  st.c = grow ? 0 : st.c;
  st.m = grow ? cm : st.m;
}

// Adds one entry x <= st.m (padding is -inf: it adds exp(-inf) = 0 once the max is finite, and
// is rescaled away with the other -inf entries otherwise).
__device__ __forceinline__ void online_add(Online& st, float x) {
  const bool top = x == st.m;
  const float e = expf(top ? 0.0f : x - st.m);
  st.c += top ? 1 : 0;
  st.r += top ? 0.0f : e;
}

// Merges b into a. The expression is symmetric in (a, b), so an xor butterfly leaves the same
// bits in every lane.
__device__ __forceinline__ Online online_merge(Online a, Online b) {
  if (a.m == b.m) return Online{a.m, a.r + b.r, a.c + b.c};
  if (a.m < b.m) {
    const Online t = a;
    a = b;
    b = t;
  }
  // a.m > b.m (or a NaN row: garbage in, garbage out, never an exception).
  return Online{a.m, a.r + (b.r + static_cast<float>(b.c)) * expf(b.m - a.m), a.c};
}

__device__ __forceinline__ Online warp_online(Online st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Online o;
    o.m = __shfl_xor_sync(kFullMask, st.m, off);
    o.r = __shfl_xor_sync(kFullMask, st.r, off);
    o.c = __shfl_xor_sync(kFullMask, st.c, off);
    st = online_merge(st, o);
  }
  return st;
}

// Raw entries j0 + 32 u (u < kChunk) of row r as float, -inf beyond k (no load issued there).
// Contiguous rows (scol == 1, a uniform branch) address every load from one base register.
template <int kChunk, typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ r, int64_t scol, int k, int j0,
                                           float (&v)[kChunk]) {
  if (scol == 1) {
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      const int j = j0 + 32 * u;
      v[u] = j < k ? to_float(r[j]) : -INFINITY;
    }
  } else {
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      const int j = j0 + 32 * u;
      v[u] = j < k ? to_float(r[j * scol]) : -INFINITY;
    }
  }
}

// One warp's online state of row r (k entries, column stride scol) shifted by w * alpha, lanes
// taking columns lane, lane + 32, ... in chunks of kChunk per lane. The next chunk's loads are
// issued before the current chunk is folded in (two chunks in flight per lane: 2 KB per warp).
// Result in every lane.
template <int kChunk, typename T>
__device__ __forceinline__ Online warp_row_online(const T* __restrict__ r, int64_t scol, int k,
                                                  float w, const float* __restrict__ alpha) {
  const int lane = threadIdx.x & 31;
  Online st = online_empty();
  float v[kChunk];
  load_chunk<kChunk, T>(r, scol, k, lane, v);
  for (int j0 = lane; j0 < k + lane; j0 += 32 * kChunk) {  // uniform trip count across the warp
    float vn[kChunk];
    load_chunk<kChunk, T>(r, scol, k, j0 + 32 * kChunk, vn);
    float x[kChunk];
    float cm = -INFINITY;
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      const int j = j0 + 32 * u;
      x[u] = j < k ? shifted(v[u], w, alpha[j]) : -INFINITY;
      cm = fmaxf(cm, x[u]);
    }
    online_rescale(st, cm);
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      online_add(st, x[u]);
      v[u] = vn[u];
    }
  }
  return warp_online(st);
}

// ---------------------------------------------------------------------------------------------
// The sampled W of the small kernels (k <= 32), from 256-row tiles of q in shared memory.
//
// Tile layout: sq[r * (KMAX + 1) + j] = q_rj; sx holds w_r q_rj in the same layout (KMAX <= 16),
// or w_r alone (KMAX = 32, to stay under 48 KB of static shared memory). A thread owns one pair
// (a < b) and a range of the tile's 16 row blocks (k(k-1)/2 <= 256: 256 / pairs groups, at most
// 16), or two pairs over all blocks (k(k-1)/2 > 256); it sums the products of its rows in float32
// per tile (non-negative terms) and adds that to a float64 register.

template <int KMAX>
struct PairWork {
  static constexpr int kPairsMax = KMAX * (KMAX - 1) / 2;
  static constexpr int kNP = kPairsMax > kBlock ? 2 : 1;
  static constexpr int kS = KMAX + 1;
  static constexpr bool kStoreWq = KMAX <= 16;
  int a[kNP], b[kNP];
  double acc[kNP];
  int npairs, p, g, ng, blk0, blk1;

  __device__ static void pair_ab(int k, int pi, int& pa, int& pb) {
    int aa = 0;
    while (pi >= k - 1 - aa) {
      pi -= k - 1 - aa;
      ++aa;
    }
    pa = aa;
    pb = aa + 1 + pi;
  }

  __device__ void init(int k) {
    const int tid = threadIdx.x;
    npairs = k * (k - 1) / 2;
#pragma unroll
    for (int i = 0; i < kNP; ++i) {
      a[i] = -1;
      b[i] = -1;
      acc[i] = 0.0;
    }
    p = 0;
    g = 0;
    ng = 1;
    blk0 = 0;
    blk1 = 0;
    if (npairs == 0) return;
    if (npairs <= kBlock) {
      const int groups = kBlock / npairs;
      ng = groups < 16 ? groups : 16;
      p = tid % npairs;
      g = tid / npairs;
      if (g < ng) {
        pair_ab(k, p, a[0], b[0]);
        blk0 = g * 16 / ng;
        blk1 = (g + 1) * 16 / ng;
      }
    } else {
      blk1 = 16;
#pragma unroll
      for (int i = 0; i < kNP; ++i) {
        const int pi = tid + i * kBlock;
        if (pi < npairs) pair_ab(k, pi, a[i], b[i]);
      }
    }
  }

  // Stores this thread's row (q, w) into the tile (row index = threadIdx.x).
  __device__ static void put(float* sq, float* sx, const float (&q)[KMAX], float w) {
    const int r = threadIdx.x;
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      sq[r * kS + j] = q[j];
      if (kStoreWq) sx[r * kS + j] = w * q[j];
    }
    if (!kStoreWq) sx[r] = w;
  }

  // Adds the products of the tile's sampled rows (blocks with their bit set in mask).
  __device__ void tile(const float* sq, const float* sx, unsigned mask) {
#pragma unroll
    for (int i = 0; i < kNP; ++i) {
      if (a[i] < 0) continue;
      const int pa = a[i], pb = b[i];
      float part = 0.0f;
      for (int bb = blk0; bb < blk1; ++bb) {
        if (!((mask >> bb) & 1u)) continue;
#pragma unroll
        for (int t = 0; t < 16; ++t) {
          const int r = bb * 16 + t;
          const float wa = kStoreWq ? sx[r * kS + pa] : sx[r] * sq[r * kS + pa];
          part = __fmaf_rn(wa, sq[r * kS + pb], part);
        }
      }
      acc[i] += static_cast<double>(part);
    }
  }

  // Writes W (k x k, row-major) into wrow: pairs a < b from the accumulators (summed over row
  // groups in group order), 0 on and below the diagonal. Every thread must call it.
  __device__ void finish(int k, double* __restrict__ wrow, double* sW) {
    const int tid = threadIdx.x;
    for (int e = tid; e < k * k; e += kBlock) {
      const int ea = e / k;
      if (ea >= e - ea * k) wrow[e] = 0.0;
    }
    if (npairs == 0) return;  // uniform
    if (npairs <= kBlock) {
      sW[tid] = a[0] >= 0 ? acc[0] : 0.0;
      __syncthreads();
      if (g == 0 && a[0] >= 0) {
        double s = 0.0;
        for (int gg = 0; gg < ng; ++gg) s += sW[gg * npairs + p];
        wrow[a[0] * k + b[0]] = s;
      }
      __syncthreads();
    } else {
#pragma unroll
      for (int i = 0; i < kNP; ++i)
        if (a[i] >= 0) wrow[a[i] * k + b[i]] = acc[i];
    }
  }
};

// Bit bb set: the 16-row block (tile / 16 + bb) is sampled (its index is a multiple of m).
// `tile` is a multiple of 256.
__device__ __forceinline__ unsigned tile_mask(int64_t tile, int64_t m) {
  const int64_t b0 = tile >> 4;
  const int64_t rem = b0 % m;
  unsigned mask = 0;
  for (int64_t bk = rem == 0 ? b0 : b0 + (m - rem); bk < b0 + 16; bk += m)
    mask |= 1u << static_cast<int>(bk - b0);
  return mask;
}

// Writes the block's column sums (kMax: maxima) of a per-lane float64 value left by
// warp_colreduce<KMAX> (lane < KMAX holds column colreduce_column(lane)) to dst[0, k): warps
// combined in order. Every thread must call it.
template <int KMAX, bool kMax = false>
__device__ __forceinline__ void block_columns(double v, double* sred, double* __restrict__ dst,
                                              int k) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (lane < KMAX) sred[warp * KMAX + colreduce_column<KMAX>(lane)] = v;
  __syncthreads();
  if (tid < k) {
    double s = kMax ? -INFINITY : 0.0;
    for (int w = 0; w < kWarps; ++w) {
      const double v = sred[w * KMAX + tid];
      s = kMax ? fmax(s, v) : s + v;
    }
    dst[tid] = s;
  }
  __syncthreads();
}

}  // namespace detail
}  // namespace ppu_cuda
