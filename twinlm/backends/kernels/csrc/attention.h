// Fused attention for MLX's CPU path at short sequences (issue #23): softmax(scale q k^T, mask) v per
// (batch, head) in one primitive, its VJP in one more (float32). Each head's score block stays in cache;
// the products are hand-written register-blocked loops (no BLAS: at head dims of 32-128 and 64-1024 keys,
// OpenBLAS's small-matrix kernels and MLX's head split/merge copies cost more than the arithmetic).
#pragma once

#include <optional>

#include "primitives.h"

namespace twinlm {

// The longest key axis the kernel takes (one head's (Tq, Tk) scores stay in cache); beyond it the caller
// keeps the BLAS path.
constexpr int ATTENTION_MAX_KEYS = 1024;

// q (N, H, Tq, D), k and v (N, H, Tk, D), float32 with any strides (read in place: the head split's views of
// a qkv projection need no copy); mask boolean, broadcastable to (N, H, Tq, Tk), True = attend; a row with no
// key gives zeros. The result has shape (N, H, Tq, D) laid out as (N, Tq, H, D), so the heads' merge
// (transpose + reshape to (N, Tq, H * D)) is a view. The gradients dq, dk, dv are laid out the same way.
// `fault` is for the tests' negative controls only (1: the forward drops the scale; 2: the backward drops
// the softmax's row-sum term); 0 everywhere else.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, const std::optional<mx::array>& mask,
                    float scale, int fault = 0, mx::StreamOrDevice s = {});

// qkv (N, T, (H + 2 Hkv) D) float32 -> q (N, H, T, D), k, v (N, Hkv, T, D): views of (a row-contiguous copy
// of) qkv, no data moved; the VJP writes the three cotangents (any strides) into one (N, T, (H + 2 Hkv) D)
// gradient in one pass. `fault` (tests only): 1 = the VJP swaps the k and v blocks.
std::vector<mx::array> split_heads(const mx::array& qkv, int n_head, int n_kv_head, int head_dim, int fault = 0,
                                   mx::StreamOrDevice s = {});

class SplitHeads : public CpuPrimitive {  // qkv -> q, k, v (views)
 public:
  SplitHeads(mx::Stream s, int h, int hkv, int d, int fault)
      : CpuPrimitive(s), h_(h), hkv_(hkv), d_(d), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmSplitHeads"; }
  bool row_contiguous_outputs() const override { return false; }  // strided views of qkv
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int h_, hkv_, d_, fault_;
};

class MergeHeadsGrad : public CpuPrimitive {  // dq, dk, dv -> dqkv (N, T, (H + 2 Hkv) D)
 public:
  MergeHeadsGrad(mx::Stream s, int fault) : CpuPrimitive(s), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmMergeHeadsGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int fault_;
};

class Attention : public CpuPrimitive {  // q, k, v[, mask] -> o, p (the probabilities, kept for the VJP)
 public:
  Attention(mx::Stream s, float scale, bool has_mask, int fault)
      : CpuPrimitive(s), scale_(scale), mask_(has_mask), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmAttention"; }
  bool row_contiguous_outputs() const override { return false; }  // o in the heads-merged layout
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  bool mask_;
  int fault_;
};

class AttentionGrad : public CpuPrimitive {  // q, k, v[, mask], p, do -> dq, dk, dv
 public:
  AttentionGrad(mx::Stream s, float scale, bool has_mask, int fault)
      : CpuPrimitive(s), scale_(scale), mask_(has_mask), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmAttentionGrad"; }
  bool row_contiguous_outputs() const override { return false; }  // dq, dk, dv heads-merged
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  bool mask_;
  int fault_;
};

}  // namespace twinlm
