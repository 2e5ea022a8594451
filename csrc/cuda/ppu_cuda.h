// Host API of the CUDA kernels (ppu_fast._cuda). Deliberately free of CUDA types so that
// bindings.cpp compiles with the plain host compiler: device pointers and the stream travel as
// integers (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream), and nothing here links
// libtorch.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

namespace ppu_cuda {

// Element type codes shared with ppu_fast/backends/cuda.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Hessian modes of step(): what each block accumulates besides the column sums and sum log Z / inv_c.
enum Mode : int { kNoHessian = 0, kDiagHessian = 1, kFullHessian = 2 };

// Largest k served by the row-in-registers kernels (one row per thread); also the largest k whose
// full Hessian is accumulated inside the kernel (larger k: the Python launcher uses a GEMM).
constexpr int64_t kSmallK = 32;

// Launch plan of step() on CUDA device `device` (its SM count and the kernel's occupancy size a
// persistent grid): number of blocks (the rows of the workspace) and doubles per block.
// Workspace row layout: [0, k) column sums | [k] sum_i log Z_i / inv_c_i |
//   [k+1, 2k+1) Hessian diagonal (mode 1) or [k+1, k+1+k*k) full Hessian, row-major (mode 2).
std::pair<int64_t, int64_t> plan_step(int64_t n, int64_t k, int mode, int dtype, int device);

// Number of blocks materialize() uses on `device`.
int64_t plan_materialize(int64_t n, int64_t k, int dtype, int device);

// One pass over log_p (n x k, element strides stride_row / stride_col, dtype code), inv_c (n,)
// float32 contiguous, alpha (k,) float32 contiguous. Writes per-block partials into workspace
// (grid x width doubles, from plan_step) and their fixed-order sums into out (width doubles).
void step(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row, int64_t stride_col,
          uintptr_t inv_c, uintptr_t alpha, int mode, uintptr_t workspace, int64_t grid,
          int64_t width, uintptr_t out, int device, uintptr_t stream);

// Writes Q (n x k) into out (dtype code out_dtype, element strides out_row / out_col).
void materialize(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row,
                 int64_t stride_col, uintptr_t inv_c, uintptr_t alpha, uintptr_t out,
                 int out_dtype, int64_t out_row, int64_t out_col, int64_t grid, int device,
                 uintptr_t stream);

// Number of CUDA devices the runtime linked into this module sees; throws std::runtime_error
// with the CUDA error name and string (e.g. cudaErrorInsufficientDriver) when it cannot tell.
int device_count();

// "runtime X.Y, driver X.Y" (driver 0.0 when none is installed); never throws.
std::string version_info();

}  // namespace ppu_cuda
