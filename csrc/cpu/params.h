// Plain-data interface between the pybind11 binding (bindings.cpp), the thread pool (pool.cpp)
// and the per-ISA kernel translation units (kernel_avx512.cpp, kernel_avx2.cpp,
// kernel_generic.cpp; the float64 kernels of kernel_f64.h are built into the last two).
//
// Nothing here is an inline function or template: every ISA translation unit is compiled with
// its own -m flags, and an inline function shared between them could be linked in its AVX-512
// form into the generic path (an ODR hazard). Only this POD struct and plain declarations are
// shared.
#pragma once
#include <cstdint>

namespace ppu_cpu {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };
enum HMode : int { H_NONE = 0, H_FULL = 1, H_DIAG = 2 };
enum Op : int { OP_STEP = 0, OP_MATERIALIZE = 1, OP_PREPARE = 2 };
enum PrepMode : int { MODE_PROBS = 0, MODE_LOGITS = 1, MODE_LOGP = 2 };
// Fault kinds prepare reports (ppu_fast/backends/base.py ERR_*).
enum Fault : int { ERR_NONE = 0, ERR_NONFINITE = 1, ERR_NEGATIVE = 2, ERR_ROWSUM = 3,
                   ERR_ALL_NEG_INF = 4 };

// Rows-in-SIMD-lanes path for k < LANES_MAX_K; one row along the vector otherwise.
constexpr int64_t LANES_MAX_K = 32;
// Rows per range are a multiple of this (the widest SIMD width, and the Hessian sample's block)
// so blocks never straddle ranges.
constexpr int64_t ROW_UNIT = 16;

struct Params {
  int op;               // OP_STEP, OP_MATERIALIZE or OP_PREPARE
  // Input: n x k of dtype lp_dtype, element (i, j) at lp + i*sr + j*sc (strides in elements,
  // non-negative). For step / materialize the solver's log-probabilities (F32/F16/BF16); for
  // prepare the user's input (F64 too).
  const void* lp;
  int lp_dtype;
  int64_t n, k, sr, sc;
  const float* inv_c;   // (n,) contiguous; prepare: may be null (no first evaluation)
  const float* alpha;   // (k,) contiguous, already rounded to float32 (as the reference does)
  // The float64 kernels (a float64 solver buffer: log_p for step / materialize, out for
  // prepare, or x in log_p mode without out) read these instead of inv_c / alpha: rounding
  // 1 / c or alpha to float32 would move Q by ~1e-7 |alpha / c|, far above float64's precision.
  const double* inv_c64;
  const double* alpha64;
  // Output (materialize: Q; step: optionally Q; prepare: log P^, may be null in log_p mode):
  // element (i, j) at out + i*osr + j*osc, dtype out_dtype.
  void* out;
  int out_dtype;
  int64_t osr, osc;
  // 1: rows of a float32 out (osc 1) are written with non-temporal stores: out is large (past
  // the last-level cache, so the next pass reads it from memory anyway) and is not the input,
  // and a cached store would first read each line of out only to overwrite it.
  int stream_out;
  int stats;            // 1: accumulate column sums and sum_i log Z_i / inv_c_i (+ Hessian)
  int hmode;            // H_NONE, H_FULL, H_DIAG
  // The Hessian's off-diagonal sample: the 16-row blocks b with b % hstride == 0.
  int64_t hstride;
  // prepare only.
  int mode;             // MODE_PROBS, MODE_LOGITS, MODE_LOGP
  const uint8_t* forget;  // (n,) 0/1 or null
  const float* fill;    // (k,) log pseudo-probabilities for forget rows, or null
  const float* qfill;   // (k,) softmax(fill), when fill and stats
  float lzfill;         // logsumexp(fill)
  double tol;           // probabilities: |row sum - 1| <= tol, the sum in float64 (as the
                        // reference's); the vector checks flag rows with flag_tol (below)
  // Fixed partition of the rows into ranges (independent of the thread count): range r is rows
  // [r * range_rows, min(n, (r + 1) * range_rows)). Each range writes its own partial sums, and
  // the binding adds the partials in range order, so results are bit-identical for any number
  // of threads.
  int64_t nranges, range_rows;
  double* colsum_part;  // nranges x k
  double* wlogz_part;   // nranges
  // nranges x hsize: H_DIAG: the diagonal d (k); H_FULL: d (k) then W (k x k, row-major, the
  // strict upper triangle meaningful: sum over sampled rows of inv_c q_j q_l, j < l).
  double* h_part;
  double* sums_part;    // prepare: nranges x 2k (retain sums | forget sums), or x k column max
  int64_t* err_part;    // prepare: nranges, row * 8 + kind of the range's first fault, or -1
  // prepare with stats and fill: the forget rows all hold fill, so their part of the first
  // evaluation is added analytically by the binding from, per range, [count, sum inv_c,
  // sum 1 / inv_c, sum of inv_c over the rows of the Hessian sample] of those rows.
  double* fill_part;    // nranges x 4
  int nthreads;
};

// The thread pool (pool.cpp): runs fn(ctx, r) for r in [0, nranges) on up to nthreads threads,
// the calling thread included; returns when every range is done. A helper thread that is not
// scheduled in time never delays the caller: ranges are claimed one at a time, and the caller
// waits only for ranges a helper has already started.
using RangeFn = void (*)(const void* ctx, int64_t r);
void parallel_ranges(int64_t nranges, int nthreads, RangeFn fn, const void* ctx);
// The helper threads the pool holds (they persist between calls).
int pool_threads();

// The float64 kernels (kernel_f64.h), by instruction set; bindings.cpp picks one.
void run_f64_generic(const Params& p);
#ifdef PPU_HAVE_X86_KERNELS
void run_f64_avx2(const Params& p);
#endif

}  // namespace ppu_cpu
