// Newton's direction for the dual solver's host side (csrc/cpu/newton.cpp).
#pragma once

#include <cstdint>

namespace ppu_cpu {

// Solves (H + (s / k) 1 1^T + 1e-12 s I) d = g by Cholesky, s = mean(diag H), and removes d's
// mean. h: k x k row-major (only its lower triangle is read); g, d: k. Returns false when the
// matrix is not numerically positive definite or d is not finite (d is then unspecified).
bool newton_direction(const double* h, const double* g, double* d, int64_t k);

}  // namespace ppu_cpu
