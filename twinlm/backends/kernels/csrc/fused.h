// Fused residual add + norm (issue #23): s = x + y, n = LayerNorm(s) or RMSNorm(s), both returned, as one
// MLX primitive with its VJP in one more (float32, CPU). The norm's maths are loops.cpp's, row by row.
#pragma once

#include <optional>
#include <utility>

#include "primitives.h"

namespace twinlm {

// (x + y, layer_norm(x + y, w, b, eps)); x and y of one shape (..., C), w and b (C,). `fault` is for the
// tests' negative controls only (1: the backward drops the residual's own cotangent; 2: the forward
// normalises x alone); 0 everywhere else.
std::pair<mx::array, mx::array> add_layer_norm(const mx::array& x, const mx::array& y, const mx::array& w,
                                               const std::optional<mx::array>& b, float eps, int fault = 0,
                                               mx::StreamOrDevice s = {});
// (x + y, rms_norm(x + y, w, eps)), the same contract.
std::pair<mx::array, mx::array> add_rms_norm(const mx::array& x, const mx::array& y, const mx::array& w,
                                             float eps, int fault = 0, mx::StreamOrDevice s = {});

class AddNorm : public CpuPrimitive {  // x, y, w[, b] -> s, n, mean, rstd (mean zeros for RMSNorm)
 public:
  AddNorm(mx::Stream s, float eps, bool rms, bool has_bias, int fault)
      : CpuPrimitive(s), eps_(eps), rms_(rms), bias_(has_bias), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return rms_ ? "TwinlmAddRMSNorm" : "TwinlmAddLayerNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float eps_;
  bool rms_, bias_;
  int fault_;
};

class AddNormGrad : public CpuPrimitive {  // s, w, mean, rstd, gn, gs -> ds (= dx = dy), dw, db
 public:
  AddNormGrad(mx::Stream s, bool rms, int fault) : CpuPrimitive(s), rms_(rms), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return rms_ ? "TwinlmAddRMSNormGrad" : "TwinlmAddLayerNormGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool rms_;
  int fault_;
};

}  // namespace twinlm
