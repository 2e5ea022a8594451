// The fused softmax-with-column-shift kernel, written once over a small SIMD "traits" type and
// compiled three times: kernel_avx512.cpp (16 lanes), kernel_avx2.cpp (8 lanes) and
// kernel_generic.cpp (1 lane, plain C++). Each of those defines PPU_NS (a namespace of its own,
// so no inline symbol is shared between translation units built with different -m flags) and
// PPU_TRAITS before including this file.
//
// For every row i: x_ij = log_p_ij - alpha_j * inv_c_i, m_i = max_j x_ij,
// e_ij = exp(x_ij - m_i), s_i = sum_j e_ij, q_ij = e_ij / s_i, log Z_i = m_i + log s_i.
// step accumulates colsum_j = sum_i q_ij, wlogz = sum_i log Z_i / inv_c_i and optionally
// H = sum_i inv_c_i (diag(q_i) - q_i q_i^T) or its diagonal; materialize writes q.
//
// Bytes moved per step: N*k*sizeof(log_p) + 4*N (inv_c) read once, nothing N x k written; the
// partial sums are nranges*k doubles. materialize also writes N*k*sizeof(out).
//
// Two shapes of loop:
//  * k < LANES_MAX_K: W rows at once, one row per SIMD lane, one vector per column (a gather, or
//    a staged transpose for the last block). Row max / sum are then plain vector ops across the
//    k column vectors, with no horizontal reductions.
//  * k >= LANES_MAX_K: one row at a time along the vector, in three passes over the row, which
//    sits in L1/L2 (max of x; exp(x - max) into a row buffer and its sum; normalise and
//    accumulate, two rows at a time in the hot case).
// Column sums are accumulated per lane in float32 for at most FLUSH_BLOCKS blocks (lanes path)
// or FLUSH_ROWS rows (row path) and then added into the range's float64 partials.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>

#include "params.h"

#ifndef PPU_NS
#error "define PPU_NS before including kernel.h"
#endif

namespace ppu_cpu {
namespace PPU_NS {

// ------------------------------------------------------------------------------------------
// Scalar helpers (per-namespace copies; see above for why nothing is shared).
// ------------------------------------------------------------------------------------------
static inline float bits_to_f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// IEEE half -> float, exact (F. Giesen's branch-light conversion).
static inline float half_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t e = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (e == shifted_exp) {
    o += (128u - 16u) << 23;  // inf / nan
  } else if (e == 0) {        // zero / subnormal: renormalise through float arithmetic
    o += 1u << 23;
    o = f_to_bits(bits_to_f(o) - bits_to_f(113u << 23));
  }
  o |= (static_cast<uint32_t>(h) & 0x8000u) << 16;
  return bits_to_f(o);
}

// float -> IEEE half, round to nearest even (F. Giesen's float_to_half_fast3_rtne).
static inline uint16_t float_to_half(float fl) {
  uint32_t f = f_to_bits(fl);
  const uint32_t f32infty = 255u << 23, f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t o;
  if (f >= f16max) {
    o = (f > f32infty) ? 0x7e00 : 0x7c00;
  } else if (f < (113u << 23)) {
    o = static_cast<uint16_t>(f_to_bits(bits_to_f(f) + bits_to_f(denorm_magic)) - denorm_magic);
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    f += mant_odd;
    o = static_cast<uint16_t>(f >> 13);
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

static inline float bf16_to_float(uint16_t h) { return bits_to_f(static_cast<uint32_t>(h) << 16); }

// float -> bfloat16, round to nearest even (NaN kept a NaN).
static inline uint16_t float_to_bf16(float f) {
  uint32_t u = f_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

static inline float load_scalar(const void* base, int dtype, int64_t off) {
  if (dtype == F32) return static_cast<const float*>(base)[off];
  const uint16_t h = static_cast<const uint16_t*>(base)[off];
  return dtype == F16 ? half_to_float(h) : bf16_to_float(h);
}

static inline void store_scalar(void* base, int dtype, int64_t off, float v) {
  if (dtype == F32) {
    static_cast<float*>(base)[off] = v;
  } else {
    static_cast<uint16_t*>(base)[off] = dtype == F16 ? float_to_half(v) : float_to_bf16(v);
  }
}

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

static void* aalloc(size_t bytes) {
  bytes = (bytes + 63) & ~static_cast<size_t>(63);
  return std::aligned_alloc(64, bytes ? bytes : 64);
}

// ------------------------------------------------------------------------------------------
// Vector exp and log, written once over the traits S.
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial fitted
// here for minimum relative error (max 3.7e-9 on the interval; about 1 ulp in float32 after
// rounding), then scaling by 2^n. Inputs are x - max <= 0; -inf and anything below the clamp
// give exactly 0.
// log: only ever called on s_i in [1, k] (the max term contributes exp(0) = 1), positive and
// normal; Cephes' logf polynomial (about 1 ulp).
// ------------------------------------------------------------------------------------------
template <class S>
static inline typename S::V vexp(typename S::V x) {
  using V = typename S::V;
  const V xc = S::max(x, S::set1(S::EXP_LO));
  const V fx = S::round(S::mul(xc, S::set1(1.44269504088896341f)));
  V r = S::fnmadd(fx, S::set1(0.693359375f), xc);
  r = S::fnmadd(fx, S::set1(-2.12194440e-4f), r);
  V p = S::set1(0.0013879691250622272f);
  p = S::fmadd(p, r, S::set1(0.00836869329214096f));
  p = S::fmadd(p, r, S::set1(0.04166722670197487f));
  p = S::fmadd(p, r, S::set1(0.1666652113199234f));
  p = S::fmadd(p, r, S::set1(0.4999999701976776f));
  p = S::fmadd(p, r, S::set1(1.0f));
  p = S::fmadd(p, r, S::set1(1.0f));
  return S::scale2(p, fx, x);
}

template <class S>
static inline typename S::V vlog(typename S::V x) {
  using V = typename S::V;
  V m, e;
  S::frexp12(x, m, e);  // x = m * 2^e, m in [1, 2)
  const auto big = S::gt(m, S::set1(1.41421356237f));
  m = S::blend(big, S::mul(m, S::set1(0.5f)), m);
  e = S::blend(big, S::add(e, S::set1(1.0f)), e);
  const V f = S::sub(m, S::set1(1.0f));
  const V z = S::mul(f, f);
  V y = S::set1(7.0376836292E-2f);
  y = S::fmadd(y, f, S::set1(-1.1514610310E-1f));
  y = S::fmadd(y, f, S::set1(1.1676998740E-1f));
  y = S::fmadd(y, f, S::set1(-1.2420140846E-1f));
  y = S::fmadd(y, f, S::set1(1.4249322787E-1f));
  y = S::fmadd(y, f, S::set1(-1.6668057665E-1f));
  y = S::fmadd(y, f, S::set1(2.0000714765E-1f));
  y = S::fmadd(y, f, S::set1(-2.4999993993E-1f));
  y = S::fmadd(y, f, S::set1(3.3333331174E-1f));
  y = S::mul(S::mul(y, f), z);
  y = S::fmadd(e, S::set1(-2.12194440e-4f), y);
  y = S::fnmadd(z, S::set1(0.5f), y);
  V r = S::add(f, y);
  return S::fmadd(e, S::set1(0.693359375f), r);
}

// ------------------------------------------------------------------------------------------
// Rows in lanes (k < LANES_MAX_K): blocks of W rows; column j of a block is one vector.
// ------------------------------------------------------------------------------------------
constexpr int FLUSH_BLOCKS = 8;  // float32 per-lane partials cover at most 8 * W rows
constexpr int KL = static_cast<int>(LANES_MAX_K);

template <class S>
struct LaneScratch {
  alignas(64) float x[KL * S::W];    // x_j, then e_j, then q_j, for each column j
  alignas(64) float acc[KL * S::W];  // colsum partials per lane
  alignas(64) float accd[KL * S::W]; // hdiag partials, or sum_i inv_c_i q_ij for H_FULL
  alignas(64) float stage[KL * S::W];
  alignas(64) float icst[S::W];
  alignas(64) float mask[S::W];
  float* acch;                       // H_FULL: k(k+1)/2 vectors of sum inv_c q_j q_l
};

template <class S>
static void lanes_flush(const Params& P, LaneScratch<S>& sc, double* colsum, double* hpart) {
  const int k = static_cast<int>(P.k);
  const int W = S::W;
  for (int j = 0; j < k; ++j) {
    colsum[j] += S::hsum_d(S::load(sc.acc + j * W));
    S::store(sc.acc + j * W, S::zero());
  }
  if (P.hmode == H_DIAG) {
    for (int j = 0; j < k; ++j) {
      hpart[j] += S::hsum_d(S::load(sc.accd + j * W));
      S::store(sc.accd + j * W, S::zero());
    }
  } else if (P.hmode == H_FULL) {
    int t = 0;
    for (int j = 0; j < k; ++j) {
      hpart[j * k + j] += S::hsum_d(S::load(sc.accd + j * W));
      S::store(sc.accd + j * W, S::zero());
      for (int l = j; l < k; ++l, ++t) {
        const double v = S::hsum_d(S::load(sc.acch + t * W));
        S::store(sc.acch + t * W, S::zero());
        hpart[j * k + l] -= v;
        if (l != j) hpart[l * k + j] -= v;
      }
    }
  }
}

template <class S>
static void lanes_range(const Params& P, int64_t r0, int64_t r1, double* colsum, double* wlogz,
                        double* hpart) {
  using V = typename S::V;
  using I = typename S::I;
  constexpr int W = S::W;
  const int k = static_cast<int>(P.k);
  LaneScratch<S>* scp = static_cast<LaneScratch<S>*>(aalloc(sizeof(LaneScratch<S>)));
  LaneScratch<S>& sc = *scp;
  sc.acch = nullptr;
  const bool stats = P.stats != 0;
  if (stats && P.hmode == H_FULL) {
    sc.acch = static_cast<float*>(aalloc(sizeof(float) * W * (k * (k + 1) / 2)));
    std::memset(sc.acch, 0, sizeof(float) * W * (k * (k + 1) / 2));
  }
  std::memset(sc.acc, 0, sizeof(sc.acc));
  std::memset(sc.accd, 0, sizeof(sc.accd));
  typename S::D wacc = S::dzero();

  // Gather indices r * sr (+ j * sc via the base pointer) must fit in int32; otherwise every
  // block goes through the scalar staging copy.
  const bool idx_ok = (W - 1) * P.sr + (k - 1) * P.sc <= 2147483647LL;
  const I ridx = S::lane_idx(idx_ok ? P.sr : 0);
  const int dt = P.lp_dtype;
  const bool tile = S::TILE && P.sc == 1;
  int since_flush = 0;

  for (int64_t b = r0; b < r1; b += W) {
    const int nv = static_cast<int>(imin(W, r1 - b));
    // A 16-bit gather reads 4 bytes per element: only the element with the highest address,
    // (n - 1, k - 1), could read past the tensor, and it lies in the block holding row n - 1.
    const bool staged = nv < W || (!tile && (!idx_ok || (dt != F32 && b + W >= P.n)));
    V ic;
    if (!staged && tile) {
      // Contiguous rows: masked row loads and an in-register transpose (cheaper than gathers).
      ic = S::loadu(P.inv_c + b);
      for (int c0 = 0; c0 < k; c0 += W)
        S::load_tile(P.lp, dt, b * P.sr + c0, P.sr, static_cast<int>(imin(W, k - c0)),
                     sc.stage + c0 * W);
      for (int j = 0; j < k; ++j)
        S::store(sc.x + j * W, S::fnmadd(ic, S::set1(P.alpha[j]), S::load(sc.stage + j * W)));
    } else if (!staged) {
      ic = S::loadu(P.inv_c + b);
      if (dt == F32) {
        const float* base = static_cast<const float*>(P.lp) + b * P.sr;
        for (int j = 0; j < k; ++j)
          S::store(sc.x + j * W, S::fnmadd(ic, S::set1(P.alpha[j]),
                                           S::gather_f32(base + j * P.sc, ridx)));
      } else {
        const uint16_t* base = static_cast<const uint16_t*>(P.lp) + b * P.sr;
        for (int j = 0; j < k; ++j) {
          const V v = dt == F16 ? S::gather_f16(base + j * P.sc, ridx)
                                : S::gather_bf16(base + j * P.sc, ridx);
          S::store(sc.x + j * W, S::fnmadd(ic, S::set1(P.alpha[j]), v));
        }
      }
    } else {
      // Scalar transpose into the staging tile; missing rows get x = 0, inv_c = 1 (finite) and
      // are masked out of every accumulation.
      for (int r = 0; r < W; ++r) {
        const bool ok = r < nv;
        sc.icst[r] = ok ? P.inv_c[b + r] : 1.0f;
        sc.mask[r] = ok ? 1.0f : 0.0f;
        for (int j = 0; j < k; ++j)
          sc.stage[j * W + r] = ok ? load_scalar(P.lp, dt, (b + r) * P.sr + j * P.sc) : 0.0f;
      }
      ic = S::load(sc.icst);
      for (int j = 0; j < k; ++j)
        S::store(sc.x + j * W, S::fnmadd(ic, S::set1(P.alpha[j]), S::load(sc.stage + j * W)));
    }
    // Row max across the column vectors, then exp and the row sums.
    V m = S::load(sc.x);
    for (int j = 1; j < k; ++j) m = S::max(m, S::load(sc.x + j * W));
    V s = S::zero();
    for (int j = 0; j < k; ++j) {
      const V e = vexp<S>(S::sub(S::load(sc.x + j * W), m));
      S::store(sc.x + j * W, e);
      s = S::add(s, e);
    }
    const V inv_s = S::div(S::set1(1.0f), s);
    const bool tail = nv < W;
    const V msk = tail ? S::load(sc.mask) : S::set1(1.0f);
    if (stats) {
      const V w = tail ? S::mul(ic, msk) : ic;
      if (P.hmode == H_NONE && !tail && !P.out) {  // the hot loop of step
        for (int j = 0; j < k; ++j)
          S::store(sc.acc + j * W, S::fmadd(S::load(sc.x + j * W), inv_s, S::load(sc.acc + j * W)));
      } else if (P.hmode == H_NONE) {
        for (int j = 0; j < k; ++j) {
          V q = S::mul(S::load(sc.x + j * W), inv_s);
          if (P.out) S::store(sc.x + j * W, q);
          if (tail) q = S::mul(q, msk);
          S::store(sc.acc + j * W, S::add(S::load(sc.acc + j * W), q));
        }
      } else if (P.hmode == H_DIAG) {
        for (int j = 0; j < k; ++j) {
          V q = S::mul(S::load(sc.x + j * W), inv_s);
          if (P.out) S::store(sc.x + j * W, q);
          if (tail) q = S::mul(q, msk);
          S::store(sc.acc + j * W, S::add(S::load(sc.acc + j * W), q));
          const V t = S::fnmadd(q, q, q);  // q (1 - q)
          S::store(sc.accd + j * W, S::fmadd(t, w, S::load(sc.accd + j * W)));
        }
      } else {  // H_FULL: accumulate sum inv_c q_j and sum inv_c q_j q_l (l >= j)
        for (int j = 0; j < k; ++j) {
          V q = S::mul(S::load(sc.x + j * W), inv_s);
          if (tail) q = S::mul(q, msk);
          S::store(sc.x + j * W, q);
          S::store(sc.acc + j * W, S::add(S::load(sc.acc + j * W), q));
        }
        int t = 0;
        for (int j = 0; j < k; ++j) {
          const V qw = S::mul(S::load(sc.x + j * W), w);
          S::store(sc.accd + j * W, S::add(S::load(sc.accd + j * W), qw));
          for (int l = j; l < k; ++l, ++t)
            S::store(sc.acch + t * W,
                     S::fmadd(qw, S::load(sc.x + l * W), S::load(sc.acch + t * W)));
        }
      }
      // log Z = m + log s; sum log Z / inv_c in float64 per lane (as the reference divides).
      V logz = S::add(m, vlog<S>(s));
      if (tail) logz = S::mul(logz, msk);
      S::dacc_div(wacc, logz, ic);
      if (++since_flush == FLUSH_BLOCKS) {
        lanes_flush<S>(P, sc, colsum, hpart);
        since_flush = 0;
      }
    } else {
      for (int j = 0; j < k; ++j) S::store(sc.x + j * W, S::mul(S::load(sc.x + j * W), inv_s));
    }
    if (P.out) {
      // Scalar transpose back out (materialize runs once per solve, not per iteration).
      for (int r = 0; r < nv; ++r)
        for (int j = 0; j < k; ++j)
          store_scalar(P.out, P.out_dtype, (b + r) * P.osr + j * P.osc, sc.x[j * W + r]);
    }
  }
  if (stats) {
    lanes_flush<S>(P, sc, colsum, hpart);
    *wlogz += S::dsum(wacc);
  }
  if (sc.acch) std::free(sc.acch);
  std::free(scp);
}

// ------------------------------------------------------------------------------------------
// One row along the vector (k >= LANES_MAX_K).
// row_exp: pass 1 finds the row max of x = log_p - alpha * inv_c (contiguous rows: without
// storing x; strided rows: x goes to the buffer), pass 2 writes e = exp(x - m) to the buffer
// (recomputing x from log_p, which is still in L1/L2) and sums it. Pass 3 normalises and
// accumulates; in the hot case (step, no Hessian, no output) two rows share one read-modify-write
// of the float32 column accumulators, halving that traffic.
// ------------------------------------------------------------------------------------------
constexpr int FLUSH_ROWS = 32;

template <class S>
static inline void row_exp(const Params& P, int64_t i, float* xb, float& m_out, float& s_out) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t k = P.k;
  const int64_t kv = (k / W) * W;
  const int64_t kp = ((k + W - 1) / W) * W;
  const int dt = P.lp_dtype;
  const float icf = P.inv_c[i];
  const V ic = S::set1(icf);
  const float ninf = -INFINITY;
  const bool contig = P.sc == 1 && W > 1;
  const void* row = dt == F32 ? static_cast<const void*>(static_cast<const float*>(P.lp) + i * P.sr)
                              : static_cast<const void*>(static_cast<const uint16_t*>(P.lp) + i * P.sr);
  auto xvec = [&](int64_t j) -> V {  // x for columns j..j+W-1 of a contiguous row
    V v;
    if (dt == F32) v = S::loadu(static_cast<const float*>(row) + j);
    else if (dt == F16) v = S::load_f16(static_cast<const uint16_t*>(row) + j);
    else v = S::load_bf16(static_cast<const uint16_t*>(row) + j);
    return S::fnmadd(ic, S::loadu(P.alpha + j), v);
  };
  // Pass 1: the row max.
  V vm = S::set1(ninf);
  int64_t j = 0;
  if (contig) {
    for (; j < kv; j += W) vm = S::max(vm, xvec(j));
  }
  float m = S::hmax(vm);
  for (; j < k; ++j) {  // strided rows and the tail: scalar, x kept in the buffer
    const float x = load_scalar(P.lp, dt, i * P.sr + j * P.sc) - icf * P.alpha[j];
    xb[j] = x;
    m = x > m ? x : m;
  }
  for (j = k; j < kp; ++j) xb[j] = ninf;  // padding: exp(-inf) = 0
  // Pass 2: e = exp(x - m) and the row sum.
  const V M = S::set1(m);
  float s;
  if constexpr (W == 1) {
    // One lane: a single float32 running sum of k terms would lose ~sqrt(k) ulps.
    double sd = 0.0;
    for (j = 0; j < kp; ++j) {
      const float e = vexp<S>(S::sub(xb[j], M));
      xb[j] = e;
      sd += e;
    }
    s = static_cast<float>(sd);
  } else {
    V vs = S::zero();
    for (j = 0; j < kp; j += W) {
      const V x = (contig && j < kv) ? xvec(j) : S::load(xb + j);
      const V e = vexp<S>(S::sub(x, M));
      S::store(xb + j, e);
      vs = S::add(vs, e);
    }
    s = S::hsum(vs);
  }
  m_out = m;
  s_out = s;
}

template <class S>
static void rows_range(const Params& P, int64_t r0, int64_t r1, double* colsum, double* wlogz,
                       double* hpart) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t k = P.k;
  const int64_t kv = (k / W) * W;
  const int64_t kp = ((k + W - 1) / W) * W;
  float* xb = static_cast<float*>(aalloc(sizeof(float) * kp));
  float* xb2 = static_cast<float*>(aalloc(sizeof(float) * kp));
  float* acc = static_cast<float*>(aalloc(sizeof(float) * kp));
  float* accd = static_cast<float*>(aalloc(sizeof(float) * kp));
  std::memset(acc, 0, sizeof(float) * kp);
  std::memset(accd, 0, sizeof(float) * kp);
  const bool stats = P.stats != 0;
  const bool diag = stats && P.hmode == H_DIAG;
  const bool hot = stats && !diag && !P.out;
  double wl = 0.0;
  int since_flush = 0;

  for (int64_t i = r0; i < r1;) {
    if (hot && i + 1 < r1) {
      float m0, s0, m1, s1;
      row_exp<S>(P, i, xb, m0, s0);
      row_exp<S>(P, i + 1, xb2, m1, s1);
      const V is0 = S::set1(1.0f / s0), is1 = S::set1(1.0f / s1);
      for (int64_t j = 0; j < kp; j += W)
        S::store(acc + j, S::fmadd(S::load(xb2 + j), is1,
                                   S::fmadd(S::load(xb + j), is0, S::load(acc + j))));
      wl += static_cast<double>(m0 + std::log(s0)) / static_cast<double>(P.inv_c[i]);
      wl += static_cast<double>(m1 + std::log(s1)) / static_cast<double>(P.inv_c[i + 1]);
      i += 2;
      since_flush += 2;
    } else {
      float m, s;
      row_exp<S>(P, i, xb, m, s);
      const float icf = P.inv_c[i];
      const V ic = S::set1(icf);
      const V inv_s = S::set1(1.0f / s);
      int64_t j;
      if (stats) {
        if (diag) {
          for (j = 0; j < kp; j += W) {
            const V q = S::mul(S::load(xb + j), inv_s);
            if (P.out) S::store(xb + j, q);
            S::store(acc + j, S::add(S::load(acc + j), q));
            S::store(accd + j, S::fmadd(S::fnmadd(q, q, q), ic, S::load(accd + j)));
          }
        } else if (P.out) {
          for (j = 0; j < kp; j += W) {
            const V q = S::mul(S::load(xb + j), inv_s);
            S::store(xb + j, q);
            S::store(acc + j, S::add(S::load(acc + j), q));
          }
        } else {
          for (j = 0; j < kp; j += W)
            S::store(acc + j, S::fmadd(S::load(xb + j), inv_s, S::load(acc + j)));
        }
        wl += static_cast<double>(m + std::log(s)) / static_cast<double>(icf);
        ++since_flush;
      } else {
        for (j = 0; j < kp; j += W) S::store(xb + j, S::mul(S::load(xb + j), inv_s));
      }
      if (P.out) {
        j = 0;
        if (P.osc == 1) {
          if (P.out_dtype == F32) {
            float* o = static_cast<float*>(P.out) + i * P.osr;
            for (; j < kv; j += W) S::storeu(o + j, S::load(xb + j));
          } else if (P.out_dtype == F16) {
            uint16_t* o = static_cast<uint16_t*>(P.out) + i * P.osr;
            for (; j < kv; j += W) S::store_f16(o + j, S::load(xb + j));
          } else {
            uint16_t* o = static_cast<uint16_t*>(P.out) + i * P.osr;
            for (; j < kv; j += W) S::store_bf16(o + j, S::load(xb + j));
          }
        }
        for (; j < k; ++j) store_scalar(P.out, P.out_dtype, i * P.osr + j * P.osc, xb[j]);
      }
      i += 1;
    }
    if (stats && since_flush >= FLUSH_ROWS) {
      for (int64_t j = 0; j < k; ++j) colsum[j] += acc[j];
      std::memset(acc, 0, sizeof(float) * kp);
      if (diag) {
        for (int64_t j = 0; j < k; ++j) hpart[j] += accd[j];
        std::memset(accd, 0, sizeof(float) * kp);
      }
      since_flush = 0;
    }
  }
  if (stats) {
    for (int64_t j = 0; j < k; ++j) colsum[j] += acc[j];
    if (diag)
      for (int64_t j = 0; j < k; ++j) hpart[j] += accd[j];
    *wlogz += wl;
  }
  std::free(xb);
  std::free(xb2);
  std::free(acc);
  std::free(accd);
}

// ------------------------------------------------------------------------------------------
// Entry point: ranges in parallel; each range owns its partials (zeroed here).
// ------------------------------------------------------------------------------------------
template <class S>
static void run_all(const Params& P) {
  const int64_t nr = P.nranges;
  const int64_t k = P.k;
  const int64_t hsz = P.hmode == H_FULL ? k * k : (P.hmode == H_DIAG ? k : 0);
  const bool lanes = k < LANES_MAX_K;
  const int nt = static_cast<int>(imax(1, imin(P.nthreads, nr)));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t r = 0; r < nr; ++r) {
    double* colsum = P.stats ? P.colsum_part + r * k : nullptr;
    double* wlogz = P.stats ? P.wlogz_part + r : nullptr;
    double* hpart = (P.stats && hsz) ? P.h_part + r * hsz : nullptr;
    if (P.stats) {
      std::memset(colsum, 0, sizeof(double) * k);
      *wlogz = 0.0;
      if (hpart) std::memset(hpart, 0, sizeof(double) * hsz);
    }
    const int64_t r0 = r * P.range_rows;
    const int64_t r1 = imin(P.n, r0 + P.range_rows);
    if (r0 >= r1) continue;
    if (lanes)
      lanes_range<S>(P, r0, r1, colsum, wlogz, hpart);
    else
      rows_range<S>(P, r0, r1, colsum, wlogz, hpart);
  }
}

}  // namespace PPU_NS
}  // namespace ppu_cpu
