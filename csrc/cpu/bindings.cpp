// pybind11 module ppu_fast._C: run-time ISA dispatch and the fixed-order combination of the
// per-range partial sums. No libtorch: the Python launcher (ppu_fast/backends/cpu.py) validates
// the tensors and passes data pointers, sizes and strides.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "params.h"

namespace py = pybind11;

namespace ppu_cpu {
void run_generic(const Params& p);
#ifdef PPU_HAVE_X86_KERNELS
void run_avx2(const Params& p);
void run_avx512(const Params& p);
#endif
}  // namespace ppu_cpu

using namespace ppu_cpu;

namespace {

bool cpu_has(const std::string& isa) {
  if (isa == "generic") return true;
#ifdef PPU_HAVE_X86_KERNELS
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return false;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* name : {"avx512", "avx2", "generic"})
    if (cpu_has(name)) out.emplace_back(name);
  return out;
}

std::string best_isa() { return supported_isas().front(); }

using Fn = void (*)(const Params&);

Fn pick(const std::string& isa_in) {
  const std::string isa = isa_in == "auto" ? best_isa() : isa_in;
  if (isa != "avx512" && isa != "avx2" && isa != "generic")
    throw py::value_error("isa: expected 'auto', 'avx512', 'avx2' or 'generic', got '" + isa + "'");
  if (!cpu_has(isa)) throw py::value_error("isa: '" + isa + "' is not supported by this CPU/build");
#ifdef PPU_HAVE_X86_KERNELS
  if (isa == "avx512") return run_avx512;
  if (isa == "avx2") return run_avx2;
#endif
  return run_generic;
}

template <class T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void check_common(int lp_dtype, int64_t n, int64_t k, int64_t sr, int64_t sc, uintptr_t lp,
                  uintptr_t inv_c, uintptr_t alpha, int nthreads) {
  if (lp_dtype < 0 || lp_dtype > 2) throw py::value_error("log_p dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  if (n < 0 || k < 1) throw py::value_error("log_p: expected n >= 0 rows and k >= 1 columns");
  if (sr < 0 || sc < 0) throw py::value_error("log_p: strides must be non-negative");
  if (n > 0 && (!lp || !inv_c || !alpha)) throw py::value_error("null data pointer");
  if (nthreads < 1) throw py::value_error("nthreads must be >= 1");
}

// Ranges depend on (n, k) only, never on the thread count, so results are bit-identical for any
// number of threads. A range holds at least ~8k elements (amortising its flushes), there are at
// most 256 of them, and their partials (nranges x k doubles) stay under 32 MB.
void make_ranges(int64_t n, int64_t k, Params& p) {
  int64_t nr = (n * k) / 8192;
  if (nr > 256) nr = 256;
  const int64_t cap = (int64_t(1) << 22) / k;
  if (nr > cap) nr = cap;
  if (nr < 1) nr = 1;
  int64_t rows = (n + nr - 1) / nr;
  rows = ((rows + ROW_UNIT - 1) / ROW_UNIT) * ROW_UNIT;
  if (rows < ROW_UNIT) rows = ROW_UNIT;
  p.range_rows = rows;
  p.nranges = n > 0 ? (n + rows - 1) / rows : 0;
}

// Tiny inputs are not worth waking a thread team (a fork/join costs a few microseconds).
int threads_for(int64_t n, int64_t k, int nthreads) {
  return n * k < 32768 ? 1 : nthreads;
}

Params base_params(uintptr_t lp, int lp_dtype, int64_t n, int64_t k, int64_t sr, int64_t sc,
                   uintptr_t inv_c, const std::vector<float>& alpha32, int nthreads) {
  Params p{};
  p.lp = ptr<const void>(lp);
  p.lp_dtype = lp_dtype;
  p.n = n; p.k = k; p.sr = sr; p.sc = sc;
  p.inv_c = ptr<const float>(inv_c);
  p.alpha = alpha32.data();
  p.out = nullptr;
  p.out_dtype = 0; p.osr = 0; p.osc = 0;
  p.nthreads = threads_for(n, k, nthreads);
  make_ranges(n, k, p);
  return p;
}

std::vector<float> alpha_to_f32(uintptr_t alpha, int64_t k) {
  // float32 like the reference's alpha.float(): the arithmetic is float32 throughout.
  const double* a = ptr<const double>(alpha);
  std::vector<float> out(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) out[j] = static_cast<float>(a[j]);
  return out;
}

void step(uintptr_t lp, int lp_dtype, int64_t n, int64_t k, int64_t sr, int64_t sc,
          uintptr_t inv_c, uintptr_t alpha, uintptr_t colsum_out, uintptr_t wlogz_out,
          int hmode, uintptr_t h_out, uintptr_t out, int out_dtype, int64_t osr, int64_t osc,
          int nthreads, const std::string& isa) {
  check_common(lp_dtype, n, k, sr, sc, lp, inv_c, alpha, nthreads);
  if (hmode < 0 || hmode > 2) throw py::value_error("hessian mode must be 0 (none), 1 (full) or 2 (diag)");
  if (hmode == H_FULL && k >= LANES_MAX_K)
    throw py::value_error("hessian: the full Hessian is accumulated in the kernel only for k < " +
                          std::to_string(LANES_MAX_K) + " (the launcher uses a GEMM above)");
  if (!colsum_out || !wlogz_out || (hmode != H_NONE && !h_out)) throw py::value_error("null output pointer");
  if (out && (out_dtype < 0 || out_dtype > 2 || osr < 0 || osc < 0))
    throw py::value_error("out: bad dtype code or strides");
  const Fn fn = pick(isa);
  const std::vector<float> a32 = alpha_to_f32(alpha, k);
  Params p = base_params(lp, lp_dtype, n, k, sr, sc, inv_c, a32, nthreads);
  p.stats = 1;
  p.hmode = hmode;
  p.out = ptr<void>(out);
  p.out_dtype = out_dtype; p.osr = osr; p.osc = osc;
  const int64_t hsz = hmode == H_FULL ? k * k : (hmode == H_DIAG ? k : 0);
  std::vector<double> cpart(static_cast<size_t>(p.nranges * k));
  std::vector<double> wpart(static_cast<size_t>(p.nranges));
  std::vector<double> hpart(static_cast<size_t>(p.nranges * hsz));
  p.colsum_part = cpart.data();
  p.wlogz_part = wpart.data();
  p.h_part = hpart.data();
  {
    py::gil_scoped_release release;
    if (n > 0) fn(p);
    // Fixed-order combination of the range partials: deterministic for any thread count.
    double* cs = ptr<double>(colsum_out);
    for (int64_t j = 0; j < k; ++j) cs[j] = 0.0;
    double w = 0.0;
    for (int64_t r = 0; r < p.nranges; ++r) {
      const double* src = cpart.data() + r * k;
      for (int64_t j = 0; j < k; ++j) cs[j] += src[j];
      w += wpart[r];
    }
    *ptr<double>(wlogz_out) = w;
    if (hsz) {
      double* h = ptr<double>(h_out);
      for (int64_t t = 0; t < hsz; ++t) h[t] = 0.0;
      for (int64_t r = 0; r < p.nranges; ++r) {
        const double* src = hpart.data() + r * hsz;
        for (int64_t t = 0; t < hsz; ++t) h[t] += src[t];
      }
    }
  }
}

void materialize(uintptr_t lp, int lp_dtype, int64_t n, int64_t k, int64_t sr, int64_t sc,
                 uintptr_t inv_c, uintptr_t alpha, uintptr_t out, int out_dtype, int64_t osr,
                 int64_t osc, int nthreads, const std::string& isa) {
  check_common(lp_dtype, n, k, sr, sc, lp, inv_c, alpha, nthreads);
  if (out_dtype < 0 || out_dtype > 2) throw py::value_error("out dtype code must be 0, 1 or 2");
  if (osr < 0 || osc < 0) throw py::value_error("out: strides must be non-negative");
  if (n > 0 && !out) throw py::value_error("out: null data pointer");
  const Fn fn = pick(isa);
  const std::vector<float> a32 = alpha_to_f32(alpha, k);
  Params p = base_params(lp, lp_dtype, n, k, sr, sc, inv_c, a32, nthreads);
  p.stats = 0;
  p.hmode = H_NONE;
  p.out = ptr<void>(out);
  p.out_dtype = out_dtype; p.osr = osr; p.osc = osc;
  py::gil_scoped_release release;
  if (n > 0) fn(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ppu_fast CPU kernels: fused softmax-with-column-shift step and materialize "
            "(C++17, OpenMP, run-time AVX-512 / AVX2 / generic dispatch). Private: use "
            "ppu_fast.backends.cpu.";
  m.attr("LANES_MAX_K") = LANES_MAX_K;
  m.def("supported_isas", &supported_isas,
        "Instruction sets this CPU and build can run, best first (e.g. ['avx512', 'avx2', 'generic']).");
  m.def("best_isa", &best_isa, "The instruction set 'auto' picks on this CPU.");
  m.def("step", &step,
        "One pass over log_p (n x k, dtype code 0 f32 / 1 f16 / 2 bf16, element (i, j) at "
        "lp + i*sr + j*sc): writes colsum (k,) f64 to colsum_out, sum_i log Z_i / inv_c_i (f64) "
        "to wlogz_out and, for hmode 1 (full, k < LANES_MAX_K) / 2 (diag), the Hessian "
        "sum_i inv_c_i (diag(q_i) - q_i q_i^T) (k x k or its diagonal, f64) to h_out. If out "
        "is non-zero, Q is also written there (dtype code out_dtype, strides osr, osc). "
        "inv_c: (n,) f32 contiguous; alpha: (k,) f64 contiguous. Releases the GIL.",
        py::arg("lp"), py::arg("lp_dtype"), py::arg("n"), py::arg("k"), py::arg("sr"), py::arg("sc"),
        py::arg("inv_c"), py::arg("alpha"), py::arg("colsum_out"), py::arg("wlogz_out"),
        py::arg("hmode"), py::arg("h_out"), py::arg("out"), py::arg("out_dtype"), py::arg("osr"),
        py::arg("osc"), py::arg("nthreads"), py::arg("isa") = "auto");
  m.def("materialize", &materialize,
        "Writes Q (n x k) into out (dtype code out_dtype, strides osr, osc). Same input "
        "conventions as step. Releases the GIL.",
        py::arg("lp"), py::arg("lp_dtype"), py::arg("n"), py::arg("k"), py::arg("sr"), py::arg("sc"),
        py::arg("inv_c"), py::arg("alpha"), py::arg("out"), py::arg("out_dtype"), py::arg("osr"),
        py::arg("osc"), py::arg("nthreads"), py::arg("isa") = "auto");
}
