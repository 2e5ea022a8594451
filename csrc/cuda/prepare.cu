// prepare() kernels of ppu_fast._cuda: ONE pass over the user's input x (N x k; float32, float16,
// bfloat16 or float64; any strides) that validates every row, writes log P^ into the solver's
// buffer, sums the normalised rows (or finds the column maxima) and, when inv_c is given, the
// solver's first evaluation at alpha = 0 -- exactly the semantics of
// ppu_fast.backends.torch_ref.TorchBackend.prepare (the contract: ppu_fast/backends/base.py).
//
// Result (per block, then reduced in block order into the packed float64 layout of
// base.unpack_prepare): [key, 0, A (k), B (k)] + [colsum (k), wlogz, d (k), W (k*k)] with
//   key = min over the block's offending rows of 8 * row + kind (int64 bits; INT64_MAX: none),
//       reduced by min (so the first offending row over the whole matrix, whatever the grid);
//   A, B = float64 sums of the normalised rows over retained / forgotten rows ("probs": p / sum p
//       with the sum in float64 as the reference; "logits": softmax), or A = column max of the
//       written rows ("log_p", reduced by max; B = 0);
//   colsum, wlogz, d, W = step(out, inv_c, 0) computed as the reference does: "probs" / "logits"
//       from the normalised rows (log Z = 0) and, on forget rows with fill, softmax(fill)
//       (precomputed by the launcher on the host in float64: fill_first); "log_p" from the
//       stored values.
// Fault kinds (ppu_fast.backends.base.ERR_*), first of: 1 non-finite (NaN / +inf for "log_p"),
// 2 negative ("probs"), 3 row sum off by more than tol ("probs"), 4 no finite entry ("log_p").
// Validation reads the input's own precision (float64 input is checked as float64).
//
// Kernels: k <= 32 one row per thread in registers (the column sums by warp_colreduce, W from a
// shared-memory tile as in step); k > 32 tiles of 16 rows: phase 1 a warp per row streams it
// (validation, row sum / online max-sum), phase 2 a thread per column re-reads the tile (L1/L2),
// writes out and adds into its block's workspace row (float32 over the tile, then float64).
#include "common.cuh"

namespace ppu_cuda {
namespace {

using namespace detail;

struct PrepParams {
  const void* x;
  int64_t n;
  int k;
  int64_t srow, scol;
  const uint8_t* forget;  // nullable
  const float* fill;      // nullable; used on forget rows only
  const float* ffirst;    // nullable: [softmax(fill) (k) | q (1 - q) of it (k) | logsumexp(fill)]
  void* out;              // nullable ("log_p" mode with a solver-dtype x)
  int odt;
  int64_t orow, ocol;
  const float* inv_c;  // nullable: no first evaluation
  int hess;            // 0 none, 1 diagonal, 2 diagonal + W (k <= kSmallK)
  int64_t hstride;
  double tol;
  double* ws;
  int64_t width;
};

// Offsets in a packed / workspace row.
__host__ __device__ __forceinline__ int64_t off_b(int64_t k) { return 2 + k; }
__host__ __device__ __forceinline__ int64_t off_c(int64_t k) { return 2 + 2 * k; }
__host__ __device__ __forceinline__ int64_t off_z(int64_t k) { return 2 + 3 * k; }
__host__ __device__ __forceinline__ int64_t off_d(int64_t k) { return 3 + 3 * k; }
__host__ __device__ __forceinline__ int64_t off_w(int64_t k) { return 3 + 4 * k; }
constexpr int64_t kOffA = 2;
constexpr long long kNoKey = 0x7fffffffffffffffLL;

// Validation reads the input's own precision: float64 stays float64, the others become float
// (exactly).
template <typename T>
struct Val {
  using type = float;
};
template <>
struct Val<double> {
  using type = double;
};
template <typename T>
__device__ __forceinline__ float vload(T v) {
  return to_float(v);
}
__device__ __forceinline__ double vload(double v) { return v; }

template <int MODE>
__device__ __forceinline__ int fault_kind(bool nonfin, bool neg, bool nanpinf, bool anyfin,
                                          double dsum, double tol) {
  if (MODE == kProbs) return nonfin ? 1 : neg ? 2 : (fabs(dsum - 1.0) > tol ? 3 : 0);
  if (MODE == kLogits) return nonfin ? 1 : 0;
  return nanpinf ? 1 : (anyfin ? 0 : 4);
}

// "probs" rows streamed in chunks: the top bookkeeping on the raw probabilities (top = entries
// equal to the row max mx; r = sum of the others; c = count), so that 1 - q_top = (r + (c - 1)
// mx) / sum. Merges are symmetric (see online_merge).
struct RawTop {
  float mx;
  float r;
  int c;
};

__device__ __forceinline__ float raw_mass(const RawTop& a) {
  return a.c > 0 ? static_cast<float>(a.c) * a.mx : 0.0f;
}

__device__ __forceinline__ RawTop raw_merge(RawTop a, RawTop b) {
  if (a.mx == b.mx) return RawTop{a.mx, a.r + b.r, a.c + b.c};
  if (a.mx < b.mx) {
    const RawTop t = a;
    a = b;
    b = t;
  }
  return RawTop{a.mx, a.r + (b.r + raw_mass(b)), a.c};
}

// The max of a register row's first k entries (-inf for none); KMAX fixes the unrolled length.
template <int KMAX>
__device__ __forceinline__ float row_max(const float (&f)[KMAX], int k) {
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < KMAX; ++j)
    if (j < k) m = fmaxf(m, f[j]);
  return m;
}

// ---------------------------------------------------------------------------------------------
// k <= 32: one row per thread, the row in registers; 256-row tiles per block iteration.
// Bytes: reads n*k*sizeof(T) once (+ n forget bytes, + 4n inv_c); writes n*k*sizeof(out) and
// grid*width*8. Static shared memory: 35-39 KB (the W tile, used when hess == 2).

// (minBlocks = 1: without it ptxas held the float64-input logits variant to 128 registers with
// spills; prepare is one pass per solve, occupancy matters less than a clean register file.)
template <int KMAX, typename T, int MODE>
__global__ void __launch_bounds__(kBlock, 1) prepare_small_kernel(const PrepParams p) {
  using V = typename Val<T>::type;
  using PW = PairWork<KMAX>;
  constexpr bool kIsLogP = MODE == kLogP;
  __shared__ float sq[kBlock * PW::kS];
  __shared__ float sx[PW::kStoreWq ? kBlock * PW::kS : kBlock];
  __shared__ double sW[kBlock];
  __shared__ double sred[kWarps * KMAX];
  __shared__ long long skey[kWarps];

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int k = p.k;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool first = p.inv_c != nullptr;
  const bool has_forget = p.forget != nullptr;
  const bool use_fill = has_forget && p.fill != nullptr;
  const bool full = first && p.hess == 2;
  double acc_a = 0.0, acc_b = 0.0, acc_c = 0.0, acc_d = 0.0, wl = 0.0;
  float colmax = -INFINITY;
  long long key = kNoKey;
  PW pw;
  if (full) pw.init(k);

  // Loop bounds depend on blockIdx only (warp shuffles and the W tile's __syncthreads).
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kBlock; tile < p.n;
       tile += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t row = tile + tid;
    const bool valid = row < p.n;
    const bool fg = valid && has_forget && p.forget[row] != 0;
    const bool filled = fg && use_fill;
    const float w = (valid && first) ? p.inv_c[row] : 0.0f;

    // 1. Read and validate the row.
    float f[KMAX];
    double dsum = 0.0;
    bool nonfin = false, neg = false, nanpinf = false, anyfin = false;
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      f[j] = 0.0f;
      if (valid && j < k) {
        const V v = vload(x[row * p.srow + j * p.scol]);
        nonfin |= !isfinite(v);
        neg |= v < V(0);
        nanpinf |= isnan(v) || v == V(INFINITY);
        anyfin |= v > V(-INFINITY);
        if (MODE == kProbs) dsum += static_cast<double>(v);
        f[j] = to_float(v);
      }
    }
    const int kind = fault_kind<MODE>(nonfin, neg, nanpinf, anyfin, dsum, p.tol);
    if (valid && kind != 0) {
      const long long kk = static_cast<long long>(row) * 8 + kind;
      key = kk < key ? kk : key;
    }

    // 2. log P^ (t) and the normalised row (f, "probs" / "logits"); write out.
    float t[KMAX];
    if (MODE == kProbs) {
      const float s = __double2float_rn(dsum);  // as the reference: float(sum in float64)
      const float ls = logf(s);
#pragma unroll
      for (int j = 0; j < KMAX; ++j) {
        t[j] = logf(f[j]) - ls;
        f[j] = f[j] / s;
      }
    } else if (MODE == kLogits) {
      const float m = row_max<KMAX>(f, k);
      float se = 0.0f;
#pragma unroll
      for (int j = 0; j < KMAX; ++j) {
        t[j] = j < k ? expf(f[j] - m) : 0.0f;
        se += t[j];
      }
      const float ls = logf(se);
#pragma unroll
      for (int j = 0; j < KMAX; ++j) {
        const float pn = t[j] / se;
        t[j] = (f[j] - m) - ls;
        f[j] = pn;
      }
    } else {
#pragma unroll
      for (int j = 0; j < KMAX; ++j) t[j] = f[j];
    }
    if (valid && p.out != nullptr) {
#pragma unroll
      for (int j = 0; j < KMAX; ++j) {
        if (j < k) store(p.out, row * p.orow + j * p.ocol, p.odt, filled ? p.fill[j] : t[j]);
      }
    }

    // 3. Retain / forget sums of the normalised rows, or the column max of the written rows.
    if (!kIsLogP) {
      const bool in_a = valid && !fg;
      if (__any_sync(kFullMask, in_a)) {  // warp-uniform
        float u[KMAX];
#pragma unroll
        for (int j = 0; j < KMAX; ++j) u[j] = in_a ? f[j] : 0.0f;
        acc_a += static_cast<double>(warp_colreduce<KMAX>(u));
      }
      if (__any_sync(kFullMask, fg)) {
        float u[KMAX];
#pragma unroll
        for (int j = 0; j < KMAX; ++j) u[j] = fg ? f[j] : 0.0f;
        acc_b += static_cast<double>(warp_colreduce<KMAX>(u));
      }
    } else {
      float u[KMAX];
#pragma unroll
      for (int j = 0; j < KMAX; ++j)
        u[j] = (valid && j < k) ? (filled ? p.fill[j] : f[j]) : -INFINITY;
      colmax = fmaxf(colmax, warp_colreduce<KMAX, true>(u));
    }

    // 4. The first evaluation: q into f, q (1 - q) into t, log Z.
    if (first) {  // uniform
      float lz = 0.0f;
      if (!kIsLogP) {
        if (filled) {
#pragma unroll
          for (int j = 0; j < KMAX; ++j) {
            f[j] = j < k ? p.ffirst[j] : 0.0f;
            t[j] = j < k ? p.ffirst[k + j] : 0.0f;
          }
          lz = p.ffirst[2 * k];
        } else {
          // The reference's rule on q = the normalised row: top = entries equal to its max.
          const float qmax = row_max<KMAX>(f, k);
          float sn = 0.0f;
          int cnt = 0;
          unsigned top = 0;
#pragma unroll
          for (int j = 0; j < KMAX; ++j) {
            const bool tt = j < k && f[j] == qmax;
            top |= tt ? (1u << j) : 0u;
            cnt += tt ? 1 : 0;
            sn += (j < k && !tt) ? f[j] : 0.0f;
          }
          const float rest = sn + static_cast<float>(cnt - 1) * qmax;
#pragma unroll
          for (int j = 0; j < KMAX; ++j)
            t[j] = j < k ? f[j] * (((top >> j) & 1u) ? rest : 1.0f - f[j]) : 0.0f;
        }
      } else {
        // The stored values: out's rounding of the written row, or x itself without out.
        if (p.out != nullptr) {
#pragma unroll
          for (int j = 0; j < KMAX; ++j)
            if (j < k) f[j] = round_to(p.odt, filled ? p.fill[j] : f[j]);
        }
        const float m = row_max<KMAX>(f, k);
        float sr = 0.0f;
        int cnt = 0;
        unsigned top = 0;
#pragma unroll
        for (int j = 0; j < KMAX; ++j) {
          const bool ok = j < k;
          const bool tt = ok && f[j] == m;
          const float e = (ok && !tt) ? expf(f[j] - m) : 0.0f;
          top |= tt ? (1u << j) : 0u;
          cnt += tt ? 1 : 0;
          sr += e;
          f[j] = tt ? 1.0f : e;
        }
        const float s = sr + static_cast<float>(cnt);
        const float rinv = 1.0f / s;
        const float rest = (sr + static_cast<float>(cnt - 1)) * rinv;
        lz = m + logf(s);
#pragma unroll
        for (int j = 0; j < KMAX; ++j) {
          f[j] *= rinv;
          t[j] = f[j] * (((top >> j) & 1u) ? rest : 1.0f - f[j]);
        }
      }
      if (valid) {
        wl += static_cast<double>(lz) / static_cast<double>(w);
      } else {
#pragma unroll
        for (int j = 0; j < KMAX; ++j) f[j] = t[j] = 0.0f;
      }
      if (p.hess >= 1) {
#pragma unroll
        for (int j = 0; j < KMAX; ++j) t[j] *= w;  // (q (1 - q)) inv_c, as the reference
        acc_d += static_cast<double>(warp_colreduce<KMAX>(t));
      }
      if (full) {
        const unsigned mask = tile_mask(tile, p.hstride);
        if (mask != 0) {    // uniform across the block
          __syncthreads();  // the previous tile's readers are done
          PW::put(sq, sx, f, w);
          __syncthreads();
          pw.tile(sq, sx, mask);
        }
      }
      acc_c += static_cast<double>(warp_colreduce<KMAX>(f));
    }
  }

  // The block's results: first offending row, then the column sums in warp order.
  key = warp_min_ll(key);
  if (lane == 0) skey[warp] = key;
  __syncthreads();
  double* out = p.ws + static_cast<int64_t>(blockIdx.x) * p.width;
  if (tid == 0) {
    long long kmin = skey[0];
    for (int w = 1; w < kWarps; ++w) kmin = skey[w] < kmin ? skey[w] : kmin;
    out[0] = __longlong_as_double(kmin);
    out[1] = 0.0;
  }
  if (kIsLogP)
    block_columns<KMAX, true>(static_cast<double>(colmax), sred, out + kOffA, k);
  else
    block_columns<KMAX>(acc_a, sred, out + kOffA, k);
  block_columns<KMAX>(acc_b, sred, out + off_b(k), k);  // 0 in "log_p" mode
  if (first) {
    block_columns<KMAX>(acc_c, sred, out + off_c(k), k);
    const double z = block_sum(wl, sred);
    if (tid == 0) out[off_z(k)] = z;
    if (p.hess >= 1) block_columns<KMAX>(acc_d, sred, out + off_d(k), k);
    if (full) pw.finish(k, out + off_w(k), sW);
  }
}

// ---------------------------------------------------------------------------------------------
// k > 32: tiles of 16 rows. Phase 1, a warp per row (2 per warp), streams the row in chunks of 8
// per lane: validation, the row's normaliser (float64 sum; online max / sum) and the top
// bookkeeping, into shared memory. Phase 2, thread j % 256 owns column j: it re-reads the tile's
// column (L1/L2: the tile was just read), writes out, and adds float32 sums over the tile into
// its block's workspace row (float64 read-modify-write; only this thread touches these slots).
// Bytes: reads n*k*sizeof(T) from DRAM (+ once more from cache); writes n*k*sizeof(out);
// workspace: up to 4 float64 read-modify-writes per column per 16 rows (2 B per element, L2).
// W (hess == 2) is not accumulated here: the launcher forms it with a GEMM (base.sampled_gram).

constexpr int kTileRows = 16;
constexpr int kPrepChunk = 8;

// (minBlocks = 1: without it ptxas held the float32 probs variant to 48 registers on sm_80 and
// spilled.)
template <typename T, int MODE>
__global__ void __launch_bounds__(kBlock, 1) prepare_tile_kernel(const PrepParams p) {
  using V = typename Val<T>::type;
  constexpr bool kIsLogP = MODE == kLogP;
  __shared__ float s_p0[kTileRows], s_p1[kTileRows], s_p2[kTileRows], s_p3[kTileRows];
  __shared__ float s_w[kTileRows];
  __shared__ int s_flags[kTileRows];  // bit 0: forget row; bit 1: written with fill
  __shared__ double sred[kWarps];
  __shared__ long long skey[kWarps];

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int k = p.k;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool first = p.inv_c != nullptr;
  const bool has_forget = p.forget != nullptr;
  const bool use_fill = has_forget && p.fill != nullptr;
  const bool has_out = p.out != nullptr;
  const bool diag = first && p.hess >= 1;
  double* acc = p.ws + static_cast<int64_t>(blockIdx.x) * p.width;
  const int64_t ob = off_b(k), oc = off_c(k), od = off_d(k);
  // Column j of the workspace row is only ever touched by thread j % 256: no races, tile order.
  for (int j = tid; j < k; j += kBlock) {
    acc[kOffA + j] = kIsLogP ? -INFINITY : 0.0;
    acc[ob + j] = 0.0;
    if (first) acc[oc + j] = 0.0;
    if (diag) acc[od + j] = 0.0;
  }
  double wl = 0.0;         // lane 0 of each warp
  long long key = kNoKey;  // lane 0 of each warp

  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kTileRows; tile < p.n;
       tile += static_cast<int64_t>(gridDim.x) * kTileRows) {  // uniform across the block
    const int rows = static_cast<int>(p.n - tile < kTileRows ? p.n - tile : kTileRows);
    // Phase 1: a warp per row.
    for (int rr = warp; rr < rows; rr += kWarps) {  // warp-uniform
      const int64_t row = tile + rr;
      const bool fg = has_forget && p.forget[row] != 0;
      const bool filled = fg && use_fill;
      const float w = first ? p.inv_c[row] : 0.0f;
      const T* __restrict__ r = x + row * p.srow;
      bool nonfin = false, neg = false, nanpinf = false, anyfin = false;
      double dsum = 0.0;
      RawTop rt{-INFINITY, 0.0f, 0};
      Online st = online_empty();
      for (int j0 = lane; j0 < k + lane; j0 += 32 * kPrepChunk) {  // uniform trip count
        float fv[kPrepChunk];
        float cm = -INFINITY;
#pragma unroll
        for (int u = 0; u < kPrepChunk; ++u) {
          const int j = j0 + 32 * u;
          fv[u] = -INFINITY;
          if (j < k) {
            const V v = vload(r[j * p.scol]);
            nonfin |= !isfinite(v);
            neg |= v < V(0);
            nanpinf |= isnan(v) || v == V(INFINITY);
            anyfin |= v > V(-INFINITY);
            if (MODE == kProbs) dsum += static_cast<double>(v);
            fv[u] = to_float(v);
            if (kIsLogP && has_out) fv[u] = round_to(p.odt, filled ? p.fill[j] : fv[u]);
            cm = fmaxf(cm, fv[u]);
          }
        }
        if (MODE == kProbs) {
          if (diag) {
            if (cm > rt.mx) {
              rt.r += raw_mass(rt);
              rt.c = 0;
              rt.mx = cm;
            }
#pragma unroll
            for (int u = 0; u < kPrepChunk; ++u) {
              if (j0 + 32 * u < k) {
                const bool tt = fv[u] == rt.mx;
                rt.c += tt ? 1 : 0;
                rt.r += tt ? 0.0f : fv[u];
              }
            }
          }
        } else if (!kIsLogP || first) {  // logits: of x; log_p: of the stored values
          online_rescale(st, cm);
#pragma unroll
          for (int u = 0; u < kPrepChunk; ++u) online_add(st, fv[u]);
        }
      }
      nonfin = __any_sync(kFullMask, nonfin);
      neg = __any_sync(kFullMask, neg);
      nanpinf = __any_sync(kFullMask, nanpinf);
      anyfin = __any_sync(kFullMask, anyfin);
      if (MODE == kProbs) {
        dsum = warp_sum_double(dsum);
        if (diag) {
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) {
            RawTop o;
            o.mx = __shfl_xor_sync(kFullMask, rt.mx, off);
            o.r = __shfl_xor_sync(kFullMask, rt.r, off);
            o.c = __shfl_xor_sync(kFullMask, rt.c, off);
            rt = raw_merge(rt, o);
          }
        }
      } else if (!kIsLogP || first) {
        st = warp_online(st);
      }
      if (lane == 0) {
        const int kind = fault_kind<MODE>(nonfin, neg, nanpinf, anyfin, dsum, p.tol);
        if (kind != 0) {
          const long long kk = static_cast<long long>(row) * 8 + kind;
          key = kk < key ? kk : key;
        }
        s_flags[rr] = (fg ? 1 : 0) | (filled ? 2 : 0);
        s_w[rr] = w;
        float lz = 0.0f;
        if (MODE == kProbs) {
          const float s = __double2float_rn(dsum);
          s_p0[rr] = s;
          s_p1[rr] = logf(s);
          s_p2[rr] = rt.mx;
          s_p3[rr] = (rt.r + static_cast<float>(rt.c - 1) * rt.mx) / s;
        } else if (MODE == kLogits) {
          const float se = st.r + static_cast<float>(st.c);
          s_p0[rr] = st.m;
          s_p1[rr] = logf(se);
          s_p2[rr] = se;
          s_p3[rr] = (st.r + static_cast<float>(st.c - 1)) / se;
        } else {
          const float s = st.r + static_cast<float>(st.c);
          const float rinv = 1.0f / s;
          s_p0[rr] = st.m;
          s_p1[rr] = rinv;
          s_p3[rr] = (st.r + static_cast<float>(st.c - 1)) * rinv;
          lz = st.m + logf(s);
        }
        if (first) {
          if (!kIsLogP) lz = filled ? p.ffirst[2 * k] : 0.0f;
          wl += static_cast<double>(lz) / static_cast<double>(w);
        }
      }
    }
    __syncthreads();
    // Phase 2: a thread per column.
    for (int j = tid; j < k; j += kBlock) {
      // Offsets advance by a row stride (64-bit products hoisted out of the unrolled loops).
      const int64_t xoff = tile * p.srow + static_cast<int64_t>(j) * p.scol;
      const int64_t ooff = tile * p.orow + static_cast<int64_t>(j) * p.ocol;
      float v[kTileRows];
#pragma unroll
      for (int rr = 0; rr < kTileRows; ++rr)
        v[rr] = rr < rows ? to_float(x[xoff + rr * p.srow]) : 0.0f;
      const float fill_j = use_fill ? p.fill[j] : 0.0f;
      const bool ff = first && !kIsLogP && use_fill;
      const float qf = ff ? p.ffirst[j] : 0.0f;
      const float qrf = ff ? p.ffirst[k + j] : 0.0f;
      float fa = 0.0f, fb = 0.0f, fc = 0.0f, fd = 0.0f, cmx = -INFINITY;
#pragma unroll
      for (int rr = 0; rr < kTileRows; ++rr) {
        if (rr >= rows) continue;
        const int fl = s_flags[rr];
        const bool fg = fl & 1, filled = fl & 2;
        const float xf = v[rr];
        float lp, pn = 0.0f;
        if (MODE == kProbs) {
          lp = logf(xf) - s_p1[rr];
          pn = xf / s_p0[rr];
        } else if (MODE == kLogits) {
          const float d0 = xf - s_p0[rr];
          lp = d0 - s_p1[rr];
          pn = expf(d0) / s_p2[rr];
        } else {
          lp = xf;
        }
        const float o = filled ? fill_j : lp;
        if (has_out) store(p.out, ooff + rr * p.orow, p.odt, o);
        if (!kIsLogP) {
          if (fg)
            fb += pn;
          else
            fa += pn;
        } else {
          cmx = fmaxf(cmx, o);
        }
        if (first) {
          float q, qr;
          if (!kIsLogP) {
            if (filled) {
              q = qf;
              qr = qrf;
            } else {
              const bool top = MODE == kProbs ? xf == s_p2[rr] : xf == s_p0[rr];
              q = pn;
              qr = q * (top ? s_p3[rr] : 1.0f - q);
            }
          } else {
            const float sv = has_out ? round_to(p.odt, o) : xf;  // the bits phase 1 saw
            const bool top = sv == s_p0[rr];
            q = (top ? 1.0f : expf(sv - s_p0[rr])) * s_p1[rr];
            qr = q * (top ? s_p3[rr] : 1.0f - q);
          }
          fc += q;
          fd += qr * s_w[rr];
        }
      }
      if (kIsLogP)
        acc[kOffA + j] = fmax(acc[kOffA + j], static_cast<double>(cmx));
      else
        acc[kOffA + j] += static_cast<double>(fa);
      if (!kIsLogP && has_forget) acc[ob + j] += static_cast<double>(fb);
      if (first) acc[oc + j] += static_cast<double>(fc);
      if (diag) acc[od + j] += static_cast<double>(fd);
    }
    __syncthreads();  // the next tile overwrites the row parameters
  }

  key = warp_min_ll(key);  // lanes other than 0 hold kNoKey
  if (lane == 0) skey[warp] = key;
  const double z = block_sum(wl, sred);  // its __syncthreads also publishes skey
  if (tid == 0) {
    long long kmin = skey[0];
    for (int w = 1; w < kWarps; ++w) kmin = skey[w] < kmin ? skey[w] : kmin;
    acc[0] = __longlong_as_double(kmin);
    acc[1] = 0.0;
    if (first) acc[off_z(k)] = z;
  }
}

// Combines the blocks' rows in block order: slot 0 by min (then split into kind and row), the
// "log_p" column maxima by max, everything else by sum. Bytes: reads grid*width*8.
__global__ void reduce_prepare_kernel(const double* __restrict__ ws, int64_t rows, int64_t width,
                                      int64_t k, int max_a, double* __restrict__ out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < width;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (c == 1) continue;
    if (c == 0) {
      long long kmin = kNoKey;
      for (int64_t g = 0; g < rows; ++g) {
        const long long v = __double_as_longlong(ws[g * width]);
        kmin = v < kmin ? v : kmin;
      }
      out[0] = kmin == kNoKey ? 0.0 : static_cast<double>(kmin & 7);
      out[1] = kmin == kNoKey ? 0.0 : static_cast<double>(kmin >> 3);
    } else if (max_a && c < kOffA + k) {
      double m = -INFINITY;
      for (int64_t g = 0; g < rows; ++g) m = fmax(m, ws[g * width + c]);
      out[c] = m;
    } else {
      double s = 0.0;
      for (int64_t g = 0; g < rows; ++g) s += ws[g * width + c];
      out[c] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host dispatch.

template <typename T, int MODE>
const void* prepare_func_tm(int64_t k) {
  if (k > kSmallK) return PPU_KERNEL(prepare_tile_kernel<T, MODE>);
  switch (kmax_for(k)) {
    case 4: return PPU_KERNEL(prepare_small_kernel<4, T, MODE>);
    case 8: return PPU_KERNEL(prepare_small_kernel<8, T, MODE>);
    case 16: return PPU_KERNEL(prepare_small_kernel<16, T, MODE>);
    default: return PPU_KERNEL(prepare_small_kernel<32, T, MODE>);
  }
}

template <typename T>
const void* prepare_func_t(int mode, int64_t k) {
  switch (mode) {
    case kProbs: return prepare_func_tm<T, kProbs>(k);
    case kLogits: return prepare_func_tm<T, kLogits>(k);
    default: return prepare_func_tm<T, kLogP>(k);
  }
}

const void* prepare_func(int dtype, int mode, int64_t k) {
  switch (dtype) {
    case kFloat32: return prepare_func_t<float>(mode, k);
    case kFloat16: return prepare_func_t<__half>(mode, k);
    case kBFloat16: return prepare_func_t<__nv_bfloat16>(mode, k);
    default: return prepare_func_t<double>(mode, k);
  }
}

int64_t prepare_width(int64_t k, bool first, int hess) {
  int64_t w = 2 + 2 * k;
  if (first) w += k + 1 + (hess >= 1 ? k : 0) + (hess == 2 ? k * k : 0);
  return w;
}

void check_prepare_args(int dtype, int64_t n, int64_t k, int mode, bool first, int hess) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16 && dtype != kFloat64)
    throw std::invalid_argument("ppu_fast._cuda: x dtype code must be 0, 1, 2 or 3, got " +
                                std::to_string(dtype));
  if (n < 0) throw std::invalid_argument("ppu_fast._cuda: n must be >= 0");
  if (k < 1 || k > (std::numeric_limits<int>::max() >> 1))
    throw std::invalid_argument("ppu_fast._cuda: k must be in [1, 2^30), got " +
                                std::to_string(k));
  if (mode != kProbs && mode != kLogits && mode != kLogP)
    throw std::invalid_argument("ppu_fast._cuda: prepare mode must be 0, 1 or 2, got " +
                                std::to_string(mode));
  if (hess < 0 || hess > 2)
    throw std::invalid_argument("ppu_fast._cuda: hess must be 0, 1 or 2, got " +
                                std::to_string(hess));
  if (hess > 0 && !first)
    throw std::invalid_argument("ppu_fast._cuda: a Hessian needs the first evaluation (inv_c)");
  if (hess == 2 && k > kSmallK)
    throw std::invalid_argument("ppu_fast._cuda: prepare accumulates the full Hessian's W only "
                                "for k <= " + std::to_string(kSmallK) + ", got k = " +
                                std::to_string(k));
}

// Every block sums into its own partial row of `width` doubles: at most kMaxWorkspacePartials
// doubles in all (at k = 32,000 a grid of ~500 blocks held 0.5 GB), the tiles then taken in more
// grid-stride rounds by fewer blocks.
int64_t prepare_grid(int dtype, int mode, int64_t n, int64_t k, int64_t width, int device) {
  const int64_t rows = k > kSmallK ? kTileRows : kBlock;
  const int64_t grid = persistent_grid(prepare_func(dtype, mode, k), kBlock, n, rows, device);
  const int64_t by_mem = kMaxWorkspacePartials / width;
  return grid <= by_mem ? grid : (by_mem < 1 ? 1 : by_mem);
}

}  // namespace

std::tuple<int64_t, int64_t, int64_t> plan_prepare(int64_t n, int64_t k, int mode, int dtype,
                                                   bool first, int hess, int device) {
  check_prepare_args(dtype, n, k, mode, first, hess);
  DeviceGuard guard(device);
  const int64_t width = prepare_width(k, first, hess);
  const int64_t grid = prepare_grid(dtype, mode, n, k, width, device);
  return {grid, width, grid * width};
}

void prepare(uintptr_t x, int dtype, int64_t n, int64_t k, int64_t stride_row, int64_t stride_col,
             int mode, uintptr_t forget, uintptr_t fill, uintptr_t fill_first, uintptr_t out,
             int out_dtype, int64_t out_row, int64_t out_col, uintptr_t inv_c, int hess,
             int64_t hess_stride, double tol, uintptr_t workspace, int64_t workspace_size,
             uintptr_t result, int device, uintptr_t stream) {
  const bool first = inv_c != 0;
  check_prepare_args(dtype, n, k, mode, first, hess);
  if (stride_row < 0 || stride_col < 0)
    throw std::invalid_argument("ppu_fast._cuda: strides must be >= 0");
  if (out != 0) {
    if (out_dtype != kFloat32 && out_dtype != kFloat16 && out_dtype != kBFloat16)
      throw std::invalid_argument("ppu_fast._cuda: out dtype code must be 0, 1 or 2, got " +
                                  std::to_string(out_dtype));
    if (out_row < 0 || out_col < 0)
      throw std::invalid_argument("ppu_fast._cuda: out strides must be >= 0");
  } else if (mode != kLogP || dtype == kFloat64) {
    throw std::invalid_argument("ppu_fast._cuda: out is required unless mode is log_p (2) and "
                                "x is in a solver dtype");
  }
  if (first && mode != kLogP && forget != 0 && fill != 0 && fill_first == 0)
    throw std::invalid_argument("ppu_fast._cuda: fill_first is required with inv_c, forget and "
                                "fill in probs / logits mode");
  if (hess_stride < 1)
    throw std::invalid_argument("ppu_fast._cuda: hess_stride must be >= 1, got " +
                                std::to_string(hess_stride));
  DeviceGuard guard(device);
  const int64_t width = prepare_width(k, first, hess);
  const int64_t grid = prepare_grid(dtype, mode, n, k, width, device);
  if (workspace_size < grid * width)
    throw std::invalid_argument("ppu_fast._cuda: workspace holds " +
                                std::to_string(workspace_size) + " doubles, the plan needs " +
                                std::to_string(grid * width));
  PrepParams prm;
  prm.x = reinterpret_cast<const void*>(x);
  prm.n = n;
  prm.k = static_cast<int>(k);
  prm.srow = stride_row;
  prm.scol = stride_col;
  prm.forget = reinterpret_cast<const uint8_t*>(forget);
  prm.fill = reinterpret_cast<const float*>(fill);
  prm.ffirst = reinterpret_cast<const float*>(fill_first);
  prm.out = reinterpret_cast<void*>(out);
  prm.odt = out_dtype;
  prm.orow = out_row;
  prm.ocol = out_col;
  prm.inv_c = reinterpret_cast<const float*>(inv_c);
  prm.hess = hess;
  prm.hstride = hess_stride;
  prm.tol = tol;
  prm.ws = reinterpret_cast<double*>(workspace);
  prm.width = width;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  void* args[] = {&prm};
  check(cudaLaunchKernel(prepare_func(dtype, mode, k), dim3(static_cast<unsigned>(grid)),
                         dim3(kBlock), args, 0, st),
        k > kSmallK ? "launch of prepare_tile_kernel" : "launch of prepare_small_kernel");
  check(cudaGetLastError(), "prepare kernel launch");
  const int64_t rblocks = ceil_div(width, kBlock);
  const int rgrid = static_cast<int>(rblocks < 1024 ? rblocks : 1024);
  const double* r_ws = prm.ws;
  int64_t r_rows = grid, r_width = width, r_k = k;
  int r_max = mode == kLogP ? 1 : 0;
  double* r_out = reinterpret_cast<double*>(result);
  void* rargs[] = {&r_ws, &r_rows, &r_width, &r_k, &r_max, &r_out};
  check(cudaLaunchKernel(PPU_KERNEL(reduce_prepare_kernel), dim3(rgrid), dim3(kBlock), rargs, 0,
                         st),
        "launch of reduce_prepare_kernel");
  check(cudaGetLastError(), "launch of reduce_prepare_kernel");
}

}  // namespace ppu_cuda
