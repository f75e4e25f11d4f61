// Int8/int4 weights in MLX's affine layout (twinlm/core/quant.py): Wt (N, K) stored as uint32 words of
// 32/bits elements each, element j of a word at bits [j*bits, (j+1)*bits); per group of G along K a float
// scale and bias, Wt[o, k] = q * scale + bias.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace twinlm {

// Which loop the GEMV uses: the best this CPU runs (auto), or one forced by the tests.
enum class QIsa { Auto = 0, Scalar = 1, Avx2 = 2, Avx512 = 3 };
void set_quant_isa(QIsa isa);
QIsa quant_isa();  // the one in use (never Auto)
std::string quant_isa_name();

// Rows of x one GEMV pass takes (qgemv_rows: M <= QGEMV_ROWS), and the most rows the GEMV path serves
// (in passes of QGEMV_ROWS over blocks of weight rows); more: dequantized tiles and sgemm. Measured on a
// shared 2-core AMD EPYC with AVX-512 (benchmarks/qmatmul.py shapes, 2 threads): the passes beat the tiles
// up to 32 rows at every shape, and lose from 64 rows at 2048x8192.
constexpr size_t QGEMV_ROWS = 8;
constexpr size_t QGEMV_MAX_ROWS = 32;

// x (M <= QGEMV_ROWS, K) row-contiguous; rows [o0, o1) of y (M, N) = x Wt^T. `xp` is scratch for M * K floats (the
// 4-bit loops read x reordered to match the nibbles; prepare it once per call with qgemv_prepare_x).
// `isa` is quant_isa() read once per call (the two must agree on the order).
void qgemv_prepare_x(QIsa isa, const float* x, float* xp, size_t M, size_t K, int bits);
void qgemv_rows(QIsa isa, const float* xp, const uint32_t* w, const float* s, const float* b, float* y, size_t M,
                size_t K, size_t N, size_t G, int bits, size_t o0, size_t o1);

// Rows [r0, r1) of Wt, dequantized to float into tile rows 0.. (tile row stride K).
void qdequant_rows(const uint32_t* w, const float* s, const float* b, float* tile, size_t K, size_t G, int bits,
                   size_t r0, size_t r1);

}  // namespace twinlm
