// Scalar maths written only with multiply, add, divide, min/max, floor and bit casts, so that GCC and
// Clang vectorise the loops that call it (no libm calls inside the hot loops).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// x86 Linux: compile each hot loop three times (AVX-512, AVX2+FMA, baseline SSE2) and pick one at load
// time (GCC/Clang function multiversioning, resolved by an ifunc). ARM64: NEON is the baseline, one
// version is enough. macOS has no ifunc: one baseline version there (the kernels serve MLX's CPU device,
// which a Mac rarely uses).
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    defined(__linux__) && !defined(TWINLM_NO_CLONES)
#define TWL_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TWL_SIMD
#endif

#define TWL_INLINE inline __attribute__((always_inline))

namespace twinlm {

// The core's pinned erf (twinlm/core/backend.py: Eigen's generic_fast_erf_float), same operation order.
constexpr float ERF_CLAMP = 4.0f;
constexpr float ERF_A[7] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                            -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                            -1.60960333262415e-02f};
constexpr float ERF_B[5] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                            -7.37332916720468e-03f, -1.42647390514189e-02f};
constexpr float SQRT_HALF = 0.70710678118654752440f;
constexpr float INV_SQRT_2PI = 0.39894228040143267794f;
constexpr float GELU_TANH_C = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float GELU_TANH_K = 0.044715f;

TWL_INLINE float verf(float x) {
  x = x < -ERF_CLAMP ? -ERF_CLAMP : x;  // NaN stays NaN, like mx.maximum/minimum
  x = x > ERF_CLAMP ? ERF_CLAMP : x;
  float x2 = x * x;
  float p = x2 * ERF_A[0] + ERF_A[1];
  p = p * x2 + ERF_A[2];
  p = p * x2 + ERF_A[3];
  p = p * x2 + ERF_A[4];
  p = p * x2 + ERF_A[5];
  p = p * x2 + ERF_A[6];
  float q = x2 * ERF_B[0] + ERF_B[1];
  q = q * x2 + ERF_B[2];
  q = q * x2 + ERF_B[3];
  q = q * x2 + ERF_B[4];
  return x * p / q;
}

// exp(x) to ~1 ulp on the float range (Cephes expf's range reduction and polynomial); 0 below -87.34
// (including -inf; true exp is subnormal there), +inf above 88.72, NaN stays NaN.
TWL_INLINE float vexp(float x) {
  float xc = x < -87.33654f ? -87.33654f : x;
  xc = xc > 88.72283f ? 88.72283f : xc;
  float n = std::floor(xc * 1.44269504088896341f + 0.5f);  // in [-126, 128]
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  // 2^n as two factors 2^a 2^b (a, b in [-63, 64]) so that n = -126 and n = 128 need no special case.
  int32_t ni = (int32_t)n;
  int32_t a = ni >> 1;
  int32_t bits_a = (a + 127) << 23, bits_b = (ni - a + 127) << 23;
  float sa = __builtin_bit_cast(float, bits_a), sb = __builtin_bit_cast(float, bits_b);
  y = y * sa * sb;
  y = x < -87.33654f ? 0.0f : y;
  y = x > 88.72283f ? INFINITY : y;
  return x != x ? x : y;
}

// tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits +-1, absolute error ~1e-7 near 0.
TWL_INLINE float vtanh(float u) {
  return 1.0f - 2.0f / (vexp(2.0f * u) + 1.0f);
}

}  // namespace twinlm
