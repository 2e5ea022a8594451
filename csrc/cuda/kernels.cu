// CUDA kernels of ppu_fast._cuda (step and materialize; prepare lives in prepare.cu): the CUDA
// C++ fallback behind the Triton backend.
//
// For q_ik = softmax_k(x_ik), x_ik = log_p_ik - alpha_k * inv_c_i, one `step` pass returns
//   colsum_k = sum_i q_ik,   wlogz = sum_i log Z_i / inv_c_i,
//   and optionally the Hessian's diagonal d_k = sum_i inv_c_i q_ik (1 - q_ik) with 1 - q of a
//   row's maximum taken from the row's other entries (see common.cuh), and, for k <= kSmallK,
//   the sampled weights W_ab = sum_{i in S} inv_c_i q_ia q_ib (a < b) over the contract's row
//   sample S (16-row blocks b with b % m == 0); the launcher assembles H = assemble_hessian(d, W).
// `materialize` writes Q; `step_write` is the step without a Hessian that also writes Q (the same
// values as materialize's) over the rows it reads, for Newton's last pass (k <= kRowK).
// Conventions (float32 arithmetic, float64 row sums, determinism without atomics): common.cuh.
// Design and measurements: docs/cuda_notes.md.
//
// Kernel families by k (thresholds kSmallK = 32 and kRowK = 1024 in ppu_cuda.h):
//   k <= 32         "small": one row per thread, held in registers (KMAX = 4, 8, 16, 32 slots),
//                   read once. Column sums: per warp of 32 rows, a recursive-halving shuffle
//                   reduction (warp_colreduce) leaves each lane one column's float sum, added in
//                   float64 to one register per lane. W: each 256-row tile with a sampled block
//                   goes to shared memory; threads own fixed pairs (a < b) and row groups.
//   32 < k <= 1024  "row": one row per warp (per pair of warps for k > 512: EPL <= 16 entries
//                   per lane), held in registers, read once. Each lane keeps float sums of its
//                   columns over 16 rows; then the block stages them in shared memory and each
//                   thread adds its columns to float64 registers. The workspace is written once
//                   per block. (materialize: one warp per row, EPL <= 32.)
//   k > 1024        "wide": two kernels. row_stats (a warp per row, streamed in chunks, online
//                   max / sum) writes (max, 1 / sum, 1 - q_top) per row; colsum (a block per
//                   1024-column slab and row group, a thread per 4 columns) re-reads the matrix
//                   and accumulates. Two reads of the matrix (the second from L2 when it fits).
// Then reduce_partials sums the workspace rows in block order into `out`.
#include "common.cuh"

namespace ppu_cuda {
namespace {

using namespace detail;

// One row of k <= KMAX entries in registers: on return q[j] = q_j (0 for j >= k), qmax = the
// row's largest q (1 / sum) and lz = log Z; with kTop also rest = 1 - qmax accumulated without
// cancellation. "Top" entries are those with q == qmax, the reference's rule (stats_from_q):
// exp(x - max) == 1 exactly, i.e. the max and any entry within rounding of it, whose 1 - q is
// rest to float precision. Branch-free: expf(-inf) = 0 for -inf entries and the padding (q =
// -inf beyond k; m is finite on a valid row); a conditional expf compiles to a branch per entry
// (a convergence barrier and the constants rematerialised: ~20 instructions).
template <int KMAX, typename T, bool kTop>
__device__ __forceinline__ void row_softmax_small(const T* __restrict__ r, int64_t scol, int k,
                                                  float w, const float* __restrict__ alpha,
                                                  float (&q)[KMAX], float& qmax, float& rest,
                                                  float& lz) {
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    q[j] = -INFINITY;
    if (j < k) {
      q[j] = shifted(to_float(r[j * scol]), w, alpha[j]);
      m = fmaxf(m, q[j]);
    }
  }
  float sr = 0.0f, cnt = 0.0f;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    q[j] = expf(q[j] - m);
    if (kTop) {
      const bool t = q[j] == 1.0f;
      cnt += t ? 1.0f : 0.0f;
      sr += t ? 0.0f : q[j];
    } else {
      sr += q[j];
    }
  }
  const float s = sr + cnt;
  const float rinv = 1.0f / s;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) q[j] *= rinv;
  qmax = rinv;
  rest = (sr + (cnt - 1.0f)) * rinv;
  lz = m + logf(s);
}

// ---------------------------------------------------------------------------------------------
// step, k <= 32: one row per thread, rows in registers.
// Bytes moved: reads n*k*sizeof(T) (log_p, once) + 4n (inv_c) + 4k per row (alpha, L1 hits);
// writes grid*width*8 (workspace). Shared memory: 2.3 KB, + 35 KB for the W tile (MODE 2).
// Workspace row: [0, k) colsum | [k] sum log Z / inv_c | [k+1, 2k+1) d (MODE >= 1) |
//   [2k+1, 2k+1+k*k) W row-major, strict upper triangle (MODE 2).

// (An explicit minimum of blocks per SM: without one, ptxas capped the W variant at 64
// registers and spilled.)
// kOut (MODE kNoHessian only): Q is also written into qout (dtype code qdt, element strides
// qrow / qcol), the values materialize_small_kernel writes, and the column sums are of those
// values. A thread holds its whole row in registers before storing any of it, so qout may be lp.
// (kOut: at least 2 blocks per SM as well: left at 1, ptxas spent 238 registers on the float64
// row sums' conversions and products, hoisted for ILP, and one block of 8 warps per SM.)
template <int KMAX, typename T, int MODE, bool kOut = false>
__global__ void __launch_bounds__(kBlock, MODE == kFullHessian || kOut ? 2 : 1)
    step_small_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow, int64_t scol,
                      const float* __restrict__ inv_c, const float* __restrict__ alpha,
                      int64_t hstride, double* __restrict__ ws, int64_t width,
                      void* qout = nullptr, int qdt = 0, int64_t qrow = 0, int64_t qcol = 0) {
  static_assert(!kOut || MODE == kNoHessian, "step_write has no Hessian");
  constexpr bool kDiag = MODE != kNoHessian;
  constexpr bool kFull = MODE == kFullHessian;
  using PW = PairWork<KMAX>;
  __shared__ float sq[kFull ? kBlock * PW::kS : 1];
  __shared__ float sx[kFull ? (PW::kStoreWq ? kBlock * PW::kS : kBlock) : 1];
  __shared__ double sW[kFull ? kBlock : 1];
  __shared__ double sred[kWarps * KMAX];

  const int tid = threadIdx.x;
  double acc_c = 0.0, acc_d = 0.0, wl = 0.0;
  PW pw;
  if (kFull) pw.init(k);

  // Loop bounds depend on blockIdx only: every thread runs the same iterations, which the
  // warp shuffles and the W tile's __syncthreads need.
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kBlock; tile < n;
       tile += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t row = tile + tid;
    float q[KMAX];
    float w = 0.0f, rest = 0.0f, qmax = 2.0f;  // (no q reaches 2 on the empty rows)
    if (row < n) {
      w = inv_c[row];
      float lz;
      row_softmax_small<KMAX, T, kDiag>(lp + row * srow, scol, k, w, alpha, q, qmax, rest, lz);
      wl += static_cast<double>(lz) / static_cast<double>(w);
      if (kOut) {  // materialize_small_kernel's arithmetic, to the bit
        double sd = 0.0;
#pragma unroll
        for (int j = 0; j < KMAX; ++j) {
          if (j < k) sd += q[j];
        }
        const double rd = 1.0 / sd;
        // store_d's rounding (double -> float -> the dtype), the dtype's branch outside the loops.
        if (qdt == kFloat64) {
#pragma unroll
          for (int j = 0; j < KMAX; ++j) {
            const double v = q[j] * rd;
            if (j < k) static_cast<double*>(qout)[row * qrow + j * qcol] = v;
            q[j] = __double2float_rn(v);
          }
        } else {
#pragma unroll
          for (int j = 0; j < KMAX; ++j) q[j] = __double2float_rn(q[j] * rd);  // padding: 0
#pragma unroll
          for (int j = 0; j < KMAX; ++j) {
            if (j < k) store(qout, row * qrow + j * qcol, qdt, q[j]);
          }
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < KMAX; ++j) q[j] = 0.0f;
    }
    if (kFull) {
      const unsigned mask = tile_mask(tile, hstride);
      if (mask != 0) {    // uniform across the block
        __syncthreads();  // the previous tile's readers are done with sq / sx
        PW::put(sq, sx, q, w);
        __syncthreads();
        pw.tile(sq, sx, mask);
      }
    }
    if (kDiag) {
      float t[KMAX];
#pragma unroll
      for (int j = 0; j < KMAX; ++j)
        t[j] = (q[j] * (q[j] == qmax ? rest : 1.0f - q[j])) * w;
      acc_d += static_cast<double>(warp_colreduce<KMAX>(t));
    }
    acc_c += static_cast<double>(warp_colreduce<KMAX>(q));
  }

  double* out = ws + static_cast<int64_t>(blockIdx.x) * width;
  block_columns<KMAX>(acc_c, sred, out, k);
  if (kDiag) block_columns<KMAX>(acc_d, sred, out + k + 1, k);
  const double z = block_sum(wl, sred);
  if (tid == 0) out[k] = z;
  if (kFull) pw.finish(k, out + 2 * k + 1, sW);
}

// ---------------------------------------------------------------------------------------------
// step, 32 < k <= 1024: one row per warp (WPR = 1; k <= 512) or per pair of warps (WPR = 2;
// 512 < k <= 1024), held in registers: lane holds columns col0 + lane + 32 u, u < EPL (EPL <= 16),
// col0 = 32 EPL * (warp's half of the row). A pair exchanges its max and sums through shared
// memory under a 64-thread named barrier: one warp holding 32 entries per lane needed 152 (254
// with the diagonal) registers, i.e. 8 warps per SM, where EPL = 16 fits 128 (16 warps per SM).
// Rounds of 16 consecutive rows per row-owner: each lane sums q (and the diagonal's terms) of its
// columns in float32 over those 16 rows, then the block stages the sums in shared memory and
// thread t adds columns t, t + 256, ... (row-owners in order) to float64 registers.
// Bytes moved: reads n*k*sizeof(T) once + 4n; alpha once per block (shared memory); writes
// grid*width*8 once. Shared memory: 32 EPL (8 + WPR) floats (stage + alpha; 20 KB at most).

constexpr int kRowsPerOwner = 16;

__device__ __forceinline__ void pair_sync(int id) {
#ifdef PPU_CUDA_EMULATE
  ::ppu_emu::named_barrier(id, 64);
#else
  asm volatile("bar.sync %0, 64;" ::"r"(id) : "memory");
#endif
}

// alpha (k floats) into shared memory; the caller synchronises before use.
__device__ __forceinline__ void stage_alpha(const float* __restrict__ alpha, int k, float* salpha) {
  for (int j = threadIdx.x; j < k; j += blockDim.x) salpha[j] = alpha[j];
}

// One row (k <= 32 * EPL * WPR entries): on return e[u] = exp(x - max) of column col0 + lane +
// 32 u (0 for padding) and the row-uniform m = max and s = sum of exp(x - max); with kTop also
// rest = s - 1 accumulated without cancellation (the entries below 1 plus count(e == 1) - 1; the
// top rule of row_softmax_small). alpha comes from shared memory (reloading it from L1 per row
// kept EPL more values live next to the loads in flight); contiguous rows (scol == 1, a uniform
// branch) address every load from one base register. WPR = 2: xch = the pair's 8 exchange
// words, bar = its named barrier, h = 0 / 1.
template <int EPL, int WPR, typename T, bool kTop>
__device__ __forceinline__ void row_exp(const T* __restrict__ r, int64_t scol, int k, float w,
                                        const float* salpha, float (&e)[EPL], float& m, float& s,
                                        float& rest, float* xch, int bar, int h) {
  const int lane = threadIdx.x & 31;
  const int c0 = h * 32 * EPL + lane;
  if (scol == 1) {
#pragma unroll
    for (int u = 0; u < EPL; ++u) {
      const int j = c0 + 32 * u;
      e[u] = j < k ? to_float(r[j]) : -INFINITY;
    }
  } else {
#pragma unroll
    for (int u = 0; u < EPL; ++u) {
      const int j = c0 + 32 * u;
      e[u] = j < k ? to_float(r[j * scol]) : -INFINITY;
    }
  }
  m = -INFINITY;
#pragma unroll
  for (int u = 0; u < EPL; ++u) {
    const int j = c0 + 32 * u;
    if (j < k) e[u] = shifted(e[u], w, salpha[j]);
    m = fmaxf(m, e[u]);
  }
  m = warp_max(m);
  if (WPR == 2) {
    if (lane == 0) xch[h] = m;
    pair_sync(bar);
    m = fmaxf(xch[0], xch[1]);  // same operands in both warps
  }
  float sr = 0.0f, cnt = 0.0f;
#pragma unroll
  for (int u = 0; u < EPL; ++u) {  // branch-free (padding is -inf)
    e[u] = expf(e[u] - m);
    if (kTop) {
      const bool t = e[u] == 1.0f;
      cnt += t ? 1.0f : 0.0f;
      sr += t ? 0.0f : e[u];
    } else {
      sr += e[u];
    }
  }
  sr = warp_sum(sr);
  if (kTop) cnt = warp_sum(cnt);  // exact: small integers
  if (WPR == 2) {
    // xch[0..1] (the maxima) were read by both warps before either got past the barrier above,
    // and xch[2..5] of the previous row were read before the partner reached that barrier.
    if (lane == 0) {
      xch[2 + h] = sr;
      xch[4 + h] = cnt;
    }
    pair_sync(bar);
    sr = xch[2] + xch[3];
    cnt = xch[4] + xch[5];
  }
  s = sr + cnt;
  rest = sr + (cnt - 1.0f);
}

// Adds the block's staged float sums of column j (written by the row-owner o that holds it, at
// stage[o * kCols + j]) to the float64 registers of the thread owning j (j = tid + 256 c),
// owners in order. Every thread must call it.
template <int EPL, int WPR>
__device__ __forceinline__ void stage_flush(const float (&f)[EPL], float* stage,
                                            double (&acc)[(32 * EPL * WPR + kBlock - 1) / kBlock],
                                            int k) {
  constexpr int kCols = 32 * EPL * WPR;
  constexpr int kPer = (kCols + kBlock - 1) / kBlock;
  constexpr int kOwners = kWarps / WPR;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c0 = (warp % WPR) * 32 * EPL + lane;
  float* mine = stage + (warp / WPR) * kCols;
#pragma unroll
  for (int u = 0; u < EPL; ++u) {
    const int j = c0 + 32 * u;
    if (j < k) mine[j] = f[u];
  }
  __syncthreads();
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int j = tid + kBlock * c;
    if (j < k) {
      double s = 0.0;
#pragma unroll
      for (int o = 0; o < kOwners; ++o) s += static_cast<double>(stage[o * kCols + j]);
      acc[c] += s;
    }
  }
  __syncthreads();  // the stage is rewritten next
}

// kOut (not with DIAG): Q is also written into qout, normalised like materialize_row_kernel's by
// the row's float64 sum of e (for a pair of warps, the two halves' float64 sums added, so a
// stored value can differ from materialize's in the last bit), and the column sums are of the
// float32 values before any rounding to a 16-bit qout (of the values written for a float32 one). Every load of a row precedes the warp's (pair's) shuffles and barriers, and
// each lane stores only entries it loaded: qout may be lp.
template <int EPL, int WPR, typename T, bool DIAG, bool kOut = false>
__global__ void __launch_bounds__(kBlock, 2)
    step_row_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow, int64_t scol,
                    const float* __restrict__ inv_c, const float* __restrict__ alpha,
                    double* __restrict__ ws, int64_t width, void* qout = nullptr, int qdt = 0,
                    int64_t qrow = 0, int64_t qcol = 0) {
  static_assert(!(kOut && DIAG), "step_write has no Hessian");
  constexpr int kCols = 32 * EPL * WPR;
  constexpr int kPer = (kCols + kBlock - 1) / kBlock;
  constexpr int kOwners = kWarps / WPR;
  constexpr int kRowsPerRound = kOwners * kRowsPerOwner;
  __shared__ float stage[kOwners * kCols];
  __shared__ float salpha[kCols];
  __shared__ float xch[kOwners * 8];
  __shared__ double xchd[kOut && WPR == 2 ? kOwners * 2 : 1];
  __shared__ double sred[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int owner = warp / WPR, h = warp % WPR;
  stage_alpha(alpha, k, salpha);
  __syncthreads();
  double dc[kPer], dd[kPer];
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    dc[c] = 0.0;
    dd[c] = 0.0;
  }
  double wl = 0.0;  // lanes of each row-owner's first warp: one row per lane and round

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRowsPerRound; base < n;
       base += static_cast<int64_t>(gridDim.x) * kRowsPerRound) {  // uniform across the block
    float fc[EPL], fd[EPL];  // fd is dead code without DIAG
#pragma unroll
    for (int u = 0; u < EPL; ++u) {
      fc[u] = 0.0f;
      fd[u] = 0.0f;
    }
    // Row i's (max, sum, inv_c) stay in lane i; its log Z / inv_c (a logf and a float64 division)
    // is formed once per round by that lane instead of per row by the whole warp.
    float my_m = 0.0f, my_s = 1.0f, my_w = 1.0f;
    const int64_t r0 = base + static_cast<int64_t>(owner) * kRowsPerOwner;
    int done = 0;
    for (int i = 0; i < kRowsPerOwner; ++i) {
      const int64_t row = r0 + i;
      if (row >= n) break;  // uniform across the row-owner's warps
      const float w = inv_c[row];
      float e[EPL];
      float m, s, rest;
      row_exp<EPL, WPR, T, DIAG>(lp + row * srow, scol, k, w, salpha, e, m, s, rest,
                                 xch + owner * 8, 1 + owner, h);
      const float rinv = 1.0f / s;
      my_m = lane == i ? m : my_m;
      my_s = lane == i ? s : my_s;
      my_w = lane == i ? w : my_w;
      ++done;
      rest *= rinv;
      if (kOut) {
        const int c0 = h * 32 * EPL + lane;
        double sd = 0.0;
#pragma unroll
        for (int u = 0; u < EPL; ++u) {
          if (c0 + 32 * u < k) sd += e[u];
        }
        sd = warp_sum_double(sd);
        if (WPR == 2) {
          // The pair's previous row read xchd before reaching row_exp's barriers of this row.
          if (lane == 0) xchd[owner * 2 + h] = sd;
          pair_sync(1 + owner);
          sd = xchd[owner * 2] + xchd[owner * 2 + 1];  // same operands, same order, in both
        }
        const double rd = 1.0 / sd;
#pragma unroll
        for (int u = 0; u < EPL; ++u) {
          const int j = c0 + 32 * u;
          if (j < k) {  // store_d's rounding (padding entries have e = 0 and add nothing)
            if (qdt == kFloat64) static_cast<double*>(qout)[row * qrow + j * qcol] = e[u] * rd;
            const float q = __double2float_rn(e[u] * rd);
            if (qdt != kFloat64) store(qout, row * qrow + j * qcol, qdt, q);
            fc[u] += q;
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < EPL; ++u) {
          const float q = e[u] * rinv;
          fc[u] += q;
          if (DIAG) fd[u] += (q * (e[u] == 1.0f ? rest : 1.0f - q)) * w;
        }
      }
    }
    if (h == 0 && lane < done)
      wl += static_cast<double>(my_m + logf(my_s)) / static_cast<double>(my_w);
    stage_flush<EPL, WPR>(fc, stage, dc, k);
    if (DIAG) stage_flush<EPL, WPR>(fd, stage, dd, k);
  }

  double* out = ws + static_cast<int64_t>(blockIdx.x) * width;
#pragma unroll
  for (int c = 0; c < kPer; ++c) {
    const int j = tid + kBlock * c;
    if (j < k) {
      out[j] = dc[c];
      if (DIAG) out[k + 1 + j] = dd[c];
    }
  }
  const double z = block_sum(wl, sred);
  if (tid == 0) out[k] = z;
}

// ---------------------------------------------------------------------------------------------
// step, k > 1024, pass 1: a warp per row streams it in chunks (8 entries per lane for 4-byte
// types, 16 for 2-byte; the next chunk's loads issued before the current one is folded in: 2 KB
// per warp in flight) with the online max / sum / top count, and writes
// stats[row] = (max, 1 / sum, accurate 1 - q_top, 0); sum log Z / inv_c per block -> zpart.
// Bytes: reads n*k*sizeof(T) + 4n + 4k per row (L1); writes 16n + 8 * grid.

template <typename T>
__global__ void __launch_bounds__(kBlock)
    row_stats_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow, int64_t scol,
                     const float* __restrict__ inv_c, const float* __restrict__ alpha,
                     float4* __restrict__ stats, double* __restrict__ zpart) {
  constexpr int kChunk = sizeof(T) == 2 ? 16 : 8;
  __shared__ double sred[kWarps];
  const int lane = threadIdx.x & 31;
  double wl = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < n;
       row += stride) {  // warp-uniform
    const float w = inv_c[row];
    const Online st = warp_row_online<kChunk, T>(lp + row * srow, scol, k, w, alpha);
    const float s = st.r + static_cast<float>(st.c);
    const float rinv = 1.0f / s;
    if (lane == 0) {
      stats[row] = make_float4(st.m, rinv, (st.r + static_cast<float>(st.c - 1)) * rinv, 0.0f);
      wl += static_cast<double>(st.m + logf(s)) / static_cast<double>(w);
    }
  }
  const double z = block_sum(wl, sred);
  if (threadIdx.x == 0) zpart[blockIdx.x] = z;
}

// step, k > 1024, pass 2: block (slab, group) = columns [1024 slab, 1024 slab + 1024) x rows
// [group * rows_per_group, ...); thread t owns columns t + 256 c (c < 4: coalesced 128-byte
// loads per warp instruction for float32) and keeps 4 rows (16 loads) in flight. float32 sums
// over 32 rows, then float64 registers; writes its group's workspace row once.
// Bytes: reads n*k*sizeof(T) (again; from L2 if the matrix fits) + 16n per slab (stats, L1/L2
// broadcast) + 4n per slab; writes G*width*8.

constexpr int kWideCols = 4;
constexpr int kWideSlab = kBlock * kWideCols;
constexpr int kWideUnroll = 4;
constexpr int kWideFlush = 32;

template <typename T, bool DIAG>
__global__ void __launch_bounds__(kBlock)
    colsum_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow, int64_t scol,
                  const float* __restrict__ inv_c, const float* __restrict__ alpha,
                  const float4* __restrict__ stats, int64_t rows_per_group,
                  double* __restrict__ ws, int64_t width) {
  const int tid = threadIdx.x;
  const int64_t g = blockIdx.y;
  const int64_t rb = g * rows_per_group;
  const int64_t re = rb + rows_per_group < n ? rb + rows_per_group : n;
  int j[kWideCols];
  bool ok[kWideCols];
  float a[kWideCols], fc[kWideCols], fd[kWideCols];
  double dc[kWideCols], dd[kWideCols];
  // Loads are unconditional, on clamped addresses (a column past k re-reads this thread's first
  // column or column 0, a row past the group re-reads the group's first row) and the
  // contributions are masked: predicated loads made nvcc sink a 64-bit row * srow + j * scol into
  // a branch per load (~18 instructions each).
  const int jb = static_cast<int>(blockIdx.x) * kWideSlab + tid;
  const int64_t cbase = static_cast<int64_t>(jb < k ? jb : 0) * scol;
  int64_t coff[kWideCols];
#pragma unroll
  for (int c = 0; c < kWideCols; ++c) {
    j[c] = jb + kBlock * c;
    ok[c] = j[c] < k;
    a[c] = ok[c] ? alpha[j[c]] : 0.0f;
    coff[c] = ok[c] ? static_cast<int64_t>(kBlock) * c * scol : 0;
    fc[c] = fd[c] = 0.0f;
    dc[c] = dd[c] = 0.0;
  }
  int since = 0;
  for (int64_t row0 = rb; row0 < re; row0 += kWideUnroll) {
    float v[kWideUnroll][kWideCols];
    float4 st[kWideUnroll];
    float w[kWideUnroll];
    bool rok[kWideUnroll];
#pragma unroll
    for (int i = 0; i < kWideUnroll; ++i) {
      rok[i] = row0 + i < re;
      const int64_t row = rok[i] ? row0 + i : row0;
      st[i] = stats[row];
      w[i] = inv_c[row];
      const T* __restrict__ rp = lp + (cbase + row * srow);
#pragma unroll
      for (int c = 0; c < kWideCols; ++c) v[i][c] = to_float(rp[coff[c]]);
    }
#pragma unroll
    for (int i = 0; i < kWideUnroll; ++i) {
#pragma unroll
      for (int c = 0; c < kWideCols; ++c) {
        const bool use = rok[i] && ok[c];
        const float e = expf(shifted(v[i][c], w[i], a[c]) - st[i].x);  // the bits row_stats saw
        const float q = e * st[i].y;
        fc[c] += use ? q : 0.0f;
        // e == 1: the row max or within rounding of it (1 - q is st.z to float precision)
        if (DIAG) fd[c] += use ? (q * (e == 1.0f ? st[i].z : 1.0f - q)) * w[i] : 0.0f;
      }
    }
    since += kWideUnroll;
    if (since >= kWideFlush) {
#pragma unroll
      for (int c = 0; c < kWideCols; ++c) {
        dc[c] += static_cast<double>(fc[c]);
        dd[c] += static_cast<double>(fd[c]);
        fc[c] = fd[c] = 0.0f;
      }
      since = 0;
    }
  }
  double* out = ws + g * width;
#pragma unroll
  for (int c = 0; c < kWideCols; ++c) {
    if (!ok[c]) continue;
    out[j[c]] = dc[c] + static_cast<double>(fc[c]);
    if (DIAG) out[k + 1 + j[c]] = dd[c] + static_cast<double>(fd[c]);
  }
  if (blockIdx.x == 0 && tid == 0) out[k] = 0.0;  // sum log Z comes from row_stats' zpart
}

// Second stage: out[c] = sum over rows g = 0, 1, ... of ws[g][c], in that order.
// Bytes moved: reads rows*width*8, writes width*8.
__global__ void reduce_partials_kernel(const double* __restrict__ ws, int64_t rows, int64_t width,
                                       double* __restrict__ out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < width;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t g = 0; g < rows; ++g) s += ws[g * width + c];
    out[c] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// materialize, k <= 32: one row per thread. Bytes: reads n*k*sizeof(T) + 4n, writes
// n*k*sizeof(out). The row is in registers before any of it is written (out may be log_p).
// The stored q are renormalised by their float64 sum (one rounding per element): a float32 row
// sum left rows of Q several ulps from summing to 1, this leaves them within 1
// (base.ROW_SUM_ULPS allows 2).
template <int KMAX, typename T>
__global__ void __launch_bounds__(kBlock)
    materialize_small_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow,
                             int64_t scol, const float* __restrict__ inv_c,
                             const float* __restrict__ alpha, void* out, int odt, int64_t orow,
                             int64_t ocol) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < n;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float q[KMAX];
    float qmax, rest, lz;
    row_softmax_small<KMAX, T, false>(lp + row * srow, scol, k, inv_c[row], alpha, q, qmax, rest,
                                      lz);
    double sd = 0.0;
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) sd += q[j];
    }
    const double rd = 1.0 / sd;
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) store_d(out, row * orow + j * ocol, odt, q[j] * rd);
    }
  }
}

// materialize, 32 < k <= 1024: one row per warp in registers, read once (the warp's shuffles
// order every load of the row before any store: out may be log_p). Bytes: reads n*k*sizeof(T)
// + 4n, writes n*k*sizeof(out). Normalised by the float64 (warp-reduced) sum of e, as above.
template <int EPL, typename T>
__global__ void __launch_bounds__(kBlock)
    materialize_row_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow,
                           int64_t scol, const float* __restrict__ inv_c,
                           const float* __restrict__ alpha, void* out, int odt, int64_t orow,
                           int64_t ocol) {
  __shared__ float salpha[32 * EPL];
  const int lane = threadIdx.x & 31;
  stage_alpha(alpha, k, salpha);
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < n;
       row += stride) {  // warp-uniform
    float e[EPL];
    float m, s, rest;
    row_exp<EPL, 1, T, false>(lp + row * srow, scol, k, inv_c[row], salpha, e, m, s, rest, nullptr,
                              0, 0);
    double sd = 0.0;
#pragma unroll
    for (int u = 0; u < EPL; ++u) {
      if (lane + 32 * u < k) sd += e[u];
    }
    const double rd = 1.0 / warp_sum_double(sd);
#pragma unroll
    for (int u = 0; u < EPL; ++u) {
      const int j = lane + 32 * u;
      if (j < k) store_d(out, row * orow + j * ocol, odt, e[u] * rd);
    }
  }
}

// materialize, k > 1024: one warp per row, streamed twice: the online stats, then the write
// pass re-reading the row (the same warp just read it: L1/L2 hits). A lane reads each of its
// columns before writing it, after the whole warp finished the first pass (out may be log_p).
// Bytes: reads n*k*sizeof(T) from DRAM (twice from cache) + 4n, writes n*k*sizeof(out).
template <typename T>
__global__ void __launch_bounds__(kBlock)
    materialize_wide_kernel(const T* __restrict__ lp, int64_t n, int k, int64_t srow,
                            int64_t scol, const float* __restrict__ inv_c,
                            const float* __restrict__ alpha, void* out, int odt, int64_t orow,
                            int64_t ocol) {
  constexpr int kChunk = sizeof(T) == 2 ? 16 : 8;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < n;
       row += stride) {  // warp-uniform
    const float w = inv_c[row];
    const T* r = lp + row * srow;
    const Online st = warp_row_online<kChunk, T>(r, scol, k, w, alpha);
    const float rinv = 1.0f / (st.r + static_cast<float>(st.c));
#pragma unroll 4
    for (int j = lane; j < k; j += 32) {
      const float e = expf(shifted(to_float(r[j * scol]), w, alpha[j]) - st.m);
      store(out, row * orow + j * ocol, odt, e * rinv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host dispatch. Kernels are picked as function pointers and launched with cudaLaunchKernel;
// persistent grids are sized from the kernel's own occupancy (resident_blocks).

enum Family { kSmall, kRow, kWide };

Family family_for(int64_t k) { return k <= kSmallK ? kSmall : k <= kRowK ? kRow : kWide; }

// Doubles per workspace row (see ppu_cuda.h); validates mode against k.
int64_t width_for(int64_t k, int mode) {
  if (mode != kNoHessian && mode != kDiagHessian && mode != kFullHessian)
    throw std::invalid_argument("ppu_fast._cuda: mode must be 0, 1 or 2, got " +
                                std::to_string(mode));
  if (mode == kFullHessian && k > kSmallK)
    throw std::invalid_argument("ppu_fast._cuda: the full Hessian's sampled W is accumulated in "
                                "the kernel only for k <= " + std::to_string(kSmallK) +
                                ", got k = " + std::to_string(k));
  return k + 1 + (mode != kNoHessian ? k : 0) + (mode == kFullHessian ? k * k : 0);
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

void check_strides(int64_t stride_row, int64_t stride_col) {
  if (stride_row < 0 || stride_col < 0)
    throw std::invalid_argument("ppu_fast._cuda: strides must be >= 0");
}

// An output of Q: its dtype code and element strides.
void check_out(int out_dtype, int64_t out_row, int64_t out_col) {
  if (out_dtype != kFloat32 && out_dtype != kFloat16 && out_dtype != kBFloat16 &&
      out_dtype != kFloat64)
    throw std::invalid_argument("ppu_fast._cuda: out dtype code must be 0, 1, 2 or 3, got " +
                                std::to_string(out_dtype));
  if (out_row < 0 || out_col < 0)
    throw std::invalid_argument("ppu_fast._cuda: out strides must be >= 0");
}

// mode -1: step_write's kernel (no Hessian, Q written).
template <int KM, typename T>
const void* small_step_func(int mode) {
  if (mode < 0) return PPU_KERNEL(step_small_kernel<KM, T, kNoHessian, true>);
  if (mode == kNoHessian) return PPU_KERNEL(step_small_kernel<KM, T, kNoHessian>);
  if (mode == kDiagHessian)
    return PPU_KERNEL(step_small_kernel<KM, T, kDiagHessian>);
  return PPU_KERNEL(step_small_kernel<KM, T, kFullHessian>);
}

template <int EPL, int WPR, typename T>
const void* row_step_func(int mode) {
  if (mode < 0) return PPU_KERNEL(step_row_kernel<EPL, WPR, T, false, true>);
  return mode == kNoHessian ? PPU_KERNEL(step_row_kernel<EPL, WPR, T, false>)
                            : PPU_KERNEL(step_row_kernel<EPL, WPR, T, true>);
}

// Rows per round of step_row_kernel: 16 per row-owner (a warp, or a pair for k > 512).
int64_t row_rows_per_round(int64_t k) { return (k > 512 ? kWarps / 2 : kWarps) * kRowsPerOwner; }

template <typename T>
const void* step_func_t(int64_t k, int mode) {
  switch (family_for(k)) {
    case kSmall:
      switch (kmax_for(k)) {
        case 4: return small_step_func<4, T>(mode);
        case 8: return small_step_func<8, T>(mode);
        case 16: return small_step_func<16, T>(mode);
        default: return small_step_func<32, T>(mode);
      }
    case kRow:
      switch (epl_for(k)) {
        case 2: return row_step_func<2, 1, T>(mode);
        case 4: return row_step_func<4, 1, T>(mode);
        case 8: return row_step_func<8, 1, T>(mode);
        case 16: return row_step_func<16, 1, T>(mode);
        default: return row_step_func<16, 2, T>(mode);  // k > 512: a pair of warps per row
      }
    default:
      return PPU_KERNEL(row_stats_kernel<T>);
  }
}

template <typename T>
const void* colsum_func_t(int mode) {
  return mode == kNoHessian ? PPU_KERNEL(colsum_kernel<T, false>)
                            : PPU_KERNEL(colsum_kernel<T, true>);
}

const void* step_func(int dtype, int64_t k, int mode) {
  switch (dtype) {
    case kFloat32: return step_func_t<float>(k, mode);
    case kFloat16: return step_func_t<__half>(k, mode);
    default: return step_func_t<__nv_bfloat16>(k, mode);
  }
}

const void* colsum_func(int dtype, int mode) {
  switch (dtype) {
    case kFloat32: return colsum_func_t<float>(mode);
    case kFloat16: return colsum_func_t<__half>(mode);
    default: return colsum_func_t<__nv_bfloat16>(mode);
  }
}

template <typename T>
const void* materialize_func_t(int64_t k) {
  switch (family_for(k)) {
    case kSmall:
      switch (kmax_for(k)) {
        case 4: return PPU_KERNEL(materialize_small_kernel<4, T>);
        case 8: return PPU_KERNEL(materialize_small_kernel<8, T>);
        case 16: return PPU_KERNEL(materialize_small_kernel<16, T>);
        default: return PPU_KERNEL(materialize_small_kernel<32, T>);
      }
    case kRow:
      switch (epl_for(k)) {
        case 2: return PPU_KERNEL(materialize_row_kernel<2, T>);
        case 4: return PPU_KERNEL(materialize_row_kernel<4, T>);
        case 8: return PPU_KERNEL(materialize_row_kernel<8, T>);
        case 16: return PPU_KERNEL(materialize_row_kernel<16, T>);
        default: return PPU_KERNEL(materialize_row_kernel<32, T>);
      }
    default:
      return PPU_KERNEL(materialize_wide_kernel<T>);
  }
}

const void* materialize_func(int dtype, int64_t k) {
  switch (dtype) {
    case kFloat32: return materialize_func_t<float>(k);
    case kFloat16: return materialize_func_t<__half>(k);
    default: return materialize_func_t<__nv_bfloat16>(k);
  }
}

// The step's launch plan; everything in it is a function of (n, k, mode, dtype, device).
struct StepPlan {
  int64_t grid;       // blocks of the main kernel (small, row) or of row_stats (wide)
  int64_t rows;       // workspace rows of partial sums (small, row: grid; wide: row groups)
  int64_t width;      // doubles per workspace row
  int64_t slabs;      // wide: 1024-column slabs (grid.x of colsum)
  int64_t rows_per_group;  // wide
  int64_t zpart_off;  // wide: offset (doubles) of row_stats' per-block sums of log Z / inv_c
  int64_t stats_off;  // wide: offset (doubles, even) of the per-row float4 stats
  int64_t size;       // workspace doubles
};

// write: step_write's plan (mode kNoHessian, the kernels that also write Q; k <= kRowK).
StepPlan make_step_plan(int64_t n, int64_t k, int mode, int dtype, int device, bool write = false) {
  StepPlan p{};
  p.width = width_for(k, mode);
  const void* f = step_func(dtype, k, write ? -1 : mode);
  switch (family_for(k)) {
    case kSmall:
      p.grid = persistent_grid(f, kBlock, n, kBlock, device);
      p.rows = p.grid;
      p.size = p.rows * p.width;
      break;
    case kRow:
      p.grid = persistent_grid(f, kBlock, n, row_rows_per_round(k), device);
      p.rows = p.grid;
      p.size = p.rows * p.width;
      break;
    default: {
      p.grid = persistent_grid(f, kBlock, n, kWarps, device);
      p.slabs = ceil_div(k, kWideSlab);
      // About two waves of colsum blocks, each group at least 64 rows, the partial rows at most
      // kMaxWorkspacePartials doubles.
      const int64_t resident = resident_blocks(colsum_func(dtype, mode), kBlock, device);
      int64_t groups = ceil_div(2 * resident, p.slabs);
      const int64_t by_rows = ceil_div(n, 64);
      if (groups > by_rows) groups = by_rows;
      const int64_t by_mem = kMaxWorkspacePartials / p.width;
      if (groups > by_mem) groups = by_mem;
      if (groups > 65535) groups = 65535;
      if (groups < 1) groups = 1;
      p.rows_per_group = n > 0 ? ceil_div(n, groups) : 1;
      p.rows = n > 0 ? ceil_div(n, p.rows_per_group) : 1;
      p.zpart_off = p.rows * p.width;
      p.stats_off = p.zpart_off + p.grid;
      p.stats_off += p.stats_off & 1;  // float4 alignment
      p.size = p.stats_off + 2 * n;
      break;
    }
  }
  return p;
}

void launch(const void* func, int64_t grid, void** args, cudaStream_t st, const char* what,
            dim3 grid3 = dim3(0)) {
  const dim3 g = grid3.x ? grid3 : dim3(static_cast<unsigned>(grid));
  check(cudaLaunchKernel(func, g, dim3(kBlock), args, 0, st), what);
  check(cudaGetLastError(), what);
}

void launch_reduce(const double* ws, int64_t rows, int64_t width, double* out, cudaStream_t st) {
  const int64_t rblocks = ceil_div(width, kBlock);
  const int rgrid = static_cast<int>(rblocks < 1024 ? rblocks : 1024);
  void* args[] = {&ws, &rows, &width, &out};
  check(cudaLaunchKernel(PPU_KERNEL(reduce_partials_kernel), dim3(rgrid), dim3(kBlock), args, 0,
                         st),
        "launch of reduce_partials_kernel");
  check(cudaGetLastError(), "launch of reduce_partials_kernel");
}

}  // namespace

static void check_write(int64_t k, int mode, int out_dtype, int64_t out_row, int64_t out_col) {
  if (k > kRowK)
    throw std::invalid_argument("ppu_fast._cuda: step_write serves k <= " +
                                std::to_string(kRowK) + ", got k = " + std::to_string(k));
  if (mode != kNoHessian)
    throw std::invalid_argument("ppu_fast._cuda: step_write has no Hessian (mode 0), got " +
                                std::to_string(mode));
  check_out(out_dtype, out_row, out_col);
}

std::tuple<int64_t, int64_t, int64_t> plan_step(int64_t n, int64_t k, int mode, int dtype,
                                                int device, bool write) {
  check_shape(dtype, n, k);
  width_for(k, mode);  // validates mode before any CUDA call
  if (write) check_write(k, mode, kFloat32, 0, 0);
  DeviceGuard guard(device);
  const StepPlan p = make_step_plan(n, k, mode, dtype, device, write);
  return {p.rows, p.width, p.size};
}

int64_t plan_materialize(int64_t n, int64_t k, int dtype, int device) {
  check_shape(dtype, n, k);
  DeviceGuard guard(device);
  const int64_t rows_per_block = family_for(k) == kSmall ? kBlock : kWarps;
  return persistent_grid(materialize_func(dtype, k), kBlock, n, rows_per_block, device);
}

namespace {

// step() and step_write(): q_out == 0 for the plain step.
void step_impl(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row,
               int64_t stride_col, uintptr_t inv_c, uintptr_t alpha, int mode,
               int64_t hess_stride, uintptr_t workspace, int64_t workspace_size, uintptr_t out,
               uintptr_t q_out, int q_dtype, int64_t q_row, int64_t q_col, int device,
               uintptr_t stream) {
  const bool write = q_out != 0;
  check_shape(dtype, n, k);
  check_strides(stride_row, stride_col);
  width_for(k, mode);
  if (write) check_write(k, mode, q_dtype, q_row, q_col);
  if (hess_stride < 1)
    throw std::invalid_argument("ppu_fast._cuda: hess_stride must be >= 1, got " +
                                std::to_string(hess_stride));
  if (workspace % 16 != 0)
    throw std::invalid_argument("ppu_fast._cuda: workspace must be 16-byte aligned");
  DeviceGuard guard(device);
  const StepPlan p = make_step_plan(n, k, mode, dtype, device, write);
  if (workspace_size < p.size)
    throw std::invalid_argument("ppu_fast._cuda: workspace holds " +
                                std::to_string(workspace_size) + " doubles, the plan needs " +
                                std::to_string(p.size));
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  // Kernel arguments, in the exact types of the kernel's parameters.
  const void* a_lp = reinterpret_cast<const void*>(log_p);
  int64_t a_n = n, a_srow = stride_row, a_scol = stride_col, a_width = p.width;
  int64_t a_m = hess_stride, a_rpg = p.rows_per_group;
  int a_k = static_cast<int>(k);
  const float* a_inv = reinterpret_cast<const float*>(inv_c);
  const float* a_alpha = reinterpret_cast<const float*>(alpha);
  double* a_ws = reinterpret_cast<double*>(workspace);
  double* a_out = reinterpret_cast<double*>(out);
  void* a_q = reinterpret_cast<void*>(q_out);
  int a_qdt = q_dtype;
  int64_t a_qrow = q_row, a_qcol = q_col;
  const void* f = step_func(dtype, k, write ? -1 : mode);
  switch (family_for(k)) {
    case kSmall: {
      void* args[] = {&a_lp, &a_n,   &a_k,     &a_srow, &a_scol, &a_inv,  &a_alpha,
                      &a_m,  &a_ws,  &a_width, &a_q,    &a_qdt,  &a_qrow, &a_qcol};
      launch(f, p.grid, args, st, "launch of step_small_kernel");
      launch_reduce(a_ws, p.rows, p.width, a_out, st);
      break;
    }
    case kRow: {
      void* args[] = {&a_lp, &a_n,     &a_k, &a_srow, &a_scol, &a_inv, &a_alpha,
                      &a_ws, &a_width, &a_q, &a_qdt,  &a_qrow, &a_qcol};
      launch(f, p.grid, args, st, "launch of step_row_kernel");
      launch_reduce(a_ws, p.rows, p.width, a_out, st);
      break;
    }
    default: {
      float4* a_stats = reinterpret_cast<float4*>(a_ws + p.stats_off);
      double* a_zpart = a_ws + p.zpart_off;
      const float4* a_cstats = a_stats;
      void* args1[] = {&a_lp, &a_n, &a_k, &a_srow, &a_scol, &a_inv, &a_alpha, &a_stats, &a_zpart};
      launch(f, p.grid, args1, st, "launch of row_stats_kernel");
      void* args2[] = {&a_lp,    &a_n,     &a_k,   &a_srow, &a_scol, &a_inv,
                       &a_alpha, &a_cstats, &a_rpg, &a_ws,   &a_width};
      launch(colsum_func(dtype, mode), 0, args2, st, "launch of colsum_kernel",
             dim3(static_cast<unsigned>(p.slabs), static_cast<unsigned>(p.rows)));
      launch_reduce(a_ws, p.rows, p.width, a_out, st);
      // out[k] (zero from the partial rows) becomes the sum of row_stats' blocks.
      launch_reduce(a_zpart, p.grid, 1, a_out + k, st);
      break;
    }
  }
}

}  // namespace

void step(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row, int64_t stride_col,
          uintptr_t inv_c, uintptr_t alpha, int mode, int64_t hess_stride, uintptr_t workspace,
          int64_t workspace_size, uintptr_t out, int device, uintptr_t stream) {
  step_impl(log_p, dtype, n, k, stride_row, stride_col, inv_c, alpha, mode, hess_stride,
            workspace, workspace_size, out, 0, 0, 0, 0, device, stream);
}

void step_write(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row,
                int64_t stride_col, uintptr_t inv_c, uintptr_t alpha, uintptr_t workspace,
                int64_t workspace_size, uintptr_t out, uintptr_t q_out, int q_dtype,
                int64_t q_row, int64_t q_col, int device, uintptr_t stream) {
  if (q_out == 0) throw std::invalid_argument("ppu_fast._cuda: step_write needs q_out");
  step_impl(log_p, dtype, n, k, stride_row, stride_col, inv_c, alpha, kNoHessian, 1, workspace,
            workspace_size, out, q_out, q_dtype, q_row, q_col, device, stream);
}

void materialize(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row,
                 int64_t stride_col, uintptr_t inv_c, uintptr_t alpha, uintptr_t out,
                 int out_dtype, int64_t out_row, int64_t out_col, int64_t grid, int device,
                 uintptr_t stream) {
  check_shape(dtype, n, k);
  check_strides(stride_row, stride_col);
  if (grid < 1 || grid > std::numeric_limits<int>::max())
    throw std::invalid_argument("ppu_fast._cuda: grid must be >= 1, got " + std::to_string(grid));
  check_out(out_dtype, out_row, out_col);
  const void* f = materialize_func(dtype, k);
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
  launch(f, grid, args, st,
         family_for(k) == kSmall ? "launch of materialize_small_kernel"
         : family_for(k) == kRow ? "launch of materialize_row_kernel"
                                 : "launch of materialize_wide_kernel");
}

int device_count() {
  int count = 0;
  detail::check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
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
