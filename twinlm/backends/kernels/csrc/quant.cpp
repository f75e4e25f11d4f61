// Int8/int4 matrix-vector loops for the quantized matmul (quant.h): each weight row is streamed once and
// dequantized in registers (q * scale + bias, one FMA per vector; 4-bit on AVX-512 a lookup in the group's
// 16 values), then multiplied into up to 8 rows of x.
// x86: hand-written AVX-512 and AVX2+FMA loops (the unpacking of nibbles does not auto-vectorise well),
// picked at run time; elsewhere (NEON, or TWINLM_NO_CLONES) a portable loop that dequantizes one group into
// a small buffer and lets the compiler vectorise the dot products.
#include "quant.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>

#include "vmath.h"

// The same platforms as the clones in vmath.h (x86 Linux with GCC or Clang; the CPU checks by level name
// need a recent compiler, which macOS x86 builds may lack): elsewhere the portable loop.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    defined(__linux__) && !defined(TWINLM_NO_CLONES)
#define TWQ_X86 1
#include <immintrin.h>
#define TWQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")))
#define TWQ_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))
#endif

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the packed words are read as bytes (little end first)");

namespace twinlm {

namespace {

QIsa detect() {
#ifdef TWQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return QIsa::Avx512;
  if (__builtin_cpu_supports("x86-64-v3")) return QIsa::Avx2;
#endif
  return QIsa::Scalar;
}

std::atomic<int> g_isa{0};

// Elements per vector block that the 4-bit loops unpack at once: x is reordered within each block so that
// the low nibbles (even elements) meet the first half and the high nibbles (odd elements) the second.
size_t nibble_block(QIsa isa) { return isa == QIsa::Avx512 ? 32 : isa == QIsa::Avx2 ? 16 : 0; }

// One group of G weights of a row, dequantized (the portable path and the tiles for sgemm).
TWL_INLINE void dequant_group(const uint8_t* wb, float sc, float bi, float* t, size_t G, int bits) {
  if (bits == 4) {
#pragma omp simd
    for (size_t j = 0; j < G / 2; j++) {
      t[2 * j] = (float)(wb[j] & 15) * sc + bi;
      t[2 * j + 1] = (float)(wb[j] >> 4) * sc + bi;
    }
  } else {
#pragma omp simd
    for (size_t j = 0; j < G; j++) t[j] = (float)wb[j] * sc + bi;
  }
}

void rows_portable(const float* x, const uint32_t* w, const float* s, const float* b, float* y, size_t M,
                   size_t K, size_t N, size_t G, int bits, size_t o0, size_t o1) {
  const size_t ng = K / G, row_bytes = K * bits / 8;
  float wf[128];
  for (size_t o = o0; o < o1; o++) {
    const uint8_t* wr = reinterpret_cast<const uint8_t*>(w) + o * row_bytes;
    float acc[QGEMV_ROWS] = {};
    for (size_t g = 0; g < ng; g++) {
      dequant_group(wr + g * G * bits / 8, s[o * ng + g], b[o * ng + g], wf, G, bits);
      for (size_t m = 0; m < M; m++) {
        const float* xm = x + m * K + g * G;
        float d = 0.0f;
#pragma omp simd reduction(+ : d)
        for (size_t j = 0; j < G; j++) d += wf[j] * xm[j];
        acc[m] += d;
      }
    }
    for (size_t m = 0; m < M; m++) y[m * N + o] = acc[m];
  }
}

#ifdef TWQ_X86
// AVX-512: 32 elements per step (16 bytes of nibbles, or 2 x 16 bytes), two accumulators per row of x.
template <int MM, int BITS>
TWQ_AVX512 void rows_avx512(const float* xp, const uint32_t* w, const float* s, const float* b, float* y, size_t K,
                            size_t N, size_t G, size_t o0, size_t o1) {
  const size_t ng = K / G, row_bytes = K * BITS / 8;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (size_t o = o0; o < o1; o++) {
    const uint8_t* wr = reinterpret_cast<const uint8_t*>(w) + o * row_bytes;
    __m512 a0[MM], a1[MM];
    for (int m = 0; m < MM; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    for (size_t g = 0; g < ng; g++) {
      const __m512 sc = _mm512_set1_ps(s[o * ng + g]), bi = _mm512_set1_ps(b[o * ng + g]);
      // 4-bit: the group's 16 possible weights, q * scale + bias by the same FMA, looked up by nibble
      // (vpermps reads an index's low 4 bits, so the low nibble needs no mask): fewer ops, the same bits.
      const __m512 lut = _mm512_fmadd_ps(iota, sc, bi);
      for (size_t k = g * G; k < (g + 1) * G; k += 32) {
        __m512 w0, w1;
        if constexpr (BITS == 4) {
          __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k / 2)));
          w0 = _mm512_permutexvar_ps(v, lut);
          w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
        } else {
          __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k)));
          __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k + 16)));
          w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), sc, bi);
          w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), sc, bi);
        }
        for (int m = 0; m < MM; m++) {
          a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp + m * K + k), a0[m]);
          a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + m * K + k + 16), a1[m]);
        }
      }
    }
    for (int m = 0; m < MM; m++) y[m * N + o] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
  }
}

TWQ_AVX2 inline float hsum256(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// AVX2+FMA: 16 elements per step; two accumulators per row of x up to 4 rows (16 registers in all).
template <int MM, int BITS>
TWQ_AVX2 void rows_avx2(const float* xp, const uint32_t* w, const float* s, const float* b, float* y, size_t K,
                        size_t N, size_t G, size_t o0, size_t o1) {
  constexpr bool TWO = MM <= 4;
  const size_t ng = K / G, row_bytes = K * BITS / 8;
  const __m256i m15 = _mm256_set1_epi32(15);
  for (size_t o = o0; o < o1; o++) {
    const uint8_t* wr = reinterpret_cast<const uint8_t*>(w) + o * row_bytes;
    __m256 a0[MM], a1[TWO ? MM : 1];
    for (int m = 0; m < MM; m++) a0[m] = _mm256_setzero_ps();
    for (int m = 0; m < (TWO ? MM : 1); m++) a1[m] = _mm256_setzero_ps();
    for (size_t g = 0; g < ng; g++) {
      const __m256 sc = _mm256_set1_ps(s[o * ng + g]), bi = _mm256_set1_ps(b[o * ng + g]);
      for (size_t k = g * G; k < (g + 1) * G; k += 16) {
        __m256 w0, w1;
        if constexpr (BITS == 4) {
          __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k / 2)));
          w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m15)), sc, bi);
          w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), sc, bi);
        } else {
          __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k)));
          __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k + 8)));
          w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v0), sc, bi);
          w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v1), sc, bi);
        }
        for (int m = 0; m < MM; m++) {
          a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp + m * K + k), a0[m]);
          if constexpr (TWO) a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + m * K + k + 8), a1[m]);
          else a0[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + m * K + k + 8), a0[m]);
        }
      }
    }
    for (int m = 0; m < MM; m++) y[m * N + o] = hsum256(TWO ? _mm256_add_ps(a0[m], a1[m]) : a0[m]);
  }
}

using RowsFn = void (*)(const float*, const uint32_t*, const float*, const float*, float*, size_t, size_t, size_t,
                        size_t, size_t);

template <int BITS>
RowsFn pick_avx512(size_t M) {
  switch (M) {
    case 1: return rows_avx512<1, BITS>;
    case 2: return rows_avx512<2, BITS>;
    case 3: return rows_avx512<3, BITS>;
    case 4: return rows_avx512<4, BITS>;
    case 5: return rows_avx512<5, BITS>;
    case 6: return rows_avx512<6, BITS>;
    case 7: return rows_avx512<7, BITS>;
    default: return rows_avx512<8, BITS>;
  }
}

template <int BITS>
RowsFn pick_avx2(size_t M) {
  switch (M) {
    case 1: return rows_avx2<1, BITS>;
    case 2: return rows_avx2<2, BITS>;
    case 3: return rows_avx2<3, BITS>;
    case 4: return rows_avx2<4, BITS>;
    case 5: return rows_avx2<5, BITS>;
    case 6: return rows_avx2<6, BITS>;
    case 7: return rows_avx2<7, BITS>;
    default: return rows_avx2<8, BITS>;
  }
}
#endif

}  // namespace

void set_quant_isa(QIsa isa) {
  QIsa best = detect();
  if (isa == QIsa::Auto) isa = best;
  if ((int)isa > (int)best) throw std::invalid_argument("quantized_matmul: this CPU (or build) cannot run that ISA");
  g_isa.store((int)isa);
}

QIsa quant_isa() {
  int v = g_isa.load();
  if (v == 0) {
    v = (int)detect();
    g_isa.store(v);
  }
  return (QIsa)v;
}

std::string quant_isa_name() {
  switch (quant_isa()) {
    case QIsa::Avx512: return "avx512";
    case QIsa::Avx2: return "avx2";
    default: return "portable";
  }
}

void qgemv_prepare_x(QIsa isa, const float* x, float* xp, size_t M, size_t K, int bits) {
  const size_t blk = nibble_block(isa);
  if (bits != 4 || blk == 0) {
    std::memcpy(xp, x, M * K * sizeof(float));
    return;
  }
  const size_t half = blk / 2;
  for (size_t m = 0; m < M; m++) {
    for (size_t k = 0; k < K; k += blk) {  // K is a multiple of the group size, so of blk
      const float* xs = x + m * K + k;
      float* xd = xp + m * K + k;
      for (size_t j = 0; j < half; j++) {
        xd[j] = xs[2 * j];
        xd[half + j] = xs[2 * j + 1];
      }
    }
  }
}

void qgemv_rows(QIsa isa, const float* xp, const uint32_t* w, const float* s, const float* b, float* y, size_t M,
                size_t K, size_t N, size_t G, int bits, size_t o0, size_t o1) {
#ifdef TWQ_X86
  if (isa == QIsa::Avx512 || isa == QIsa::Avx2) {
    RowsFn f = isa == QIsa::Avx512 ? (bits == 4 ? pick_avx512<4>(M) : pick_avx512<8>(M))
                                   : (bits == 4 ? pick_avx2<4>(M) : pick_avx2<8>(M));
    f(xp, w, s, b, y, K, N, G, o0, o1);
    return;
  }
#endif
  (void)isa;
  rows_portable(xp, w, s, b, y, M, K, N, G, bits, o0, o1);
}

TWL_SIMD void qdequant_rows(const uint32_t* w, const float* s, const float* b, float* tile, size_t K, size_t G,
                            int bits, size_t r0, size_t r1) {
  const size_t ng = K / G, row_bytes = K * bits / 8;
  for (size_t r = r0; r < r1; r++) {
    const uint8_t* wr = reinterpret_cast<const uint8_t*>(w) + r * row_bytes;
    float* t = tile + (r - r0) * K;
    for (size_t g = 0; g < ng; g++) {
      dequant_group(wr + g * G * bits / 8, s[r * ng + g], b[r * ng + g], t + g * G, G, bits);
    }
  }
}

}  // namespace twinlm
