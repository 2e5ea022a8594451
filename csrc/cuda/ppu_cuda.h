// Host API of the CUDA kernels (ppu_fast._cuda). Deliberately free of CUDA types so that
// bindings.cpp compiles with the plain host compiler: device pointers and the stream travel as
// integers (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream), and nothing here links
// libtorch. Every function validates its arguments (std::invalid_argument -> ValueError) before
// any CUDA call; CUDA failures throw std::runtime_error (-> RuntimeError) naming the error.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

namespace ppu_cuda {

// Element type codes shared with ppu_fast/backends/cuda.py (float64: prepare's input and
// materialize's output only).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Hessian modes of step(): what each block accumulates besides the column sums and sum log Z /
// inv_c. kDiagHessian: the diagonal d (1 - q of a row's maximum from the row's other entries);
// kFullHessian: d and the sampled weights W_ab = sum_{i in S} inv_c_i q_ia q_ib (a < b), k <=
// kSmallK only (the launcher assembles the Newton Hessian; larger k: W from a GEMM).
enum Mode : int { kNoHessian = 0, kDiagHessian = 1, kFullHessian = 2 };

// prepare() modes, as ppu_fast.backends.base.MODE_CODE.
enum PrepareMode : int { kProbs = 0, kLogits = 1, kLogP = 2 };

// Kernel families: k <= kSmallK one row per thread in registers; kSmallK < k <= kRowK one row
// per warp in registers; larger k two streaming passes (see kernels.cu).
constexpr int64_t kSmallK = 32;
constexpr int64_t kRowK = 1024;

// Launch plan of step() on CUDA device `device`: (rows, width, workspace) = the number of
// per-block partial rows the result sums, doubles per row, and the float64 workspace to allocate
// (16-byte aligned). Row layout: [0, k) column sums | [k] sum_i log Z_i / inv_c_i |
//   [k+1, 2k+1) Hessian diagonal (modes 1, 2) | [2k+1, 2k+1+k*k) W row-major (mode 2; the strict
//   upper triangle, zeros elsewhere).
// write: the plan of step_write (mode 0, k <= kRowK).
std::tuple<int64_t, int64_t, int64_t> plan_step(int64_t n, int64_t k, int mode, int dtype,
                                                int device, bool write = false);

// Number of blocks materialize() uses on `device`.
int64_t plan_materialize(int64_t n, int64_t k, int dtype, int device);

// One pass over log_p (n x k, element strides stride_row / stride_col, dtype code), inv_c (n,)
// float32 contiguous, alpha (k,) float32 contiguous; hess_stride = m of the Hessian's row sample
// (mode 2; ppu_fast.backends.base.hessian_stride). Writes per-block partials into workspace
// (workspace_size doubles, at least plan_step's) and their fixed-order sums into out (width
// doubles).
void step(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row, int64_t stride_col,
          uintptr_t inv_c, uintptr_t alpha, int mode, int64_t hess_stride, uintptr_t workspace,
          int64_t workspace_size, uintptr_t out, int device, uintptr_t stream);

// step() without a Hessian (mode 0) that also writes Q into q_out (dtype code q_dtype, element
// strides q_row / q_col; the values materialize writes, to the last bit for k <= 512), summing
// the values written: Newton's last pass. q_out may be log_p. k <= kRowK; the workspace is
// plan_step(..., write = true)'s.
void step_write(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row,
                int64_t stride_col, uintptr_t inv_c, uintptr_t alpha, uintptr_t workspace,
                int64_t workspace_size, uintptr_t out, uintptr_t q_out, int q_dtype,
                int64_t q_row, int64_t q_col, int device, uintptr_t stream);

// Writes Q (n x k) into out (dtype code out_dtype, element strides out_row / out_col).
void materialize(uintptr_t log_p, int dtype, int64_t n, int64_t k, int64_t stride_row,
                 int64_t stride_col, uintptr_t inv_c, uintptr_t alpha, uintptr_t out,
                 int out_dtype, int64_t out_row, int64_t out_col, int64_t grid, int device,
                 uintptr_t stream);

// Launch plan of prepare(): (grid, width, workspace doubles). width is the packed result's
// length (ppu_fast.backends.base.packed_size) without W when k > kSmallK:
//   [kind, row, A (k), B (k)] + [colsum (k), wlogz, d (k) if hess >= 1, W (k*k) if hess == 2]
//   when `first`. hess: 0 none, 1 diagonal, 2 diagonal + sampled W (k <= kSmallK); needs first.
std::tuple<int64_t, int64_t, int64_t> plan_prepare(int64_t n, int64_t k, int mode, int dtype,
                                                   bool first, int hess, int device);

// One pass over x (n x k, dtype code incl. float64, element strides): validates every row
// (first offending row and kind), writes log P^ into out (0: no out; dtype code out_dtype, a
// solver dtype), fill (k float32) on rows with forget[i] != 0 (uint8, 0: no mask; fill 0: none),
// sums the normalised rows over retained / forgotten rows (column max in "log_p" mode) and, with
// inv_c (0: none), the first evaluation at alpha = 0. fill_first (probs / logits with forget and
// fill): [softmax(fill) (k) | its q (1 - q) terms (k) | logsumexp(fill)] float32. The result
// (width doubles, the packed layout above) is written to `result` on the device.
void prepare(uintptr_t x, int dtype, int64_t n, int64_t k, int64_t stride_row, int64_t stride_col,
             int mode, uintptr_t forget, uintptr_t fill, uintptr_t fill_first, uintptr_t out,
             int out_dtype, int64_t out_row, int64_t out_col, uintptr_t inv_c, int hess,
             int64_t hess_stride, double tol, uintptr_t workspace, int64_t workspace_size,
             uintptr_t result, int device, uintptr_t stream);

// Number of CUDA devices the runtime linked into this module sees; throws std::runtime_error
// with the CUDA error name and string (e.g. cudaErrorInsufficientDriver) when it cannot tell.
int device_count();

// "CUDA runtime X.Y, driver X.Y" (driver "none" when none is installed); never throws.
std::string version_info();

}  // namespace ppu_cuda
