// One row of attention's masked, scaled softmax and of its backward: the pinned expressions, shared by the
// masked-softmax kernel (loops.cpp) and the fused attention kernel (attention.cpp), inlined into each
// caller's per-ISA clones.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "vmath.h"

namespace twinlm {

// p = softmax(where(mask, s * scale, -inf)) over one row of n scores (mask nullptr: attend everywhere); a
// row with no key left gives zeros. s and p may be the same row (each element is read before it is written).
TWL_INLINE void masked_softmax_row(const float* sr, const uint8_t* mr, float* pr, size_t n, float scale) {
  // Masked, scaled scores into p first (unconditional loads, then a select: this vectorises).
  if (mr) {
#pragma omp simd
    for (size_t j = 0; j < n; j++) {
      float v = sr[j] * scale;
      pr[j] = mr[j] ? v : -INFINITY;
    }
  } else {
#pragma omp simd
    for (size_t j = 0; j < n; j++) pr[j] = sr[j] * scale;
  }
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (size_t j = 0; j < n; j++) m = pr[j] > m ? pr[j] : m;
  if (m == -INFINITY) {  // no key left (a padding row): zeros, not NaN
    for (size_t j = 0; j < n; j++) pr[j] = 0.0f;
    return;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (size_t j = 0; j < n; j++) {
    float e = vexp(pr[j] - m);  // exp(-inf) = 0
    pr[j] = e;
    sum += e;
  }
#pragma omp simd
  for (size_t j = 0; j < n; j++) pr[j] = pr[j] / sum;
}

// ds = scale * p * (g - sum(g p)) over one row (zero where masked, since p is zero there); g and ds may be
// the same row.
TWL_INLINE void softmax_bwd_row(const float* pr, const float* gr, float* dr, size_t n, float scale) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (size_t j = 0; j < n; j++) dot += gr[j] * pr[j];
#pragma omp simd
  for (size_t j = 0; j < n; j++) dr[j] = scale * (pr[j] * (gr[j] - dot));
}

}  // namespace twinlm
