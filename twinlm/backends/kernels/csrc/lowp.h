// The linear layer over bfloat16 / float16 weights (issue #21): x @ w + b with the weight kept in its low
// dtype and every product accumulated in float32. MLX's own CPU matmul in bf16/f16 is several times slower
// than in float32 on x86; decoding is bound by weight bytes, so a kernel that streams the 2-byte weight
// once and widens it in registers beats float32 instead.
#pragma once

#include <optional>

#include "primitives.h"

namespace twinlm {

// x (..., K) float32 | bfloat16 | float16, w (K, N) bfloat16 | float16 | float32, b None or (N,) in x's or w's
// dtype: (..., N) in x's dtype. Rows M <= LOWP_GEMV_MAX_ROWS stream the weight once per 8 rows (GEMV, split
// over column tiles): at a few rows BLAS's sgemv for x @ w read a float32 (K, N) weight at 8-12 GB/s of the
// ~27 this machine reads. More rows convert blocks of the weight to a float32 tile and sgemm them (a float32
// weight: one sgemm). The VJP gives dx (x's dtype), dw (w's dtype, float32-accumulated) and db (b's dtype).
// `fault` is for the tests' negative controls only (1: a bf16 weight widened from the low half of the float32;
// 2: an f16 weight decoded as bf16; 3: the bias gradient left at zero); 0 everywhere else.
mx::array linear_lowp(const mx::array& x, const mx::array& w, const std::optional<mx::array>& b, int fault = 0,
                      mx::StreamOrDevice s = {});

constexpr int LOWP_GEMV_ROWS = 8;       // rows of x per pass over the weight (sums held in registers)
constexpr int LOWP_GEMV_MAX_ROWS = 16;  // more rows: widened blocks of the weight and sgemm

// The vector code linear_lowp runs: 0 portable C++, 1 AVX2+FMA+F16C, 2 AVX-512F. `lowp_isa(level)` with
// level >= 0 caps it (tests: run every path this CPU has); the cap never exceeds what the CPU supports.
int lowp_isa(int level = -1);

class LinearLowp : public CpuPrimitive {  // x (M, K) float32, w (K, N) bf16|f16[, b (N,) float32] -> float32
 public:
  LinearLowp(mx::Stream s, bool has_bias, int fault) : CpuPrimitive(s), bias_(has_bias), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmLinearLowp"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool bias_;
  int fault_;
};

class LinearLowpGrad : public CpuPrimitive {  // x, w, g (float32 but w) -> the wanted ones of dx, dw, db (float32)
 public:
  LinearLowpGrad(mx::Stream s, bool dx, bool dw, bool db, int fault)
      : CpuPrimitive(s), dx_(dx), dw_(dw), db_(db), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmLinearLowpGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool dx_, dw_, db_;
  int fault_;
};

// x (..., K) float32 | bfloat16 | float16, w (N, K) bfloat16 | float16 | float32 row-major: x @ w.T, (..., N)
// in x's dtype (the tied head `h @ wte.T`: each output is the dot of a row of x with a contiguous row of w).
// Rows M <= LOWP_GEMV_MAX_ROWS: dot products over blocks of w's rows, each read from memory once per 8 rows of x
// (AVX-512: groups of 6-8 rows of w against <= 4 rows of x, twice for 5-8 rows, the second pass from L1; AVX2: 4
// rows of w and 2 of x), the next groups prefetched (MLX's float32 BLAS call at one row reads the (V, C) head at a
// third of the memory's rate); more rows: blocks of a bf16/f16 w widened to a float32 tile
// and one sgemm (transposed B) per block, a float32 w one sgemm. The VJP gives dx (x's dtype) and dw (w's dtype,
// float32-accumulated: full fine-tuning trains a tied embedding). `fault`: tests' negative controls only (1 and 2
// as linear_lowp; 4: each row of w read at a neighbour's offset, a transposition-like mix-up).
mx::array matmul_t_lowp(const mx::array& x, const mx::array& w, int fault = 0, mx::StreamOrDevice s = {});

class MatmulTLowp : public CpuPrimitive {  // x (M, K) float32, w (N, K) bf16|f16|f32 -> (M, N) float32
 public:
  MatmulTLowp(mx::Stream s, int fault) : CpuPrimitive(s), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "TwinlmMatmulTLowp"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int fault_;
};

class MatmulTLowpGrad : public CpuPrimitive {  // x, w, g (float32 but w) -> the wanted ones of dx, dw (float32)
 public:
  MatmulTLowpGrad(mx::Stream s, bool dx, bool dw, int fault) : CpuPrimitive(s), dx_(dx), dw_(dw), fault_(fault) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override { return "TwinlmMatmulTLowpGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  bool dx_, dw_;
  int fault_;
};

}  // namespace twinlm
