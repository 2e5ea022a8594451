// Plain-data interface between the pybind11 binding (bindings.cpp) and the per-ISA kernel
// translation units (kernel_avx512.cpp, kernel_avx2.cpp, kernel_generic.cpp).
//
// Nothing here is an inline function or template: every ISA translation unit is compiled with
// its own -m flags, and an inline function shared between them could be linked in its AVX-512
// form into the generic path (an ODR hazard). Only this POD struct is shared.
#pragma once
#include <cstdint>

namespace ppu_cpu {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };
enum HMode : int { H_NONE = 0, H_FULL = 1, H_DIAG = 2 };

// Rows-in-SIMD-lanes path for k < LANES_MAX_K; one row along the vector otherwise.
constexpr int64_t LANES_MAX_K = 32;
// Rows per range are a multiple of this (the widest SIMD width) so blocks never straddle ranges.
constexpr int64_t ROW_UNIT = 16;

struct Params {
  // Input log-probabilities: n x k of dtype lp_dtype, element (i, j) at lp + i*sr + j*sc
  // (strides in elements, non-negative).
  const void* lp;
  int lp_dtype;
  int64_t n, k, sr, sc;
  const float* inv_c;   // (n,) contiguous
  const float* alpha;   // (k,) contiguous, already rounded to float32 (as the reference does)
  // Optional output Q (materialize): element (i, j) at out + i*osr + j*osc, dtype out_dtype.
  void* out;
  int out_dtype;
  int64_t osr, osc;
  int stats;            // 1: accumulate column sums and sum_i log Z_i / inv_c_i (+ Hessian)
  int hmode;            // H_NONE, H_FULL (only k < LANES_MAX_K), H_DIAG
  // Fixed partition of the rows into ranges (independent of the thread count): range r is rows
  // [r * range_rows, min(n, (r + 1) * range_rows)). Each range writes its own partial sums, and
  // the binding adds the partials in range order, so results are bit-identical for any number
  // of threads.
  int64_t nranges, range_rows;
  double* colsum_part;  // nranges x k
  double* wlogz_part;   // nranges
  double* h_part;       // nranges x k x k (H_FULL) or nranges x k (H_DIAG), else unused
  int nthreads;
};

}  // namespace ppu_cpu
