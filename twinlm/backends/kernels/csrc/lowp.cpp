// linear_lowp: x @ w + b over a bfloat16 / float16 (or, for its GEMV, float32) weight, float32 accumulation
// (see lowp.h).
//
// Few rows (decoding): each pool chunk owns a range of 32-column tiles (64 bytes of a 2-byte weight row, one
// cache line) and walks them in passes of 16 rows of K, tile after tile, keeping a tile's MR x 32 sums in
// registers during its pass (see "The GEMV walk" below); the weight is read once, widened in registers (bf16:
// the 16 bits shifted into the top half of a float32; f16: F16C's vcvtph2ps) and FMA'd. Explicit
// AVX2+FMA+F16C and AVX-512F versions are chosen at load time (the other kernels' target_clones cannot express
// intrinsics), with a portable C++ body that the compiler vectorises.
// More rows (prefill, training) and the gradients: blocks of the weight widened to a float32 tile and
// multiplied by the BLAS MLX uses, onto the bias (beta = 1), like `linear`.
#include "lowp.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "loops.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"
#include "stream.h"

// TWINLM_NO_CLONES (a baseline-only build) leaves the portable body alone, as in the other kernels.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(TWINLM_NO_CLONES)
#define TWL_LOWP_X86 1
#include <immintrin.h>
#define TWL_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TWL_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define TWL_INLINE inline __attribute__((always_inline))  // a GEMV tile into its walk: no call per short pass
#endif

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace twinlm {

namespace {

constexpr size_t TILE = 32;  // columns per tile: 64 bytes of a 2-byte weight row
// GEMV walk (few rows): rows of K per pass over a tile (its MR x 32 sums in registers, stored to y between
// passes). Short passes make consecutive tiles read the same KB_GEMV rows side by side, so the weight streams
// as KB_GEMV contiguous row segments instead of one tile walking down a column strip with a row stride of N
// elements (a new page every row or two, no stream for the prefetchers): at 8 rows 2.5-3x the weight bytes per
// second of CPU time of that walk (benchmarks/README.md). 16 rows and 2 tiles of prefetch lead were the best
// of 4-32 rows and 0-12 tiles at 1, 4 and 8 rows on this machine's AMD EPYC.
constexpr size_t KB_GEMV = 16;
constexpr size_t PF_TILES = 2;  // tiles of the walk prefetched ahead (into the next pass at a chunk's end)
constexpr int WBF16 = 0, WF16 = 1, WF32 = 2;  // the weight's element type (template argument T)

template <int T>
using WType = std::conditional_t<T == WF32, float, uint16_t>;

// ---- scalar conversions (the portable body, the column tail, and the faults) ----------------------------
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

// IEEE half -> float, exact (subnormals, inf, NaN included).
inline float f16_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

// The weight element as float32; the faults are the tests' wrong decodings.
inline float widen(uint16_t h, bool f16, int fault) {
  if (fault == 1 && !f16) return bits_f32((uint32_t)h);  // low half: a tiny subnormal, not the value
  if (fault == 2 && f16) return bf16_f32(h);
  return f16 ? f16_f32(h) : bf16_f32(h);
}

// ---- portable bodies ----------------------------------------------------------------------------------------
// y[m, c0:c1] += sum_k x[m, k] w[k, c0:c1], for all M rows: the weight row is read once per k.
void gemv_portable(const float* x, size_t M, size_t K, const void* wv, size_t N, int T, int fault, float* y,
                   size_t c0, size_t c1) {
  float row[TILE * 8];
  const bool f16 = T == WF16;
  for (size_t j0 = c0; j0 < c1; j0 += TILE * 8) {
    size_t j1 = std::min(c1, j0 + TILE * 8), n = j1 - j0;
    for (size_t k = 0; k < K; k++) {
      const uint16_t* wr = static_cast<const uint16_t*>(wv) + k * N + j0;
      if (T == WF32) {
        std::memcpy(row, static_cast<const float*>(wv) + k * N + j0, n * sizeof(float));
      } else if (f16 || fault) {
        for (size_t j = 0; j < n; j++) row[j] = widen(wr[j], f16, fault);
      } else {
#pragma omp simd
        for (size_t j = 0; j < n; j++) row[j] = bf16_f32(wr[j]);
      }
      for (size_t m = 0; m < M; m++) {
        const float xv = x[m * K + k];
        float* yr = y + m * N + j0;
#pragma omp simd
        for (size_t j = 0; j < n; j++) yr[j] += xv * row[j];
      }
    }
  }
}

void widen_portable(const uint16_t* w, float* out, size_t n, bool f16, int fault) {
  if (f16 || fault) {
    for (size_t i = 0; i < n; i++) out[i] = widen(w[i], f16, fault);
    return;
  }
#pragma omp simd
  for (size_t i = 0; i < n; i++) out[i] = bf16_f32(w[i]);
}


// The GEMV walk over a chunk's tiles [t0, t1) (tiles_avx2, tiles_avx512): passes of KB_GEMV rows, each over
// every tile of the chunk in order, summing rows [k0, k1) of the tile onto y (every y element is still
// y + x[m, 0] w[0, j] + x[m, 1] w[1, j] + ... in k order, one FMA at a time, whatever the chunking: the bits of
// the walk before it). The tile kernel prefetches, row by row, the same rows of the tile PF_TILES further along
// the walk (wrapping into the next pass at the chunk's end): walk_ahead is where it starts, null past the end.
template <class W>
inline const W* walk_ahead(const W* w, size_t K, size_t N, size_t t0, size_t nt, size_t t, size_t k0, size_t kb,
                           size_t pf) {
  size_t ahead = t - t0 + pf, pk = k0;
  if (ahead >= nt) {  // into a later pass (no division in the common case: one pass on, pf < nt)
    if (ahead < 2 * nt) ahead -= nt, pk += kb;
    else pk += (ahead / nt) * kb, ahead %= nt;
  }
  return pk < K ? w + pk * N + (t0 + ahead) * TILE : nullptr;
}

#ifdef TWL_LOWP_X86
// ---- AVX2 + FMA + F16C --------------------------------------------------------------------------------------
template <bool F16>
TWL_AVX2 inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (F16) return _mm256_cvtph_ps(h);
  else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int T>
TWL_AVX2 inline __m256 loadw8(const WType<T>* p) {
  if constexpr (T == WF32) return _mm256_loadu_ps(p);
  else return load8<T == WF16>(p);
}

// One sub-tile of NV x 8 columns at j, rows [k0, k1), MR rows of x: MR * NV sums in registers.
template <int T, int MR, int NV>
TWL_AVX2 TWL_INLINE void tile_avx2(const float* x, size_t K, const WType<T>* w, size_t N, float* y, size_t j,
                                   size_t k0, size_t k1, const WType<T>* pf) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; m++) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) acc[m][v] = _mm256_loadu_ps(y + m * N + j + 8 * v);
  }
  const WType<T>* wr = w + k0 * N + j;
  for (size_t k = k0; k < k1; k++, wr += N) {
    if (pf) {  // the walk's tile PF_TILES ahead, this row (a float32 tile: two lines)
      _mm_prefetch(reinterpret_cast<const char*>(pf + (k - k0) * N), _MM_HINT_T0);
      if constexpr (T == WF32) _mm_prefetch(reinterpret_cast<const char*>(pf + (k - k0) * N + 16), _MM_HINT_T0);
    }
    __m256 wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) wv[v] = loadw8<T>(wr + 8 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++) {
      __m256 xb = _mm256_broadcast_ss(x + m * K + k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; v++) acc[m][v] = _mm256_fmadd_ps(xb, wv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; m++) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(y + m * N + j + 8 * v, acc[m][v]);
  }
}

// 16 ymm registers: MR * NV sums + NV weights + 1 broadcast.
template <int T, int MR>
TWL_AVX2 void tiles_avx2(const float* x, size_t K, const void* wv, size_t N, float* y, size_t t0, size_t t1) {
  constexpr int NV = MR <= 2 ? 4 : MR <= 4 ? 2 : 1;
  const WType<T>* w = static_cast<const WType<T>*>(wv);
  const size_t kb = KB_GEMV, pfd = PF_TILES;
  for (size_t k0 = 0; k0 < K; k0 += kb) {
    const size_t k1 = std::min(K, k0 + kb);
    for (size_t t = t0; t < t1; t++) {
      const WType<T>* pf = walk_ahead(w, K, N, t0, t1 - t0, t, k0, kb, pfd);
      for (size_t s = 0; s < TILE; s += 8 * NV) {
        tile_avx2<T, MR, NV>(x, K, w, N, y, t * TILE + s, k0, k1, s ? nullptr : pf);
      }
    }
  }
}

template <bool F16>
TWL_AVX2 void widen_avx2(const uint16_t* w, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8<F16>(w + i));
  for (; i < n; i++) out[i] = F16 ? f16_f32(w[i]) : bf16_f32(w[i]);
}

// ---- AVX-512F -----------------------------------------------------------------------------------------------
template <bool F16>
TWL_AVX512 inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (F16) return _mm512_cvtph_ps(h);
  else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int T>
TWL_AVX512 inline __m512 loadw16(const WType<T>* p) {
  if constexpr (T == WF32) return _mm512_loadu_ps(p);
  else return load16<T == WF16>(p);
}

// A whole 32-column tile is 2 zmm; 32 registers hold MR <= 8 rows of sums.
template <int T, int MR>
TWL_AVX512 TWL_INLINE void tile_avx512(const float* x, size_t K, const WType<T>* w, size_t N, float* y, size_t j,
                                       size_t k0, size_t k1, const WType<T>* pf) {
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; m++) {
    acc[m][0] = _mm512_loadu_ps(y + m * N + j);
    acc[m][1] = _mm512_loadu_ps(y + m * N + j + 16);
  }
  const WType<T>* wr = w + k0 * N + j;
  for (size_t k = k0; k < k1; k++, wr += N) {
    if (pf) {  // the walk's tile PF_TILES ahead, this row (a float32 tile: two lines)
      _mm_prefetch(reinterpret_cast<const char*>(pf + (k - k0) * N), _MM_HINT_T0);
      if constexpr (T == WF32) _mm_prefetch(reinterpret_cast<const char*>(pf + (k - k0) * N + 16), _MM_HINT_T0);
    }
    __m512 w0 = loadw16<T>(wr), w1 = loadw16<T>(wr + 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++) {
      __m512 xb = _mm512_set1_ps(x[m * K + k]);
      acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; m++) {
    _mm512_storeu_ps(y + m * N + j, acc[m][0]);
    _mm512_storeu_ps(y + m * N + j + 16, acc[m][1]);
  }
}

template <int T, int MR>
TWL_AVX512 void tiles_avx512(const float* x, size_t K, const void* wv, size_t N, float* y, size_t t0,
                             size_t t1) {
  const WType<T>* w = static_cast<const WType<T>*>(wv);
  const size_t kb = KB_GEMV, pfd = PF_TILES;
  for (size_t k0 = 0; k0 < K; k0 += kb) {
    const size_t k1 = std::min(K, k0 + kb);
    for (size_t t = t0; t < t1; t++) {
      tile_avx512<T, MR>(x, K, w, N, y, t * TILE, k0, k1, walk_ahead(w, K, N, t0, t1 - t0, t, k0, kb, pfd));
    }
  }
}

template <bool F16>
TWL_AVX512 void widen_avx512(const uint16_t* w, float* out, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, load16<F16>(w + i));
  for (; i < n; i++) out[i] = F16 ? f16_f32(w[i]) : bf16_f32(w[i]);
}

using TilesFn = void (*)(const float*, size_t, const void*, size_t, float*, size_t, size_t);

template <int T, int... MR>
TilesFn pick_tiles(int isa, int m, std::integer_sequence<int, MR...>) {
  TilesFn fn = nullptr;
  ((m == MR + 1 ? (fn = isa == 2 ? &tiles_avx512<T, MR + 1> : &tiles_avx2<T, MR + 1>) : fn), ...);
  return fn;
}
#endif  // TWL_LOWP_X86

int detect_isa() {
#ifdef TWL_LOWP_X86
  __builtin_cpu_init();
  bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (v3 && __builtin_cpu_supports("avx512f")) return 2;
  if (v3) return 1;
#endif
  return 0;
}

const int CPU_ISA = detect_isa();
int g_isa = CPU_ISA;

// y[m, t0*TILE : t1*TILE] += x w over those column tiles (all rows M <= LOWP_GEMV_ROWS).
void gemv_tiles(int isa, const float* x, size_t M, size_t K, const void* w, size_t N, int T, int fault, float* y,
                size_t t0, size_t t1) {
#ifdef TWL_LOWP_X86
  if (isa > 0 && fault == 0) {
    constexpr auto rows = std::make_integer_sequence<int, LOWP_GEMV_ROWS>{};
    auto fn = T == WF32   ? pick_tiles<WF32>(isa, (int)M, rows)
              : T == WF16 ? pick_tiles<WF16>(isa, (int)M, rows)
                          : pick_tiles<WBF16>(isa, (int)M, rows);
    fn(x, K, w, N, y, t0, t1);
    return;
  }
#endif
  gemv_portable(x, M, K, w, N, T, fault, y, t0 * TILE, t1 * TILE);
}

void widen(int isa, const uint16_t* w, float* out, size_t n, bool f16, int fault) {
#ifdef TWL_LOWP_X86
  if (isa == 2 && fault == 0) return f16 ? widen_avx512<true>(w, out, n) : widen_avx512<false>(w, out, n);
  if (isa == 1 && fault == 0) return f16 ? widen_avx2<true>(w, out, n) : widen_avx2<false>(w, out, n);
#endif
  widen_portable(w, out, n, f16, fault);
}

// Rows [k0, k1) of w as float32 into out (k1 - k0, N), split over the pool.
void widen_rows(int isa, const uint16_t* w, size_t N, size_t k0, size_t k1, bool f16, int fault, float* out) {
  parallel_rows(k1 - k0, N, [&](int, size_t r0, size_t r1) {
    widen(isa, w + (k0 + r0) * N, out + r0 * N, (r1 - r0) * N, f16, fault);
  });
}

// Rows of K per widened block: about 8 MB of float32, whole rows, at least 64.
size_t block_rows(size_t K, size_t N) { return std::min(K, std::max<size_t>(64, (2u << 20) / std::max<size_t>(N, 1))); }

constexpr int ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112;  // CBLAS's enum values

// C (m, n) = op(A) op(B) + beta C, row-major with explicit leading dimensions.
void sgemm(bool ta, bool tb, size_t m, size_t n, size_t k, const float* a, size_t lda, const float* b, size_t ldb,
           float beta, float* c, size_t ldc) {
  cblas_sgemm(ROW_MAJOR, ta ? TRANS : NO_TRANS, tb ? TRANS : NO_TRANS, (int)m, (int)n, (int)k, 1.0f, a, (int)lda,
              b, (int)ldb, beta, c, (int)ldc);
}

void allocate(mx::array& a) { a.set_data(mx::allocator::malloc(a.nbytes())); }

template <class F>
void launch(const mx::Stream& s, F&& f) {
  mx::cpu::get_command_encoder(s).dispatch(std::forward<F>(f));
}

bool lowp_dtype(mx::Dtype d) { return d == mx::bfloat16 || d == mx::float16; }

int weight_type(mx::Dtype d) { return d == mx::float32 ? WF32 : d == mx::float16 ? WF16 : WBF16; }

std::string dtype_name(mx::Dtype d) {
  if (d == mx::float32) return "float32";
  if (d == mx::bfloat16) return "bfloat16";
  if (d == mx::float16) return "float16";
  return "another dtype";
}

}  // namespace

int lowp_isa(int level) {
  if (level >= 0) g_isa = std::min(level, CPU_ISA);
  return g_isa;
}

mx::array linear_lowp(const mx::array& x, const mx::array& w, const std::optional<mx::array>& b, int fault,
                      mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (x.ndim() < 1 || w.ndim() != 2 || x.shape(-1) != w.shape(0) ||
      (b && (b->ndim() != 1 || b->shape(0) != w.shape(1)))) {
    throw std::invalid_argument("linear_lowp: x (..., K), weight (K, N) and bias (N,)");
  }
  if (!lowp_dtype(w.dtype()) && w.dtype() != mx::float32) {
    throw std::invalid_argument("linear_lowp: the weight must be bfloat16, float16 or float32, not " +
                                dtype_name(w.dtype()));
  }
  if (x.dtype() != mx::float32 && x.dtype() != w.dtype()) {
    throw std::invalid_argument("linear_lowp: x must be float32 or the weight's dtype (" + dtype_name(w.dtype()) +
                                "), not " + dtype_name(x.dtype()));
  }
  if (b && b->dtype() != x.dtype() && b->dtype() != w.dtype()) {
    throw std::invalid_argument("linear_lowp: the bias must be in x's or the weight's dtype, not " +
                                dtype_name(b->dtype()));
  }
  if (x.size() >= (size_t)INT32_MAX || w.size() >= (size_t)INT32_MAX) {
    throw std::invalid_argument("linear_lowp: too large for 32-bit BLAS sizes");
  }
  // The kernel takes float32 activations; a low-precision x (M x K, small beside the weight) and bias are
  // widened by MLX's astype, whose VJP casts their gradients back, and the result is rounded to x's dtype.
  std::vector<mx::array> inputs = {row_contiguous(mx::astype(x, mx::float32, stream), stream),
                                   row_contiguous(w, stream)};
  if (b) inputs.push_back(row_contiguous(mx::astype(*b, mx::float32, stream), stream));
  auto shape = x.shape();
  shape.back() = w.shape(1);
  auto y = mx::array(shape, mx::float32, std::make_shared<LinearLowp>(stream, b.has_value(), fault), inputs);
  return x.dtype() == mx::float32 ? y : mx::astype(y, x.dtype(), stream);
}

void LinearLowp::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  size_t K = in[1].shape(0), N = in[1].shape(1);
  size_t M = K ? in[0].size() / K : out[0].size() / std::max<size_t>(N, 1);
  const void* w = in[1].data<uint8_t>();
  launch(stream(), [x = in[0].data<float>(), w, b = bias_ ? in[2].data<float>() : nullptr, y = out[0].data<float>(),
                    M, K, N, T = weight_type(in[1].dtype()), fault = fault_, isa = g_isa] {
    if (M == 0 || N == 0) return;
    if (b) parallel_rows(M, N, [&](int, size_t r0, size_t r1) { fill_rows(b, y, N, r0, r1); });
    else std::memset(y, 0, M * N * sizeof(float));
    if (K == 0) return;
    if (M <= (size_t)LOWP_GEMV_MAX_ROWS) {
      // Passes of up to 8 rows, each reading the 2-byte weight once: fewer bytes than widening it to a
      // float32 tile (2 read + 4 written + 4 read per element) while there are few passes. Whole tiles
      // over the pool; the last partial tile (N % 32 columns) by the portable body.
      size_t tiles = N / TILE;
      for (size_t r0 = 0; r0 < M; r0 += LOWP_GEMV_ROWS) {
        size_t mr = std::min<size_t>(LOWP_GEMV_ROWS, M - r0);
        const float* xr = x + r0 * K;
        float* yr = y + r0 * N;
        parallel_rows(tiles, K * TILE * mr, [&](int, size_t t0, size_t t1) {
          gemv_tiles(isa, xr, mr, K, w, N, T, fault, yr, t0, t1);
        });
        if (N % TILE) gemv_portable(xr, mr, K, w, N, T, fault, yr, tiles * TILE, N);
      }
      return;
    }
    if (T == WF32) {  // one sgemm onto the bias
      sgemm(false, false, M, N, K, x, K, static_cast<const float*>(w), N, 1.0f, y, N);
      return;
    }
    const bool f16 = T == WF16;
    const uint16_t* w16 = static_cast<const uint16_t*>(w);
    size_t kb = block_rows(K, N);
    std::unique_ptr<float[]> tile(new float[kb * N]);  // uninitialised: every element is written first
    for (size_t k0 = 0; k0 < K; k0 += kb) {
      size_t k1 = std::min(K, k0 + kb);
      widen_rows(isa, w16, N, k0, k1, f16, fault, tile.get());
      sgemm(false, false, M, N, k1 - k0, x + k0, K, tile.get(), N, 1.0f, y, N);  // onto the bias
    }
  });
}

std::vector<mx::array> LinearLowp::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                       const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const auto& x = primals[0];
  const auto& w = primals[1];
  auto g = mx::contiguous(mx::astype(cot[0], mx::float32, stream()), false, stream());
  bool want[3] = {false, false, false};
  for (int a : argnums) want[a] = true;
  std::vector<mx::Shape> shapes;
  for (int i = 0; i < 3; i++) {
    if (want[i]) shapes.push_back(primals[i].shape());
  }
  auto grads = mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                      std::make_shared<LinearLowpGrad>(stream(), want[0], want[1], want[2], fault_),
                                      {x, w, g});
  std::vector<mx::array> result;
  for (int a : argnums) {
    int slot = 0;
    for (int i = 0; i < a; i++) slot += want[i];
    // dw is summed in float32 and rounded once to the weight's dtype.
    result.push_back(a == 1 ? mx::astype(grads[slot], w.dtype(), stream()) : grads[slot]);
  }
  return result;
}

bool LinearLowp::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const LinearLowp&>(other);
  return bias_ == o.bias_ && fault_ == o.fault_;
}

// dx = g w^T over widened blocks of w's rows (each block one column block of dx); dw = x^T g as one sgemm
// in float32; db as partial column sums per chunk of rows, added in chunk order (as LinearGrad).
void LinearLowpGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  size_t K = in[1].shape(0), N = in[1].shape(1), M = N ? in[2].size() / N : 0;
  int slot = 0;
  float* dx = dx_ ? out[slot++].data<float>() : nullptr;
  float* dw = dw_ ? out[slot++].data<float>() : nullptr;
  float* db = db_ ? out[slot++].data<float>() : nullptr;
  const void* wv = in[1].data<uint8_t>();
  launch(stream(), [x = in[0].data<float>(), wv, g = in[2].data<float>(), dx, dw, db, M, K, N,
                    T = weight_type(in[1].dtype()), fault = fault_, isa = g_isa] {
    bool empty = M == 0 || N == 0 || K == 0;
    const bool f16 = T == WF16;
    const uint16_t* w = static_cast<const uint16_t*>(wv);
    if (dx && !empty && T == WF32) {  // one sgemm
      sgemm(false, true, M, K, N, g, N, static_cast<const float*>(wv), N, 0.0f, dx, K);
    } else if (dx && !empty) {
      size_t kb = block_rows(K, N);
      std::unique_ptr<float[]> tile(new float[kb * N]);
      for (size_t k0 = 0; k0 < K; k0 += kb) {
        size_t k1 = std::min(K, k0 + kb);
        widen_rows(isa, w, N, k0, k1, f16, fault, tile.get());
        sgemm(false, true, M, k1 - k0, N, g, N, tile.get(), N, 0.0f, dx + k0, K);
      }
    } else if (dx) {
      std::memset(dx, 0, M * K * sizeof(float));
    }
    if (dw && !empty) sgemm(true, false, K, N, M, x, K, g, N, 0.0f, dw, N);
    else if (dw) std::memset(dw, 0, K * N * sizeof(float));
    if (db) {
      std::memset(db, 0, N * sizeof(float));
      if (M == 0 || N == 0 || fault == 3) return;
      int chunks = row_chunks(M, N);
      if (chunks <= 1) {
        col_sum(g, db, N, 0, M);
        return;
      }
      std::vector<float> part(N * chunks, 0.0f);
      parallel_rows(M, N, [&](int c, size_t r0, size_t r1) { col_sum(g, &part[N * c], N, r0, r1); });
      for (int c = 0; c < chunks; c++) {
        for (size_t j = 0; j < N; j++) db[j] += part[N * c + j];
      }
    }
  });
}

bool LinearLowpGrad::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const LinearLowpGrad&>(other);
  return dx_ == o.dx_ && dw_ == o.dw_ && db_ == o.db_ && fault_ == o.fault_;
}

}  // namespace twinlm

// ---- matmul_t_lowp: x @ w.T over a (N, K) bfloat16 / float16 / float32 weight (see lowp.h) --------------------
namespace twinlm {

namespace {

constexpr size_t NB_T = 64;  // rows of w per block: 64 x K x 2 bytes (72 KB at K = 576) stays in L2 for every
                             // group of x's rows
template <int T>
inline float widen1(WType<T> v) {
  if constexpr (T == WF32) return v;
  else if constexpr (T == WF16) return f16_f32(v);
  else return bf16_f32(v);
}

// Row n of w as the kernel reads it: fault 4 reads the neighbouring row (a mixed-up index).
template <class W>
inline const W* wrow(const W* w, size_t n, size_t K, size_t N, int fault) {
  return w + (fault == 4 ? (n + 1) % N : n) * K;
}

// y[m, n] = x[m] . w[n] for m < M, n in [n0, n1): each row of w widened once into `buf`, then M dots.
template <int T>
void dots_portable(const float* x, size_t M, size_t K, const void* wv, size_t N, int fault, float* y, size_t n0,
                   size_t n1, float* buf) {
  const WType<T>* w = static_cast<const WType<T>*>(wv);
  for (size_t n = n0; n < n1; n++) {
    const WType<T>* wr = wrow(w, n, K, N, fault);
    if constexpr (T == WF32) std::memcpy(buf, wr, K * sizeof(float));
    else widen_portable(wr, buf, K, T == WF16, fault == 4 ? 0 : fault);
    for (size_t m = 0; m < M; m++) {
      const float* xr = x + m * K;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (size_t k = 0; k < K; k++) s += xr[k] * buf[k];
      y[m * N + n] = s;
    }
  }
}

#ifdef TWL_LOWP_X86
TWL_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MR rows of x against NR rows of w from n: MR * NR sums of 8 lanes, the K % 8 tail in scalar.
template <int T, int MR, int NR>
TWL_AVX2 void dots_avx2(const float* x, size_t K, const void* w, size_t N, float* y, size_t n) {
  __m256 acc[MR][NR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; m++) {
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) acc[m][r] = _mm256_setzero_ps();
  }
  const WType<T>* wr = static_cast<const WType<T>*>(w) + n * K;
  size_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) wv[r] = loadw8<T>(wr + r * K + k);
#pragma GCC unroll 4
    for (int m = 0; m < MR; m++) {
      __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < NR; r++) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; m++) {
    for (int r = 0; r < NR; r++) {
      float s = hsum8(acc[m][r]);
      for (size_t t = k; t < K; t++) s += x[m * K + t] * widen1<T>(wr[r * K + t]);
      y[m * N + n + r] = s;
    }
  }
}

// The horizontal sums of 16 vectors at once, v[i] -> lane i, in _mm512_reduce_add_ps's order for each (lanes
// i + i+8, then + i+4, + i+2, + i+1: the bits of a reduce_add per vector) at ~3 instructions a sum instead of ~8.
TWL_AVX512 inline __m512 hsum16(const __m512* v) {
  __m512 s[8], t[4], u[2];
  for (int i = 0; i < 8; i++) {  // 128-bit lanes 0+2 and 1+3 of each vector: [v0 (L0+L2, L1+L3), v1 (...)]
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 4; i++) {  // + the other half: 128-bit lane j holds vector 4i + j's four partial sums
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int i = 0; i < 2; i++) {  // positions 0 + 2 and 1 + 3 within each 128-bit lane
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4j + q holds vector 4q + j's sum: back to lane i for vector i
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, r);
}

// MR rows of x against NR rows of w from n: MR * NR sums of 16 lanes (each lane an FMA chain in k order), summed
// 16 at a time by hsum16, the K % 16 tail in scalar (the bits of the kernel before it). With PF, the same columns
// of the rows PF_GROUPS_T groups ahead are prefetched into L2 (T1: into L1, with x's rows there too, they were
// evicted before use; at one row the head read 1.5x the bytes per CPU-second of no prefetch, at 8 rows 1.6x).
constexpr size_t PF_GROUPS_T = 2;

template <int T, int MR, int NR, bool PF>
TWL_AVX512 void dots_avx512(const float* x, size_t K, const void* w, size_t N, float* y, size_t n) {
  constexpr int S = MR * NR, P = (S + 15) / 16 * 16;
  __m512 acc[S];  // only the live sums: MR * NR + NR + 1 registers in the loop, no spill
#pragma GCC unroll 32
  for (int i = 0; i < S; i++) acc[i] = _mm512_setzero_ps();
  const WType<T>* wr = static_cast<const WType<T>*>(w) + n * K;
  const WType<T>* pf = PF && n + (PF_GROUPS_T + 1) * NR <= N ? wr + PF_GROUPS_T * NR * K : nullptr;
  size_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (pf && (T == WF32 || k % 32 == 0)) {  // a line per row: 16 float32 or 32 two-byte values
#pragma GCC unroll 8
      for (int r = 0; r < NR; r++) _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + k), _MM_HINT_T1);
    }
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) wv[r] = loadw16<T>(wr + r * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++) {
      __m512 xv = _mm512_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; r++) acc[m * NR + r] = _mm512_fmadd_ps(xv, wv[r], acc[m * NR + r]);
    }
  }
  alignas(64) float sums[P];
#pragma GCC unroll 2
  for (int i = 0; i < P; i += 16) {  // 16 at a time, the last group padded with zeros (their sums unused)
    __m512 v[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) v[j] = i + j < S ? acc[i + j] : _mm512_setzero_ps();
    _mm512_store_ps(sums + i, hsum16(v));
  }
  for (int m = 0; m < MR; m++) {
    for (int r = 0; r < NR; r++) {
      float s = sums[m * NR + r];
      for (size_t t = k; t < K; t++) s += x[m * K + t] * widen1<T>(wr[r * K + t]);
      y[m * N + n + r] = s;
    }
  }
}

// Rows [n0, n1) of w against MR <= 8 rows of x, AVX-512: NR rows of w at a time (MR * NR + NR + 1 of the 32
// zmm), then one at a time; more than 4 rows of x in two passes over each group of w's rows, the second from L1
// (one pass of 8 x 3 sums ran at half the FMA rate of 4 x 6 on this machine's AMD EPYC).
template <int T, int MR>
void dots_rows_avx512(const float* x, size_t K, const void* w, size_t N, float* y, size_t n0, size_t n1) {
  constexpr int M1 = MR > 4 ? 4 : MR, M2 = MR - M1;
  constexpr int NR = M1 >= 3 ? 6 : 8;
  size_t n = n0;
  for (; n + NR <= n1; n += NR) {
    dots_avx512<T, M1, NR, true>(x, K, w, N, y, n);
    if constexpr (M2 > 0) dots_avx512<T, M2, NR, false>(x + M1 * K, K, w, N, y + M1 * N, n);
  }
  for (; n < n1; n++) {
    dots_avx512<T, M1, 1, true>(x, K, w, N, y, n);
    if constexpr (M2 > 0) dots_avx512<T, M2, 1, false>(x + M1 * K, K, w, N, y + M1 * N, n);
  }
}

// Rows [n0, n1) of w against MR rows of x: 4 rows of w at a time, then one at a time.
template <int T, int MR>
void dots_rows_avx2(const float* x, size_t K, const void* w, size_t N, float* y, size_t n0, size_t n1) {
  size_t n = n0;
  for (; n + 4 <= n1; n += 4) dots_avx2<T, MR, 4>(x, K, w, N, y, n);
  for (; n < n1; n++) dots_avx2<T, MR, 1>(x, K, w, N, y, n);
}

using DotsFn = void (*)(const float*, size_t, const void*, size_t, float*, size_t, size_t);

template <int T>
DotsFn pick_dots(int isa, int mr) {
  if (isa == 2) {  // up to 8 rows of x in one walk over w
    switch (mr) {
      case 1: return &dots_rows_avx512<T, 1>;
      case 2: return &dots_rows_avx512<T, 2>;
      case 3: return &dots_rows_avx512<T, 3>;
      case 4: return &dots_rows_avx512<T, 4>;
      case 5: return &dots_rows_avx512<T, 5>;
      case 6: return &dots_rows_avx512<T, 6>;
      case 7: return &dots_rows_avx512<T, 7>;
      default: return &dots_rows_avx512<T, 8>;
    }
  }
  return mr == 1 ? &dots_rows_avx2<T, 1> : &dots_rows_avx2<T, 2>;  // 16 ymm: 2 x 4 + 4 + 1
}
#endif  // TWL_LOWP_X86

// y[:, n0:n1] for all M rows of x: blocks of NB_T rows of w, each read from memory once and by every group of
// x's rows from cache.
void dots_rows(int isa, const float* x, size_t M, size_t K, const void* w, size_t N, int T, int fault, float* y,
               size_t n0, size_t n1) {
#ifdef TWL_LOWP_X86
  if (isa > 0 && fault == 0) {
    size_t mr_max = isa == 2 ? 8 : 2;
    for (size_t b0 = n0; b0 < n1; b0 += NB_T) {
      size_t b1 = std::min(n1, b0 + NB_T);
      for (size_t m0 = 0; m0 < M; m0 += mr_max) {
        int mr = (int)std::min(mr_max, M - m0);
        DotsFn fn = T == WF32 ? pick_dots<WF32>(isa, mr) : T == WF16 ? pick_dots<WF16>(isa, mr)
                                                                     : pick_dots<WBF16>(isa, mr);
        fn(x + m0 * K, K, w, N, y + m0 * N, b0, b1);
      }
    }
    return;
  }
#endif
  std::unique_ptr<float[]> buf(new float[std::max<size_t>(K, 1)]);
  if (T == WF32) dots_portable<WF32>(x, M, K, w, N, fault, y, n0, n1, buf.get());
  else if (T == WF16) dots_portable<WF16>(x, M, K, w, N, fault, y, n0, n1, buf.get());
  else dots_portable<WBF16>(x, M, K, w, N, fault, y, n0, n1, buf.get());
}

// Rows [n0, n1) of a bf16/f16 w (N, K) as float32 into out (n1 - n0, K), split over the pool.
void widen_rows_t(int isa, const uint16_t* w, size_t N, size_t K, size_t n0, size_t n1, bool f16, int fault,
                  float* out) {
  if (fault != 4) return widen_rows(isa, w, K, n0, n1, f16, fault, out);
  for (size_t n = n0; n < n1; n++) widen_portable(wrow(w, n, K, N, fault), out + (n - n0) * K, K, f16, 0);
}

// A float32 w as the kernel reads it: itself, or (fault 4) a copy with each row its neighbour.
const float* rows_f32(const float* w, size_t N, size_t K, int fault, std::unique_ptr<float[]>& copy) {
  if (fault != 4) return w;
  copy.reset(new float[N * K]);
  for (size_t n = 0; n < N; n++) std::memcpy(copy.get() + n * K, wrow(w, n, K, N, fault), K * sizeof(float));
  return copy.get();
}

}  // namespace

mx::array matmul_t_lowp(const mx::array& x, const mx::array& w, int fault, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (x.ndim() < 1 || w.ndim() != 2 || x.shape(-1) != w.shape(1)) {
    throw std::invalid_argument("matmul_t_lowp: x (..., K) and weight (N, K)");
  }
  if (!lowp_dtype(w.dtype()) && w.dtype() != mx::float32) {
    throw std::invalid_argument("matmul_t_lowp: the weight must be bfloat16, float16 or float32, not " +
                                dtype_name(w.dtype()));
  }
  if (x.dtype() != mx::float32 && x.dtype() != w.dtype()) {
    throw std::invalid_argument("matmul_t_lowp: x must be float32 or the weight's dtype (" + dtype_name(w.dtype()) +
                                "), not " + dtype_name(x.dtype()));
  }
  if (x.size() >= (size_t)INT32_MAX || w.size() >= (size_t)INT32_MAX) {
    throw std::invalid_argument("matmul_t_lowp: too large for 32-bit BLAS sizes");
  }
  // As linear_lowp: float32 activations in (astype's VJP casts their gradient back), the result rounded to x's
  // dtype once.
  std::vector<mx::array> inputs = {row_contiguous(mx::astype(x, mx::float32, stream), stream),
                                   row_contiguous(w, stream)};
  auto shape = x.shape();
  shape.back() = w.shape(0);
  auto y = mx::array(shape, mx::float32, std::make_shared<MatmulTLowp>(stream, fault), inputs);
  return x.dtype() == mx::float32 ? y : mx::astype(y, x.dtype(), stream);
}

void MatmulTLowp::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  size_t N = in[1].shape(0), K = in[1].shape(1);
  size_t M = K ? in[0].size() / K : out[0].size() / std::max<size_t>(N, 1);
  const void* w = in[1].data<uint8_t>();
  launch(stream(), [x = in[0].data<float>(), w, y = out[0].data<float>(), M, K, N, T = weight_type(in[1].dtype()),
                    fault = fault_, isa = g_isa] {
    if (M == 0 || N == 0) return;
    if (K == 0) {
      std::memset(y, 0, M * N * sizeof(float));
      return;
    }
    if (M <= (size_t)LOWP_GEMV_MAX_ROWS) {  // the weight read once, no float32 copy of it
      parallel_rows(N, K * M, [&](int, size_t n0, size_t n1) {
        dots_rows(isa, x, M, K, w, N, T, fault, y, n0, n1);
      });
      return;
    }
    if (T == WF32) {  // one sgemm, transposed B
      std::unique_ptr<float[]> copy;
      const float* w32 = rows_f32(static_cast<const float*>(w), N, K, fault, copy);
      sgemm(false, true, M, N, K, x, K, w32, K, 0.0f, y, N);
      return;
    }
    const uint16_t* w16 = static_cast<const uint16_t*>(w);
    size_t nb = block_rows(N, K);
    std::unique_ptr<float[]> tile(new float[nb * K]);
    for (size_t n0 = 0; n0 < N; n0 += nb) {
      size_t n1 = std::min(N, n0 + nb);
      widen_rows_t(isa, w16, N, K, n0, n1, T == WF16, fault, tile.get());
      sgemm(false, true, M, n1 - n0, K, x, K, tile.get(), K, 0.0f, y + n0, N);
    }
  });
}

std::vector<mx::array> MatmulTLowp::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                        const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const auto& x = primals[0];
  const auto& w = primals[1];
  auto g = mx::contiguous(mx::astype(cot[0], mx::float32, stream()), false, stream());
  bool want[2] = {false, false};
  for (int a : argnums) want[a] = true;
  std::vector<mx::Shape> shapes;
  for (int i = 0; i < 2; i++) {
    if (want[i]) shapes.push_back(primals[i].shape());
  }
  auto grads = mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                      std::make_shared<MatmulTLowpGrad>(stream(), want[0], want[1], fault_),
                                      {x, w, g});
  std::vector<mx::array> result;
  for (int a : argnums) {
    int slot = a == 1 && want[0] ? 1 : 0;
    result.push_back(a == 1 ? mx::astype(grads[slot], w.dtype(), stream()) : grads[slot]);  // dw rounded once
  }
  return result;
}

bool MatmulTLowp::is_equivalent(const mx::Primitive& other) const {
  return fault_ == static_cast<const MatmulTLowp&>(other).fault_;
}

// dx = g w over widened blocks of w's rows (a float32 w: one sgemm), accumulated by the sgemm (beta = 1 after the
// first block); dw = g^T x as one sgemm in float32.
void MatmulTLowpGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  size_t N = in[1].shape(0), K = in[1].shape(1), M = N ? in[2].size() / N : 0;
  int slot = 0;
  float* dx = dx_ ? out[slot++].data<float>() : nullptr;
  float* dw = dw_ ? out[slot++].data<float>() : nullptr;
  const void* w = in[1].data<uint8_t>();
  launch(stream(), [x = in[0].data<float>(), w, g = in[2].data<float>(), dx, dw, M, K, N,
                    T = weight_type(in[1].dtype()), fault = fault_, isa = g_isa] {
    bool empty = M == 0 || N == 0 || K == 0;
    if (dx && !empty && T == WF32) {
      std::unique_ptr<float[]> copy;
      const float* w32 = rows_f32(static_cast<const float*>(w), N, K, fault, copy);
      sgemm(false, false, M, K, N, g, N, w32, K, 0.0f, dx, K);
    } else if (dx && !empty) {
      size_t nb = block_rows(N, K);
      std::unique_ptr<float[]> tile(new float[nb * K]);
      for (size_t n0 = 0; n0 < N; n0 += nb) {
        size_t n1 = std::min(N, n0 + nb);
        widen_rows_t(isa, static_cast<const uint16_t*>(w), N, K, n0, n1, T == WF16, fault, tile.get());
        sgemm(false, false, M, K, n1 - n0, g + n0, N, tile.get(), K, n0 ? 1.0f : 0.0f, dx, K);
      }
    } else if (dx) {
      std::memset(dx, 0, M * K * sizeof(float));
    }
    if (dw && !empty) sgemm(true, false, N, K, M, g, N, x, K, 0.0f, dw, K);
    else if (dw) std::memset(dw, 0, N * K * sizeof(float));
  });
}

bool MatmulTLowpGrad::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const MatmulTLowpGrad&>(other);
  return dx_ == o.dx_ && dw_ == o.dw_ && fault_ == o.fault_;
}

}  // namespace twinlm
