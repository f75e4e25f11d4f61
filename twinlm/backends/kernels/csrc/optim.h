// The optimizer's elementwise work as MLX primitives (issue #23): AdamW over every parameter in one
// primitive (one pass over p, g, m, v per element instead of ~15 MLX ops per tensor) and the sum of
// squares of a list of tensors (the global gradient norm) in another. float32, CPU.
#pragma once

#include <vector>

#include "primitives.h"

namespace twinlm {

// AdamW (twinlm/core/optim.py's docstring is the maths) over tensors ps[i], gs[i], ms[i], vs[i] of one shape
// each; lr, bc1, bc2, scale (the clip factor, multiplied into g first) are float32 scalars, keep a bool
// scalar (False: every output is its old value). decay[i] is tensor i's weight decay (0: none). Returns the
// new p of every tensor, then every m, then every v. `fault` is for the tests' negative controls only (1: the
// bias corrections ignored, 2: the weight decay dropped); 0 everywhere else. Not differentiable.
std::vector<mx::array> adamw(const std::vector<mx::array>& ps, const std::vector<mx::array>& gs,
                             const std::vector<mx::array>& ms, const std::vector<mx::array>& vs,
                             const mx::array& lr, const mx::array& bc1, const mx::array& bc2,
                             const mx::array& scale, const mx::array& keep, double beta1, double beta2, double eps,
                             const std::vector<double>& decay, int fault = 0, mx::StreamOrDevice s = {});

// sum_i sum(xs[i]^2) as a float32 scalar: per tensor, partial sums over fixed blocks added in block order,
// then the tensors in list order (the same bits at any thread count). fault (tests only): 1 = the last
// tensor left out.
mx::array sum_squares(const std::vector<mx::array>& xs, int fault = 0, mx::StreamOrDevice s = {});

class AdamW : public CpuPrimitive {  // lr, bc1, bc2, scale, keep, then p, g, m, v per tensor -> p'..., m'..., v'...
 public:
  AdamW(mx::Stream s, double beta1, double beta2, double eps, std::vector<double> decay, int fault)
      : CpuPrimitive(s), beta1_(beta1), beta2_(beta2), eps_(eps), decay_(std::move(decay)), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmAdamW"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  double beta1_, beta2_, eps_;
  std::vector<double> decay_;
  int fault_;
};

class SumSquares : public CpuPrimitive {  // xs... -> sum of squares (0-d)
 public:
  SumSquares(mx::Stream s, int fault) : CpuPrimitive(s), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmSumSquares"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>&) override { return {{}}; }

 private:
  int fault_;
};

}  // namespace twinlm
