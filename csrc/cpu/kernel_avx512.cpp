// AVX-512 (F, BW, DQ, VL) instantiation of kernel.h: 16 rows per vector in the small-k path.
// Compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma -mf16c (CMakeLists.txt);
// only called after a run-time CPU check (bindings.cpp).
#include <immintrin.h>
#include <cstdint>

#define PPU_NS isa_avx512
namespace ppu_cpu {
namespace isa_avx512 {
struct Avx512 {
  static constexpr int W = 16;
  // scalef handles denormal and zero results itself, so the clamp only has to keep the
  // Cody-Waite reduction finite: exp(-150) is 0 in float32.
  static constexpr float EXP_LO = -150.0f;
  using V = __m512;
  using I = __m512i;
  using M = __mmask16;
  struct D { __m512d lo, hi; };
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_load_ps(p); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_store_ps(p, v); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  static void sfence() { _mm_sfence(); }
  // The first n lanes (0 <= n <= W) of a row's last, partial vector: masked loads read nothing
  // past them (no fault at the end of a buffer) and give 0 in the other lanes.
  static M first_n(int n) { return static_cast<M>((1u << n) - 1u); }
  static V loadu_n(const float* p, int n) { return _mm512_maskz_loadu_ps(first_n(n), p); }
  static void storeu_n(float* p, V v, int n) { _mm512_mask_storeu_ps(p, first_n(n), v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale2(V p, V n, V) { return _mm512_scalef_ps(p, n); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static V load_f64(const double* p) {  // 16 doubles -> 16 floats (round to nearest)
    const __m256 lo = _mm512_cvtpd_ps(_mm512_loadu_pd(p));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_loadu_pd(p + 8));
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
  }
  static V blend(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  // Whether frexp12 returns the true exponent and a mantissa in [1, 2) for subnormal inputs too.
  static constexpr bool FREXP_SUBNORMAL = true;
  // log(x) for every x >= 0 (subnormals by getmant / getexp, exact -inf at 0; NaN and negative
  // inputs give garbage, as vlog_any's), within about 1 ulp: a 32-entry table and a degree-5
  // log1p, 15 instructions against vlog_any's 24. m = x / 2^e in [0.75, 1.5); its top five
  // mantissa bits pick c_t (1 on the two intervals next to m = 1, so log(x) near 1 keeps its
  // relative accuracy; the interval's midpoint elsewhere), stored as 1/c_t rounded to float and
  // -log of that float; r = m / c_t - 1 by one FMA, |r| <= 1/32, where the series' first
  // neglected term r^6 / 6 is 5e-9 of r. prepare spends about a third of its time in the log.
  static constexpr bool OWN_LOG = true;
  static V log_any(V x) {
    alignas(64) static const float inv_c[32] = {
        1.000000000e+00f, 9.552238584e-01f, 9.275362492e-01f, 9.014084339e-01f,
        8.767123222e-01f, 8.533333540e-01f, 8.311688304e-01f, 8.101266026e-01f,
        7.901234627e-01f, 7.710843086e-01f, 7.529411912e-01f, 7.356321812e-01f,
        7.191011310e-01f, 7.032967210e-01f, 6.881720424e-01f, 6.736842394e-01f,
        1.319587588e+00f, 1.292929292e+00f, 1.267326713e+00f, 1.242718458e+00f,
        1.219047666e+00f, 1.196261644e+00f, 1.174311876e+00f, 1.153153181e+00f,
        1.132743359e+00f, 1.113043427e+00f, 1.094017148e+00f, 1.075630307e+00f,
        1.057851195e+00f, 1.040650368e+00f, 1.024000049e+00f, 1.000000000e+00f};
    alignas(64) static const float log_c[32] = {
        0.000000000e+00f, 4.580955952e-02f, 7.522340119e-02f, 1.037968099e-01f,
        1.315763593e-01f, 1.586050093e-01f, 1.849223375e-01f, 2.105647475e-01f,
        2.355660647e-01f, 2.599575520e-01f, 2.837681472e-01f, 3.070250452e-01f,
        3.297532797e-01f, 3.519763947e-01f, 3.737164140e-01f, 3.949937522e-01f,
        -2.773192525e-01f, -2.569104135e-01f, -2.369097322e-01f, -2.173012793e-01f,
        -1.980699450e-01f, -1.792013943e-01f, -1.606823355e-01f, -1.425000876e-01f,
        -1.246424392e-01f, -1.070980877e-01f, -8.985637873e-02f, -7.290682197e-02f,
        -5.623967573e-02f, -3.984587267e-02f, -2.371657453e-02f, 0.000000000e+00f};
    const V m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
    V e = _mm512_getexp_ps(x);  // -inf at 0, which carries through to the result
    e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.0f), _CMP_LT_OQ), e,
                           _mm512_set1_ps(1.0f));
    const __m512i t = _mm512_srli_epi32(_mm512_castps_si512(m), 18);  // bits 4..0 index
    const V ic = _mm512_permutex2var_ps(_mm512_load_ps(inv_c), t, _mm512_load_ps(inv_c + 16));
    const V lc = _mm512_permutex2var_ps(_mm512_load_ps(log_c), t, _mm512_load_ps(log_c + 16));
    const V r = _mm512_fmsub_ps(m, ic, _mm512_set1_ps(1.0f));
    V p = _mm512_fmadd_ps(_mm512_set1_ps(0.2f), r, _mm512_set1_ps(-0.25f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.333333343f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(-0.5f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r);  // log1p(r)
    // ln 2 = 0x3f317200 (12 significant bits: e * hi is exact) + 1.4286068e-6, both positive so
    // that e = -inf gives -inf + -inf.
    const V hi = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693145751953125f), lc);
    const V lo = _mm512_fmadd_ps(e, _mm512_set1_ps(1.42860682e-06f), p);
    return _mm512_add_ps(hi, lo);
  }
  static void frexp12(V x, V& m, V& e) {
    m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
    e = _mm512_getexp_ps(x);
  }
  static float hmax(V a) { return _mm512_reduce_max_ps(a); }
  static float hsum(V a) { return _mm512_reduce_add_ps(a); }
  static double hsum_d(V a) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  }
  static I lane_idx(int64_t stride) {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32(static_cast<int>(stride)));
  }
  static V gather_f32(const float* base, I idx) { return _mm512_i32gather_ps(idx, base, 4); }
  // 16-bit elements: gather 32 bits at each element's address, keep the low half.
  static V gather_f16(const uint16_t* base, I idx) {
    const __m512i g = _mm512_i32gather_epi32(idx, base, 2);
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
  }
  static V gather_bf16(const uint16_t* base, I idx) {
    const __m512i g = _mm512_i32gather_epi32(idx, base, 2);
    return _mm512_castsi512_ps(_mm512_slli_epi32(g, 16));
  }
  static V load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void store_f16(uint16_t* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store_bf16(uint16_t* p, V v) {  // round to nearest even (q is never NaN here)
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
  }
  // The standard 16 x 16 in-register transpose: v[i] lane l becomes t[l] lane i (t = v^T).
  __attribute__((always_inline)) static inline void transpose16(const V* v, V* t) {
    V u[16];
    for (int g = 0; g < 4; ++g) {
      const V t0 = _mm512_unpacklo_ps(v[4 * g], v[4 * g + 1]);
      const V t1 = _mm512_unpackhi_ps(v[4 * g], v[4 * g + 1]);
      const V t2 = _mm512_unpacklo_ps(v[4 * g + 2], v[4 * g + 3]);
      const V t3 = _mm512_unpackhi_ps(v[4 * g + 2], v[4 * g + 3]);
      u[4 * g + 0] = _mm512_shuffle_ps(t0, t2, 0x44);
      u[4 * g + 1] = _mm512_shuffle_ps(t0, t2, 0xEE);
      u[4 * g + 2] = _mm512_shuffle_ps(t1, t3, 0x44);
      u[4 * g + 3] = _mm512_shuffle_ps(t1, t3, 0xEE);
    }
    // u[4g + m], lane l: rows 4g..4g+3 of column 4l + m.
    for (int m = 0; m < 4; ++m) {
      const V v0 = _mm512_shuffle_f32x4(u[m], u[m + 4], 0x88);
      const V v1 = _mm512_shuffle_f32x4(u[m], u[m + 4], 0xdd);
      const V v2 = _mm512_shuffle_f32x4(u[m + 8], u[m + 12], 0x88);
      const V v3 = _mm512_shuffle_f32x4(u[m + 8], u[m + 12], 0xdd);
      t[m] = _mm512_shuffle_f32x4(v0, v2, 0x88);
      t[m + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
      t[m + 8] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
      t[m + 12] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
    }
  }
  // 16 rows x cols (<= 16) contiguous columns starting at element `off`, row stride sr:
  // masked row loads (never touching memory past the row's cols elements), then the transpose;
  // column j goes to dst + 16 j.
  static constexpr bool TILE = true;
  __attribute__((always_inline)) static inline void load_tile(const void* base, int dtype, int64_t off, int64_t sr, int cols, float* dst) {
    const __mmask16 mk = static_cast<__mmask16>((1u << cols) - 1u);
    V r[16], t[16];
    if (dtype == 0) {
      const float* p = static_cast<const float*>(base) + off;
      for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(mk, p + i * sr);
    } else {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (int i = 0; i < 16; ++i) {
        const __m256i h = _mm256_maskz_loadu_epi16(mk, p + i * sr);
        r[i] = dtype == 1 ? _mm512_cvtph_ps(h)
                          : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
    }
    transpose16(r, t);
    for (int m = 0; m < cols; ++m) _mm512_store_ps(dst + 16 * m, t[m]);
  }
  // The inverse: columns src + 16 j (j < cols) become 16 rows of cols elements at element `off`
  // of base (row stride sr, dtype 0 f32 / 1 f16 / 2 bf16), written with masked stores.
  __attribute__((always_inline)) static inline void store_tile(void* base, int dtype, int64_t off, int64_t sr, int cols, const float* src) {
    const __mmask16 mk = static_cast<__mmask16>((1u << cols) - 1u);
    V c[16], r[16];
    for (int j = 0; j < 16; ++j) c[j] = j < cols ? _mm512_load_ps(src + 16 * j) : _mm512_setzero_ps();
    transpose16(c, r);
    if (dtype == 0) {
      float* p = static_cast<float*>(base) + off;
      for (int i = 0; i < 16; ++i) _mm512_mask_storeu_ps(p + i * sr, mk, r[i]);
    } else {
      uint16_t* p = static_cast<uint16_t*>(base) + off;
      for (int i = 0; i < 16; ++i) {
        __m256i h;
        if (dtype == 1) {
          h = _mm512_cvtps_ph(r[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        } else {  // bfloat16, round to nearest even (values here are never NaN)
          __m512i u = _mm512_castps_si512(r[i]);
          const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
          u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
          h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
        }
        _mm256_mask_storeu_epi16(p + i * sr, mk, h);
      }
    }
  }
  static D dzero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static __m512d lo_pd(V a) { return _mm512_cvtps_pd(_mm512_castps512_ps256(a)); }
  static __m512d hi_pd(V a) {
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  }
  // d += num / den in float64 without a float64 division (two vdivpd per 16 rows cost ~10% of
  // the small-k step): q0 = num * rcp14(den) is within ~2^-14 of the quotient, the remainder
  // r = num - q0 * den is formed exactly enough by one FMA, and q0 + r / den (the tiny
  // correction again through rcp14) is the quotient to ~2^-38 relative.
  static void dacc_div(D& d, V num, V den) {
    const V inv = _mm512_rcp14_ps(den);
    const V q0 = _mm512_mul_ps(num, inv);
    const V c = _mm512_mul_ps(_mm512_fnmadd_ps(q0, den, num), inv);
    d.lo = _mm512_add_pd(d.lo, _mm512_add_pd(lo_pd(q0), lo_pd(c)));
    d.hi = _mm512_add_pd(d.hi, _mm512_add_pd(hi_pd(q0), hi_pd(c)));
  }
  static double dsum(const D& d) { return _mm512_reduce_add_pd(_mm512_add_pd(d.lo, d.hi)); }
};
}  // namespace isa_avx512
}  // namespace ppu_cpu

#include "kernel.h"

namespace ppu_cpu {
void run_avx512(const Params& p) { isa_avx512::run_all<isa_avx512::Avx512>(p); }
}  // namespace ppu_cpu
