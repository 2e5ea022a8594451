// Newton's direction for the solver (ppu_fast/solver.py, _newton_direction), here because numpy
// spent more on it than the pass it followed on small problems: a 10 x 10 solve costs ~15 us
// through numpy's wrappers and ~1 us here, a 100 x 100 one ~80 us against ~40 us. The matrix
// solved with is the balanced Laplacian of h (newton.h; solver.balanced_laplacian is the numpy
// twin): PSD with null vector 1, made positive definite exactly as the numpy route does (the
// rank-one term (s / k) 1 1^T fixes the gauge, a ridge of 1e-12 s handles classes whose column
// is empty, s = the mean diagonal) and solved by Cholesky. A pivot that is not positive, or a
// non-finite result, returns false: the caller then takes numpy's pivoted LU / least-squares
// route, which also serves Hessians that are not PSD.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "newton.h"

namespace ppu_cpu {

#if defined(PPU_HAVE_X86_KERNELS) && defined(__GNUC__) && !defined(__clang__)
#define PPU_NEWTON_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PPU_NEWTON_CLONES
#endif

namespace {

// acc[l] = sum_i c_i m[i, l] over a k x k row-major m (c null: all 1), as contiguous axpys that
// vectorise without reassociating any sum: for a symmetric m these are its row sums (w t).
inline void weighted_column_sums(const double* m, const double* c, int64_t k, double* acc) {
  std::fill(acc, acc + k, 0.0);
  for (int64_t i = 0; i < k; ++i) {
    const double ci = c ? c[i] : 1.0;
    const double* __restrict mi = m + i * k;
    double* __restrict a = acc;
    for (int64_t l = 0; l < k; ++l) a[l] += mi[l] * ci;
  }
}

}  // namespace

PPU_NEWTON_CLONES
void balanced_laplacian(const double* h, int64_t k, int max_iters, double tol, double* out) {
  // out holds the weights w (>= 0; NaN kept, for the caller's finiteness check) whole and
  // symmetric while t is swept, then the Laplacian.
  std::vector<double> t(static_cast<size_t>(k), 1.0), ws(static_cast<size_t>(k)),
      f(static_cast<size_t>(k));
  std::vector<char> swept(static_cast<size_t>(k), 0), weighted(static_cast<size_t>(k), 0);
  for (int64_t i = 0; i < k; ++i) {
    out[i * k + i] = 0.0;
    for (int64_t l = 0; l < i; ++l) {
      const double v = -h[i * k + l];
      out[i * k + l] = out[l * k + i] = (v > 0.0 || std::isnan(v)) ? v : 0.0;
    }
  }
  weighted_column_sums(out, nullptr, k, ws.data());
  for (int64_t i = 0; i < k; ++i) {
    weighted[i] = !(ws[i] <= 0.0);  // NaN counts as weight
    swept[i] = weighted[i] && h[i * k + i] > 0.0;
  }
  for (int it = 0; it < max_iters; ++it) {
    weighted_column_sums(out, t.data(), k, ws.data());  // w t
    double worst = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      f[i] = 1.0;
      if (!swept[i]) continue;
      const double r = h[i * k + i] / (t[i] * ws[i]);
      const double a = std::fabs(r - 1.0);
      if (!(a <= worst)) worst = a;  // NaN propagates: the sweeps stop, as numpy's max does
      f[i] = std::sqrt(r);
    }
    if (!(worst >= tol)) break;
    for (int64_t i = 0; i < k; ++i) t[i] *= f[i];
  }
  for (int64_t i = 0; i < k; ++i) {  // -t_i w_il t_l: the lower triangle, mirrored
    double* __restrict oi = out + i * k;
    for (int64_t l = 0; l < i; ++l) oi[l] = -(t[i] * oi[l] * t[l]);
    for (int64_t l = 0; l < i; ++l) out[l * k + i] = oi[l];
  }
  // Row sums as column sums (the matrix is exactly symmetric, and both add in index order).
  weighted_column_sums(out, nullptr, k, ws.data());
  for (int64_t i = 0; i < k; ++i) out[i * k + i] = weighted[i] ? -ws[i] : h[i * k + i];
}

// The trailing updates are axpys the compiler vectorises; AVX-512 makes a 100 x 100 solve 20 %
// faster than baseline SSE2. GCC picks the clone at load time (no flags needed at build time).
PPU_NEWTON_CLONES
bool newton_direction(const double* h, const double* g, double* d, int64_t k, int balance_iters,
                      double balance_tol) {
  if (k < 1) return false;
  std::vector<double> a(static_cast<size_t>(k * k)), col(static_cast<size_t>(k)),
      y(static_cast<size_t>(k));
  balanced_laplacian(h, k, balance_iters, balance_tol, a.data());
  double scale = 0.0;
  for (int64_t j = 0; j < k; ++j) scale += a[j * k + j];
  scale /= static_cast<double>(k);
  if (!(scale > 1e-300)) scale = 1e-300;  // also NaN: the result is then rejected below
  const double rank1 = scale / static_cast<double>(k), ridge = 1e-12 * scale;
  // Lower triangle of A = H + rank1 1 1^T + ridge I, row-major, in place; overwritten by its
  // factor L.
  for (int64_t i = 0; i < k; ++i)
    for (int64_t l = 0; l <= i; ++l) a[i * k + l] += rank1 + (i == l ? ridge : 0.0);
  // Right-looking Cholesky: column j of L, then a rank-one update of the trailing triangle
  // (contiguous rows against a copy of the column, so the inner loop is a plain axpy).
  for (int64_t j = 0; j < k; ++j) {
    const double piv = a[j * k + j];
    if (!(piv > 0.0) || !std::isfinite(piv)) return false;
    const double ljj = std::sqrt(piv), inv = 1.0 / ljj;
    a[j * k + j] = ljj;
    for (int64_t i = j + 1; i < k; ++i) {
      a[i * k + j] *= inv;
      col[i] = a[i * k + j];
    }
    const double* __restrict cl = col.data();
    for (int64_t i = j + 1; i < k; ++i) {
      const double lij = cl[i];
      double* __restrict row = a.data() + i * k;
      for (int64_t l = j + 1; l <= i; ++l) row[l] -= lij * cl[l];
    }
  }
  for (int64_t i = 0; i < k; ++i) {  // L y = g
    double s = g[i];
    for (int64_t l = 0; l < i; ++l) s -= a[i * k + l] * y[l];
    y[i] = s / a[i * k + i];
  }
  for (int64_t i = k - 1; i >= 0; --i) {  // L^T d = y
    double s = y[i];
    for (int64_t l = i + 1; l < k; ++l) s -= a[l * k + i] * d[l];
    d[i] = s / a[i * k + i];
  }
  double mean = 0.0;
  for (int64_t i = 0; i < k; ++i) mean += d[i];
  mean /= static_cast<double>(k);
  bool finite = true;
  for (int64_t i = 0; i < k; ++i) {
    d[i] -= mean;  // the gauge: Q does not change when every alpha_j moves together
    finite = finite && std::isfinite(d[i]);
  }
  return finite;
}

// No target clones here: a baseline x86-64 build has no FMA to contract these expressions into,
// so they round as numpy's elementwise twins (solver._log_residual_numpy) but for libm's log1p,
// which can differ from numpy's SIMD one in the last bit.
void log_residual(const double* grad, const double* m, int64_t k, double span, double* out) {
  const double up = std::exp(span), down = std::exp(-span);
  for (int64_t j = 0; j < k; ++j) {
    const double g = grad[j], mj = m[j], s = g + mj;
    if (!(s > 0.0 && mj > 0.0)) {  // NaN too: grad is kept, as the numpy twin keeps it
      out[j] = g;
      continue;
    }
    const double lr = std::log1p(g / mj);
    out[j] = lr > span ? s - mj * up * (1.0 - span)
             : lr < -span ? s - mj * down * (1.0 + span)
                          : s * lr;
  }
}

void pass_terms(const double* colsum, const double* m, const double* alpha, int64_t k,
                double* grad, double* terms) {
  double am = 0.0, amax = 0.0, ares = 0.0;
  bool nan = false;
  for (int64_t j = 0; j < k; ++j) {
    grad[j] = colsum[j] - m[j];
    am += alpha[j] * m[j];
    const double a = std::fabs(alpha[j]);
    nan = nan || std::isnan(a);
    if (a > amax) amax = a;
    ares += std::fabs(grad[j]);
  }
  terms[0] = am;
  terms[1] = nan ? std::nan("") : amax;  // numpy's max propagates NaN
  terms[2] = ares;
}

}  // namespace ppu_cpu
