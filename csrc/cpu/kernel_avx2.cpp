// AVX2 + FMA + F16C instantiation of kernel.h (8 rows per vector in the small-k path) and of
// kernel_f64.h (4 doubles per vector; also what AVX-512 machines run for float64).
// Compiled with -mavx2 -mfma -mf16c (CMakeLists.txt); only called after a run-time CPU check.
#include <immintrin.h>
#include <cmath>
#include <cstdint>

#define PPU_NS isa_avx2
namespace ppu_cpu {
namespace isa_avx2 {
struct Avx2 {
  static constexpr int W = 8;
  // 2^n is built from exponent bits, valid down to n = -126; below the clamp the result is
  // forced to exactly 0 (q < 1e-38 relative to the row max: nothing lost).
  static constexpr float EXP_LO = -87.3f;
  using V = __m256;
  using I = __m256i;
  using M = __m256;
  struct D { __m256d lo, hi; };
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_load_ps(p); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_store_ps(p, v); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  static void sfence() { _mm_sfence(); }
  // The first n lanes (0 <= n <= W) of a row's last, partial vector: masked loads read nothing
  // past them (no fault at the end of a buffer) and give 0 in the other lanes.
  static M first_n(int n) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static V loadu_n(const float* p, int n) {
    return _mm256_maskload_ps(p, _mm256_castps_si256(first_n(n)));
  }
  static void storeu_n(float* p, V v, int n) {
    _mm256_maskstore_ps(p, _mm256_castps_si256(first_n(n)), v);
  }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale2(V p, V n, V x) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const V r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_and_ps(r, _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_GE_OQ));  // -inf, NaN -> 0
  }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static M eq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static V load_f64(const double* p) {  // 8 doubles -> 8 floats (round to nearest)
    const __m128 lo = _mm256_cvtpd_ps(_mm256_loadu_pd(p));
    const __m128 hi = _mm256_cvtpd_ps(_mm256_loadu_pd(p + 4));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
  }
  static V blend(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  // Whether frexp12 returns the true exponent and a mantissa in [1, 2) for subnormal inputs too.
  static constexpr bool FREXP_SUBNORMAL = false;
  static constexpr bool OWN_LOG = false;  // no log_any of its own: kernel.h's vlog_any
  static void frexp12(V x, V& m, V& e) {  // x positive and normal
    const __m256i u = _mm256_castps_si256(x);
    e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(u, 23), _mm256_set1_epi32(127)));
    m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffff)),
                                            _mm256_set1_epi32(0x3f800000)));
  }
  static float hmax(V a) {
    __m128 v = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_max_ps(v, _mm_movehl_ps(v, v));
    v = _mm_max_ss(v, _mm_shuffle_ps(v, v, 1));
    return _mm_cvtss_f32(v);
  }
  static float hsum(V a) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    return _mm_cvtss_f32(v);
  }
  static double hsum_d4(__m256d a) {
    __m128d v = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    v = _mm_add_sd(v, _mm_unpackhi_pd(v, v));
    return _mm_cvtsd_f64(v);
  }
  static double hsum_d(V a) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
    return hsum_d4(_mm256_add_pd(lo, hi));
  }
  static I lane_idx(int64_t stride) {
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                              _mm256_set1_epi32(static_cast<int>(stride)));
  }
  static V gather_f32(const float* base, I idx) { return _mm256_i32gather_ps(base, idx, 4); }
  static __m128i pack_lo16(__m256i g) {  // low 16 bits of each 32-bit lane -> 8 x uint16
    const __m256i sh = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i t = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(g, sh), 0x08);
    return _mm256_castsi256_si128(t);
  }
  static V gather_f16(const uint16_t* base, I idx) {
    const __m256i g = _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), idx, 2);
    return _mm256_cvtph_ps(pack_lo16(g));
  }
  static V gather_bf16(const uint16_t* base, I idx) {
    const __m256i g = _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), idx, 2);
    return _mm256_castsi256_ps(_mm256_slli_epi32(g, 16));
  }
  static V load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static void store_f16(uint16_t* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store_bf16(uint16_t* p, V v) {
    __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack_lo16(u));
  }
  static constexpr bool TILE = false;  // gathers (see kernel_avx512.cpp for the tile path)
  static void load_tile(const void*, int, int64_t, int64_t, int, float*) {}
  static void store_tile(void*, int, int64_t, int64_t, int, const float*) {}
  static D dzero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static void dacc_div(D& d, V num, V den) {
    d.lo = _mm256_add_pd(d.lo, _mm256_div_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(num)),
                                             _mm256_cvtps_pd(_mm256_castps256_ps128(den))));
    d.hi = _mm256_add_pd(d.hi, _mm256_div_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(num, 1)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(den, 1))));
  }
  static double dsum(const D& d) { return hsum_d4(_mm256_add_pd(d.lo, d.hi)); }
};

// Four doubles. exp and log are written here (no vector libm is assumed): see their comments.
struct Avx2D {
  static constexpr int W = 4;
  using V = __m256d;
  using M = __m256d;
  static V set1(double a) { return _mm256_set1_pd(a); }
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_load_pd(p); }
  static V loadu(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_store_pd(p, v); }
  static void storeu(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V div(V a, V b) { return _mm256_div_pd(a, b); }
  static V max(V a, V b) { return _mm256_max_pd(a, b); }  // NaN a -> b, as the clamps rely on
  static V min(V a, V b) { return _mm256_min_pd(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_pd(a, b, c); }
  static M eq(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_EQ_OQ); }
  static M lt(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_LT_OQ); }
  static V blend(M m, V a, V b) { return _mm256_blendv_pd(b, a, m); }
  static double hsum(V a) {
    __m128d v = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    v = _mm_add_sd(v, _mm_unpackhi_pd(v, v));
    return _mm_cvtsd_f64(v);
  }
  static double hmax(V a) {
    __m128d v = _mm_max_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    v = _mm_max_sd(v, _mm_unpackhi_pd(v, v));
    return _mm_cvtsd_f64(v);
  }
  // 2^n for integer-valued n in [-1022, 1023]: 2^52 + n + 1023 holds n + 1023 in its low bits.
  static V pow2(V n) {
    const V magic = _mm256_set1_pd(4503599627370496.0);  // 2^52
    const __m256i b = _mm256_sub_epi64(
        _mm256_castpd_si256(_mm256_add_pd(n, _mm256_set1_pd(4503599627370496.0 + 1023.0))),
        _mm256_castpd_si256(magic));
    return _mm256_castsi256_pd(_mm256_slli_epi64(b, 52));
  }
  // exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite, ln2 split so that n ln2_hi
  // is exact), e^r by its Taylor series to r^13 (truncation below 5e-18), then 2^n applied in
  // two halves so that results in the subnormal range are single roundings. -inf, NaN and
  // anything below -746 give 0.
  static V exp(V x) {
    const V xc = _mm256_max_pd(x, _mm256_set1_pd(-746.0));
    const V n = _mm256_round_pd(_mm256_mul_pd(xc, _mm256_set1_pd(1.4426950408889634)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), xc);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
    static constexpr double c[14] = {
        1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
        1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,
        1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,        0.5,
        1.0,                1.0};
    V p = _mm256_set1_pd(c[0]);
    for (int t = 1; t < 14; ++t) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c[t]));
    const V n1 = _mm256_floor_pd(_mm256_mul_pd(n, _mm256_set1_pd(0.5)));
    const V n2 = _mm256_sub_pd(n, n1);
    return _mm256_mul_pd(_mm256_mul_pd(p, pow2(n1)), pow2(n2));
  }
  // log(x) for x >= 0 (fdlibm's e_log.c reduction and polynomial, branch-free): x = 2^e m with
  // m in [sqrt(2)/2, sqrt(2)), f = m - 1, s = f / (2 + f), log(1 + f) = f - (f^2/2 - s (f^2/2 +
  // R(s^2))). Subnormals are scaled by 2^54 first; 0 gives -inf.
  static V log(V x) {
    const V one = _mm256_set1_pd(1.0);
    const M sub = _mm256_cmp_pd(x, _mm256_set1_pd(2.2250738585072014e-308), _CMP_LT_OQ);
    const V xs = _mm256_blendv_pd(x, _mm256_mul_pd(x, _mm256_set1_pd(18014398509481984.0)), sub);
    const __m256i u = _mm256_castpd_si256(xs);
    const V magic = _mm256_set1_pd(4503599627370496.0);  // 2^52: exponent bits -> double
    V e = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(_mm256_srli_epi64(u, 52),
                                                            _mm256_castpd_si256(magic))),
                        magic);
    e = _mm256_sub_pd(e, _mm256_blendv_pd(_mm256_set1_pd(1023.0), _mm256_set1_pd(1077.0), sub));
    V m = _mm256_castsi256_pd(_mm256_or_si256(
        _mm256_and_si256(u, _mm256_set1_epi64x(0x000fffffffffffffLL)),
        _mm256_castpd_si256(one)));
    const M big = _mm256_cmp_pd(m, _mm256_set1_pd(1.4142135623730951), _CMP_GT_OQ);
    m = _mm256_blendv_pd(m, _mm256_mul_pd(m, _mm256_set1_pd(0.5)), big);
    e = _mm256_blendv_pd(e, _mm256_add_pd(e, one), big);
    const V f = _mm256_sub_pd(m, one);
    const V s = _mm256_div_pd(f, _mm256_add_pd(_mm256_set1_pd(2.0), f));
    const V z = _mm256_mul_pd(s, s);
    const V w = _mm256_mul_pd(z, z);
    const V t1 = _mm256_mul_pd(w, _mm256_fmadd_pd(w, _mm256_fmadd_pd(w, _mm256_set1_pd(1.531383769920937332e-01),
                                                                      _mm256_set1_pd(2.222219843214978396e-01)),
                                                  _mm256_set1_pd(3.999999999940941908e-01)));
    const V t2 = _mm256_mul_pd(z, _mm256_fmadd_pd(w, _mm256_fmadd_pd(w, _mm256_fmadd_pd(w, _mm256_set1_pd(1.479819860511658591e-01),
                                                                                         _mm256_set1_pd(1.818357216161805012e-01)),
                                                                     _mm256_set1_pd(2.857142874366239149e-01)),
                                                 _mm256_set1_pd(6.666666666666735130e-01)));
    const V R = _mm256_add_pd(t2, t1);
    const V hfsq = _mm256_mul_pd(_mm256_set1_pd(0.5), _mm256_mul_pd(f, f));
    // e ln2_hi - ((hfsq - (s (hfsq + R) + e ln2_lo)) - f)
    const V inner = _mm256_fmadd_pd(e, _mm256_set1_pd(1.90821492927058770002e-10),
                                    _mm256_mul_pd(s, _mm256_add_pd(hfsq, R)));
    const V y = _mm256_fmsub_pd(e, _mm256_set1_pd(6.93147180369123816490e-01),
                                _mm256_sub_pd(_mm256_sub_pd(hfsq, inner), f));
    return _mm256_blendv_pd(y, _mm256_set1_pd(-INFINITY),
                            _mm256_cmp_pd(x, _mm256_setzero_pd(), _CMP_EQ_OQ));
  }
};
}  // namespace isa_avx2
}  // namespace ppu_cpu

#include "kernel.h"
#include "kernel_f64.h"

namespace ppu_cpu {
void run_avx2(const Params& p) { isa_avx2::run_all<isa_avx2::Avx2>(p); }
void run_f64_avx2(const Params& p) { isa_avx2::run_all_f64<isa_avx2::Avx2D>(p); }
}  // namespace ppu_cpu
