// Portable instantiation of kernel.h and kernel_f64.h: one lane (plain C++ floats / doubles),
// for CPUs without AVX2 and for non-x86 builds. The compiler may still auto-vectorise it for the
// baseline ISA.
#include <cstdint>
#include <cmath>
#include <cstring>

#define PPU_NS isa_generic
namespace ppu_cpu {
namespace isa_generic {
struct Scalar {
  static constexpr int W = 1;
  static constexpr float EXP_LO = -87.3f;  // 2^n from exponent bits, valid down to n = -126
  using V = float;
  using I = int;
  using M = bool;
  using D = double;
  static V set1(float a) { return a; }
  static V zero() { return 0.0f; }
  static V load(const float* p) { return *p; }
  static V loadu(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static void storeu(float* p, V v) { *p = v; }
  static void stream(float* p, V v) { *p = v; }
  static void sfence() {}
  static M first_n(int n) { return n > 0; }
  static V loadu_n(const float* p, int n) { return n > 0 ? *p : 0.0f; }
  static void storeu_n(float* p, V v, int n) {
    if (n > 0) *p = v;
  }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V max(V a, V b) { return a > b ? a : b; }  // NaN a -> b (the clamp), as maxps does
  static V min(V a, V b) { return a < b ? a : b; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V fnmadd(V a, V b, V c) { return c - a * b; }
  static V round(V a) {  // round to nearest even for |a| < 2^22 (the reduction keeps it small)
    const float magic = 12582912.0f;  // 1.5 * 2^23
    const float t = a + magic;  // no -ffast-math: the compiler keeps both roundings
    return t - magic;
  }
  static V scale2(V p, V n, V x) {
    if (!(x >= EXP_LO)) return 0.0f;  // -inf, NaN and tiny results -> 0
    uint32_t e = static_cast<uint32_t>(static_cast<int>(n) + 127) << 23;
    float s;
    std::memcpy(&s, &e, 4);
    return p * s;
  }
  static M gt(V a, V b) { return a > b; }
  static M lt(V a, V b) { return a < b; }
  static M eq(V a, V b) { return a == b; }
  static V load_f64(const double* p) { return static_cast<float>(*p); }
  static V blend(M m, V a, V b) { return m ? a : b; }
  // Whether frexp12 returns the true exponent and a mantissa in [1, 2) for subnormal inputs too.
  static constexpr bool FREXP_SUBNORMAL = false;
  static constexpr bool OWN_LOG = false;  // no log_any of its own: kernel.h's vlog_any
  static void frexp12(V x, V& m, V& e) {  // x positive and normal
    uint32_t u;
    std::memcpy(&u, &x, 4);
    e = static_cast<float>(static_cast<int>(u >> 23) - 127);
    u = (u & 0x7fffffu) | 0x3f800000u;
    std::memcpy(&m, &u, 4);
  }
  static float hmax(V a) { return a; }
  static float hsum(V a) { return a; }
  static double hsum_d(V a) { return a; }
  static I lane_idx(int64_t) { return 0; }
  static V gather_f32(const float* base, I) { return *base; }
  static V gather_f16(const uint16_t* base, I);
  static V gather_bf16(const uint16_t* base, I);
  static V load_f16(const uint16_t* p);
  static V load_bf16(const uint16_t* p);
  static void store_f16(uint16_t* p, V v);
  static void store_bf16(uint16_t* p, V v);
  static constexpr bool TILE = false;  // gathers (see kernel_avx512.cpp for the tile path)
  static void load_tile(const void*, int, int64_t, int64_t, int, float*) {}
  static void store_tile(void*, int, int64_t, int64_t, int, const float*) {}
  static D dzero() { return 0.0; }
  static void dacc_div(D& d, V num, V den) { d += static_cast<double>(num) / static_cast<double>(den); }
  static double dsum(const D& d) { return d; }
};
// One double; exp and log are the C library's.
struct ScalarD {
  static constexpr int W = 1;
  using V = double;
  using M = bool;
  static V set1(double a) { return a; }
  static V zero() { return 0.0; }
  static V load(const double* p) { return *p; }
  static V loadu(const double* p) { return *p; }
  static void store(double* p, V v) { *p = v; }
  static void storeu(double* p, V v) { *p = v; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V fnmadd(V a, V b, V c) { return c - a * b; }
  static M eq(V a, V b) { return a == b; }
  static M lt(V a, V b) { return a < b; }
  static V blend(M m, V a, V b) { return m ? a : b; }
  static double hsum(V a) { return a; }
  static double hmax(V a) { return a; }
  static V exp(V x) { return std::exp(x); }
  static V log(V x) { return std::log(x); }
};
}  // namespace isa_generic
}  // namespace ppu_cpu

#include "kernel.h"
#include "kernel_f64.h"

namespace ppu_cpu {
namespace isa_generic {
float Scalar::gather_f16(const uint16_t* base, int) { return half_to_float(*base); }
float Scalar::gather_bf16(const uint16_t* base, int) { return bf16_to_float(*base); }
float Scalar::load_f16(const uint16_t* p) { return half_to_float(*p); }
float Scalar::load_bf16(const uint16_t* p) { return bf16_to_float(*p); }
void Scalar::store_f16(uint16_t* p, float v) { *p = float_to_half(v); }
void Scalar::store_bf16(uint16_t* p, float v) { *p = float_to_bf16(v); }
}  // namespace isa_generic
void run_generic(const Params& p) { isa_generic::run_all<isa_generic::Scalar>(p); }
void run_f64_generic(const Params& p) { isa_generic::run_all_f64<isa_generic::ScalarD>(p); }
}  // namespace ppu_cpu
