// pybind11 bindings of ppu_fast._cuda. Pointers and the CUDA stream arrive as Python ints
// (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream): the module never links libtorch.
// C++ exceptions map to Python: std::invalid_argument -> ValueError, std::runtime_error (a CUDA
// error, named with its code and string) -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ppu_cuda.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() =
      "CUDA kernels of ppu_fast (private; use ppu_fast.backends.cuda). One fused pass over an "
      "N x k matrix of log-probabilities: column sums of Q = softmax(log_p - inv_c alpha), "
      "sum log Z / inv_c and the Hessian, or Q itself.";
  m.attr("SMALL_K") = ppu_cuda::kSmallK;
  m.attr("FLOAT32") = static_cast<int>(ppu_cuda::kFloat32);
  m.attr("FLOAT16") = static_cast<int>(ppu_cuda::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(ppu_cuda::kBFloat16);
  m.attr("FLOAT64") = static_cast<int>(ppu_cuda::kFloat64);
  m.attr("NO_HESSIAN") = static_cast<int>(ppu_cuda::kNoHessian);
  m.attr("DIAG_HESSIAN") = static_cast<int>(ppu_cuda::kDiagHessian);
  m.attr("FULL_HESSIAN") = static_cast<int>(ppu_cuda::kFullHessian);

  m.def("plan_step", &ppu_cuda::plan_step, py::arg("n"), py::arg("k"), py::arg("mode"),
        py::arg("dtype"), py::arg("device"),
        "(grid, width) of step() on CUDA device `device`: the workspace is grid x width float64 "
        "and grid is the kernel's resident blocks on that device (or fewer for small n). Row "
        "layout: [0, k) column sums, [k] sum log Z / inv_c, then the Hessian diagonal (k, mode 1) "
        "or the full k x k Hessian row-major (mode 2, k <= SMALL_K only).");
  m.def("plan_materialize", &ppu_cuda::plan_materialize, py::arg("n"), py::arg("k"),
        py::arg("dtype"), py::arg("device"), "Number of blocks materialize() uses on `device`.");
  m.def("step", &ppu_cuda::step, py::arg("log_p"), py::arg("dtype"), py::arg("n"), py::arg("k"),
        py::arg("stride_row"), py::arg("stride_col"), py::arg("inv_c"), py::arg("alpha"),
        py::arg("mode"), py::arg("workspace"), py::arg("grid"), py::arg("width"), py::arg("out"),
        py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Launch one step pass on `stream` of `device`. log_p: device pointer to n x k elements "
        "of dtype code `dtype` with element strides (stride_row, stride_col); inv_c: (n,) "
        "float32 contiguous; alpha: (k,) float32 contiguous; workspace: grid x width float64 "
        "(from plan_step); out: (width,) float64, receives the fixed-order sum of the workspace "
        "rows. Asynchronous; raises RuntimeError naming the CUDA error if a launch fails.");
  m.def("materialize", &ppu_cuda::materialize, py::arg("log_p"), py::arg("dtype"), py::arg("n"),
        py::arg("k"), py::arg("stride_row"), py::arg("stride_col"), py::arg("inv_c"),
        py::arg("alpha"), py::arg("out"), py::arg("out_dtype"), py::arg("out_row"),
        py::arg("out_col"), py::arg("grid"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Launch the kernel writing Q (n x k) into `out` (dtype code out_dtype: float32, float16, "
        "bfloat16 or float64; element strides out_row, out_col). Asynchronous.");
  m.def("device_count", &ppu_cuda::device_count,
        "CUDA devices visible to this module's runtime; raises RuntimeError naming the CUDA "
        "error (e.g. cudaErrorInsufficientDriver) when there is no usable driver.");
  m.def("version_info", &ppu_cuda::version_info,
        "'CUDA runtime X.Y, driver X.Y' (driver 'none' without one); never raises.");
}
