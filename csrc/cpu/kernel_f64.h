// The float64 kernels: step, materialize and prepare when the solver's buffer is float64 (log_p
// for step / materialize; out for prepare, or x itself in log_p mode without out). They read
// Params.inv_c64 / alpha64 in place of the float32 inv_c / alpha.
//
// Included by kernel_avx2.cpp and kernel_generic.cpp after kernel.h (whose scalar helpers and
// classify_row it uses), with PPU_NS set and a traits type D over W lanes of double: set1, zero,
// load / loadu / store / storeu, add, sub, mul, div, min, max, fmadd (a b + c), fnmadd
// (c - a b), eq / lt masks, blend, hsum, hmax, and exp (for x <= 0; -inf gives 0) and log (for
// x >= 0; 0 gives -inf) accurate to a few ulps. (An AVX-512 instantiation would be a wider D;
// bindings.cpp runs the AVX2 one on AVX-512 machines.)
//
// One row at a time along the vector, for every k: the float32 kernels' rows-in-lanes path for
// k < 32 is a speed-up this path does without. A row is read completely into a buffer before
// anything of it is written (out may alias the input), e = exp(x - max) is formed once per
// element and pass, and every sum is a float64 sum into the range's own partials, so results
// depend on (n, k) and the fixed ranges, never on the thread count. Sums over rows go through
// blocks of F64_FLUSH_ROWS rows: their rounding grows with (block + rows / block) instead of the
// range's rows (40,000 in a range of a 10^7-row problem: 200 ulps typical, which the residual
// floor and the dual's noise bound would feel).
//
// 1 - q of a row's maximum is never 1 - q: it is (rest + count of the other maxima) / s, rest
// the sum of the entries below the maximum (e is exactly 1 at the maxima), so a one-hot row
// keeps a 1 - q of 1e-26. Every other entry has q < 1/2, where 1 - q loses nothing.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "params.h"

#ifndef PPU_NS
#error "define PPU_NS and include kernel.h before kernel_f64.h"
#endif

namespace ppu_cpu {
namespace PPU_NS {

static inline double load_scalar64(const void* base, int dtype, int64_t off) {
  if (dtype == F64) return static_cast<const double*>(base)[off];
  if (dtype == F32) return static_cast<const float*>(base)[off];
  const uint16_t h = static_cast<const uint16_t*>(base)[off];
  return dtype == F16 ? half_to_float(h) : bf16_to_float(h);
}

static inline void store_scalar64(void* base, int dtype, int64_t off, double v) {
  if (dtype == F64) {
    static_cast<double*>(base)[off] = v;
  } else {
    store_scalar(base, dtype, off, static_cast<float>(v));
  }
}

constexpr int F64_FLUSH_ROWS = 64;

// Per-range scratch, each kp doubles (k rounded up to the vector width), 64-byte aligned. The
// block sums (acc, accd, sret, sfor, wl) are added into the range's (the *2 twins) every
// F64_FLUSH_ROWS rows.
struct F64Scratch {
  double* x;     // the row: x, then e = exp(x - m), then q (or, in prepare, log P^)
  double* pn;    // prepare: the normalised row (p / sum p or softmax)
  double* acc;   // column sums of q
  double* accd;  // the Hessian's diagonal
  double* sret;  // prepare: sums of the retained normalised rows, or (log_p mode) column max
  double* sfor;  // prepare: sums of the forgotten normalised rows
  double* fill;  // prepare: fill as float64
  double *acc2, *accd2, *sret2, *sfor2;
  double wl, wl2;
  // H_FULL: up to F64_GRAM_ROWS sampled rows of q and inv_c q (qstride apart), and the weights
  // W accumulated over them (k x kp, rows j, only l > j read back).
  double *qb, *qwb, *wacc;
  int64_t qstride;
  int nq, wblocks;
};

constexpr int F64_GRAM_ROWS = 16;

// Row i of out from v (k entries), converted to out's dtype.
template <class D>
static inline void f64_store_row(const Params& P, int64_t i, const double* v) {
  constexpr int W = D::W;
  const int64_t k = P.k;
  int64_t j = 0;
  if (P.out_dtype == F64 && P.osc == 1 && W > 1) {
    double* o = static_cast<double*>(P.out) + i * P.osr;
    for (; j + W <= k; j += W) D::storeu(o + j, D::load(v + j));
  }
  for (; j < k; ++j) store_scalar64(P.out, P.out_dtype, i * P.osr + j * P.osc, v[j]);
}

// x_j = log_p_ij - alpha_j * inv_c_i into x (padding -inf: exp gives 0).
template <class D>
static inline void f64_load_shifted(const Params& P, int64_t i, double* x) {
  using V = typename D::V;
  constexpr int W = D::W;
  const int64_t k = P.k;
  const int64_t kp = ((k + W - 1) / W) * W;
  const double w = P.inv_c64[i];
  const double* lp = static_cast<const double*>(P.lp);
  int64_t j = 0;
  if (P.sc == 1 && W > 1) {
    const V WW = D::set1(w);
    const double* row = lp + i * P.sr;
    for (; j + W <= k; j += W) D::store(x + j, D::fnmadd(WW, D::loadu(P.alpha64 + j), D::loadu(row + j)));
  }
  for (; j < k; ++j) x[j] = lp[i * P.sr + j * P.sc] - w * P.alpha64[j];
  for (j = k; j < kp; ++j) x[j] = -INFINITY;
}

// A sampled row q (kp entries, zero padded) with weight w into the gram buffer, whose rows
// kernel.h's rows_gram_block adds to W in register tiles once F64_GRAM_ROWS are in (a row at a
// time, W's read-modify-write cost 4x a step at k = 100 with every row sampled).
template <class D>
static inline void f64_gram_row(const Params& P, F64Scratch& rs, const double* q, double w) {
  constexpr int W = D::W;
  const int64_t kp = ((P.k + W - 1) / W) * W;
  double* dq = rs.qb + rs.nq * rs.qstride;
  double* dw = rs.qwb + rs.nq * rs.qstride;
  const typename D::V WW = D::set1(w);
  for (int64_t j = 0; j < kp; j += W) {
    const typename D::V v = D::load(q + j);
    D::store(dq + j, v);
    D::store(dw + j, D::mul(v, WW));
  }
  if (++rs.nq == F64_GRAM_ROWS) rows_gram_block<D>(P, rs);
}

// Evaluates the row in rs.x (x, -inf padded) with weight w: e = exp(x - m); with stats adds q
// to the column sums, log Z / w to wl and, with the Hessian, the diagonal and a sampled row's
// weights; with write_out stores q as row i of out.
template <class D>
static inline void f64_eval_row(const Params& P, F64Scratch& rs, int64_t i, double w, bool stats,
                                bool write_out, double& wl) {
  using V = typename D::V;
  constexpr int W = D::W;
  const int64_t k = P.k;
  const int64_t kp = ((k + W - 1) / W) * W;
  const bool hess = stats && P.hmode != H_NONE;
  const bool samp = stats && sampled_row(P, i);
  double* x = rs.x;
  V vm = D::set1(-INFINITY);
  for (int64_t j = 0; j < kp; j += W) vm = D::max(vm, D::load(x + j));
  const double m = D::hmax(vm);
  const V M = D::set1(m), one = D::set1(1.0), zero = D::zero();
  V vs = zero, vr = zero, vc = zero;
  for (int64_t j = 0; j < kp; j += W) {
    const V e = D::exp(D::sub(D::load(x + j), M));
    D::store(x + j, e);
    vs = D::add(vs, e);
    if (hess) {
      const auto top = D::eq(e, one);
      vr = D::add(vr, D::blend(top, zero, e));
      vc = D::add(vc, D::blend(top, one, zero));
    }
  }
  const double s = D::hsum(vs);
  const double inv_s = 1.0 / s;
  const double rtop = hess ? (D::hsum(vr) + (D::hsum(vc) - 1.0)) * inv_s : 0.0;
  const V IS = D::set1(inv_s), RT = D::set1(rtop), WW = D::set1(w);
  const bool keep = write_out || samp;
  for (int64_t j = 0; j < kp; j += W) {
    const V e = D::load(x + j);
    const V q = D::mul(e, IS);
    if (stats) D::store(rs.acc + j, D::add(D::load(rs.acc + j), q));
    if (hess) {
      const V r = D::blend(D::eq(e, one), RT, D::sub(one, q));
      D::store(rs.accd + j, D::fmadd(D::mul(q, r), WW, D::load(rs.accd + j)));
    }
    if (keep) D::store(x + j, q);
  }
  if (stats) wl += (m + std::log(s)) / w;
  if (samp) f64_gram_row<D>(P, rs, x, w);
  if (write_out) f64_store_row<D>(P, i, x);
}

// prepare, one row (see kernel.h's row_prepare for the float32 twin): pass A reads the row as
// float64 and reduces it (sum, min, max) for validation, the exact fault of a flagged row coming
// from classify_row; then log P^ (or fill on a forget row) is written, the normalised row added
// to the retained / forgotten sums and, for the first evaluation, a retained row's Hessian
// pieces (q = the normalised row, log Z = 0). log_p mode evaluates the row as stored.
template <class D>
static inline void f64_prepare_row(const Params& P, F64Scratch& rs, int64_t i, int64_t* err,
                                   double* fpart, double& wl) {
  using V = typename D::V;
  constexpr int W = D::W;
  const int64_t k = P.k;
  const int64_t kp = ((k + W - 1) / W) * W;
  const int dt = P.lp_dtype;
  const bool f = P.forget && P.forget[i];
  double* x = rs.x;
  V vs = D::zero(), vmn = D::set1(INFINITY), vmx = D::set1(-INFINITY);
  int64_t j = 0;
  if (dt == F64 && P.sc == 1 && W > 1) {
    const double* row = static_cast<const double*>(P.lp) + i * P.sr;
    for (; j + W <= k; j += W) {
      const V v = D::loadu(row + j);
      D::store(x + j, v);
      vs = D::add(vs, v);
      vmn = D::min(vmn, v);
      vmx = D::max(vmx, v);
    }
  }
  double s = D::hsum(vs), mx = D::hmax(vmx);
  double mn = -D::hmax(D::sub(D::zero(), vmn));
  for (; j < k; ++j) {
    const double v = load_scalar64(P.lp, dt, i * P.sr + j * P.sc);
    x[j] = v;
    s += v;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  bool flagged;
  if (P.mode == MODE_PROBS)
    flagged = !(std::fabs(s - 1.0) <= flag_tol(P.tol, static_cast<double>(k + W), 0x1p-53)) ||
              !(mn >= 0.0);
  else if (P.mode == MODE_LOGITS) flagged = !std::isfinite(s);
  else flagged = !(s < INFINITY) || !(mx > -INFINITY);  // NaN, +inf, or no finite entry
  if (flagged && *err < 0) {
    const int kind = classify_row(P, i);
    if (kind != ERR_NONE) *err = i * 8 + kind;
  }
  if (P.mode == MODE_LOGP) {
    for (j = k; j < kp; ++j) x[j] = -INFINITY;
    for (j = 0; j < kp; j += W) D::store(rs.sret + j, D::max(D::load(rs.sret + j), D::load(x + j)));
    if (P.out) f64_store_row<D>(P, i, x);
    if (P.stats) f64_eval_row<D>(P, rs, i, P.inv_c64[i], true, false, wl);
    return;
  }
  const V one = D::set1(1.0), zero = D::zero();
  const bool want_d = P.stats && P.hmode != H_NONE && !f;
  double* dst = f ? rs.sfor : rs.sret;
  double* pn = rs.pn;
  const V WW = D::set1(want_d ? P.inv_c64[i] : 0.0);
  if (P.mode == MODE_PROBS) {
    for (j = k; j < kp; ++j) x[j] = 0.0;
    const double inv_s = 1.0 / s;
    const V IS = D::set1(inv_s), LS = D::set1(std::log(s)), MX = D::set1(mx);
    // 1 - p of the row's largest entry: the others' sum (and any other maxima) over s.
    double rtop = 0.0;
    if (want_d) {
      V vr = zero, vc = zero;
      for (j = 0; j < kp; j += W) {
        const V v = D::load(x + j);
        const auto top = D::eq(v, MX);
        vr = D::add(vr, D::blend(top, zero, v));
        vc = D::add(vc, D::blend(top, one, zero));
      }
      rtop = (D::hsum(vr) + (D::hsum(vc) - 1.0) * mx) * inv_s;
    }
    const V RT = D::set1(rtop);
    for (j = 0; j < kp; j += W) {
      const V v = D::load(x + j);
      const V q = D::mul(v, IS);
      D::store(pn + j, q);
      D::store(dst + j, D::add(D::load(dst + j), q));
      if (want_d) {
        const V r = D::blend(D::eq(v, MX), RT, D::sub(one, q));
        D::store(rs.accd + j, D::fmadd(D::mul(q, r), WW, D::load(rs.accd + j)));
      }
      D::store(x + j, D::sub(D::log(v), LS));
    }
  } else {
    for (j = k; j < kp; ++j) x[j] = -INFINITY;
    const V MX = D::set1(mx);
    V se = zero, vr = zero, vc = zero;
    for (j = 0; j < kp; j += W) {
      const V e = D::exp(D::sub(D::load(x + j), MX));
      D::store(pn + j, e);
      se = D::add(se, e);
      const auto top = D::eq(e, one);
      vr = D::add(vr, D::blend(top, zero, e));
      vc = D::add(vc, D::blend(top, one, zero));
    }
    const double sf = D::hsum(se);
    const double inv_s = 1.0 / sf;
    // (x - max) - log sum e: max + log sum e would round the log away when |max| is large.
    const V IS = D::set1(inv_s), SH = D::set1(std::log(sf));
    const V RT = D::set1((D::hsum(vr) + (D::hsum(vc) - 1.0)) * inv_s);
    for (j = 0; j < kp; j += W) {
      const V e = D::load(pn + j);
      const V q = D::mul(e, IS);
      D::store(pn + j, q);
      D::store(dst + j, D::add(D::load(dst + j), q));
      if (want_d) {
        const V r = D::blend(D::eq(e, one), RT, D::sub(one, q));
        D::store(rs.accd + j, D::fmadd(D::mul(q, r), WW, D::load(rs.accd + j)));
      }
      D::store(x + j, D::sub(D::sub(D::load(x + j), MX), SH));
    }
  }
  if (P.out) f64_store_row<D>(P, i, (f && P.fill) ? rs.fill : x);
  if (!P.stats) return;
  if (f) {  // all forget rows hold fill: the binding adds their first evaluation analytically
    const double w = P.inv_c64[i];
    fpart[0] += 1.0;
    fpart[1] += w;
    fpart[2] += 1.0 / w;
    if (sampled_row(P, i)) fpart[3] += w;
    return;
  }
  if (P.hmode == H_FULL && sampled_row(P, i)) f64_gram_row<D>(P, rs, pn, P.inv_c64[i]);
}

template <class D>
static void f64_range(const Params& P, int64_t r0, int64_t r1, double* colsum, double* wlogz,
                      double* hpart, double* sums, int64_t* err, double* fpart) {
  constexpr int W = D::W;
  const int64_t k = P.k;
  const int64_t kp = ((k + W - 1) / W) * W;
  const bool prep = P.op == OP_PREPARE;
  const bool stats = P.stats != 0;
  const bool logp_max = prep && P.mode == MODE_LOGP;  // sret holds a max: no block sums
  F64Scratch rs;
  double** bufs[] = {&rs.x,    &rs.pn,    &rs.acc,   &rs.accd,  &rs.sret, &rs.sfor,
                     &rs.fill, &rs.acc2,  &rs.accd2, &rs.sret2, &rs.sfor2};
  for (double** b : bufs) {
    *b = static_cast<double*>(aalloc(sizeof(double) * kp));
    std::memset(*b, 0, sizeof(double) * kp);
  }
  if (logp_max)
    for (int64_t j = 0; j < kp; ++j) rs.sret[j] = -INFINITY;
  if (prep && P.fill)
    for (int64_t j = 0; j < k; ++j) rs.fill[j] = P.fill[j];
  rs.wl = rs.wl2 = 0.0;
  const bool full = stats && P.hmode == H_FULL;
  rs.qb = rs.qwb = rs.wacc = nullptr;
  rs.qstride = kp + 4;  // the 4-class tiles read up to 3 entries past k (zero)
  rs.nq = rs.wblocks = 0;
  if (full) {
    for (double** b : {&rs.qb, &rs.qwb}) {
      *b = static_cast<double*>(aalloc(sizeof(double) * F64_GRAM_ROWS * rs.qstride));
      std::memset(*b, 0, sizeof(double) * F64_GRAM_ROWS * rs.qstride);
    }
    rs.wacc = static_cast<double*>(aalloc(sizeof(double) * k * kp));
    std::memset(rs.wacc, 0, sizeof(double) * k * kp);
  }
  auto flush = [&](double* blk, double* tot) {
    for (int64_t j = 0; j < kp; j += W) {
      D::store(tot + j, D::add(D::load(tot + j), D::load(blk + j)));
      D::store(blk + j, D::zero());
    }
  };
  int since = 0;
  for (int64_t i = r0; i < r1; ++i) {
    if (prep) {
      f64_prepare_row<D>(P, rs, i, err, fpart, rs.wl);
    } else {
      f64_load_shifted<D>(P, i, rs.x);
      f64_eval_row<D>(P, rs, i, P.inv_c64[i], stats, P.out != nullptr, rs.wl);
    }
    if (++since == F64_FLUSH_ROWS || i + 1 == r1) {
      if (stats) {
        flush(rs.acc, rs.acc2);
        if (P.hmode != H_NONE) flush(rs.accd, rs.accd2);
        rs.wl2 += rs.wl;
        rs.wl = 0.0;
      }
      if (prep && !logp_max) {
        flush(rs.sret, rs.sret2);
        flush(rs.sfor, rs.sfor2);
      }
      since = 0;
    }
  }
  if (stats) {
    for (int64_t j = 0; j < k; ++j) colsum[j] += rs.acc2[j];
    if (P.hmode != H_NONE)
      for (int64_t j = 0; j < k; ++j) hpart[j] += rs.accd2[j];
    *wlogz += rs.wl2;
    if (full) {
      if (rs.nq > 0) rows_gram_block<D>(P, rs);
      double* w = hpart + k;
      for (int64_t j = 0; j < k; ++j)
        for (int64_t l = j + 1; l < k; ++l) w[j * k + l] += rs.wacc[j * kp + l];
    }
  }
  if (prep) {
    if (logp_max) {
      for (int64_t j = 0; j < k; ++j)
        if (rs.sret[j] > sums[j]) sums[j] = rs.sret[j];
    } else {
      for (int64_t j = 0; j < k; ++j) {
        sums[j] += rs.sret2[j];
        sums[k + j] += rs.sfor2[j];
      }
    }
  }
  for (double** b : bufs) std::free(*b);
  for (double* b : {rs.qb, rs.qwb, rs.wacc}) std::free(b);
}

template <class D>
static void run_all_f64(const Params& P) {
  parallel_ranges(P.nranges, P.nthreads, &run_range<&f64_range<D>>, &P);
}

}  // namespace PPU_NS
}  // namespace ppu_cpu
