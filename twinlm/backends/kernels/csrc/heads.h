// Attention's per-head products read through strides (issue #23): q, k, v are views of the qkv projection
// (a slice, a reshape and a transpose), which MLX's CPU matmul copies into contiguous arrays first (forward,
// and again in its backward). This primitive hands BLAS each (batch, head) matrix where it lies, with its
// leading dimension, and its VJP is the same primitive on the cotangent.
#pragma once

#include "primitives.h"

namespace twinlm {

// op(a) @ op(b) over matching leading (batch) dims: a (..., M, K) (or (..., K, M) with ta), b (..., K, N) (or
// (..., N, K) with tb) -> (..., M, N), float32, any strides (a matrix whose rows and columns are both strided
// is copied first, at evaluation). `fault` is for the tests' negative controls only (1: the views' row
// strides ignored, as if they were contiguous); 0 everywhere else.
mx::array head_matmul(const mx::array& a, const mx::array& b, bool ta, bool tb, int fault = 0,
                      mx::StreamOrDevice s = {});

class HeadMatmul : public CpuPrimitive {
 public:
  HeadMatmul(mx::Stream s, bool ta, bool tb, int fault) : CpuPrimitive(s), ta_(ta), tb_(tb), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmHeadMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool ta_, tb_;
  int fault_;
};

}  // namespace twinlm
