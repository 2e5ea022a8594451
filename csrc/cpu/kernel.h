// The fused CPU kernels, written once over a small SIMD "traits" type and compiled three times:
// kernel_avx512.cpp (16 lanes), kernel_avx2.cpp (8 lanes) and kernel_generic.cpp (1 lane, plain
// C++). Each of those defines PPU_NS (a namespace of its own, so no inline symbol is shared
// between translation units built with different -m flags) before including this file.
//
// Three operations (ppu_fast/backends/base.py has the contract):
//  * step: for every row i, x_ij = log_p_ij - alpha_j * inv_c_i, m_i = max_j x_ij,
//    e_ij = exp(x_ij - m_i), s_i = sum_j e_ij, q_ij = e_ij / s_i, log Z_i = m_i + log s_i;
//    accumulates colsum_j = sum_i q_ij, wlogz = sum_i log Z_i / inv_c_i and optionally the
//    Hessian's exact diagonal d_j = sum_i inv_c_i q_ij (1 - q_ij) and the sampled weights
//    W_jl = sum_{i in S} inv_c_i q_ij q_il (j < l). Reads N*k*sizeof(log_p) + 4N, writes nothing
//    N x k.
//  * materialize: writes q. Reads as step, writes N*k*sizeof(out).
//  * prepare: reads the user's input once (any dtype, F64 included), validates each row, writes
//    log P^ and sums the normalised rows over the retained / forgotten rows; optionally the first
//    solver evaluation at alpha = 0 from the normalised rows themselves (no extra exp). Reads
//    N*k*sizeof(x) + N (forget mask), writes N*k*sizeof(out).
//
// 1 - q_ij is never formed as 1 - q in float32 for the row maximum (it is 0 for a one-hot row):
// for entries equal to the row's largest q it is the sum of the smaller entries plus
// (count of maxima - 1) * max; every other entry has q <= 1/2 and 1 - q loses nothing.
//
// Two shapes of loop:
//  * k < LANES_MAX_K: W rows at once, one row per SIMD lane, one vector per column (a gather, a
//    tile transpose, or a staged transpose for the last block). Row max / sum are plain vector
//    ops across the k column vectors, with no horizontal reductions; the sampled weights are k(k-1)/2
//    per-lane FMAs per block of sampled rows.
//  * k >= LANES_MAX_K: one row at a time along the vector, in passes over the row, which sits in
//    L1/L2. The sampled rows of a 16-row block are gathered and their weights formed by a
//    register-tiled rank-16 update (4 classes x one vector of classes per tile).
// Column sums are accumulated per lane in float32 for at most FLUSH_BLOCKS blocks (lanes path)
// or FLUSH_ROWS rows (row path) and then added into the range's float64 partials.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

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
  if (dtype == F64) return static_cast<float>(static_cast<const double*>(base)[off]);
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

// log for any x >= 0: exact -inf at 0, subnormals scaled into the normal range first. (Negative
// and NaN inputs give garbage: prepare reports such rows as faults before anything uses them.)
// An ISA with a faster log of its own (S::OWN_LOG; AVX-512's table log) uses that instead.
template <class S>
static inline typename S::V vlog_any(typename S::V x) {
  using V = typename S::V;
  if constexpr (S::OWN_LOG) {
    return S::log_any(x);
  } else if constexpr (S::FREXP_SUBNORMAL) {  // frexp12 normalises subnormals: only 0 is special
    return S::blend(S::eq(x, S::zero()), S::set1(-INFINITY), vlog<S>(x));
  } else {
    const auto sub = S::lt(x, S::set1(1.17549435e-38f));
    const V xs = S::blend(sub, S::mul(x, S::set1(16777216.0f)), x);  // * 2^24
    V y = vlog<S>(xs);
    y = S::blend(sub, S::sub(y, S::set1(16.6355323f)), y);  // - 24 ln 2
    return S::blend(S::eq(x, S::zero()), S::set1(-INFINITY), y);
  }
}

// Rows whose sum of exp(x - max) is below this are "confident": their 1 - q_max = (s - 1) / s
// needs the smaller entries summed on their own (s - 1 would keep too few bits).
constexpr float CONFIDENT = 1.0009765625f;  // 1 + 2^-10: s - 1 keeps >= 13 bits above it

// s + e with the rounding error of the addition carried in c (Knuth's TwoSum; no -ffast-math, and
// no products for -ffp-contract to fuse). Rows written out as Q are normalised by a sum kept this
// way: a plain float32 sum of k terms left the rows of Q up to 6 ulps from summing to 1 at
// k = 1000, the compensated one leaves them within 1 (base.ROW_SUM_ULPS allows 2). The lanes path
// uses it; the row path (row_exp) gets the same error terms from Fast2Sum, which its sums allow.
template <class S>
static inline void two_sum(typename S::V& s, typename S::V& c, typename S::V e) {
  using V = typename S::V;
  const V t = S::add(s, e);
  const V bp = S::sub(t, s);
  c = S::add(c, S::add(S::sub(s, S::sub(t, bp)), S::sub(e, bp)));
  s = t;
}

// 1 / (s + c) to about float32 rounding: one Newton step from 1 / s on the residual
// 1 - (s + c) / s, formed with an FMA.
template <class S>
static inline typename S::V inv_sum(typename S::V s, typename S::V c) {
  using V = typename S::V;
  const V one = S::set1(1.0f);
  const V i0 = S::div(one, s);
  const V r = S::sub(S::fnmadd(s, i0, one), S::mul(c, i0));
  return S::fmadd(i0, r, i0);
}

// Whether some lane of s is not above thr (a NaN lane counts). A mask register (AVX-512's
// __mmask16, the generic bool) is tested directly; a vector mask through a horizontal max.
template <class S>
static inline bool any_not_above(typename S::V s, typename S::V thr) {
  using M = typename S::M;
  if constexpr (sizeof(M) <= sizeof(uint32_t)) {
    return static_cast<uint32_t>(S::gt(s, thr)) != (1u << S::W) - 1u;
  } else {
    return S::hmax(S::blend(S::gt(s, thr), S::zero(), S::set1(1.0f))) > 0.0f;
  }
}

static inline bool sampled_row(const Params& P, int64_t i) {
  return P.hmode == H_FULL && ((i / ROW_UNIT) % P.hstride) == 0;
}

// The threshold the vector checks flag a probability row's |sum - 1| with: tol less a bound on
// the rounding of a sum of `adds` additions of nonnegative terms in precision `unit` (the sum's
// own relative error is at most adds * unit), so that every row whose exact sum is off by more
// than tol is flagged, and classify_row, which sums in float64 like the reference, decides. (The
// float32 sums compared with tol rounded to float32 let rows off by up to ~k * 6e-8 more than
// tol through, which the reference and the GPU backends refused.) Negative when tol is below the
// bound: then every row is flagged.
static inline double flag_tol(double tol, double adds, double unit) {
  return tol - (adds + 2.0) * unit * (1.0 + tol);
}

// The exact fault kind of row i of the input (scalar; only for rows the vector checks flagged).
static int classify_row(const Params& P, int64_t i) {
  const int64_t k = P.k;
  bool nonfinite = false, negative = false, nan_or_pinf = false, any_finite = false;
  double s = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    double v;
    if (P.lp_dtype == F64) {
      v = static_cast<const double*>(P.lp)[i * P.sr + j * P.sc];
    } else {
      v = load_scalar(P.lp, P.lp_dtype, i * P.sr + j * P.sc);
    }
    if (!std::isfinite(v)) nonfinite = true;
    if (std::isnan(v) || v == INFINITY) nan_or_pinf = true;
    if (v > -INFINITY) any_finite = true;
    if (v < 0) negative = true;
    s += v;
  }
  if (P.mode == MODE_LOGP) return nan_or_pinf ? ERR_NONFINITE : (any_finite ? ERR_NONE : ERR_ALL_NEG_INF);
  if (nonfinite) return ERR_NONFINITE;
  if (P.mode == MODE_LOGITS) return ERR_NONE;
  if (negative) return ERR_NEGATIVE;
  return std::fabs(s - 1.0) > P.tol ? ERR_ROWSUM : ERR_NONE;
}

// ------------------------------------------------------------------------------------------
// Rows in lanes (k < LANES_MAX_K): blocks of W rows; column j of a block is one vector.
// ------------------------------------------------------------------------------------------
constexpr int FLUSH_BLOCKS = 8;  // float32 per-lane partials cover at most 8 * W rows
// The sampled weights W are accumulated in float32 over at most this many sampled 16-row blocks
// (both paths). The lanes path flushes them by that count, not with the column sums: a flush
// reduces all k(k-1)/2 pair vectors, and only every hstride-th block adds to them.
constexpr int W_FLUSH_BLOCKS = 16;
constexpr int KL = static_cast<int>(LANES_MAX_K);

template <class S>
struct LaneScratch {
  alignas(64) float x[KL * S::W];    // x_j, then e_j, then q_j (or log P^ in prepare)
  alignas(64) float acc[KL * S::W];  // colsum partials per lane
  alignas(64) float accd[KL * S::W]; // Hessian diagonal partials
  alignas(64) float sret[KL * S::W]; // prepare: sums over retained rows, or the column max
  alignas(64) float sfor[KL * S::W]; // prepare: sums over forgotten rows
  alignas(64) float stage[KL * S::W];
  alignas(64) float icst[S::W];
  alignas(64) float mask[S::W];
  alignas(64) float fmask[S::W];
  alignas(64) float flag[S::W];
  float* acch;                       // H_FULL: k(k-1)/2 vectors of sum inv_c q_j q_l, j < l
};

// The sampled weights' partials into hpart's W.
template <class S>
static void lanes_flush_w(const Params& P, LaneScratch<S>& sc, double* hpart) {
  const int k = static_cast<int>(P.k);
  constexpr int W = S::W;
  double* w = hpart + k;
  int t = 0;
  for (int j = 0; j < k; ++j) {
    for (int l = j + 1; l < k; ++l, ++t) {
      w[j * k + l] += S::hsum_d(S::load(sc.acch + t * W));
      S::store(sc.acch + t * W, S::zero());
    }
  }
}

// pairs: the sampled weights too (the end of a range, and prepare's blocks).
template <class S>
static void lanes_flush(const Params& P, LaneScratch<S>& sc, double* colsum, double* hpart,
                        bool pairs = true) {
  const int k = static_cast<int>(P.k);
  const int W = S::W;
  if (colsum) {
    for (int j = 0; j < k; ++j) {
      colsum[j] += S::hsum_d(S::load(sc.acc + j * W));
      S::store(sc.acc + j * W, S::zero());
    }
  }
  if (P.hmode != H_NONE) {
    for (int j = 0; j < k; ++j) {
      hpart[j] += S::hsum_d(S::load(sc.accd + j * W));
      S::store(sc.accd + j * W, S::zero());
    }
  }
  if (pairs && sc.acch) lanes_flush_w<S>(P, sc, hpart);
}

template <class S>
static void lanes_flush_sums(const Params& P, LaneScratch<S>& sc, double* sums) {
  const int k = static_cast<int>(P.k);
  const int W = S::W;
  if (P.mode == MODE_LOGP) return;  // the column max is folded in at the end of the range
  for (int j = 0; j < k; ++j) {
    sums[j] += S::hsum_d(S::load(sc.sret + j * W));
    sums[k + j] += S::hsum_d(S::load(sc.sfor + j * W));
    S::store(sc.sret + j * W, S::zero());
    S::store(sc.sfor + j * W, S::zero());
  }
}

// A sampled block's weights: acch gets inv_c q_j q_l (w q_j q_l) for each pair j < l.
template <class S>
static inline void lanes_pairs(const Params& P, LaneScratch<S>& sc, const float* q,
                               typename S::V w) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int k = static_cast<int>(P.k);
  int t = 0;
  for (int j = 0; j < k; ++j) {
    const V qw = S::mul(S::load(q + j * W), w);
    for (int l = j + 1; l < k; ++l, ++t)
      S::store(sc.acch + t * W, S::fmadd(qw, S::load(q + l * W), S::load(sc.acch + t * W)));
  }
}

// Hessian pieces of a block: rows' q_j at q + j W. A row's maximal entries are those equal to
// qmax (its largest q), whose 1 - q is rtop (from the smaller entries); every other entry's
// 1 - q is formed directly. w = inv_c (times the lane mask on a tail block, 0 on rows that carry
// no statistics).
template <class S>
static inline void lanes_hessian(const Params& P, LaneScratch<S>& sc, const float* q,
                                 typename S::V qmax, typename S::V rtop, typename S::V w,
                                 bool sampled, bool top_fix) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int k = static_cast<int>(P.k);
  for (int j = 0; j < k; ++j) {
    const V v = S::load(q + j * W);
    if (top_fix) {  // some row of the block is confident
      const V r = S::blend(S::eq(v, qmax), rtop, S::sub(S::set1(1.0f), v));
      S::store(sc.accd + j * W, S::fmadd(S::mul(v, r), w, S::load(sc.accd + j * W)));
    } else {        // q - q^2 loses at most eps / (1 - q) <= 2^10 eps on these rows
      S::store(sc.accd + j * W, S::fmadd(S::fnmadd(v, v, v), w, S::load(sc.accd + j * W)));
    }
  }
  if (P.hmode == H_FULL && sampled) lanes_pairs<S>(P, sc, q, w);
}

// prepare: the raw input values of block b (nv rows) into sc.stage, column j at stage + j W;
// rows past nv get a valid filler row (uniform probabilities, or zeros) and lane mask 0.
template <class S>
static inline void lanes_load_raw(const Params& P, LaneScratch<S>& sc, int64_t b, int nv) {
  constexpr int W = S::W;
  const int k = static_cast<int>(P.k);
  const int dt = P.lp_dtype;
  const float filler = P.mode == MODE_PROBS ? 1.0f / static_cast<float>(k) : 0.0f;
  if (S::TILE && nv == W && P.sc == 1 && dt != F64) {
    for (int c0 = 0; c0 < k; c0 += W)
      S::load_tile(P.lp, dt, b * P.sr + c0, P.sr, static_cast<int>(imin(W, k - c0)),
                   sc.stage + c0 * W);
    return;
  }
  for (int r = 0; r < W; ++r) {
    const bool ok = r < nv;
    for (int j = 0; j < k; ++j)
      sc.stage[j * W + r] = ok ? load_scalar(P.lp, dt, (b + r) * P.sr + j * P.sc) : filler;
  }
}

// Writes the block's rows (columns in sc.x) to out: tile stores for contiguous rows, else a
// scalar transpose.
template <class S>
static inline void lanes_store_out(const Params& P, LaneScratch<S>& sc, int64_t b, int nv) {
  constexpr int W = S::W;
  const int k = static_cast<int>(P.k);
  if (S::TILE && nv == W && P.osc == 1) {
    for (int c0 = 0; c0 < k; c0 += W)
      S::store_tile(P.out, P.out_dtype, b * P.osr + c0, P.osr, static_cast<int>(imin(W, k - c0)),
                    sc.x + c0 * W);
    return;
  }
  for (int r = 0; r < nv; ++r)
    for (int j = 0; j < k; ++j)
      store_scalar(P.out, P.out_dtype, (b + r) * P.osr + j * P.osc, sc.x[j * W + r]);
}

// prepare, one block: validate (a row sum and min / max per lane; exact kinds on the rare rows
// flagged), form log P^ into sc.x, add the normalised rows to the retained / forgotten sums (or
// the column max) and, with stats, the first evaluation of the retained rows. log_p mode leaves
// sc.x = the values for the softmax that follows.
template <class S>
static inline void lanes_prepare_block(const Params& P, LaneScratch<S>& sc, int64_t b, int nv,
                                       typename S::V ic, typename S::V msk, bool tail,
                                       int64_t* err, double* fpart) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int k = static_cast<int>(P.k);
  lanes_load_raw<S>(P, sc, b, nv);
  // The block's forget rows as lane values and as bits (bit r: row b + r). Branch-free: with a
  // class forget the rows are scattered, and per-row branches mispredicted about one row in ten
  // (prepare at 50,000 x 10 took 0.57 ms on one thread against 0.46 without a forget set).
  unsigned fbits = 0;
  if (P.forget) {
    for (int r = 0; r < nv; ++r) fbits |= static_cast<unsigned>(P.forget[b + r] != 0) << r;
  }
  for (int r = 0; r < W; ++r) sc.fmask[r] = static_cast<float>((fbits >> r) & 1u);
  const bool any_forget = fbits != 0;
  const V f = S::load(sc.fmask);
  const V one = S::set1(1.0f);
  // With the Hessian (probs), also the sum of a row's entries but one of its maxima: each entry
  // adds min(running max, entry), so the largest entry is the one left out.
  const bool hess = P.stats && P.hmode != H_NONE;
  const bool rest_x = hess && P.mode == MODE_PROBS;
  V s = S::zero(), mn = S::set1(INFINITY), mx = S::set1(-INFINITY), rest = S::zero();
  for (int j = 0; j < k; ++j) {
    const V x = S::load(sc.stage + j * W);
    s = S::add(s, x);
    mn = S::min(mn, x);
    if (rest_x && j > 0) rest = S::add(rest, S::min(mx, x));
    mx = S::max(mx, x);
  }
  // Rows needing a closer look: a non-finite sum (a NaN / inf entry), a negative entry or a sum
  // off the simplex (probs), a NaN / +inf or no finite entry (log_p).
  V flag;
  if (P.mode == MODE_PROBS) {
    const V dev = S::sub(s, one);
    const V adev = S::max(dev, S::sub(S::zero(), dev));
    // Each lane sums its row's k entries one by one in float32.
    const float thr = static_cast<float>(flag_tol(P.tol, static_cast<double>(k), 0x1p-24));
    flag = S::blend(S::gt(adev, S::set1(thr)), one, S::zero());              // NaN s: not > thr
    flag = S::max(flag, S::blend(S::eq(S::sub(s, s), S::zero()), S::zero(), one));
    flag = S::max(flag, S::blend(S::lt(mn, S::zero()), one, S::zero()));
  } else if (P.mode == MODE_LOGITS) {
    flag = S::blend(S::eq(S::sub(s, s), S::zero()), S::zero(), one);
  } else {
    // -inf entries are fine: s is then -inf; a NaN or +inf makes it NaN or +inf.
    flag = S::blend(S::lt(s, S::set1(INFINITY)), S::zero(), one);
    flag = S::max(flag, S::blend(S::gt(mx, S::set1(-INFINITY)), S::zero(), one));
  }
  if (tail) flag = S::mul(flag, msk);
  if (S::hmax(flag) > 0.0f && *err < 0) {
    S::store(sc.flag, flag);
    for (int r = 0; r < nv; ++r) {
      if (sc.flag[r] > 0.0f) {
        const int kind = classify_row(P, b + r);
        if (kind != ERR_NONE) {
          *err = (b + r) * 8 + kind;
          break;
        }
      }
    }
  }
  if (P.mode == MODE_LOGP) {
    for (int j = 0; j < k; ++j) {
      const V x = S::load(sc.stage + j * W);
      S::store(sc.x + j * W, x);
      S::store(sc.sret + j * W, S::max(S::load(sc.sret + j * W),
                                       tail ? S::blend(S::gt(msk, S::zero()), x, S::set1(-INFINITY)) : x));
    }
    return;
  }
  // The normaliser: log P^ = log x - lshift (probs) or (x - max) - lshift (logits), pn = x / s or
  // e / s. (Logits subtract the max first: max + log sum e rounds log sum e away when |max| is
  // large, e.g. two tied logits of 1e30 gave log P^ = 0 instead of -log 2.)
  V inv_s, lshift;
  if (P.mode == MODE_PROBS) {
    lshift = vlog<S>(S::max(s, S::set1(1e-30f)));
    inv_s = S::div(one, s);
  } else {
    V se = S::zero(), em = S::zero();  // em: the running max of e (e = 1 at the row's max)
    for (int j = 0; j < k; ++j) {
      const V e = vexp<S>(S::sub(S::load(sc.stage + j * W), mx));
      se = S::add(se, e);
      if (hess) {
        rest = S::add(rest, S::min(em, e));
        em = S::max(em, e);
      }
      S::store(sc.x + j * W, e);
    }
    lshift = vlog<S>(se);
    inv_s = S::div(one, se);
  }
  // Retained (1 - f) and forgotten (f) lanes.
  const V fr = tail ? S::mul(f, msk) : f;
  const V rr = tail ? S::mul(S::sub(one, f), msk) : S::sub(one, f);
  // The row's largest probability pmax = mx * inv_s (probs) or inv_s (logits, e = 1 at the max),
  // and its 1 - pmax from the smaller entries (the maxima's 1 - q; every other entry has q <= 1/2
  // and forms 1 - q directly): the same form as the step's confident rows, for every row.
  const V pmax = P.mode == MODE_PROBS ? S::mul(mx, inv_s) : inv_s;
  const V rtop = S::mul(rest, inv_s);
  const bool sampled = hess && sampled_row(P, b);
  // Forget lanes carry no statistics here (their part is analytic).
  V w = tail ? S::mul(ic, msk) : ic;
  if (any_forget) w = S::mul(w, S::sub(one, f));
  // pn is kept in sc.stage only where the sampled weights read it back.
  const bool keep = sampled;
  const bool fill = P.fill && any_forget;
  const auto fz = S::gt(f, S::zero());
  // One pass: log P^ (or fill) into sc.x, the sums of the normalised rows and the diagonal term.
  for (int j = 0; j < k; ++j) {
    const V x = S::load(sc.stage + j * W);
    V lg, pn;
    if (P.mode == MODE_PROBS) {
      lg = S::sub(vlog_any<S>(x), lshift);
      pn = S::mul(x, inv_s);
    } else {
      pn = S::mul(S::load(sc.x + j * W), inv_s);
      lg = S::sub(S::sub(x, mx), lshift);
    }
    if (fill) lg = S::blend(fz, S::set1(P.fill[j]), lg);
    S::store(sc.x + j * W, lg);
    if (keep) S::store(sc.stage + j * W, pn);
    if (any_forget) S::store(sc.sfor + j * W, S::fmadd(pn, fr, S::load(sc.sfor + j * W)));
    S::store(sc.sret + j * W, S::fmadd(pn, rr, S::load(sc.sret + j * W)));
    if (hess) {
      const V r = S::blend(S::eq(pn, pmax), rtop, S::sub(one, pn));
      S::store(sc.accd + j * W, S::fmadd(S::mul(pn, r), w, S::load(sc.accd + j * W)));
    }
  }
  if (sampled) lanes_pairs<S>(P, sc, sc.stage, w);
  // The first evaluation of the retained rows (q = pn, log Z = 0; their column sums are the
  // retained sums); the forget rows, all equal to fill, are added by the binding.
  if (P.stats && any_forget) {
    const bool samp = sampled_row(P, b);
    // The forget rows in ascending order, as the bits say (one loop exit to predict per block).
    for (unsigned bits = fbits; bits; bits &= bits - 1) {
      const int r = __builtin_ctz(bits);
      const double w = P.inv_c[b + r];
      fpart[0] += 1.0;
      fpart[1] += w;
      fpart[2] += 1.0 / w;
      if (samp) fpart[3] += w;
    }
  }
}

template <class S>
static void lanes_range(const Params& P, int64_t r0, int64_t r1, double* colsum, double* wlogz,
                        double* hpart, double* sums, int64_t* err, double* fpart) {
  using V = typename S::V;
  using I = typename S::I;
  constexpr int W = S::W;
  const int k = static_cast<int>(P.k);
  const bool stats = P.stats != 0;
  const bool prep = P.op == OP_PREPARE;
  // Statistics prepare adds itself (probs / logits fold the column sums into the retained sums).
  const bool prep_pn = prep && P.mode != MODE_LOGP;
  const int npairs = stats && P.hmode == H_FULL ? k * (k - 1) / 2 : 0;
  // acch follows the scratch in one allocation (sizeof is a multiple of its 64-byte alignment).
  LaneScratch<S>* scp = static_cast<LaneScratch<S>*>(
      aalloc(sizeof(LaneScratch<S>) + sizeof(float) * W * npairs));
  LaneScratch<S>& sc = *scp;
  sc.acch = nullptr;
  if (npairs > 0) {
    sc.acch = reinterpret_cast<float*>(scp + 1);
    std::memset(sc.acch, 0, sizeof(float) * W * npairs);
  }
  std::memset(sc.acc, 0, sizeof(sc.acc));
  std::memset(sc.accd, 0, sizeof(sc.accd));
  std::memset(sc.sfor, 0, sizeof(sc.sfor));
  if (prep && P.mode == MODE_LOGP) {
    for (int t = 0; t < KL * W; ++t) sc.sret[t] = -INFINITY;
  } else {
    std::memset(sc.sret, 0, sizeof(sc.sret));
  }
  typename S::D wacc = S::dzero();

  // Gather indices r * sr (+ j * sc via the base pointer) must fit in int32; otherwise every
  // block goes through the scalar staging copy.
  const bool idx_ok = (W - 1) * P.sr + (k - 1) * P.sc <= 2147483647LL;
  const I ridx = S::lane_idx(idx_ok ? P.sr : 0);
  const int dt = P.lp_dtype;
  const bool tile = S::TILE && P.sc == 1;
  int since_flush = 0;
  int wblocks = 0;  // sampled blocks in acch since its last flush
  const V one = S::set1(1.0f);

  for (int64_t b = r0; b < r1; b += W) {
    const int nv = static_cast<int>(imin(W, r1 - b));
    const bool tail = nv < W;
    if (tail) {
      for (int r = 0; r < W; ++r) {
        sc.mask[r] = r < nv ? 1.0f : 0.0f;
        sc.icst[r] = (r < nv && P.inv_c) ? P.inv_c[b + r] : 1.0f;
      }
    }
    const V msk = tail ? S::load(sc.mask) : one;
    V ic;
    if (prep) {
      ic = tail ? S::load(sc.icst) : (P.inv_c ? S::loadu(P.inv_c + b) : one);
      lanes_prepare_block<S>(P, sc, b, nv, ic, msk, tail, err, fpart);
      if (P.out) {
        lanes_store_out<S>(P, sc, b, nv);
        if (P.mode == MODE_LOGP && stats && P.out_dtype != F32) {
          // The first evaluation is of the values as stored: read back the rounded block.
          for (int r = 0; r < nv; ++r)
            for (int j = 0; j < k; ++j)
              sc.x[j * W + r] = load_scalar(P.out, P.out_dtype, (b + r) * P.osr + j * P.osc);
        }
      }
      if (prep_pn || !stats) {
        if (++since_flush == FLUSH_BLOCKS) {
          if (stats) lanes_flush<S>(P, sc, nullptr, hpart, false);
          lanes_flush_sums<S>(P, sc, sums);
          since_flush = 0;
        }
        // The sampled weights by their own count, as in the step below.
        if (sc.acch && sampled_row(P, b) && ++wblocks == W_FLUSH_BLOCKS) {
          lanes_flush_w<S>(P, sc, hpart);
          wblocks = 0;
        }
        continue;
      }
      // log_p: sc.x holds the values; evaluate them at alpha = 0 below.
    } else {
      // A 16-bit gather reads 4 bytes per element: only the element with the highest address,
      // (n - 1, k - 1), could read past the tensor, and it lies in the block holding row n - 1.
      const bool staged = tail || (!tile && (!idx_ok || (dt != F32 && b + W >= P.n)));
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
          if (!tail) sc.icst[r] = P.inv_c[b + r];
          for (int j = 0; j < k; ++j)
            sc.stage[j * W + r] = ok ? load_scalar(P.lp, dt, (b + r) * P.sr + j * P.sc) : 0.0f;
        }
        ic = S::load(sc.icst);
        for (int j = 0; j < k; ++j)
          S::store(sc.x + j * W, S::fnmadd(ic, S::set1(P.alpha[j]), S::load(sc.stage + j * W)));
      }
    }
    // Row max across the column vectors, then exp and the row sums (with the Hessian: also the
    // sum of the entries below the maximum, whose e is 1, and the count of maxima).
    const bool hess = stats && P.hmode != H_NONE;
    V m = S::load(sc.x);
    for (int j = 1; j < k; ++j) m = S::max(m, S::load(sc.x + j * W));
    // Rows that are written out (materialize) are normalised by a compensated sum.
    const bool exact = !prep && (!stats || P.out);
    V s = S::zero(), sc_lo = S::zero();
    for (int j = 0; j < k; ++j) {
      const V e = vexp<S>(S::sub(S::load(sc.x + j * W), m));
      S::store(sc.x + j * W, e);
      if (exact) two_sum<S>(s, sc_lo, e);
      else s = S::add(s, e);
    }
    const V inv_s = exact ? inv_sum<S>(s, sc_lo) : S::div(one, s);
    if (stats) {
      const V logz = S::add(m, vlog<S>(s));
      // The maxima have e = 1, q = 1 / s, and 1 - q = (s - 1) / s, which float32 forms exactly
      // enough unless s < 1 + 2^-10 (a confident row): then s - 1 is the sum of the entries below
      // the maximum (a single maximum, or s would be >= 2).
      const V thr = S::set1(CONFIDENT);
      const bool any_confident = hess && any_not_above<S>(s, thr);
      const bool sampled = hess && sc.acch && sampled_row(P, b);
      if (!hess && !tail && !P.out) {  // the hot loop of step
        for (int j = 0; j < k; ++j)
          S::store(sc.acc + j * W, S::fmadd(S::load(sc.x + j * W), inv_s, S::load(sc.acc + j * W)));
        S::dacc_div(wacc, logz, ic);
      } else if (hess && !any_confident && !P.out) {
        // The hot loop of step with the Hessian, on blocks without a confident row: q, its column
        // sum and its diagonal term in one pass (the operations of the loops below, so the same
        // results); q is stored only when a sampled block's weights read it back.
        const V w = tail ? S::mul(ic, msk) : ic;
        for (int j = 0; j < k; ++j) {
          const V q = S::mul(S::load(sc.x + j * W), inv_s);
          if (sampled) S::store(sc.x + j * W, q);
          S::store(sc.acc + j * W, S::add(S::load(sc.acc + j * W), tail ? S::mul(q, msk) : q));
          S::store(sc.accd + j * W, S::fmadd(S::fnmadd(q, q, q), w, S::load(sc.accd + j * W)));
        }
        S::dacc_div(wacc, tail ? S::mul(logz, msk) : logz, ic);
        if (sampled) lanes_pairs<S>(P, sc, sc.x, w);
      } else {
        // On a confident block, also the sum of the entries below the maximum (q s each).
        V rest = S::zero();
        for (int j = 0; j < k; ++j) {
          const V q = S::mul(S::load(sc.x + j * W), inv_s);
          S::store(sc.x + j * W, q);
          S::store(sc.acc + j * W, S::add(S::load(sc.acc + j * W), tail ? S::mul(q, msk) : q));
          if (any_confident) rest = S::add(rest, S::blend(S::eq(q, inv_s), S::zero(), S::mul(q, s)));
        }
        S::dacc_div(wacc, tail ? S::mul(logz, msk) : logz, ic);
        if (hess) {
          V sm1 = S::sub(s, one);
          if (any_confident) sm1 = S::blend(S::gt(s, thr), sm1, rest);
          lanes_hessian<S>(P, sc, sc.x, inv_s, S::mul(sm1, inv_s), tail ? S::mul(ic, msk) : ic,
                           sampled, any_confident);
        }
      }
      if (++since_flush == FLUSH_BLOCKS) {
        lanes_flush<S>(P, sc, colsum, hpart, false);
        since_flush = 0;
      }
      if (sampled && ++wblocks == W_FLUSH_BLOCKS) {
        lanes_flush_w<S>(P, sc, hpart);
        wblocks = 0;
      }
    } else {
      for (int j = 0; j < k; ++j) S::store(sc.x + j * W, S::mul(S::load(sc.x + j * W), inv_s));
    }
    if (P.out && !prep) lanes_store_out<S>(P, sc, b, nv);
  }
  if (stats) {
    lanes_flush<S>(P, sc, prep_pn ? nullptr : colsum, hpart);
    *wlogz += S::dsum(wacc);
  }
  if (prep) {
    if (P.mode == MODE_LOGP) {
      for (int j = 0; j < k; ++j) {
        const double v = S::hmax(S::load(sc.sret + j * W));
        if (v > sums[j]) sums[j] = v;
      }
    } else {
      lanes_flush_sums<S>(P, sc, sums);
    }
  }
  std::free(scp);
}

// ------------------------------------------------------------------------------------------
// One row along the vector (k >= LANES_MAX_K).
// row_exp: pass 1 finds the row max of x = log_p - alpha * inv_c (contiguous rows: without
// storing x; strided rows: x goes to the buffer), pass 2 writes e = exp(x - m) to the buffer
// (recomputing x from log_p, which is still in L1/L2) and sums it. In the hot case (step, no
// Hessian, no output) two rows share one read-modify-write of the float32 column accumulators.
// ------------------------------------------------------------------------------------------
constexpr int FLUSH_ROWS = 32;

// Rows of at least this many columns sum e = exp(x - m) (and prepare the probabilities or the
// exps it normalises by) compensated in every pass, not only when written as Q: a plain float32
// sum per lane (k / W terms each) drops the terms below half an ulp of its running sum, so the
// row sums came out low and every q high. That bias is the solver's residual floor: at k =
// 100,000 (peaked rows) 2.3e-6, and a refine stalled above tol 1e-6 for its 40 passes; at k =
// 10,000 5.6e-8, under float32's tol floor of 1e-7, where the 3 extra operations per vector are
// not spent.
constexpr int64_t COMPENSATED_ROW_K = 8192;

// A row's sum of terms in [0, 1], lane by lane: blocked, or compensated. The compensated sum
// starts every lane at 1 (taken off at the end), so a lane's running sum is never below the
// term added and Fast2Sum (3 extra operations) is exact where TwoSum took 6. The blocked sum adds
// ROW_SUM_BLOCK vectors plainly, then each block's sum into a running pair by TwoSum: a single
// plain running sum per lane (k / W terms) dropped the terms below half an ulp of it, every one
// rounding the same way, and with many small entries (k = 5,000, logits randn * 5) the row sums
// came out ~3.5e-7 low, the class totals as much high, above float32's tol floor 1e-7 (refines
// to tol 2e-7 then stopped short); compensating every vector cost the step 25-50 %. Rows of at
// most ROW_SUM_BLOCK vectors (k <= 128 with 16 lanes) are the plain sum, as before. Plain: one
// running sum, for sums that only flag a non-finite row (raw logits, log_p with its -inf
// entries, where TwoSum's inf - inf would turn every such row's sum into NaN and flag it).
constexpr int ROW_SUM_BLOCK = 8;
enum class RowSumKind { PLAIN, BLOCKED, COMPENSATED };

template <class S>
struct RowSum {
  using V = typename S::V;
  RowSumKind kind;
  V s, c, b;
  int n = 0;
  bool paired = false;  // a block went into (s, c)
  // Compensated when asked for, else ``other`` (blocked, or plain).
  explicit RowSum(bool compensated, RowSumKind other = RowSumKind::BLOCKED)
      : kind(compensated ? RowSumKind::COMPENSATED : other),
        s(compensated ? S::set1(1.0f) : S::zero()), c(S::zero()), b(S::zero()) {}
  void add(V e) {
    if (kind == RowSumKind::COMPENSATED) {
      const V t = S::add(s, e);
      c = S::add(c, S::sub(e, S::sub(t, s)));
      s = t;
    } else {
      b = S::add(b, e);
      if (kind == RowSumKind::BLOCKED && ++n == ROW_SUM_BLOCK) {
        two_sum<S>(s, c, b);
        b = S::zero();
        n = 0;
        paired = true;
      }
    }
  }
  // The total, in float64 unless the row was a single block (the lanes' starting 1s taken off
  // when compensated).
  double total() {
    if (kind == RowSumKind::COMPENSATED)
      return (S::hsum_d(s) - static_cast<double>(S::W)) + S::hsum_d(c);
    if (!paired) return static_cast<double>(S::hsum(b));
    two_sum<S>(s, c, b);
    return S::hsum_d(s) + S::hsum_d(c);
  }
};

template <class S>
// s_exact: when given, also the row sum to float64 accuracy (compensated), for rows written as Q.
static inline void row_exp(const Params& P, int64_t i, float* xb, float& m_out, float& s_out,
                           double* s_exact = nullptr) {
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
    if (dt == F32 && j < k) {  // the partial last vector, masked; -inf (exp 0) past k
      const int n = static_cast<int>(k - j);
      const V x = S::blend(S::first_n(n),
                           S::fnmadd(ic, S::loadu_n(P.alpha + j, n),
                                     S::loadu_n(static_cast<const float*>(row) + j, n)),
                           S::set1(ninf));
      S::store(xb + j, x);
      vm = S::max(vm, x);
      j = kp;
    }
  }
  float m = S::hmax(vm);
  for (; j < k; ++j) {  // strided rows and the tail: scalar, x kept in the buffer
    const float x = load_scalar(P.lp, dt, i * P.sr + j * P.sc) - icf * P.alpha[j];
    xb[j] = x;
    m = x > m ? x : m;
  }
  for (j = j > k ? j : k; j < kp; ++j) xb[j] = ninf;  // padding: exp(-inf) = 0
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
    if (s_exact) *s_exact = sd;
  } else {
    // Compensated for rows written as Q, and for wide rows (COMPENSATED_ROW_K).
    RowSum<S> sum(s_exact != nullptr || k >= COMPENSATED_ROW_K);
    for (j = 0; j < kp; j += W) {
      const V x = (contig && j < kv) ? xvec(j) : S::load(xb + j);
      const V e = vexp<S>(S::sub(x, M));
      S::store(xb + j, e);
      sum.add(e);
    }
    const double sd = sum.total();
    if (s_exact) *s_exact = sd;
    s = static_cast<float>(sd);
  }
  m_out = m;
  s_out = s;
}

// Per-range scratch of the row path.
struct RowScratch {
  float *xb, *xb2, *acc, *accd, *sret, *sfor;
  float *qb, *qwb, *wacc;  // H_FULL: 16 sampled rows of q and inv_c q; W accumulator (k x kp)
  int64_t qstride;
  int nq = 0, wblocks = 0;
};

// W += sum over the nq rows in qb of (inv_c q)^T q, upper part: tiles of 4 classes j (broadcast
// from qwb) by one vector of classes l (loaded from qb), all nq rows accumulated in registers.
// Also the float64 kernels' (kernel_f64.h: S a double traits, Scratch its F64Scratch).
template <class S, class Scratch = RowScratch>
static void rows_gram_block(const Params& P, Scratch& rs) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t k = P.k;
  const int64_t kp = ((k + W - 1) / W) * W;
  const int64_t st = rs.qstride;
  for (int64_t j0 = 0; j0 < k; j0 += 4) {
    for (int64_t c = (j0 / W) * W; c < kp; c += W) {
      V a0 = S::zero(), a1 = S::zero(), a2 = S::zero(), a3 = S::zero();
      for (int r = 0; r < rs.nq; ++r) {
        const V q = S::load(rs.qb + r * st + c);
        const auto* wq = rs.qwb + r * st + j0;
        a0 = S::fmadd(S::set1(wq[0]), q, a0);
        a1 = S::fmadd(S::set1(wq[1]), q, a1);
        a2 = S::fmadd(S::set1(wq[2]), q, a2);
        a3 = S::fmadd(S::set1(wq[3]), q, a3);
      }
      auto* w = rs.wacc + j0 * kp + c;
      S::store(w, S::add(S::load(w), a0));
      if (j0 + 1 < k) S::store(w + kp, S::add(S::load(w + kp), a1));
      if (j0 + 2 < k) S::store(w + 2 * kp, S::add(S::load(w + 2 * kp), a2));
      if (j0 + 3 < k) S::store(w + 3 * kp, S::add(S::load(w + 3 * kp), a3));
    }
  }
  rs.nq = 0;
  ++rs.wblocks;
}

static void rows_flush_w(const Params& P, RowScratch& rs, int64_t kp, double* hpart) {
  const int64_t k = P.k;
  double* w = hpart + k;
  for (int64_t j = 0; j < k; ++j)
    for (int64_t l = j + 1; l < k; ++l) w[j * k + l] += rs.wacc[j * kp + l];
  std::memset(rs.wacc, 0, sizeof(float) * k * kp);
  rs.wblocks = 0;
}

// The sum of a row's entries other than its (single) maximum vtop: 1 - q_max of a confident row.
template <class S>
static inline float row_rest(const Params& P, const float* v, float vtop) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t kp = ((P.k + W - 1) / W) * W;
  const V VT = S::set1(vtop);
  V r = S::zero();
  for (int64_t j = 0; j < kp; j += W) {
    const V x = S::load(v + j);
    r = S::add(r, S::blend(S::eq(x, VT), S::zero(), x));
  }
  return S::hsum(r);
}

// One pass over a row held as v (kp entries, zero padded) with q = v * scale: adds q to the
// column sums (colsum), the Hessian's diagonal and, for a sampled row, q and inv_c q to the gram
// block; with keep, q is written back to v. The diagonal's q (1 - q) is q - q^2, except on a
// confident row (top_fix), where the entries with v == vtop take 1 - q = rtop.
template <class S>
static inline void row_pass(const Params& P, RowScratch& rs, float* v, float scale, float vtop,
                            float rtop, float icf, bool colsum, bool hess, bool sampled, bool keep,
                            bool top_fix) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t kp = ((P.k + W - 1) / W) * W;
  const V SC = S::set1(scale), VT = S::set1(vtop), RT = S::set1(rtop), WW = S::set1(icf);
  const V one = S::set1(1.0f);
  float* dq = sampled ? rs.qb + rs.nq * rs.qstride : nullptr;
  float* dw = sampled ? rs.qwb + rs.nq * rs.qstride : nullptr;
  for (int64_t j = 0; j < kp; j += W) {
    const V x = S::load(v + j);
    const V q = S::mul(x, SC);
    if (colsum) S::store(rs.acc + j, S::add(S::load(rs.acc + j), q));
    if (hess) {
      if (top_fix) {  // a confident row: the maximum's 1 - q comes from the other entries
        const V r = S::blend(S::eq(x, VT), RT, S::sub(one, q));
        S::store(rs.accd + j, S::fmadd(S::mul(q, r), WW, S::load(rs.accd + j)));
      } else {        // q - q^2 loses at most eps / (1 - q) <= 2^10 eps here
        S::store(rs.accd + j, S::fmadd(S::fnmadd(q, q, q), WW, S::load(rs.accd + j)));
      }
    }
    if (sampled) {
      S::store(dq + j, q);
      S::store(dw + j, S::mul(q, WW));
    }
    if (keep) S::store(v + j, q);
  }
  if (sampled) ++rs.nq;
}

// Stores row i of out from the float buffer v (converted to out's dtype).
template <class S>
static inline void row_store_out(const Params& P, int64_t i, const float* v) {
  constexpr int W = S::W;
  const int64_t k = P.k;
  const int64_t kv = (k / W) * W;
  int64_t j = 0;
  if (P.osc == 1 && W > 1) {
    if (P.out_dtype == F32 && P.stream_out) {
      float* o = static_cast<float*>(P.out) + i * P.osr;
      // Non-temporal stores need whole aligned vectors: scalar head up to the alignment and
      // scalar tail. (Masked stores there, next to the streamed lines, made a 1,000,000 x 100
      // prepare 1.6x slower on AVX-512; in the cached path below they are a gain.)
      const int64_t head = imin(k, static_cast<int64_t>(
          ((W * sizeof(float) - reinterpret_cast<uintptr_t>(o) % (W * sizeof(float))) %
           (W * sizeof(float))) / sizeof(float)));
      for (; j < head; ++j) o[j] = v[j];
      for (; j + W <= k; j += W) S::stream(o + j, S::loadu(v + j));
    } else if (P.out_dtype == F32) {
      float* o = static_cast<float*>(P.out) + i * P.osr;
      for (; j < kv; j += W) S::storeu(o + j, S::loadu(v + j));
      // v may be the caller's fill (k floats, no padding, any alignment: unaligned loads; an
      // aligned one crashed on a fill that is a view at an offset or numpy memory): read its
      // tail masked too.
      if (j < k) {
        // The partial last vector: a whole vector ending at column k (it rewrites the columns
        // before j with the same values) where the row is that long, else masked. A masked
        // store reaches past the row in address, and in place (out == log_p) the next row's
        // first load then waits for it: 7 ms of a 30 ms 1,000,000 x 100 last pass.
        if (k >= W) S::storeu(o + k - W, S::loadu(v + k - W));
        else S::storeu_n(o + j, S::loadu_n(v + j, static_cast<int>(k - j)), static_cast<int>(k - j));
      }
      return;
    } else if (P.out_dtype == F16) {
      uint16_t* o = static_cast<uint16_t*>(P.out) + i * P.osr;
      for (; j < kv; j += W) S::store_f16(o + j, S::loadu(v + j));
    } else {
      uint16_t* o = static_cast<uint16_t*>(P.out) + i * P.osr;
      for (; j < kv; j += W) S::store_bf16(o + j, S::loadu(v + j));
    }
  }
  for (; j < k; ++j) store_scalar(P.out, P.out_dtype, i * P.osr + j * P.osc, v[j]);
}

// prepare, one row. Pass A loads the row (converted to float32) and reduces it: the sum (a NaN or
// inf entry makes it non-finite) and min / max; rows failing the quick checks get their exact
// fault from classify_row. Pass B writes log P^ (or fill), adds the normalised row to the retained
// / forgotten sums and, for the Hessian of a retained row's first evaluation, sums its entries
// below the maximum; pass C (Hessian only) adds the diagonal and the sampled row. log_p mode leaves
// the values in rs.xb for the evaluation that follows.
template <class S>
static inline void row_prepare(const Params& P, RowScratch& rs, int64_t i, int64_t* err,
                               double* fpart) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t k = P.k;
  const int64_t kv = (k / W) * W;
  const int64_t kp = ((k + W - 1) / W) * W;
  const int dt = P.lp_dtype;
  const bool f = P.forget && P.forget[i];
  float* x = rs.xb;
  const V one = S::set1(1.0f);
  // Pass A. A wide row of probabilities is summed compensated (COMPENSATED_ROW_K): its sum
  // normalises P^, whose column sums are the targets, which the compensated passes must meet.
  // (Entries outside [0, 1] flag the row, which classify_row then judges in float64.)
  // Raw logits and log_p values are summed only to flag a non-finite row: plainly.
  RowSum<S> sum(P.mode == MODE_PROBS && k >= COMPENSATED_ROW_K,
                P.mode == MODE_PROBS ? RowSumKind::BLOCKED : RowSumKind::PLAIN);
  V vmn = S::set1(INFINITY), vmx = S::set1(-INFINITY);
  int64_t j = 0;
  if (P.sc == 1 && W > 1) {
    for (; j < kv; j += W) {
      V v;
      if (dt == F32) v = S::loadu(static_cast<const float*>(P.lp) + i * P.sr + j);
      else if (dt == F64) v = S::load_f64(static_cast<const double*>(P.lp) + i * P.sr + j);
      else if (dt == F16) v = S::load_f16(static_cast<const uint16_t*>(P.lp) + i * P.sr + j);
      else v = S::load_bf16(static_cast<const uint16_t*>(P.lp) + i * P.sr + j);
      S::store(x + j, v);
      sum.add(v);
      vmn = S::min(vmn, v);
      vmx = S::max(vmx, v);
    }
    if (dt == F32 && j < k) {  // the partial last vector, masked (0 in the lanes past k)
      const int n = static_cast<int>(k - j);
      const auto in = S::first_n(n);
      const V v = S::loadu_n(static_cast<const float*>(P.lp) + i * P.sr + j, n);
      S::store(x + j, v);
      sum.add(v);
      vmn = S::min(vmn, S::blend(in, v, S::set1(INFINITY)));
      vmx = S::max(vmx, S::blend(in, v, S::set1(-INFINITY)));
      j = k;
    }
  }
  double s_tail = 0.0;
  float mn = S::hmax(S::sub(S::zero(), vmn)), mx = S::hmax(vmx);
  mn = -mn;
  for (; j < k; ++j) {
    const float v = load_scalar(P.lp, dt, i * P.sr + j * P.sc);
    x[j] = v;
    s_tail += v;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  for (j = k; j < kp; ++j) x[j] = P.mode == MODE_PROBS ? 0.0f : -INFINITY;
  const double s = sum.total() + s_tail;
  bool flagged;
  // Each lane sums ceil(k / W) entries, then the lanes are added (log2 W), all in float32.
  if (P.mode == MODE_PROBS)
    flagged = !(std::fabs(s - 1.0) <= flag_tol(P.tol, static_cast<double>(k / S::W + 2 * S::W),
                                               0x1p-24)) || !(mn >= 0.0f);
  else if (P.mode == MODE_LOGITS) flagged = !std::isfinite(s);
  else flagged = !(s < INFINITY) || !(mx > -INFINITY);  // NaN, +inf, or no finite entry
  if (flagged && *err < 0) {
    const int kind = classify_row(P, i);
    if (kind != ERR_NONE) *err = i * 8 + kind;
  }
  if (P.mode == MODE_LOGP) {
    for (j = 0; j < kp; j += W) S::store(rs.sret + j, S::max(S::load(rs.sret + j), S::load(x + j)));
    if (P.out) {
      row_store_out<S>(P, i, x);
      if (P.stats && P.out_dtype != F32) {
        // The first evaluation is of the values as stored: read back the rounded row.
        for (j = 0; j < k; ++j) x[j] = load_scalar(P.out, P.out_dtype, i * P.osr + j * P.osc);
      }
    }
    return;
  }
  // Pass B: log P^ into x, the normalised row into xb2 (probs: x / s; logits: its softmax), the
  // row added to the retained / forgotten sums and, for the first evaluation's Hessian of a
  // retained row that is not confident, its diagonal term q - q^2 (a confident row's, whose
  // maximum needs 1 - q from the other entries, takes a pass of its own below).
  float* pn = rs.xb2;
  float* dst = f ? rs.sfor : rs.sret;
  const bool want_d = P.stats && P.hmode != H_NONE && !f;
  const V WW = S::set1(want_d ? P.inv_c[i] : 0.0f);
  float inv_s, pmax;
  bool confident;
  if (P.mode == MODE_PROBS) {
    const float sf = static_cast<float>(s);
    inv_s = 1.0f / sf;
    pmax = mx * inv_s;
    confident = !(mx < s * (1.0 - 1.0 / 1024));
    const bool fold = want_d && !confident;
    const bool logs = !(f && P.fill);  // a forget row's log P^ is fill: its own log is not needed
    const V SH = S::set1(std::log(sf)), IS = S::set1(inv_s);
    for (j = 0; j < kp; j += W) {
      const V v = S::load(x + j);
      const V q = S::mul(v, IS);
      S::store(pn + j, q);
      S::store(dst + j, S::add(S::load(dst + j), q));
      if (fold) S::store(rs.accd + j, S::fmadd(S::fnmadd(q, q, q), WW, S::load(rs.accd + j)));
      if (logs) S::store(x + j, S::sub(vlog_any<S>(v), SH));
    }
  } else {
    const V M = S::set1(mx);
    RowSum<S> se(k >= COMPENSATED_ROW_K);  // as pass A's, for the softmax
    for (j = 0; j < kp; j += W) {
      const V e = vexp<S>(S::sub(S::load(x + j), M));
      S::store(pn + j, e);
      se.add(e);
    }
    const float sf = static_cast<float>(se.total());
    inv_s = 1.0f / sf;
    pmax = inv_s;  // e of the maximum is 1
    confident = !(sf > CONFIDENT);
    const bool fold = want_d && !confident;
    // (x - max) - log sum e: max + log sum e would round the log away when |max| is large.
    const V SH = S::set1(std::log(sf)), IS = S::set1(inv_s);
    for (j = 0; j < kp; j += W) {
      const V q = S::mul(S::load(pn + j), IS);
      S::store(pn + j, q);
      S::store(dst + j, S::add(S::load(dst + j), q));
      if (fold) S::store(rs.accd + j, S::fmadd(S::fnmadd(q, q, q), WW, S::load(rs.accd + j)));
      S::store(x + j, S::sub(S::sub(S::load(x + j), M), SH));
    }
  }
  if (P.out) row_store_out<S>(P, i, (f && P.fill) ? P.fill : x);
  if (!P.stats) return;
  if (f) {  // all forget rows hold fill: their first evaluation is added analytically
    const double w = P.inv_c[i];
    fpart[0] += 1.0;
    fpart[1] += w;
    fpart[2] += 1.0 / w;
    if (sampled_row(P, i)) fpart[3] += w;
    return;
  }
  if (P.hmode == H_NONE) return;
  const bool samp = sampled_row(P, i);
  if (!confident && !samp) return;  // the diagonal is in already
  // A confident row: the largest probability's 1 - pmax is the sum of the smaller entries (a
  // single maximum then); a sampled row goes to the gram block.
  const float rtop = confident ? row_rest<S>(P, pn, pmax) : 1.0f - pmax;
  row_pass<S>(P, rs, pn, 1.0f, pmax, rtop, P.inv_c[i], false, confident, samp, false,
              confident);
}

template <class S>
static void rows_range(const Params& P, int64_t r0, int64_t r1, double* colsum, double* wlogz,
                       double* hpart, double* sums, int64_t* err, double* fpart) {
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t k = P.k;
  const int64_t kp = ((k + W - 1) / W) * W;
  RowScratch rs;
  auto fl = [&](int64_t count) { return static_cast<float*>(aalloc(sizeof(float) * count)); };
  rs.xb = fl(kp);
  rs.xb2 = fl(kp);
  rs.acc = fl(kp);
  rs.accd = fl(kp);
  rs.sret = fl(kp);
  rs.sfor = fl(kp);
  std::memset(rs.acc, 0, sizeof(float) * kp);
  std::memset(rs.accd, 0, sizeof(float) * kp);
  std::memset(rs.sfor, 0, sizeof(float) * kp);
  const bool prep = P.op == OP_PREPARE;
  const bool prep_pn = prep && P.mode != MODE_LOGP;
  if (prep && P.mode == MODE_LOGP) {
    for (int64_t j = 0; j < kp; ++j) rs.sret[j] = -INFINITY;
  } else {
    std::memset(rs.sret, 0, sizeof(float) * kp);
  }
  const bool stats = P.stats != 0;
  const bool full = stats && P.hmode == H_FULL;
  const bool hess = stats && P.hmode != H_NONE;
  rs.qb = rs.qwb = rs.wacc = nullptr;
  rs.qstride = ((kp + 4 + W - 1) / W) * W;  // room for the 4-class tiles past k (zero)
  if (full) {
    rs.qb = fl(ROW_UNIT * rs.qstride);
    rs.qwb = fl(ROW_UNIT * rs.qstride);
    rs.wacc = fl(k * kp);
    std::memset(rs.qb, 0, sizeof(float) * ROW_UNIT * rs.qstride);
    std::memset(rs.qwb, 0, sizeof(float) * ROW_UNIT * rs.qstride);
    std::memset(rs.wacc, 0, sizeof(float) * k * kp);
  }
  const bool hot = stats && !hess && !P.out && !prep;
  const bool pair_h = stats && hess && !P.out && !prep;
  double wl = 0.0;
  int since_flush = 0;

  for (int64_t i = r0; i < r1;) {
    if (hot && i + 1 < r1) {
      float m0, s0, m1, s1;
      row_exp<S>(P, i, rs.xb, m0, s0);
      row_exp<S>(P, i + 1, rs.xb2, m1, s1);
      const V is0 = S::set1(1.0f / s0), is1 = S::set1(1.0f / s1);
      for (int64_t j = 0; j < kp; j += W)
        S::store(rs.acc + j, S::fmadd(S::load(rs.xb2 + j), is1,
                                      S::fmadd(S::load(rs.xb + j), is0, S::load(rs.acc + j))));
      wl += static_cast<double>(m0 + std::log(s0)) / static_cast<double>(P.inv_c[i]);
      wl += static_cast<double>(m1 + std::log(s1)) / static_cast<double>(P.inv_c[i + 1]);
      i += 2;
      since_flush += 2;
    } else if (pair_h && i + 1 < r1) {
      // A step with the Hessian, two rows at a time (they share the accumulators' read-modify-
      // write, as in the hot loop); a confident row takes the single-row pass for its maximum.
      float m0, s0, m1, s1;
      row_exp<S>(P, i, rs.xb, m0, s0);
      row_exp<S>(P, i + 1, rs.xb2, m1, s1);
      const float is0 = 1.0f / s0, is1 = 1.0f / s1;
      const float w0 = P.inv_c[i], w1 = P.inv_c[i + 1];
      const bool sa = full && sampled_row(P, i);  // a pair never straddles a 16-row block
      if (s0 > CONFIDENT && s1 > CONFIDENT) {
        const V I0 = S::set1(is0), I1 = S::set1(is1), W0 = S::set1(w0), W1 = S::set1(w1);
        float* dq0 = sa ? rs.qb + rs.nq * rs.qstride : nullptr;
        float* dw0 = sa ? rs.qwb + rs.nq * rs.qstride : nullptr;
        for (int64_t j = 0; j < kp; j += W) {
          const V q0 = S::mul(S::load(rs.xb + j), I0), q1 = S::mul(S::load(rs.xb2 + j), I1);
          S::store(rs.acc + j, S::add(S::load(rs.acc + j), S::add(q0, q1)));
          const V d = S::fmadd(S::fnmadd(q1, q1, q1), W1,
                               S::mul(S::fnmadd(q0, q0, q0), W0));
          S::store(rs.accd + j, S::add(S::load(rs.accd + j), d));
          if (sa) {
            S::store(dq0 + j, q0);
            S::store(dw0 + j, S::mul(q0, W0));
            S::store(dq0 + rs.qstride + j, q1);
            S::store(dw0 + rs.qstride + j, S::mul(q1, W1));
          }
        }
        if (sa) rs.nq += 2;
      } else {
        for (int t = 0; t < 2; ++t) {
          float* e = t ? rs.xb2 : rs.xb;
          const float st = t ? s1 : s0;
          const bool conf = !(st > CONFIDENT);
          const float rest = conf ? row_rest<S>(P, e, 1.0f) : 0.0f;
          row_pass<S>(P, rs, e, 1.0f / st, 1.0f, (conf ? rest : st - 1.0f) / st, t ? w1 : w0,
                      true, true, sa, false, conf);
        }
      }
      wl += static_cast<double>(m0 + std::log(s0)) / static_cast<double>(w0);
      wl += static_cast<double>(m1 + std::log(s1)) / static_cast<double>(w1);
      if (full && rs.nq > 0 && ((i + 2) % ROW_UNIT == 0 || i + 2 == r1)) {
        rows_gram_block<S>(P, rs);
        if (rs.wblocks == W_FLUSH_BLOCKS) rows_flush_w(P, rs, kp, hpart);
      }
      i += 2;
      since_flush += 2;
    } else {
      if (prep) row_prepare<S>(P, rs, i, err, fpart);
      if (!prep || (P.mode == MODE_LOGP && stats)) {
        // A step row, or log_p mode's evaluation of the stored values at alpha = 0: e in xb.
        float m, s, rest = 0.0f;
        // Rows written out as Q (materialize) are normalised by their float64 sum.
        double s_exact = 0.0;
        const bool exact = !prep && P.out;
        // Q straight to out (materialize, and the solver's last pass): one pass over e for the
        // column sums and the stores instead of q written back to the buffer, then copied.
        const bool direct = exact && !hess && P.out_dtype == F32 && P.osc == 1 && W > 1 &&
                            !P.stream_out;
        if (prep) {
          // x is in xb already: the max, then e = exp(x - m) in place.
          V vm = S::set1(-INFINITY);
          for (int64_t j = 0; j < kp; j += W) vm = S::max(vm, S::load(rs.xb + j));
          m = S::hmax(vm);
          const V M = S::set1(m);
          // As row_exp (whose one-lane sum is a double): one float32 lane is k terms.
          RowSum<S> sum(W == 1 || k >= COMPENSATED_ROW_K);
          for (int64_t j = 0; j < kp; j += W) {
            const V e = vexp<S>(S::sub(S::load(rs.xb + j), M));
            S::store(rs.xb + j, e);
            sum.add(e);
          }
          s = static_cast<float>(sum.total());
          if (hess && !(s > CONFIDENT)) rest = row_rest<S>(P, rs.xb, 1.0f);
        } else {
          row_exp<S>(P, i, rs.xb, m, s, exact ? &s_exact : nullptr);
          if (hess && !(s > CONFIDENT)) rest = row_rest<S>(P, rs.xb, 1.0f);
        }
        const float inv_s = exact ? static_cast<float>(1.0 / s_exact) : 1.0f / s;
        if (direct) {
          float* o = static_cast<float*>(P.out) + i * P.osr;
          const V IS = S::set1(inv_s);
          const int64_t kv = (k / W) * W;
          int64_t j = 0;
          for (; j < kv; j += W) {
            const V q = S::mul(S::load(rs.xb + j), IS);
            if (stats) S::store(rs.acc + j, S::add(S::load(rs.acc + j), q));
            S::storeu(o + j, q);
          }
          if (j < k) {  // padding lanes hold e = 0
            const V q = S::mul(S::load(rs.xb + j), IS);
            if (stats) S::store(rs.acc + j, S::add(S::load(rs.acc + j), q));
            // Not masked: see row_store_out (the same values, a whole vector ending at k).
            if (k >= W) S::storeu(o + k - W, S::mul(S::loadu(rs.xb + k - W), IS));
            else S::storeu_n(o + j, q, static_cast<int>(k - j));
          }
          if (stats) wl += static_cast<double>(m + std::log(s)) / static_cast<double>(P.inv_c[i]);
        } else if (stats) {
          const bool samp = full && sampled_row(P, i);
          // e of a maximum is 1 and its 1 - q is (s - 1) / s; for a confident row s - 1 is the
          // sum of the smaller entries (rest).
          const bool confident = !(s > CONFIDENT);
          row_pass<S>(P, rs, rs.xb, inv_s, 1.0f, (confident ? rest : s - 1.0f) * inv_s,
                      P.inv_c[i], true, hess, samp, P.out && !prep, confident);
          wl += static_cast<double>(m + std::log(s)) / static_cast<double>(P.inv_c[i]);
        } else {
          const V IS = S::set1(inv_s);
          for (int64_t j = 0; j < kp; j += W) S::store(rs.xb + j, S::mul(S::load(rs.xb + j), IS));
        }
        if (P.out && !prep && !direct) row_store_out<S>(P, i, rs.xb);
      }
      if (full && rs.nq > 0 && ((i + 1) % ROW_UNIT == 0 || i + 1 == r1)) {
        rows_gram_block<S>(P, rs);
        if (rs.wblocks == W_FLUSH_BLOCKS) rows_flush_w(P, rs, kp, hpart);
      }
      ++since_flush;
      i += 1;
    }
    if (since_flush >= FLUSH_ROWS) {
      if (stats) {
        if (!prep_pn) {
          for (int64_t j = 0; j < k; ++j) colsum[j] += rs.acc[j];
          std::memset(rs.acc, 0, sizeof(float) * kp);
        }
        if (hess) {
          for (int64_t j = 0; j < k; ++j) hpart[j] += rs.accd[j];
          std::memset(rs.accd, 0, sizeof(float) * kp);
        }
      }
      if (prep_pn) {
        for (int64_t j = 0; j < k; ++j) {
          sums[j] += rs.sret[j];
          sums[k + j] += rs.sfor[j];
        }
        std::memset(rs.sret, 0, sizeof(float) * kp);
        std::memset(rs.sfor, 0, sizeof(float) * kp);
      }
      since_flush = 0;
    }
  }
  if (stats) {
    if (!prep_pn)
      for (int64_t j = 0; j < k; ++j) colsum[j] += rs.acc[j];
    if (hess)
      for (int64_t j = 0; j < k; ++j) hpart[j] += rs.accd[j];
    if (full) {
      if (rs.nq > 0) rows_gram_block<S>(P, rs);
      rows_flush_w(P, rs, kp, hpart);
    }
    *wlogz += wl;
  }
  if (prep) {
    if (P.mode == MODE_LOGP) {
      for (int64_t j = 0; j < k; ++j)
        if (rs.sret[j] > sums[j]) sums[j] = rs.sret[j];
    } else {
      for (int64_t j = 0; j < k; ++j) {
        sums[j] += rs.sret[j];
        sums[k + j] += rs.sfor[j];
      }
    }
  }
  for (float* p : {rs.xb, rs.xb2, rs.acc, rs.accd, rs.sret, rs.sfor, rs.qb, rs.qwb, rs.wacc})
    std::free(p);
}

// ------------------------------------------------------------------------------------------
// Entry point: ranges on the thread pool; each range owns its partials (initialised here) and
// hands them to Body for its rows [r0, r1) (kernel_f64.h runs its own Body through this too).
// ------------------------------------------------------------------------------------------
using RangeBody = void (*)(const Params& P, int64_t r0, int64_t r1, double* colsum,
                           double* wlogz, double* hpart, double* sums, int64_t* err,
                           double* fpart);

template <class S>
static void f32_range(const Params& P, int64_t r0, int64_t r1, double* colsum, double* wlogz,
                      double* hpart, double* sums, int64_t* err, double* fpart) {
  if (P.k < LANES_MAX_K)
    lanes_range<S>(P, r0, r1, colsum, wlogz, hpart, sums, err, fpart);
  else
    rows_range<S>(P, r0, r1, colsum, wlogz, hpart, sums, err, fpart);
  // Non-temporal stores are weakly ordered: make them visible before the pool reports the
  // range done.
  if (P.stream_out) S::sfence();
}

template <RangeBody Body>
static void run_range(const void* ctx, int64_t r) {
  const Params& P = *static_cast<const Params*>(ctx);
  const int64_t k = P.k;
  const int64_t hsz = P.hmode == H_FULL ? k + k * k : (P.hmode == H_DIAG ? k : 0);
  const bool prep = P.op == OP_PREPARE;
  double* colsum = P.stats ? P.colsum_part + r * k : nullptr;
  double* wlogz = P.stats ? P.wlogz_part + r : nullptr;
  double* hpart = (P.stats && hsz) ? P.h_part + r * hsz : nullptr;
  const int64_t ssz = prep ? (P.mode == MODE_LOGP ? k : 2 * k) : 0;
  double* sums = prep ? P.sums_part + r * ssz : nullptr;
  int64_t* err = prep ? P.err_part + r : nullptr;
  double* fpart = prep ? P.fill_part + r * 4 : nullptr;
  if (P.stats) {
    std::memset(colsum, 0, sizeof(double) * k);
    *wlogz = 0.0;
    if (hpart) std::memset(hpart, 0, sizeof(double) * hsz);
  }
  if (prep) {
    for (int64_t j = 0; j < ssz; ++j) sums[j] = P.mode == MODE_LOGP ? -INFINITY : 0.0;
    *err = -1;
    for (int t = 0; t < 4; ++t) fpart[t] = 0.0;
  }
  const int64_t r0 = r * P.range_rows;
  const int64_t r1 = imin(P.n, r0 + P.range_rows);
  if (r0 < r1) Body(P, r0, r1, colsum, wlogz, hpart, sums, err, fpart);
}

template <class S>
static void run_all(const Params& P) {
  parallel_ranges(P.nranges, P.nthreads, &run_range<&f32_range<S>>, &P);
}

}  // namespace PPU_NS
}  // namespace ppu_cpu
