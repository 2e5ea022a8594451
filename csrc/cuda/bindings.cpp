// pybind11 bindings of ppu_fast._cuda. Pointers and the CUDA stream arrive as Python ints
// (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream): the module never links libtorch.
// C++ exceptions map to Python: std::invalid_argument -> ValueError, std::runtime_error (a CUDA
// error, named with its code and string) -> RuntimeError. Arguments are validated before any
// CUDA call, so argument errors read the same with or without a GPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ppu_cuda.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() =
      "CUDA kernels of ppu_fast (private; use ppu_fast.backends.cuda). One fused pass over an "
      "N x k matrix of log-probabilities: column sums of Q = softmax(log_p - inv_c alpha), "
      "sum log Z / inv_c and the Hessian's diagonal / sampled weights, or Q itself; and prepare, "
      "one pass over the user's input that validates, writes log P^ and sums.";
  m.attr("SMALL_K") = ppu_cuda::kSmallK;
  m.attr("ROW_K") = ppu_cuda::kRowK;
  m.attr("FLOAT32") = static_cast<int>(ppu_cuda::kFloat32);
  m.attr("FLOAT16") = static_cast<int>(ppu_cuda::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(ppu_cuda::kBFloat16);
  m.attr("FLOAT64") = static_cast<int>(ppu_cuda::kFloat64);
  m.attr("NO_HESSIAN") = static_cast<int>(ppu_cuda::kNoHessian);
  m.attr("DIAG_HESSIAN") = static_cast<int>(ppu_cuda::kDiagHessian);
  m.attr("FULL_HESSIAN") = static_cast<int>(ppu_cuda::kFullHessian);
  m.attr("PROBS") = static_cast<int>(ppu_cuda::kProbs);
  m.attr("LOGITS") = static_cast<int>(ppu_cuda::kLogits);
  m.attr("LOG_P") = static_cast<int>(ppu_cuda::kLogP);

  m.def("plan_step", &ppu_cuda::plan_step, py::arg("n"), py::arg("k"), py::arg("mode"),
        py::arg("dtype"), py::arg("device"), py::arg("write") = false,
        "(rows, width, workspace) of step() on CUDA device `device`: the per-block partial rows "
        "the result sums, doubles per row, and the float64 workspace to allocate. Row layout: "
        "[0, k) column sums, [k] sum log Z / inv_c, then the Hessian diagonal (k, modes 1 and 2) "
        "and the sampled W (k x k row-major, strict upper triangle, mode 2, k <= SMALL_K only). "
        "write: the plan of step_write (mode 0, k <= ROW_K).");
  m.def("plan_materialize", &ppu_cuda::plan_materialize, py::arg("n"), py::arg("k"),
        py::arg("dtype"), py::arg("device"), "Number of blocks materialize() uses on `device`.");
  m.def("step", &ppu_cuda::step, py::arg("log_p"), py::arg("dtype"), py::arg("n"), py::arg("k"),
        py::arg("stride_row"), py::arg("stride_col"), py::arg("inv_c"), py::arg("alpha"),
        py::arg("mode"), py::arg("hess_stride"), py::arg("workspace"), py::arg("workspace_size"),
        py::arg("out"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Launch one step pass on `stream` of `device`. log_p: device pointer to n x k elements "
        "of dtype code `dtype` with element strides (stride_row, stride_col); inv_c: (n,) "
        "float32 contiguous; alpha: (k,) float32 contiguous; hess_stride: m of the Hessian's row "
        "sample (mode 2); workspace: workspace_size float64 (at least plan_step's, 16-byte "
        "aligned); out: (width,) float64, receives the fixed-order sum of the partial rows. "
        "Asynchronous; raises RuntimeError naming the CUDA error if a launch fails.");
  m.def("step_write", &ppu_cuda::step_write, py::arg("log_p"), py::arg("dtype"), py::arg("n"),
        py::arg("k"), py::arg("stride_row"), py::arg("stride_col"), py::arg("inv_c"),
        py::arg("alpha"), py::arg("workspace"), py::arg("workspace_size"), py::arg("out"),
        py::arg("q_out"), py::arg("q_dtype"), py::arg("q_row"), py::arg("q_col"),
        py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "step (mode 0) that also writes Q into q_out (dtype code q_dtype: float32, float16, "
        "bfloat16 or float64; element strides q_row, q_col; may be log_p) and sums the values "
        "written: Newton's last pass. k <= ROW_K; workspace: plan_step(..., write=True)'s. "
        "Asynchronous.");
  m.def("materialize", &ppu_cuda::materialize, py::arg("log_p"), py::arg("dtype"), py::arg("n"),
        py::arg("k"), py::arg("stride_row"), py::arg("stride_col"), py::arg("inv_c"),
        py::arg("alpha"), py::arg("out"), py::arg("out_dtype"), py::arg("out_row"),
        py::arg("out_col"), py::arg("grid"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Launch the kernel writing Q (n x k) into `out` (dtype code out_dtype: float32, float16, "
        "bfloat16 or float64; element strides out_row, out_col). Asynchronous.");
  m.def("plan_prepare", &ppu_cuda::plan_prepare, py::arg("n"), py::arg("k"), py::arg("mode"),
        py::arg("dtype"), py::arg("first"), py::arg("hess"), py::arg("device"),
        "(grid, width, workspace) of prepare(): width is the packed result's length "
        "(base.packed_size, without W when k > SMALL_K).");
  m.def("prepare", &ppu_cuda::prepare, py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("k"),
        py::arg("stride_row"), py::arg("stride_col"), py::arg("mode"), py::arg("forget"),
        py::arg("fill"), py::arg("fill_first"), py::arg("out"), py::arg("out_dtype"),
        py::arg("out_row"), py::arg("out_col"), py::arg("inv_c"), py::arg("hess"),
        py::arg("hess_stride"), py::arg("tol"), py::arg("workspace"), py::arg("workspace_size"),
        py::arg("result"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Launch prepare's pass over x (n x k, dtype code incl. float64 = 3, element strides) in "
        "mode 0 probs / 1 logits / 2 log_p. forget: uint8 (n,) or 0; fill: float32 (k,) or 0; "
        "fill_first: float32 [softmax(fill) | q (1 - q) of it | logsumexp(fill)] (2k + 1) or 0; "
        "out: the solver's buffer (dtype code 0-2, strides) or 0 (log_p mode only); inv_c: "
        "float32 (n,) or 0 (no first evaluation); hess 0 / 1 diagonal / 2 diagonal + W (k <= "
        "SMALL_K). result: (width,) float64 on the device, the packed layout of "
        "base.unpack_prepare. Asynchronous.");
  m.def("device_count", &ppu_cuda::device_count,
        "CUDA devices visible to this module's runtime; raises RuntimeError naming the CUDA "
        "error (e.g. cudaErrorInsufficientDriver) when there is no usable driver.");
  m.def("version_info", &ppu_cuda::version_info,
        "'CUDA runtime X.Y, driver X.Y' (driver 'none' without one); never raises.");
}
