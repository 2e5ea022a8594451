// CUDA kernels of ppu_fast._cuda: the CUDA C++ fallback behind the Triton backend.
//
// For q_ik = softmax_k(x_ik), x_ik = log_p_ik - alpha_k * inv_c_i, one `step` pass returns
//   colsum_k = sum_i q_ik,   wlogz = sum_i log Z_i / inv_c_i,
//   and optionally H = sum_i inv_c_i (diag(q_i) - q_i q_i^T) (full for k <= kSmallK) or its diagonal.
// `materialize` writes Q. Arithmetic is float32 (expf / logf / IEEE division, never the fast-math
// intrinsics, so results track the float32 PyTorch reference); every sum over rows is float64.
//
// Determinism without float atomics: each block owns one row of a workspace (grid x width doubles)
// and adds its rows into it in a fixed order (grid-stride loop, fixed thread <-> row/column
// mapping, fixed-shape shuffle/shared-memory trees); a second kernel then sums the workspace rows
// in block order. The grid depends only on (n, k, dtype, mode) and the device (its SM count and
// the kernel's occupancy there), so two runs on one device give bit-identical results.
//
// Kernels by k (the threshold kSmallK = 32 lives in ppu_cuda.h):
//   k <= 32  one row per thread, the row held in registers (KMAX = 4, 8, 16 or 32 slots):
//            read once. Full Hessian: each 256-row tile of q goes to shared memory and every
//            thread accumulates fixed entries (a, b) of the k x k matrix over the tile.
//   k > 32   a block works on tiles of kTileRows rows: phase 1, one warp per row, single-pass
//            online max/sum; phase 2, thread j owns columns j, j + blockDim, ... and re-reads the
//            tile to add q (and inv_c q (1 - q)) into its block's workspace row. No full Hessian
//            here: the Python launcher builds it from materialised row chunks with a GEMM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
namespace {

constexpr int kBlock = 256;          // threads per block (the large-k step may use fewer)
constexpr int kTileRows = 16;        // rows per tile of the large-k step kernel
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Host-side error handling: every CUDA call is checked; failures become std::runtime_error
// (Python RuntimeError) naming the call and the CUDA error, e.g. cudaErrorInsufficientDriver (35).

void check(cudaError_t err, const char* what) {
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

// ---------------------------------------------------------------------------------------------
// Device helpers.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The output dtype is a runtime switch (uniform across the grid): materialize is not the hot
// path, and this keeps the number of kernel instantiations down.
__device__ __forceinline__ void store(void* out, int64_t off, int dtype, float q) {
  switch (dtype) {
    case kFloat32: static_cast<float*>(out)[off] = q; break;
    case kFloat16: static_cast<__half*>(out)[off] = __float2half_rn(q); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(out)[off] = __float2bfloat16_rn(q); break;
    default: static_cast<double*>(out)[off] = static_cast<double>(q); break;
  }
}

// Online softmax state (m = running max, s = sum exp(x - m)); (-inf, 0) is the empty state.
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

// Warp-level (m, s) merge down to lane 0 in a fixed shuffle tree; the result is broadcast.
__device__ __forceinline__ void warp_merge(float& m, float& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_down_sync(kFullMask, m, off);
    const float s2 = __shfl_down_sync(kFullMask, s, off);
    online_merge(m, s, m2, s2);
  }
  m = __shfl_sync(kFullMask, m, 0);
  s = __shfl_sync(kFullMask, s, 0);
}

// One warp's (m, s) of a row of k entries, lanes taking columns lane, lane + 32, ...: each lane
// loads kChunk entries at a time (independent loads in flight, which is what keeps the memory
// system busy), folds the chunk's max into its running max once, then adds the chunk's exps.
// Result broadcast to every lane.
constexpr int kChunk = 8;

template <typename T>
__device__ __forceinline__ void row_stats_warp(const T* __restrict__ r, int64_t scol, int k,
                                               float w, const float* __restrict__ alpha,
                                               float& m, float& s) {
  const int lane = threadIdx.x & 31;
  m = -INFINITY;
  s = 0.0f;
  for (int64_t j0 = lane; j0 < k; j0 += 32 * kChunk) {
    float x[kChunk];
    float cm = -INFINITY;
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      const int64_t j = j0 + 32 * u;
      x[u] = j < k ? to_float(r[j * scol]) - w * alpha[j] : -INFINITY;
      cm = fmaxf(cm, x[u]);
    }
    if (cm > m) {
      s *= expf(m - cm);  // m == -inf: s is 0 and stays 0
      m = cm;
    }
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      if (x[u] != -INFINITY) s += expf(x[u] - m);  // skip -inf: never exp(-inf - (-inf))
    }
  }
  warp_merge(m, s);
}

// Deterministic block sum of one double per thread (fixed shuffle tree, then warps in order).
// Every thread of the block must call it; the result is valid in thread 0.
__device__ double block_sum(double v, double* sred) {
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

// Softmax of one row with k <= KMAX held in registers. On return q[j] = q_j for j < k (0 beyond),
// and m, s are the row's max and sum exp(x - m), so log Z = m + logf(s).
template <int KMAX, typename T>
__device__ __forceinline__ void row_softmax_small(const T* __restrict__ r, int64_t scol, int k,
                                                  float w, const float* __restrict__ alpha,
                                                  float (&q)[KMAX], float& m, float& s) {
  m = -INFINITY;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    q[j] = -INFINITY;
    if (j < k) {
      q[j] = to_float(r[j * scol]) - w * alpha[j];
      m = fmaxf(m, q[j]);
    }
  }
  s = 0.0f;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) {
      q[j] = expf(q[j] - m);  // -inf entries give exactly 0
      s += q[j];
    }
  }
#pragma unroll
  for (int j = 0; j < KMAX; ++j) q[j] = (j < k) ? q[j] / s : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// step, k <= 32: one row per thread, rows in registers.
// Bytes moved: reads n*k*sizeof(T) (log_p, once) + 4n (inv_c) + 4k per thread (alpha, L1-cached);
// writes grid*width*8 (workspace). The matrix is read exactly once.

template <int KMAX, typename T, int MODE>
__global__ void __launch_bounds__(kBlock)
    step_small_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow, int64_t scol,
                      const float* __restrict__ inv_c, const float* __restrict__ alpha,
                      double* __restrict__ ws, int64_t width) {
  constexpr int kPad = KMAX + 1;  // shared row stride: avoids bank conflicts on writes
  constexpr bool kFull = MODE == kFullHessian;
  constexpr bool kDiag = MODE == kDiagHessian;
  constexpr int kEntries = kFull ? (KMAX * KMAX + kBlock - 1) / kBlock : 1;
  __shared__ float sq[kFull ? kBlock * kPad : 1];
  __shared__ float sw[kFull ? kBlock : 1];
  __shared__ double sred[kBlock / 32];

  const int tid = threadIdx.x;
  double cs[KMAX];
  double dg[kDiag ? KMAX : 1];
  double hacc[kEntries];
#pragma unroll
  for (int j = 0; j < KMAX; ++j) cs[j] = 0.0;
#pragma unroll
  for (int j = 0; j < (kDiag ? KMAX : 1); ++j) dg[j] = 0.0;
#pragma unroll
  for (int h = 0; h < kEntries; ++h) hacc[h] = 0.0;
  double wl = 0.0;

  // The loop bounds depend on blockIdx only, so every thread runs the same iterations (needed
  // for the __syncthreads of the full-Hessian tile).
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kBlock; tile < n;
       tile += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t row = tile + tid;
    float q[KMAX];
    float w = 0.0f;
    if (row < n) {
      w = inv_c[row];
      float m, s;
      row_softmax_small<KMAX, T>(lp + row * srow, scol, k, w, alpha, q, m, s);
      wl += static_cast<double>(m + logf(s)) / static_cast<double>(w);
#pragma unroll
      for (int j = 0; j < KMAX; ++j) {
        if (j < k) {
          cs[j] += static_cast<double>(q[j]);
          if (kDiag) dg[j] += static_cast<double>(w * q[j] * (1.0f - q[j]));
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < KMAX; ++j) q[j] = 0.0f;
    }
    if (kFull) {
      __syncthreads();  // the previous tile's readers are done with sq / sw
#pragma unroll
      for (int j = 0; j < KMAX; ++j) sq[tid * kPad + j] = q[j];
      sw[tid] = w;
      __syncthreads();
      const int rows = static_cast<int>(n - tile < kBlock ? n - tile : kBlock);
#pragma unroll
      for (int h = 0; h < kEntries; ++h) {
        const int e = tid + h * kBlock;  // this thread's fixed entry (a, b) of H
        if (e < k * k) {
          const int a = e / k;
          const int b = e - a * k;
          const float delta = (a == b) ? 1.0f : 0.0f;
          double acc = 0.0;
          for (int r = 0; r < rows; ++r) {
            acc += static_cast<double>(sw[r] * sq[r * kPad + a]) *
                   static_cast<double>(delta - sq[r * kPad + b]);
          }
          hacc[h] += acc;
        }
      }
    }
  }

  double* out = ws + static_cast<int64_t>(blockIdx.x) * width;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) {  // k is uniform, so every thread reaches the same block_sum calls
      const double v = block_sum(cs[j], sred);
      if (tid == 0) out[j] = v;
      if (kDiag) {
        const double d = block_sum(dg[j], sred);
        if (tid == 0) out[k + 1 + j] = d;
      }
    }
  }
  const double v = block_sum(wl, sred);
  if (tid == 0) out[k] = v;
  if (kFull) {
#pragma unroll
    for (int h = 0; h < kEntries; ++h) {
      const int e = tid + h * kBlock;
      if (e < k * k) out[k + 1 + e] = hacc[h];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// step, k > 32: tiles of kTileRows rows; phase 1 (warp per row, online max/sum) reads the tile,
// phase 2 (thread per column) reads it again and accumulates into the block's workspace row.
// Bytes moved: 2 * n*k*sizeof(T) reads of log_p, of which the second hits L2 while the tiles in
// flight fit there (grid * kTileRows * k * sizeof(T): 396 blocks x 16 rows x 1000 x 4 B = 25 MB
// on an H100 for k = 1000; for very large k, e.g. 32,000, the re-read comes from HBM and the step
// costs about two reads of the matrix); + 4n (inv_c) + 4k (alpha) per tile (L1/L2);
// workspace: grid*width*8 written once to zero, then 16 B (read + write) per column per tile and
// per accumulated quantity, i.e. 1 B per element per quantity with 16-row tiles, in L2.

template <typename T, int MODE>
__global__ void __launch_bounds__(kBlock)
    step_large_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow, int64_t scol,
                      const float* __restrict__ inv_c, const float* __restrict__ alpha,
                      double* __restrict__ ws, int64_t width) {
  constexpr bool kDiag = MODE == kDiagHessian;
  __shared__ float sm[kTileRows];
  __shared__ float ss[kTileRows];
  __shared__ float sw[kTileRows];
  __shared__ double sred[kBlock / 32];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = blockDim.x >> 5;
  double* acc = ws + static_cast<int64_t>(blockIdx.x) * width;
  // Column j of the workspace row is only ever touched by thread j % blockDim: no races, and
  // its additions happen in tile order.
  for (int j = tid; j < k; j += blockDim.x) {
    acc[j] = 0.0;
    if (kDiag) acc[k + 1 + j] = 0.0;
  }
  double wl = 0.0;  // lane 0 of each warp: sum of log Z / inv_c over the rows this warp did

  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kTileRows; tile < n;
       tile += static_cast<int64_t>(gridDim.x) * kTileRows) {
    const int rows = static_cast<int>(n - tile < kTileRows ? n - tile : kTileRows);
    for (int rr = warp; rr < rows; rr += nwarps) {  // warp-uniform loop
      const int64_t row = tile + rr;
      const float w = inv_c[row];
      float m, s;
      row_stats_warp(lp + row * srow, scol, k, w, alpha, m, s);
      if (lane == 0) {
        sm[rr] = m;
        ss[rr] = s;
        sw[rr] = w;
        wl += static_cast<double>(m + logf(s)) / static_cast<double>(w);
      }
    }
    __syncthreads();
    for (int j = tid; j < k; j += blockDim.x) {
      const float a = alpha[j];
      const T* col = lp + tile * srow + j * scol;
      double c = 0.0, d = 0.0;
#pragma unroll
      for (int rr = 0; rr < kTileRows; ++rr) {  // unrolled: the tile's loads issue together
        if (rr < rows) {
          const float x = to_float(col[rr * srow]) - sw[rr] * a;
          const float q = expf(x - sm[rr]) / ss[rr];
          c += static_cast<double>(q);
          if (kDiag) d += static_cast<double>(sw[rr] * q * (1.0f - q));
        }
      }
      acc[j] += c;
      if (kDiag) acc[k + 1 + j] += d;
    }
    __syncthreads();  // the next tile overwrites sm / ss / sw
  }
  const double v = block_sum(wl, sred);  // lanes other than 0 contribute +0.0
  if (tid == 0) acc[k] = v;
}

// Second stage: out[c] = sum over blocks g = 0, 1, ... of ws[g][c], in that order.
// Bytes moved: reads grid*width*8, writes width*8.
__global__ void reduce_partials_kernel(const double* __restrict__ ws, int64_t grid, int64_t width,
                                       double* __restrict__ out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < width;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t g = 0; g < grid; ++g) s += ws[g * width + c];
    out[c] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// materialize, k <= 32: one row per thread. Bytes: reads n*k*sizeof(T) + 4n, writes
// n*k*sizeof(out).
template <int KMAX, typename T>
__global__ void __launch_bounds__(kBlock)
    materialize_small_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow,
                             int64_t scol, const float* __restrict__ inv_c,
                             const float* __restrict__ alpha, void* __restrict__ out, int odt,
                             int64_t orow, int64_t ocol) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < n;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float q[KMAX];
    float m, s;
    row_softmax_small<KMAX, T>(lp + row * srow, scol, k, inv_c[row], alpha, q, m, s);
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) store(out, row * orow + j * ocol, odt, q[j]);
    }
  }
}

// materialize, k > 32: one warp per row; the second read of the row (by the same warp, right
// after the first) comes from L1/L2. Bytes: reads n*k*sizeof(T) from DRAM (twice from cache) +
// 4n, writes n*k*sizeof(out).
template <typename T>
__global__ void __launch_bounds__(kBlock)
    materialize_large_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow,
                             int64_t scol, const float* __restrict__ inv_c,
                             const float* __restrict__ alpha, void* __restrict__ out, int odt,
                             int64_t orow, int64_t ocol) {
  const int lane = threadIdx.x & 31;
  const int64_t wpb = blockDim.x >> 5;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); row < n;
       row += static_cast<int64_t>(gridDim.x) * wpb) {  // warp-uniform loop
    const float w = inv_c[row];
    const T* r = lp + row * srow;
    float m, s;
    row_stats_warp(r, scol, k, w, alpha, m, s);
#pragma unroll 4
    for (int j = lane; j < k; j += 32) {
      const float x = to_float(r[j * scol]) - w * alpha[j];
      store(out, row * orow + j * ocol, odt, expf(x - m) / s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host dispatch. Kernels are picked as function pointers and launched with cudaLaunchKernel, so
// that the grid can be sized from the kernel's own occupancy: a persistent grid of exactly the
// blocks that fit on the device at once (capped at kMaxBlocksPerSM per SM), never a second
// partial wave.

constexpr int kMaxBlocksPerSM = 8;  // bounds the workspace (grid x width doubles)

struct Choice {
  const void* func;        // the kernel
  int threads;             // block size
  int64_t rows_per_block;  // rows one block handles per sweep (sizes grids for small n)
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Doubles per workspace row (see ppu_cuda.h); validates mode against k.
int64_t width_for(int64_t k, int mode) {
  if (mode != kNoHessian && mode != kDiagHessian && mode != kFullHessian)
    throw std::invalid_argument("ppu_fast._cuda: mode must be 0, 1 or 2, got " +
                                std::to_string(mode));
  if (mode == kFullHessian && k > kSmallK)
    throw std::invalid_argument("ppu_fast._cuda: the full Hessian is accumulated in the kernel "
                                "only for k <= " + std::to_string(kSmallK) + ", got k = " +
                                std::to_string(k));
  return k + 1 + (mode == kDiagHessian ? k : 0) + (mode == kFullHessian ? k * k : 0);
}

void check_shape(int dtype, int64_t n, int64_t k) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument("ppu_fast._cuda: log_p dtype code must be 0, 1 or 2, got " +
                                std::to_string(dtype));
  if (n < 0) throw std::invalid_argument("ppu_fast._cuda: n must be >= 0");
  if (k < 1 || k > (std::numeric_limits<int>::max() >> 1))
    throw std::invalid_argument("ppu_fast._cuda: k must be in [1, 2^30), got " +
                                std::to_string(k));
}

void check_launch(int64_t stride_row, int64_t stride_col, int64_t grid) {
  if (stride_row < 0 || stride_col < 0)
    throw std::invalid_argument("ppu_fast._cuda: strides must be >= 0");
  if (grid < 1 || grid > std::numeric_limits<int>::max())
    throw std::invalid_argument("ppu_fast._cuda: grid must be >= 1, got " + std::to_string(grid));
}

int kmax_for(int64_t k) { return k <= 4 ? 4 : k <= 8 ? 8 : k <= 16 ? 16 : 32; }

template <int KM, typename T>
const void* small_step_func(int mode) {
  if (mode == kNoHessian) return reinterpret_cast<const void*>(step_small_kernel<KM, T, kNoHessian>);
  if (mode == kDiagHessian)
    return reinterpret_cast<const void*>(step_small_kernel<KM, T, kDiagHessian>);
  return reinterpret_cast<const void*>(step_small_kernel<KM, T, kFullHessian>);
}

template <typename T>
Choice choose_step_t(int64_t k, int mode) {
  if (k <= kSmallK) {
    const void* f = nullptr;
    switch (kmax_for(k)) {
      case 4: f = small_step_func<4, T>(mode); break;
      case 8: f = small_step_func<8, T>(mode); break;
      case 16: f = small_step_func<16, T>(mode); break;
      default: f = small_step_func<32, T>(mode); break;
    }
    return {f, kBlock, kBlock};
  }
  // Enough threads to cover a row's columns in one sweep, in whole warps, 64..256.
  const int64_t want = ceil_div(k, 32) * 32;
  const int threads = want > kBlock ? kBlock : (want < 64 ? 64 : static_cast<int>(want));
  const void* f = mode == kNoHessian
                      ? reinterpret_cast<const void*>(step_large_kernel<T, kNoHessian>)
                      : reinterpret_cast<const void*>(step_large_kernel<T, kDiagHessian>);
  return {f, threads, kTileRows};
}

Choice choose_step(int dtype, int64_t k, int mode) {
  switch (dtype) {
    case kFloat32: return choose_step_t<float>(k, mode);
    case kFloat16: return choose_step_t<__half>(k, mode);
    default: return choose_step_t<__nv_bfloat16>(k, mode);
  }
}

template <typename T>
Choice choose_materialize_t(int64_t k) {
  if (k <= kSmallK) {
    const void* f = nullptr;
    switch (kmax_for(k)) {
      case 4: f = reinterpret_cast<const void*>(materialize_small_kernel<4, T>); break;
      case 8: f = reinterpret_cast<const void*>(materialize_small_kernel<8, T>); break;
      case 16: f = reinterpret_cast<const void*>(materialize_small_kernel<16, T>); break;
      default: f = reinterpret_cast<const void*>(materialize_small_kernel<32, T>); break;
    }
    return {f, kBlock, kBlock};
  }
  return {reinterpret_cast<const void*>(materialize_large_kernel<T>), kBlock, kBlock / 32};
}

Choice choose_materialize(int dtype, int64_t k) {
  switch (dtype) {
    case kFloat32: return choose_materialize_t<float>(k);
    case kFloat16: return choose_materialize_t<__half>(k);
    default: return choose_materialize_t<__nv_bfloat16>(k);
  }
}

// Blocks of kernel `c` resident on `device` at once (at most kMaxBlocksPerSM per SM). Asked of
// the runtime once per (kernel, block size, device) and cached: it is fixed for a device.
int64_t resident_blocks(const Choice& c, int device) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, int64_t> cache;
  const auto key = std::make_tuple(c.func, c.threads, device);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int sms = 0, per_sm = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute(MultiProcessorCount)");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, c.func, c.threads, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (per_sm < 1) per_sm = 1;
  if (per_sm > kMaxBlocksPerSM) per_sm = kMaxBlocksPerSM;
  const int64_t blocks = static_cast<int64_t>(per_sm) * (sms > 0 ? sms : 1);
  std::lock_guard<std::mutex> lock(mutex);
  cache[key] = blocks;
  return blocks;
}

// Blocks for `c` on n rows: min(blocks needed, resident blocks) on the current device.
// Deterministic for a given (kernel, n, device).
int64_t grid_for(const Choice& c, int64_t n, int device) {
  const int64_t cap = resident_blocks(c, device);
  const int64_t need = ceil_div(n, c.rows_per_block);
  return need < 1 ? 1 : (need > cap ? cap : need);
}

}  // namespace

std::pair<int64_t, int64_t> plan_step(int64_t n, int64_t k, int mode, int dtype, int device) {
  check_shape(dtype, n, k);
  const int64_t width = width_for(k, mode);
  DeviceGuard guard(device);
  return {grid_for(choose_step(dtype, k, mode), n, device), width};
}

int64_t plan_materialize(int64_t n, int64_t k, int dtype, int device) {
  check_shape(dtype, n, k);
  DeviceGuard guard(device);
  return grid_for(choose_materialize(dtype, k), n, device);
}

void step(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row, int64_t stride_col,
          uintptr_t inv_c, uintptr_t alpha, int mode, uintptr_t workspace, int64_t grid,
          int64_t width, uintptr_t out, int device, uintptr_t stream) {
  check_shape(dtype, n, k);
  check_launch(stride_row, stride_col, grid);
  const int64_t expect = width_for(k, mode);
  if (width != expect)
    throw std::invalid_argument("ppu_fast._cuda: workspace width " + std::to_string(width) +
                                " does not match k and mode (expected " + std::to_string(expect) +
                                ")");
  const Choice c = choose_step(dtype, k, mode);
  DeviceGuard guard(device);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  // Kernel arguments, in the exact types of the kernel's parameters.
  const void* lp = reinterpret_cast<const void*>(log_p);
  int64_t a_n = n, a_srow = stride_row, a_scol = stride_col, a_width = width;
  int a_k = static_cast<int>(k);
  const float* a_inv = reinterpret_cast<const float*>(inv_c);
  const float* a_alpha = reinterpret_cast<const float*>(alpha);
  double* a_ws = reinterpret_cast<double*>(workspace);
  void* args[] = {&lp, &a_n, &a_k, &a_srow, &a_scol, &a_inv, &a_alpha, &a_ws, &a_width};
  check(cudaLaunchKernel(c.func, dim3(static_cast<unsigned>(grid)), dim3(c.threads), args, 0, st),
        k <= kSmallK ? "launch of step_small_kernel" : "launch of step_large_kernel");
  check(cudaGetLastError(), "step kernel launch");
  const int64_t rblocks = ceil_div(width, kBlock);
  const int rgrid = static_cast<int>(rblocks < 1024 ? rblocks : 1024);
  reduce_partials_kernel<<<rgrid, kBlock, 0, st>>>(a_ws, grid, width,
                                                   reinterpret_cast<double*>(out));
  check(cudaGetLastError(), "launch of reduce_partials_kernel");
}

void materialize(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row,
                 int64_t stride_col, uintptr_t inv_c, uintptr_t alpha, uintptr_t out,
                 int out_dtype, int64_t out_row, int64_t out_col, int64_t grid, int device,
                 uintptr_t stream) {
  check_shape(dtype, n, k);
  check_launch(stride_row, stride_col, grid);
  if (out_dtype != kFloat32 && out_dtype != kFloat16 && out_dtype != kBFloat16 &&
      out_dtype != kFloat64)
    throw std::invalid_argument("ppu_fast._cuda: out dtype code must be 0, 1, 2 or 3, got " +
                                std::to_string(out_dtype));
  if (out_row < 0 || out_col < 0)
    throw std::invalid_argument("ppu_fast._cuda: out strides must be >= 0");
  const Choice c = choose_materialize(dtype, k);
  DeviceGuard guard(device);
  if (n == 0) return;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const void* lp = reinterpret_cast<const void*>(log_p);
  int64_t a_n = n, a_srow = stride_row, a_scol = stride_col, a_orow = out_row, a_ocol = out_col;
  int a_k = static_cast<int>(k), a_odt = out_dtype;
  const float* a_inv = reinterpret_cast<const float*>(inv_c);
  const float* a_alpha = reinterpret_cast<const float*>(alpha);
  void* a_out = reinterpret_cast<void*>(out);
  void* args[] = {&lp, &a_n, &a_k, &a_srow, &a_scol, &a_inv, &a_alpha, &a_out, &a_odt,
                  &a_orow, &a_ocol};
  check(cudaLaunchKernel(c.func, dim3(static_cast<unsigned>(grid)), dim3(c.threads), args, 0, st),
        k <= kSmallK ? "launch of materialize_small_kernel" : "launch of materialize_large_kernel");
  check(cudaGetLastError(), "materialize kernel launch");
}

int device_count() {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return count;
}

std::string version_info() {
  int rt = 0, drv = 0;
  if (cudaRuntimeGetVersion(&rt) != cudaSuccess) rt = 0;
  if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0;
  auto fmt = [](int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); };
  return "CUDA runtime " + fmt(rt) + ", driver " + (drv ? fmt(drv) : std::string("none"));
}

}  // namespace ppu_cuda
