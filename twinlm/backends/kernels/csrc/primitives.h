// MLX primitives for the core's composites (twinlm/core/backend.py), CPU only, float32 only.
#pragma once

#include <optional>
#include <stdexcept>
#include <string>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace twinlm {

namespace mx = mlx::core;

// Ops (what Python calls). Inputs are made row-contiguous; every op needs float32 on a CPU stream.
mx::array gelu(const mx::array& x, bool tanh_form, mx::StreamOrDevice s = {});
mx::array layer_norm(const mx::array& x, const mx::array& w, const std::optional<mx::array>& b, float eps,
                     mx::StreamOrDevice s = {});
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s = {});
mx::array masked_softmax(const mx::array& scores, const std::optional<mx::array>& mask, float scale,
                         mx::StreamOrDevice s = {});
mx::array cross_entropy_rows(const mx::array& logits, const mx::array& targets, mx::StreamOrDevice s = {});
mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});
mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin, mx::StreamOrDevice s = {});
// x (..., K) @ w (K, N) [+ b (N,)]: one sgemm onto the bias. `fault` is for the tests' negative controls
// only (1: beta = 0, which drops the bias; 2: the bias gradient left at zero); 0 everywhere else.
mx::array linear(const mx::array& x, const mx::array& w, const std::optional<mx::array>& b, int fault = 0,
                 mx::StreamOrDevice s = {});
// table (V, C) rows at ids (any shape, integer; negative ids count from the end, as mx.take): (..., C).
// Out-of-range ids give NaN rows. `fault` (tests only): 1 = the backward assigns instead of adding.
mx::array embedding(const mx::array& table, const mx::array& ids, int fault = 0, mx::StreamOrDevice s = {});

// x (..., K) @ dequantize(qweight, scales, biases).T -> (..., N), MLX's affine layout (quant.h), the
// semantics of mx.quantized_matmul(..., transpose=True). transpose = false computes x (..., N) @ Wt -> (..., K)
// (the gradient for x). Gradients for the weight, scales and biases raise: the base is frozen (QLoRA).
mx::array quantized_matmul(const mx::array& x, const mx::array& qweight, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, bool transpose = true,
                           mx::StreamOrDevice s = {});

// A primitive with a CPU implementation only; the GPU path says so (Python never sends it there).
class CpuPrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override;
  // Every output in a row-contiguous buffer of its own, as `allocate` makes them. A kernel that writes another
  // layout says false (the head split's views; attention's outputs, strided in the heads-merged layout), or a
  // kernel reading its output directly would read it wrong.
  virtual bool row_contiguous_outputs() const { return true; }
};

// An input as a kernel reads it, row-contiguous. An evaluated array that already is one (weights, tables,
// position rows) and the output of a kernel here that writes fresh buffers are used as they are; the rest go
// through MLX's Contiguous, a graph node even where it copies nothing (a 4-bit SmolLM2-135M token had 940).
inline mx::array row_contiguous(const mx::array& a, const mx::Stream& s) {
  if (a.is_available()) {
    if (a.flags().row_contiguous) return a;
  } else if (a.has_primitive()) {
    auto* p = dynamic_cast<const CpuPrimitive*>(&a.primitive());
    if (p && p->row_contiguous_outputs()) return a;
  }
  return mx::contiguous(a, false, s);
}

// A float32 input of a kernel, row-contiguous; any other dtype is one error line naming the kernel.
inline mx::array prepared(const mx::array& x, const mx::Stream& s, const char* what) {
  if (x.dtype() != mx::float32) throw std::invalid_argument(std::string(what) + ": float32 only");
  return row_contiguous(x, s);
}

class Gelu : public CpuPrimitive {
 public:
  Gelu(mx::Stream s, bool tanh_form) : CpuPrimitive(s), tanh_(tanh_form) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return tanh_ ? "TwinlmGeluTanh" : "TwinlmGelu"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  bool tanh_;
};

class GeluGrad : public CpuPrimitive {  // inputs x, g -> g * gelu'(x)
 public:
  GeluGrad(mx::Stream s, bool tanh_form) : CpuPrimitive(s), tanh_(tanh_form) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return tanh_ ? "TwinlmGeluTanhGrad" : "TwinlmGeluGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  bool tanh_;
};

class LayerNorm : public CpuPrimitive {  // x, w[, b] -> y, mean, rstd
 public:
  LayerNorm(mx::Stream s, float eps, bool has_bias) : CpuPrimitive(s), eps_(eps), bias_(has_bias) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmLayerNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float eps_;
  bool bias_;
};

class LayerNormGrad : public CpuPrimitive {  // x, w, mean, rstd, gy -> dx, dw, db
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmLayerNormGrad"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class RMSNorm : public CpuPrimitive {  // x, w -> y, rstd
 public:
  RMSNorm(mx::Stream s, float eps) : CpuPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmRMSNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float eps_;
};

class RMSNormGrad : public CpuPrimitive {  // x, w, rstd, gy -> dx, dw
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmRMSNormGrad"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class MaskedSoftmax : public CpuPrimitive {  // scores[, mask broadcast to scores] -> p
 public:
  MaskedSoftmax(mx::Stream s, float scale, bool has_mask) : CpuPrimitive(s), scale_(scale), mask_(has_mask) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmMaskedSoftmax"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  float scale_;
  bool mask_;
};

class SoftmaxGrad : public CpuPrimitive {  // p, g -> scale * p * (g - sum(g p))
 public:
  SoftmaxGrad(mx::Stream s, float scale) : CpuPrimitive(s), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmSoftmaxGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  float scale_;
};

class CrossEntropy : public CpuPrimitive {  // logits (N, V), targets (N,) int32 -> nll (N,), lse (N,)
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmCrossEntropy"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class CrossEntropyGrad : public CpuPrimitive {  // logits, targets, lse, g (N,) -> dlogits
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmCrossEntropyGrad"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class SwiGLU : public CpuPrimitive {  // gate, up -> silu(gate) * up
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmSwiGLU"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }
};

class SwiGLUGrad : public CpuPrimitive {  // gate, up, dy -> dgate, dup
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmSwiGLUGrad"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class Rope : public CpuPrimitive {  // x (..., T, hs), cos, sin (T, hs/2) -> rotated x; inverse: rotate back
 public:
  Rope(mx::Stream s, bool inverse) : CpuPrimitive(s), inverse_(inverse) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return inverse_ ? "TwinlmRopeInverse" : "TwinlmRope"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  bool inverse_;
};

class Linear : public CpuPrimitive {  // x (M, K) viewed, w (K, N)[, b (N,)] -> x @ w + b, shape (..., N)
 public:
  Linear(mx::Stream s, bool has_bias, int fault) : CpuPrimitive(s), bias_(has_bias), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmLinear"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool bias_;
  int fault_;
};

class LinearGrad : public CpuPrimitive {  // x, w, g -> the wanted ones of dx = g w^T, dw = x^T g, db = sum g
 public:
  LinearGrad(mx::Stream s, bool dx, bool dw, bool db, int fault)
      : CpuPrimitive(s), dx_(dx), dw_(dw), db_(db), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmLinearGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool dx_, dw_, db_;
  int fault_;
};

class QuantizedMatmul : public CpuPrimitive {  // x, qweight, scales, biases -> x Wt^T (or x Wt)
 public:
  QuantizedMatmul(mx::Stream s, int group_size, int bits, bool transpose)
      : CpuPrimitive(s), group_(group_size), bits_(bits), transpose_(transpose) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmQuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override;

 private:
  int group_, bits_;
  bool transpose_;
};

class Embedding : public CpuPrimitive {  // table (V, C), ids int32 -> rows (..., C)
 public:
  Embedding(mx::Stream s, int fault) : CpuPrimitive(s), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmEmbedding"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int fault_;
};

class EmbeddingGrad : public CpuPrimitive {  // ids, g (..., C) -> dtable (V, C): the scatter-add
 public:
  EmbeddingGrad(mx::Stream s, int fault) : CpuPrimitive(s), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmEmbeddingGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int fault_;
};

}  // namespace twinlm
