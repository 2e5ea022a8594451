// pybind11 module ppu_fast._C: run-time ISA dispatch, the plan of fixed row ranges and threads, and
// the fixed-order combination of the per-range partial sums. No libtorch: the Python launcher
// (ppu_fast/backends/cpu.py) validates the tensors and passes data pointers, sizes and strides.
// A float64 solver buffer (dtype code 3) runs the float64 kernels (kernel_f64.h), whose inv_c and
// alpha are float64 too; the float32 / float16 / bfloat16 buffers run kernel.h.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "host_cache.h"
#include "newton.h"
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

Fn pick(const std::string& isa_in, bool f64 = false) {
  const std::string isa = isa_in == "auto" ? best_isa() : isa_in;
  if (isa != "avx512" && isa != "avx2" && isa != "generic")
    throw py::value_error("isa: expected 'auto', 'avx512', 'avx2' or 'generic', got '" + isa + "'");
  if (!cpu_has(isa)) throw py::value_error("isa: '" + isa + "' is not supported by this CPU/build");
#ifdef PPU_HAVE_X86_KERNELS
  // float64 has an AVX2 kernel and a generic one: AVX-512 machines run the AVX2 one (an
  // AVX-512 double kernel could not be tested where it was written).
  if (f64) return isa == "generic" ? run_f64_generic : run_f64_avx2;
  if (isa == "avx512") return run_avx512;
  if (isa == "avx2") return run_avx2;
#endif
  return f64 ? run_f64_generic : run_generic;
}

template <class T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// The full Hessian's W partials are k x k per range: beyond this k Newton uses the diagonal.
constexpr int64_t MAX_FULL_K = 1024;

void check_common(int lp_dtype, int64_t n, int64_t k, int64_t sr, int64_t sc, uintptr_t lp,
                  uintptr_t inv_c, uintptr_t alpha, int nthreads) {
  if (lp_dtype < 0 || lp_dtype > 3) throw py::value_error("log_p dtype code must be 0 (f32), 1 (f16), 2 (bf16) or 3 (f64)");
  if (n < 0 || k < 1) throw py::value_error("log_p: expected n >= 0 rows and k >= 1 columns");
  if (sr < 0 || sc < 0) throw py::value_error("log_p: strides must be non-negative");
  if (n > 0 && (!lp || !inv_c || !alpha)) throw py::value_error("null data pointer");
  if (nthreads < 1) throw py::value_error("nthreads must be >= 1");
}

// Ranges depend on (n, k, the partials' size) only, never on the thread count, so results are
// bit-identical for any number of threads. A range holds at least ~8k elements (amortising its
// flushes), there are at most 256 of them, and all their partials stay under ~2 MB (a k x k
// Hessian sample per range at k = 128 allows 15 ranges).
void make_ranges(int64_t n, int64_t k, int64_t part_doubles, Params& p) {
  int64_t nr = (n * k) / 8192;
  if (nr > 256) nr = 256;
  const int64_t cap = (int64_t(1) << 18) / (part_doubles > 0 ? part_doubles : 1);
  if (nr > cap) nr = cap;
  if (nr < 1) nr = 1;
  int64_t rows = (n + nr - 1) / nr;
  rows = ((rows + ROW_UNIT - 1) / ROW_UNIT) * ROW_UNIT;
  if (rows < ROW_UNIT) rows = ROW_UNIT;
  p.range_rows = rows;
  p.nranges = n > 0 ? (n + rows - 1) / rows : 0;
}

// Each thread gets at least MIN_WORK elements (~50-100 us of a step): below that, waking a helper
// costs more than it saves, and a small problem stays on the calling thread.
constexpr int64_t MIN_WORK = int64_t(1) << 17;
// prepare writes log P^ with non-temporal stores (Params::stream_out) from this size on: twice
// the 32 MiB last-level cache of the machines we measure on, so the solver's next pass could
// not have found the rows in cache anyway.
constexpr int64_t STREAM_MIN_BYTES = int64_t(64) << 20;
// ... and only for rows of at least this many bytes. A row that does not start on a cache line
// begins and ends in lines the stream shares with its neighbours, written by scalar stores: with
// 400-byte rows (k = 100) that is 2 lines in 7, and the non-temporal prepare of a reused
// 1,000,000 x 100 buffer took 55-58 ms against 38-42 ms with plain stores (A/B, two rounds,
// 2-core dev VM, 2026-12-05); with 4,000-byte rows (k = 1,000) streaming stayed as fast or faster
// (262,144 x 1,000, prepare: 83-95 ms against 90-109 ms with out=, 138-140 against 122-148 ms
// fresh).
constexpr int64_t STREAM_MIN_ROW_BYTES = 2048;

int threads_for(int64_t n, int64_t k, int nthreads) {
  const int64_t by_work = (n * k) / MIN_WORK;
  if (by_work < 2) return 1;
  return static_cast<int>(by_work < nthreads ? by_work : nthreads);
}

int64_t hsize(int hmode, int64_t k) {
  return hmode == H_FULL ? k + k * k : (hmode == H_DIAG ? k : 0);
}

// f64: inv_c (and alpha64, set by the caller) are float64, for the float64 kernels.
Params base_params(int op, uintptr_t lp, int lp_dtype, int64_t n, int64_t k, int64_t sr, int64_t sc,
                   uintptr_t inv_c, const std::vector<float>& alpha32, int nthreads,
                   bool f64 = false) {
  Params p{};
  p.op = op;
  p.lp = ptr<const void>(lp);
  p.lp_dtype = lp_dtype;
  p.n = n; p.k = k; p.sr = sr; p.sc = sc;
  p.inv_c = f64 ? nullptr : ptr<const float>(inv_c);
  p.inv_c64 = f64 ? ptr<const double>(inv_c) : nullptr;
  p.alpha = alpha32.data();
  p.out = nullptr;
  p.out_dtype = 0; p.osr = 0; p.osc = 0;
  p.hstride = 1;
  p.nthreads = threads_for(n, k, nthreads);
  return p;
}

std::vector<float> alpha_to_f32(uintptr_t alpha, int64_t k) {
  // float32 like the reference's alpha.float(): the arithmetic is float32 throughout.
  const double* a = ptr<const double>(alpha);
  std::vector<float> out(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) out[j] = static_cast<float>(a[j]);
  return out;
}

// Adds the ranges' partials in range order: deterministic for any thread count.
void combine(const std::vector<double>& part, int64_t nranges, int64_t width, double* dst) {
  for (int64_t t = 0; t < width; ++t) dst[t] = 0.0;
  for (int64_t r = 0; r < nranges; ++r) {
    const double* src = part.data() + r * width;
    for (int64_t t = 0; t < width; ++t) dst[t] += src[t];
  }
}

// Newton's Hessian H = S L S from the exact diagonal d (k) and the sampled weights W (k x k,
// strict upper triangle read): L the Laplacian of W, S = diag(sqrt(d / diag L)); a class no
// sampled row reaches keeps d_j alone. Same as ppu_fast.backends.base.assemble_hessian, here
// because numpy's per-call overhead made a 10 x 10 assembly cost more than the pass itself.
void assemble(const double* d, const double* w, int64_t k, double* h) {
  std::vector<double> ld(static_cast<size_t>(k), 0.0), s(static_cast<size_t>(k), 0.0);
  for (int64_t j = 0; j < k; ++j)
    for (int64_t l = j + 1; l < k; ++l) {
      ld[j] += w[j * k + l];
      ld[l] += w[j * k + l];
    }
  for (int64_t j = 0; j < k; ++j) s[j] = ld[j] > 0 ? std::sqrt((d[j] > 0 ? d[j] : 0.0) / ld[j]) : 0.0;
  for (int64_t j = 0; j < k; ++j) {
    h[j * k + j] = d[j] > 0 ? d[j] : 0.0;
    for (int64_t l = j + 1; l < k; ++l) {
      const double v = -s[j] * w[j * k + l] * s[l];
      h[j * k + l] = v;
      h[l * k + j] = v;
    }
  }
}

void step(uintptr_t lp, int lp_dtype, int64_t n, int64_t k, int64_t sr, int64_t sc,
          uintptr_t inv_c, uintptr_t alpha, uintptr_t colsum_out, uintptr_t wlogz_out,
          int hmode, int64_t hstride, uintptr_t h_out, uintptr_t out, int out_dtype, int64_t osr,
          int64_t osc, int nthreads, const std::string& isa) {
  check_common(lp_dtype, n, k, sr, sc, lp, inv_c, alpha, nthreads);
  if (hmode < 0 || hmode > 2) throw py::value_error("hessian mode must be 0 (none), 1 (full) or 2 (diag)");
  if (hmode == H_FULL && k > MAX_FULL_K)
    throw py::value_error("hessian: the full Hessian is formed only for k <= " +
                          std::to_string(MAX_FULL_K) + " (use the diagonal above)");
  if (hstride < 1) throw py::value_error("hstride must be >= 1");
  if (!colsum_out || !wlogz_out || (hmode != H_NONE && !h_out)) throw py::value_error("null output pointer");
  const bool f64 = lp_dtype == F64;
  if (out && (out_dtype < 0 || out_dtype > (f64 ? 3 : 2) || osr < 0 || osc < 0))
    throw py::value_error("out: bad dtype code or strides");
  const Fn fn = pick(isa, f64);
  const std::vector<float> a32 = f64 ? std::vector<float>() : alpha_to_f32(alpha, k);
  Params p = base_params(OP_STEP, lp, lp_dtype, n, k, sr, sc, inv_c, a32, nthreads, f64);
  p.alpha64 = f64 ? ptr<const double>(alpha) : nullptr;
  const int64_t hsz = hsize(hmode, k);
  make_ranges(n, k, k + 1 + hsz, p);
  p.stats = 1;
  p.hmode = hmode;
  p.hstride = hstride;
  p.out = ptr<void>(out);
  p.out_dtype = out_dtype; p.osr = osr; p.osc = osc;
  std::vector<double> cpart(static_cast<size_t>(p.nranges * k));
  std::vector<double> wpart(static_cast<size_t>(p.nranges));
  std::vector<double> hpart(static_cast<size_t>(p.nranges * hsz));
  p.colsum_part = cpart.data();
  p.wlogz_part = wpart.data();
  p.h_part = hpart.data();
  py::gil_scoped_release release;
  if (n > 0) fn(p);
  combine(cpart, p.nranges, k, ptr<double>(colsum_out));
  combine(wpart, p.nranges, 1, ptr<double>(wlogz_out));
  if (hmode == H_DIAG) combine(hpart, p.nranges, hsz, ptr<double>(h_out));
  if (hmode == H_FULL) {  // h_out receives the assembled k x k Hessian
    std::vector<double> dw(static_cast<size_t>(hsz));
    combine(hpart, p.nranges, hsz, dw.data());
    assemble(dw.data(), dw.data() + k, k, ptr<double>(h_out));
  }
}

void materialize(uintptr_t lp, int lp_dtype, int64_t n, int64_t k, int64_t sr, int64_t sc,
                 uintptr_t inv_c, uintptr_t alpha, uintptr_t out, int out_dtype, int64_t osr,
                 int64_t osc, int nthreads, const std::string& isa) {
  check_common(lp_dtype, n, k, sr, sc, lp, inv_c, alpha, nthreads);
  const bool f64 = lp_dtype == F64;
  if (out_dtype < 0 || out_dtype > (f64 ? 3 : 2))
    throw py::value_error(f64 ? "out dtype code must be 0, 1, 2 or 3" : "out dtype code must be 0, 1 or 2");
  if (osr < 0 || osc < 0) throw py::value_error("out: strides must be non-negative");
  if (n > 0 && !out) throw py::value_error("out: null data pointer");
  const Fn fn = pick(isa, f64);
  const std::vector<float> a32 = f64 ? std::vector<float>() : alpha_to_f32(alpha, k);
  Params p = base_params(OP_MATERIALIZE, lp, lp_dtype, n, k, sr, sc, inv_c, a32, nthreads, f64);
  p.alpha64 = f64 ? ptr<const double>(alpha) : nullptr;
  make_ranges(n, k, 0, p);
  p.stats = 0;
  p.hmode = H_NONE;
  p.out = ptr<void>(out);
  p.out_dtype = out_dtype; p.osr = osr; p.osc = osc;
  py::gil_scoped_release release;
  if (n > 0) fn(p);
}

// Writes the packed float64 result of ppu_fast/backends/base.py (unpack_prepare):
// [kind, row, A (k), B (k), colsum (k), wlogz, d (k) if hmode, H (k*k) if H_FULL], with H the
// assembled Hessian (assemble(d, W)), where the device backends pack the weights W.
void prepare(uintptr_t x, int x_dtype, int64_t n, int64_t k, int64_t sr, int64_t sc, int mode,
             uintptr_t forget, uintptr_t fill, uintptr_t out, int out_dtype, int64_t osr,
             int64_t osc, uintptr_t inv_c, int hmode, int64_t hstride, double tol,
             uintptr_t packed, int64_t packed_len, int nthreads, const std::string& isa) {
  if (x_dtype < 0 || x_dtype > 3) throw py::value_error("x dtype code must be 0 (f32), 1 (f16), 2 (bf16) or 3 (f64)");
  if (n < 0 || k < 1) throw py::value_error("x: expected n >= 0 rows and k >= 1 columns");
  if (sr < 0 || sc < 0 || osr < 0 || osc < 0) throw py::value_error("strides must be non-negative");
  if (mode < 0 || mode > 2) throw py::value_error("mode must be 0 (probs), 1 (logits) or 2 (log_p)");
  if (n > 0 && !x) throw py::value_error("x: null data pointer");
  if (!out && mode != MODE_LOGP) throw py::value_error("out: required unless mode is log_p");
  if (out && (out_dtype < 0 || out_dtype > 3)) throw py::value_error("out dtype code must be 0, 1, 2 or 3");
  if (hmode < 0 || hmode > 2) throw py::value_error("hessian mode must be 0, 1 or 2");
  if (hmode == H_FULL && k > MAX_FULL_K)
    throw py::value_error("hessian: the full Hessian is formed only for k <= " + std::to_string(MAX_FULL_K));
  if (hstride < 1 || nthreads < 1) throw py::value_error("hstride and nthreads must be >= 1");
  const bool first = inv_c != 0;
  const int64_t hsz = first ? hsize(hmode, k) : 0;
  const int64_t want = 2 + 2 * k + (first ? k + 1 + hsz : 0);
  if (packed_len != want)
    throw py::value_error("packed: expected " + std::to_string(want) + " doubles, got " +
                          std::to_string(packed_len));
  // The solver's buffer decides the kernel: out, or x itself in log_p mode without out.
  const bool f64 = (out ? out_dtype : x_dtype) == F64;
  const Fn fn = pick(isa, f64);
  const std::vector<float> a32(static_cast<size_t>(k), 0.0f);
  Params p = base_params(OP_PREPARE, x, x_dtype, n, k, sr, sc, inv_c, a32, nthreads, f64);
  const int64_t ssz = mode == MODE_LOGP ? k : 2 * k;
  make_ranges(n, k, ssz + 1 + (first ? k + 1 + hsz : 0), p);
  p.mode = mode;
  p.forget = ptr<const uint8_t>(forget);
  p.fill = ptr<const float>(fill);
  p.tol = tol;
  p.out = ptr<void>(out);
  p.out_dtype = out_dtype; p.osr = osr; p.osc = osc;
  p.stream_out = out && out != x && out_dtype == F32 && osc == 1 &&
                 n * k * int64_t(sizeof(float)) >= STREAM_MIN_BYTES &&
                 k * int64_t(sizeof(float)) >= STREAM_MIN_ROW_BYTES;
  p.stats = first ? 1 : 0;
  p.hmode = first ? hmode : H_NONE;
  p.hstride = hstride;
  // softmax(fill) and logsumexp(fill), as a step would compute them; 1 - q of fill from the
  // other entries (double precision), for the forget rows' analytic part of the Hessian.
  std::vector<float> qfill(static_cast<size_t>(k), 0.0f);
  std::vector<double> qfd(static_cast<size_t>(k), 0.0), dfill(static_cast<size_t>(k), 0.0);
  double lzfill64 = 0.0;
  if (p.fill) {
    float m = -INFINITY;
    for (int64_t j = 0; j < k; ++j) m = p.fill[j] > m ? p.fill[j] : m;
    double s = 0.0;
    for (int64_t j = 0; j < k; ++j) s += std::exp(static_cast<double>(p.fill[j] - m));
    for (int64_t j = 0; j < k; ++j) {
      qfd[j] = std::exp(static_cast<double>(p.fill[j] - m)) / s;
      qfill[j] = static_cast<float>(qfd[j]);
    }
    // sum_{l != j} q_l as prefix + suffix sums of the others: no cancellation against q_j.
    std::vector<double> suffix(static_cast<size_t>(k + 1), 0.0);
    for (int64_t j = k - 1; j >= 0; --j) suffix[j] = suffix[j + 1] + qfd[j];
    double prefix = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      dfill[j] = qfd[j] * (prefix + suffix[j + 1]);
      prefix += qfd[j];
    }
    lzfill64 = m + std::log(s);
    p.lzfill = static_cast<float>(lzfill64);
    p.qfill = qfill.data();
  }
  std::vector<double> cpart(static_cast<size_t>(first ? p.nranges * k : 0));
  std::vector<double> wpart(static_cast<size_t>(first ? p.nranges : 0));
  std::vector<double> hpart(static_cast<size_t>(p.nranges * hsz));
  std::vector<double> spart(static_cast<size_t>(p.nranges * ssz));
  std::vector<int64_t> epart(static_cast<size_t>(p.nranges));
  std::vector<double> fpart(static_cast<size_t>(p.nranges * 4));
  p.fill_part = fpart.data();
  p.colsum_part = cpart.data();
  p.wlogz_part = wpart.data();
  p.h_part = hpart.data();
  p.sums_part = spart.data();
  p.err_part = epart.data();
  py::gil_scoped_release release;
  if (n > 0) fn(p);
  double* o = ptr<double>(packed);
  int64_t bad = -1;
  for (int64_t r = 0; r < p.nranges; ++r) {
    if (epart[r] >= 0) {  // ranges are in row order: the first with a fault has the first row
      bad = epart[r];
      break;
    }
  }
  o[0] = bad >= 0 ? static_cast<double>(bad % 8) : 0.0;
  o[1] = bad >= 0 ? static_cast<double>(bad / 8) : 0.0;
  if (mode == MODE_LOGP) {
    for (int64_t j = 0; j < k; ++j) {
      double v = -INFINITY;
      for (int64_t r = 0; r < p.nranges; ++r) v = spart[r * k + j] > v ? spart[r * k + j] : v;
      o[2 + j] = v;
      o[2 + k + j] = 0.0;
    }
  } else {
    combine(spart, p.nranges, 2 * k, o + 2);
  }
  if (first) {
    double* colsum = o + 2 + 2 * k;
    double* wlogz = o + 2 + 3 * k;
    double* h = o + 3 + 3 * k;
    combine(wpart, p.nranges, 1, wlogz);
    if (hsz) combine(hpart, p.nranges, hsz, h);
    if (mode == MODE_LOGP) {
      combine(cpart, p.nranges, k, colsum);
    } else {
      // Retained rows: q = the normalised row, whose column sums are the retained sums (log Z =
      // 0). Forget rows all hold fill: q = softmax(fill), log Z = logsumexp(fill), added here.
      double fsum[4] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t r = 0; r < p.nranges; ++r)
        for (int t = 0; t < 4; ++t) fsum[t] += fpart[r * 4 + t];
      // The float32 kernels' forget rows hold softmax(fill) rounded to float32, the float64
      // kernels' the double values.
      auto qf = [&](int64_t j) { return f64 ? qfd[j] : static_cast<double>(qfill[j]); };
      for (int64_t j = 0; j < k; ++j) colsum[j] = o[2 + j] + fsum[0] * qf(j);
      *wlogz += fsum[2] * (f64 ? lzfill64 : static_cast<double>(p.lzfill));
      if (hmode != H_NONE && fsum[0] > 0.0) {
        for (int64_t j = 0; j < k; ++j) h[j] += fsum[1] * dfill[j];
        if (hmode == H_FULL && fsum[3] > 0.0) {
          for (int64_t j = 0; j < k; ++j)
            for (int64_t l = j + 1; l < k; ++l)
              h[k + j * k + l] += fsum[3] * qf(j) * qf(l);
        }
      }
    }
    if (hmode == H_FULL) {  // W's slot receives the assembled Hessian, as step's h_out does
      const std::vector<double> w(h + k, h + k + k * k);
      assemble(h, w.data(), k, h + k);
    }
  }
}

using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Newton's direction (newton.cpp) for ppu_fast.solver: d (k,) as a new array, or None when the
// Cholesky route fails and the caller should take numpy's.
py::object newton_direction_py(const F64Array& h, const F64Array& g, int balance_iters,
                               double balance_tol) {
  if (g.ndim() != 1 || h.ndim() != 2 || h.shape(0) != g.shape(0) || h.shape(1) != g.shape(0))
    throw py::value_error("newton_direction: expected h (k, k) and grad (k,)");
  const int64_t k = g.shape(0);
  F64Array d(k);
  if (!newton_direction(h.data(), g.data(), d.mutable_data(), k, balance_iters, balance_tol))
    return py::none();
  return std::move(d);
}

F64Array balanced_laplacian_py(const F64Array& h, int max_iters, double tol) {
  if (h.ndim() != 2 || h.shape(0) != h.shape(1))
    throw py::value_error("balanced_laplacian: expected h (k, k)");
  const int64_t k = h.shape(0);
  F64Array out({k, k});
  balanced_laplacian(h.data(), k, max_iters, tol, out.mutable_data());
  return out;
}

F64Array log_residual_py(const F64Array& grad, const F64Array& m, double span) {
  if (grad.ndim() != 1 || m.ndim() != 1 || grad.shape(0) != m.shape(0))
    throw py::value_error("log_residual: expected grad (k,) and m (k,)");
  const int64_t k = grad.shape(0);
  F64Array out(k);
  log_residual(grad.data(), m.data(), k, span, out.mutable_data());
  return out;
}

// (grad (k,), alpha . m, max |alpha|, sum |grad|) for ppu_fast.solver's _Evaluator.record.
py::tuple pass_terms_py(const F64Array& colsum, const F64Array& m, const F64Array& alpha) {
  if (colsum.ndim() != 1 || m.ndim() != 1 || alpha.ndim() != 1 || m.shape(0) != colsum.shape(0)
      || alpha.shape(0) != colsum.shape(0))
    throw py::value_error("pass_terms: expected colsum, m and alpha of one shape (k,)");
  const int64_t k = colsum.shape(0);
  F64Array grad(k);
  double t[3];
  pass_terms(colsum.data(), m.data(), alpha.data(), k, grad.mutable_data(), t);
  return py::make_tuple(std::move(grad), t[0], t[1], t[2]);
}

// A buffer from the host cache (host_cache.cpp), exposed through the buffer protocol so that
// torch.frombuffer wraps it without a copy: the tensor's storage holds a reference to this object,
// and the block goes back to the cache only when the last tensor or view on it is freed.
class HostBuffer {
 public:
  explicit HostBuffer(size_t nbytes) : block_(host_acquire(nbytes)), nbytes_(nbytes) {}
  ~HostBuffer() { host_release(block_); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  void* data() const { return block_.base; }
  size_t nbytes() const { return nbytes_; }
  size_t mapped() const { return block_.size; }

 private:
  HostBlock block_;
  size_t nbytes_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ppu_fast CPU kernels: fused prepare (validate + log P^ + sums), the "
            "softmax-with-column-shift step and materialize (C++17, a small thread pool, run-time "
            "AVX-512 / AVX2 / generic dispatch). Private: use ppu_fast.backends.cpu.";
  // The interface version ppu_fast/backends/cpu.py expects (its _C_INTERFACE): a module built
  // from older sources (an editable checkout pulled without rebuilding) is refused by it, not
  // half used. 2: prepare packs the assembled Hessian; newton_direction exists. 3:
  // newton_direction solves with the balanced Laplacian (its balance arguments). 4: HostBuffer and
  // the host cache's functions. 5: log_residual and pass_terms (the solver's host arithmetic).
  m.attr("INTERFACE") = 5;
  m.attr("LANES_MAX_K") = LANES_MAX_K;
  m.attr("MAX_FULL_K") = MAX_FULL_K;
  m.attr("MIN_WORK") = MIN_WORK;
  m.def("supported_isas", &supported_isas,
        "Instruction sets this CPU and build can run, best first (e.g. ['avx512', 'avx2', 'generic']).");
  py::class_<HostBuffer>(m, "HostBuffer", py::buffer_protocol(),
                         "nbytes writable bytes from the host cache, 2 MiB-aligned (Linux only: "
                         "see host_cache_available); back to the cache when freed.")
      .def(py::init<size_t>(), py::arg("nbytes"))
      .def_property_readonly("nbytes", &HostBuffer::nbytes)
      .def_property_readonly("mapped", &HostBuffer::mapped, "bytes mapped (a multiple of 2 MiB)")
      .def_property_readonly("ptr", [](const HostBuffer& b) {
        return reinterpret_cast<uintptr_t>(b.data());
      })
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {py::ssize_t(1)},
                               /*readonly=*/false);
      });
  m.def("host_cache_available", &host_cache_available,
        "Whether HostBuffer maps memory here (Linux).");
  m.def("host_empty_cache", &host_empty_cache, "Unmap every cached host block.");
  m.def("host_set_limit", &host_set_limit, py::arg("bytes"),
        "The most bytes the host cache keeps (blocks above it are unmapped now, oldest first).");
  m.def("host_cache_stats", [] {
    const HostCacheStats s = host_cache_stats();
    py::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["cached_blocks"] = s.cached_blocks;
    d["limit_bytes"] = s.limit_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  }, "The host cache's counters: cached_bytes, cached_blocks, limit_bytes, hits, misses.");
  m.def("best_isa", &best_isa, "The instruction set 'auto' picks on this CPU.");
  m.def("pool_threads", &pool_threads,
        "The helper threads the kernels' pool holds now (it grows to num_threads - 1 on use).");
  m.def("threads_for", &threads_for, py::arg("n"), py::arg("k"), py::arg("nthreads"),
        "Threads a call on an n x k matrix uses when allowed nthreads (at least MIN_WORK "
        "elements each).");
  m.def("step", &step,
        "One pass over log_p (n x k, dtype code 0 f32 / 1 f16 / 2 bf16 / 3 f64, element (i, j) at "
        "lp + i*sr + j*sc): writes colsum (k,) f64 to colsum_out, sum_i log Z_i / inv_c_i (f64) "
        "to wlogz_out and, for hmode 2 (diag) the Hessian's exact diagonal d (k), for hmode 1 "
        "(full, k <= MAX_FULL_K) Newton's Hessian (k x k, row-major): the exact diagonal d and "
        "the Laplacian of W = the sum over the rows of the 16-row blocks b with "
        "b % hstride == 0 of inv_c q q^T, rescaled to d (ppu_fast.backends.base) to h_out. If out "
        "is non-zero, Q is also written there (dtype code out_dtype, strides osr, osc). "
        "inv_c: (n,) contiguous, f32 (f64 for an f64 log_p); alpha: (k,) f64 contiguous. "
        "Releases the GIL.",
        py::arg("lp"), py::arg("lp_dtype"), py::arg("n"), py::arg("k"), py::arg("sr"), py::arg("sc"),
        py::arg("inv_c"), py::arg("alpha"), py::arg("colsum_out"), py::arg("wlogz_out"),
        py::arg("hmode"), py::arg("hstride"), py::arg("h_out"), py::arg("out"),
        py::arg("out_dtype"), py::arg("osr"), py::arg("osc"), py::arg("nthreads"),
        py::arg("isa") = "auto");
  m.def("newton_direction", &newton_direction_py, py::arg("h"), py::arg("grad"),
        py::arg("balance_iters"), py::arg("balance_tol"),
        "Newton's direction d (k,) for the dual solver: solves (H + (s / k) 1 1^T + 1e-12 s I) "
        "d = grad by Cholesky, H = balanced_laplacian(h, balance_iters, balance_tol), s = "
        "mean(diag H), and removes d's mean; None when a pivot is not positive or d is not "
        "finite.");
  m.def("log_residual", &log_residual_py, py::arg("grad"), py::arg("m"), py::arg("span"),
        "Newton's right-hand side on the class totals in log form (csrc/cpu/newton.h; "
        "ppu_fast.solver._log_residual_numpy is its specification): (k,) float64.");
  m.def("pass_terms", &pass_terms_py, py::arg("colsum"), py::arg("m"), py::arg("alpha"),
        "(colsum - m, alpha . m, max |alpha|, sum |colsum - m|) in float64, summed in index "
        "order (ppu_fast.solver._Evaluator.record).");
  m.def("balanced_laplacian", &balanced_laplacian_py, py::arg("h"), py::arg("max_iters"),
        py::arg("tol"),
        "The matrix newton_direction solves with (csrc/cpu/newton.h): the Laplacian of h's "
        "off-diagonal weights, symmetrically rescaled so that its diagonal matches h's.");
  m.def("materialize", &materialize,
        "Writes Q (n x k) into out (dtype code out_dtype, strides osr, osc; 3 (f64) only for an "
        "f64 log_p). Same input conventions as step. Releases the GIL.",
        py::arg("lp"), py::arg("lp_dtype"), py::arg("n"), py::arg("k"), py::arg("sr"), py::arg("sc"),
        py::arg("inv_c"), py::arg("alpha"), py::arg("out"), py::arg("out_dtype"), py::arg("osr"),
        py::arg("osc"), py::arg("nthreads"), py::arg("isa") = "auto");
  m.def("prepare", &prepare,
        "One pass over x (n x k, dtype code 0 f32 / 1 f16 / 2 bf16 / 3 f64, strides sr, sc) in "
        "mode 0 (probs), 1 (logits) or 2 (log_p): validates every row, writes log P^ into out "
        "(dtype code out_dtype 0-3, strides osr, osc; may be 0 in log_p mode; inv_c is f64 when "
        "the buffer, out or else x, is f64), forget rows (uint8 "
        "mask, may be 0) getting fill (k f32, may be 0), and writes the packed float64 result "
        "of ppu_fast.backends.base.unpack_prepare into packed (packed_len doubles): [kind, row, "
        "retain sums or column max (k), forget sums (k), and, when inv_c is non-zero, the first "
        "evaluation colsum (k), wlogz, d (k) if hmode, and for hmode 1 Newton's Hessian (k*k, "
        "assembled from d and the sampled W as step's h_out)]. Releases the GIL.",
        py::arg("x"), py::arg("x_dtype"), py::arg("n"), py::arg("k"), py::arg("sr"), py::arg("sc"),
        py::arg("mode"), py::arg("forget"), py::arg("fill"), py::arg("out"), py::arg("out_dtype"),
        py::arg("osr"), py::arg("osc"), py::arg("inv_c"), py::arg("hmode"), py::arg("hstride"),
        py::arg("tol"), py::arg("packed"), py::arg("packed_len"), py::arg("nthreads"),
        py::arg("isa") = "auto");
}
