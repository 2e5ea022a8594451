// Newton's direction for the dual solver's host side (csrc/cpu/newton.cpp).
#pragma once

#include <cstdint>

namespace ppu_cpu {

// The matrix Newton solves with, from a Hessian h (k x k row-major, symmetric; only its diagonal
// and strict lower triangle are read) as the backends assemble it: exact diagonal d, off-diagonal
// entries -w (w >= 0, from all rows or a row sample). out = the Laplacian of the weights
// t_i w_il t_l, with t > 0 rescaled (at most max_iters sweeps of t_i *= sqrt(d_i / (t_i (w t)_i)),
// fewer once every ratio is within tol of 1) so that its diagonal, their row sums, moves toward
// d: H 1 = 0 to float64 rounding whatever the sweeps reach, diag(H) = d within tol when they
// converge. A class with d_i <= 0 is not rescaled; one with no weight at all keeps d_i alone.
// Why: the backends' S L S matches d exactly but not H 1 = 0 (a sample's rescaling; float32
// rounding, ~1e-6, even with every row), and when Newton's direction has a huge component along 1
// (a class whose alpha must run far: class unlearning at small lam) that mismatch times it
// swamped the other classes' components (docs/solver.md, "What Newton solves with"). NaN
// weights stay NaN (the caller rejects the result).
void balanced_laplacian(const double* h, int64_t k, int max_iters, double tol, double* out);

// Solves (H + (s / k) 1 1^T + 1e-12 s I) d = g by Cholesky, H = balanced_laplacian(h), s =
// mean(diag H), and removes d's mean. g, d: k. Returns false when the matrix is not numerically
// positive definite or d is not finite (d is then unspecified).
bool newton_direction(const double* h, const double* g, double* d, int64_t k, int balance_iters,
                      double balance_tol);

// Newton's right-hand side on the class totals in log form (ppu_fast/solver.py, _log_residual,
// whose numpy twin is the specification): out_j = s_j log1p(grad_j / m_j) for s = grad + m within
// e^span of m_j, the tangent line of the log beyond, grad_j where s_j or m_j is not positive.
// Why here: numpy's dozen k-vector calls cost ~20 us a pass, more than a 50,000 x 10 pass's own
// host work.
void log_residual(const double* grad, const double* m, int64_t k, double span, double* out);

// What the solver records of a pass (ppu_fast/solver.py, _Evaluator.record): grad = colsum - m
// (k) and terms = [alpha . m, max |alpha| (NaN if any alpha is NaN), sum |grad|], summed in index
// order.
void pass_terms(const double* colsum, const double* m, const double* alpha, int64_t k,
                double* grad, double* terms);

}  // namespace ppu_cpu
