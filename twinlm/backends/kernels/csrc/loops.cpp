// The kernels' inner loops: plain C++ over float rows, vectorised by the compiler (see vmath.h for the
// per-ISA clones). Each function handles rows [r0, r1) (or elements [i0, i1)) so the pool can split it.
#include "loops.h"

#include <cmath>

#include "softmax_row.h"
#include "vmath.h"

namespace twinlm {

// ---- GELU (exact, the core's pinned erf) ------------------------------------------------------
TWL_SIMD void gelu_fwd(const float* x, float* y, size_t i0, size_t i1) {
#pragma omp simd
  for (size_t i = i0; i < i1; i++) {
    float v = x[i];
    y[i] = 0.5f * v * (1.0f + verf(v * SQRT_HALF));
  }
}

// g * (Phi(x) + x phi(x)): the core's analytic gradient (Backend._gelu_grad).
TWL_SIMD void gelu_bwd(const float* x, const float* g, float* dx, size_t i0, size_t i1) {
#pragma omp simd
  for (size_t i = i0; i < i1; i++) {
    float v = x[i];
    float d = 0.5f * (1.0f + verf(v * SQRT_HALF)) + v * (vexp(-0.5f * (v * v)) * INV_SQRT_2PI);
    dx[i] = g[i] * d;
  }
}

// ---- GELU, tanh form (GPT-2's gelu_new) ---------------------------------------------------------
TWL_SIMD void gelu_tanh_fwd(const float* x, float* y, size_t i0, size_t i1) {
#pragma omp simd
  for (size_t i = i0; i < i1; i++) {
    float v = x[i];
    y[i] = 0.5f * v * (1.0f + vtanh(GELU_TANH_C * (v + GELU_TANH_K * (v * v * v))));
  }
}

TWL_SIMD void gelu_tanh_bwd(const float* x, const float* g, float* dx, size_t i0, size_t i1) {
#pragma omp simd
  for (size_t i = i0; i < i1; i++) {
    float v = x[i];
    float t = vtanh(GELU_TANH_C * (v + GELU_TANH_K * (v * v * v)));
    float du = GELU_TANH_C * (1.0f + 3.0f * GELU_TANH_K * (v * v));
    dx[i] = g[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du);
  }
}

// ---- LayerNorm ------------------------------------------------------------------------------------
TWL_SIMD void layer_norm_fwd(const float* x, const float* w, const float* b, float* y, float* mean,
                             float* rstd, size_t C, float eps, size_t r0, size_t r1) {
  const float inv_c = 1.0f / (float)C;
  for (size_t r = r0; r < r1; r++) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (size_t j = 0; j < C; j++) s += xr[j];
    const float mu = s / (float)C;
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (size_t j = 0; j < C; j++) {
      float d = xr[j] - mu;
      v += d * d;
    }
    const float rs = 1.0f / std::sqrt(v * inv_c + eps);
    mean[r] = mu;
    rstd[r] = rs;
    if (b) {
#pragma omp simd
      for (size_t j = 0; j < C; j++) yr[j] = (xr[j] - mu) * rs * w[j] + b[j];
    } else {
#pragma omp simd
      for (size_t j = 0; j < C; j++) yr[j] = (xr[j] - mu) * rs * w[j];
    }
  }
}

// dx = rstd (gw - mean(gw) - xhat mean(gw xhat)), gw = gy * w; dw += gy xhat, db += gy (this chunk's part).
TWL_SIMD void layer_norm_bwd(const float* x, const float* w, const float* mean, const float* rstd,
                             const float* gy, float* dx, float* dw, float* db, size_t C, size_t r0,
                             size_t r1) {
  const float inv_c = 1.0f / (float)C;
  for (size_t r = r0; r < r1; r++) {
    const float* xr = x + r * C;
    const float* gr = gy + r * C;
    float* dr = dx + r * C;
    const float mu = mean[r], rs = rstd[r];
    float a = 0.0f, c = 0.0f;
#pragma omp simd reduction(+ : a, c)
    for (size_t j = 0; j < C; j++) {
      float xh = (xr[j] - mu) * rs;
      float gw = gr[j] * w[j];
      a += gw;
      c += gw * xh;
    }
    a *= inv_c;
    c *= inv_c;
#pragma omp simd
    for (size_t j = 0; j < C; j++) {
      float xh = (xr[j] - mu) * rs;
      dr[j] = rs * (gr[j] * w[j] - a - xh * c);
      dw[j] += gr[j] * xh;
      db[j] += gr[j];
    }
  }
}

// ---- RMSNorm --------------------------------------------------------------------------------------
TWL_SIMD void rms_norm_fwd(const float* x, const float* w, float* y, float* rstd, size_t C, float eps,
                           size_t r0, size_t r1) {
  const float inv_c = 1.0f / (float)C;
  for (size_t r = r0; r < r1; r++) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (size_t j = 0; j < C; j++) s += xr[j] * xr[j];
    const float rs = 1.0f / std::sqrt(s * inv_c + eps);
    rstd[r] = rs;
#pragma omp simd
    for (size_t j = 0; j < C; j++) yr[j] = xr[j] * rs * w[j];
  }
}

// y = x rs w: dx = rs (gw - x rs^2 mean(gw x)), gw = gy * w; dw += gy x rs.
TWL_SIMD void rms_norm_bwd(const float* x, const float* w, const float* rstd, const float* gy, float* dx,
                           float* dw, size_t C, size_t r0, size_t r1) {
  const float inv_c = 1.0f / (float)C;
  for (size_t r = r0; r < r1; r++) {
    const float* xr = x + r * C;
    const float* gr = gy + r * C;
    float* dr = dx + r * C;
    const float rs = rstd[r];
    float c = 0.0f;
#pragma omp simd reduction(+ : c)
    for (size_t j = 0; j < C; j++) c += gr[j] * w[j] * xr[j];
    const float k = c * inv_c * rs * rs;
#pragma omp simd
    for (size_t j = 0; j < C; j++) {
      dr[j] = rs * (gr[j] * w[j] - xr[j] * k);
      dw[j] += gr[j] * xr[j] * rs;
    }
  }
}

// ---- masked, scaled softmax (attention probabilities) --------------------------------------------
// p = softmax(where(mask, s * scale, -inf)) per row of length T (softmax_row.h); a row with no key left gives
// zeros. mask_rows[r] is the offset of row r's mask (nullptr mask: attend everywhere).
TWL_SIMD void masked_softmax_fwd(const float* s, const uint8_t* mask, const int64_t* mask_rows, float* p,
                                 size_t T, float scale, size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) {
    masked_softmax_row(s + r * T, mask ? mask + mask_rows[r] : nullptr, p + r * T, T, scale);
  }
}

// ds = scale * p * (g - sum(g p)) (zero where masked, since p is zero there).
TWL_SIMD void softmax_bwd(const float* p, const float* g, float* ds, size_t T, float scale, size_t r0,
                          size_t r1) {
  for (size_t r = r0; r < r1; r++) softmax_bwd_row(p + r * T, g + r * T, ds + r * T, T, scale);
}

// ---- cross-entropy over rows of logits (N, V) ------------------------------------------------------
// lse = max + log(sum(exp(l - max))); nll = lse - l[target] (0 for a target outside [0, V)).
TWL_SIMD void cross_entropy_fwd(const float* logits, const int32_t* targets, float* nll, float* lse,
                                size_t V, size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) {
    const float* lr = logits + r * V;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (size_t j = 0; j < V; j++) m = lr[j] > m ? lr[j] : m;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (size_t j = 0; j < V; j++) s += vexp(lr[j] - m);
    const float l = m + std::log(s);
    lse[r] = l;
    const int32_t t = targets[r];
    nll[r] = (t >= 0 && (size_t)t < V) ? l - lr[t] : 0.0f;
  }
}

// dlogits = g[r] * (softmax(l) - onehot(target)).
TWL_SIMD void cross_entropy_bwd(const float* logits, const int32_t* targets, const float* lse,
                                const float* g, float* dl, size_t V, size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) {
    const float* lr = logits + r * V;
    float* dr = dl + r * V;
    const float l = lse[r], gr = g[r];
#pragma omp simd
    for (size_t j = 0; j < V; j++) dr[j] = gr * vexp(lr[j] - l);
    const int32_t t = targets[r];
    if (t >= 0 && (size_t)t < V) dr[t] -= gr;
  }
}

}  // namespace twinlm

namespace twinlm {

// ---- SwiGLU: silu(g) * u, silu(g) = g / (1 + exp(-g)) --------------------------------------------------
TWL_SIMD void swiglu_fwd(const float* g, const float* u, float* y, size_t i0, size_t i1) {
#pragma omp simd
  for (size_t i = i0; i < i1; i++) y[i] = g[i] / (1.0f + vexp(-g[i])) * u[i];
}

// dg = dy u s (1 + g (1 - s)), du = dy silu(g), s = sigmoid(g).
TWL_SIMD void swiglu_bwd(const float* g, const float* u, const float* dy, float* dg, float* du, size_t i0,
                         size_t i1) {
#pragma omp simd
  for (size_t i = i0; i < i1; i++) {
    float s = 1.0f / (1.0f + vexp(-g[i]));
    du[i] = dy[i] * (g[i] * s);
    dg[i] = dy[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
  }
}

// ---- RoPE, half-split layout: [x1 cos - x2 sin, x2 cos + x1 sin] over rows of length 2 * half ------------
// Row r is at position r % T (cos/sin are (T, half)); sign = -1 rotates back (the backward).
TWL_SIMD void rope_rows(const float* x, const float* cs, const float* sn, float* y, size_t T, size_t half,
                        float sign, size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) {
    const float* xr = x + r * 2 * half;
    float* yr = y + r * 2 * half;
    const float* c = cs + (r % T) * half;
    const float* s = sn + (r % T) * half;
#pragma omp simd
    for (size_t j = 0; j < half; j++) {
      float x1 = xr[j], x2 = xr[half + j], sj = sign * s[j];
      yr[j] = x1 * c[j] - x2 * sj;
      yr[half + j] = x2 * c[j] + x1 * sj;
    }
  }
}

// ---- linear layer: the bias as BLAS's C (beta = 1), and the bias gradient ----------------------------------
// Each row of y gets a copy of b; sgemm then adds x @ W onto it.
void fill_rows(const float* b, float* y, size_t N, size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) std::memcpy(y + r * N, b, N * sizeof(float));
}

// acc[j] += sum over rows [r0, r1) of g[r, j] (acc starts at zero; rows in order).
TWL_SIMD void col_sum(const float* g, float* acc, size_t N, size_t r0, size_t r1) {
  for (size_t r = r0; r < r1; r++) {
    const float* gr = g + r * N;
#pragma omp simd
    for (size_t j = 0; j < N; j++) acc[j] += gr[j];
  }
}

}  // namespace twinlm
