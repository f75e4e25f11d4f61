#pragma once

#include <cstddef>
#include <cstdint>

namespace twinlm {

void gelu_fwd(const float* x, float* y, size_t i0, size_t i1);
void gelu_bwd(const float* x, const float* g, float* dx, size_t i0, size_t i1);
void gelu_tanh_fwd(const float* x, float* y, size_t i0, size_t i1);
void gelu_tanh_bwd(const float* x, const float* g, float* dx, size_t i0, size_t i1);
void layer_norm_fwd(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                    size_t C, float eps, size_t r0, size_t r1);
void layer_norm_bwd(const float* x, const float* w, const float* mean, const float* rstd, const float* gy,
                    float* dx, float* dw, float* db, size_t C, size_t r0, size_t r1);
void rms_norm_fwd(const float* x, const float* w, float* y, float* rstd, size_t C, float eps, size_t r0,
                  size_t r1);
void rms_norm_bwd(const float* x, const float* w, const float* rstd, const float* gy, float* dx, float* dw,
                  size_t C, size_t r0, size_t r1);
void masked_softmax_fwd(const float* s, const uint8_t* mask, const int64_t* mask_rows, float* p, size_t T,
                        float scale, size_t r0, size_t r1);
void softmax_bwd(const float* p, const float* g, float* ds, size_t T, float scale, size_t r0, size_t r1);
void cross_entropy_fwd(const float* logits, const int32_t* targets, float* nll, float* lse, size_t V,
                       size_t r0, size_t r1);
void cross_entropy_bwd(const float* logits, const int32_t* targets, const float* lse, const float* g,
                       float* dl, size_t V, size_t r0, size_t r1);

void swiglu_fwd(const float* g, const float* u, float* y, size_t i0, size_t i1);
void swiglu_bwd(const float* g, const float* u, const float* dy, float* dg, float* du, size_t i0, size_t i1);
void rope_rows(const float* x, const float* cs, const float* sn, float* y, size_t T, size_t half, float sign,
               size_t r0, size_t r1);

// The linear layer's row loops (the products themselves are BLAS calls).
void fill_rows(const float* b, float* y, size_t N, size_t r0, size_t r1);
void col_sum(const float* g, float* acc, size_t N, size_t r0, size_t r1);

}  // namespace twinlm
