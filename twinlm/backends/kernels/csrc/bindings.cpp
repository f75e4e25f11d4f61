// Python bindings (nanobind, in MLX's nanobind domain so mx.array crosses the boundary).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/version.h"
#include "attention.h"
#include "fused.h"
#include "lowp.h"
#include "optim.h"
#include "pool.h"
#include "primitives.h"
#include "quant.h"
#ifdef TWINLM_SHM_ALLREDUCE
#include "shm_allreduce.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

static std::string simd_level() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__linux__) && !defined(TWINLM_NO_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "AVX-512 (x86-64-v4 clone)";
  if (__builtin_cpu_supports("x86-64-v3")) return "AVX2+FMA (x86-64-v3 clone)";
  return "SSE2 (baseline clone)";
#elif defined(__x86_64__) || defined(__i386__)
  return "SSE2 (one baseline version)";
#elif defined(__aarch64__)
  return "NEON";
#else
  return "scalar";
#endif
}

NB_MODULE(_twinlm_kernels, m) {
  m.doc() = "twinlm's CPU kernels for MLX: the core's composites as MLX primitives with a VJP";
  m.attr("MLX_VERSION_BUILT") = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) +
                                "." + std::to_string(MLX_VERSION_PATCH);
  m.attr("NANOBIND_VERSION") = std::to_string(NB_VERSION_MAJOR) + "." + std::to_string(NB_VERSION_MINOR) + "." +
                               std::to_string(NB_VERSION_PATCH);
  m.def("simd_level", &simd_level, "the vector ISA the loops dispatch to on this CPU");
  m.def("threads", [] { return twinlm::pool().threads(); }, "the kernels' thread count");
  m.def("set_threads", &twinlm::set_threads, "n"_a, "set the kernels' thread count (0: the default)");
  m.def("gelu", &twinlm::gelu, "x"_a, "tanh_form"_a = false, nb::kw_only(), "stream"_a = nb::none());
  m.def("layer_norm", &twinlm::layer_norm, "x"_a, "weight"_a, "bias"_a.none(), "eps"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("rms_norm", &twinlm::rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("masked_softmax", &twinlm::masked_softmax, "scores"_a, "mask"_a.none(), "scale"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("swiglu", &twinlm::swiglu, "gate"_a, "up"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("rope", &twinlm::rope, "x"_a, "cos"_a, "sin"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("linear", [](const mx::array& x, const mx::array& w, const std::optional<mx::array>& b,
                     mx::StreamOrDevice s) { return twinlm::linear(x, w, b, 0, s); },
        "x"_a, "weight"_a, "bias"_a.none(), nb::kw_only(), "stream"_a = nb::none(),
        "x @ weight + bias as one sgemm onto the bias (beta = 1), with its VJP");
  m.def("_linear_faulty", &twinlm::linear, "x"_a, "weight"_a, "bias"_a.none(), "fault"_a, nb::kw_only(),
        "stream"_a = nb::none(), "tests only: a deliberately wrong linear (1: beta = 0, 2: no bias gradient)");
  m.def("embedding", [](const mx::array& t, const mx::array& ids, mx::StreamOrDevice s) {
          return twinlm::embedding(t, ids, 0, s);
        }, "table"_a, "ids"_a, nb::kw_only(), "stream"_a = nb::none(),
        "table rows at ids (mx.take on axis 0), its VJP a scatter-add split over columns");
  m.def("_embedding_faulty", &twinlm::embedding, "table"_a, "ids"_a, "fault"_a, nb::kw_only(),
        "stream"_a = nb::none(), "tests only: a deliberately wrong embedding (1: the backward assigns)");
  m.def("quantized_matmul", &twinlm::quantized_matmul, "x"_a, "qweight"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, nb::kw_only(), "transpose"_a = true, "stream"_a = nb::none(),
        "x @ dequantize(qweight, scales, biases).T for int4/int8 weights in MLX's affine layout (the semantics of "
        "mx.quantized_matmul(..., transpose=True); transpose=False: x @ dequantize(...)), float32 x of any "
        "leading shape; its VJP gives the gradient for x only (a frozen base)");
  m.def("quant_isa", &twinlm::quant_isa_name, "the loops the quantized GEMV runs (avx512, avx2 or portable)");
  m.def("_set_quant_isa", [](const std::string& name) {
          twinlm::QIsa isa = name == "auto" ? twinlm::QIsa::Auto : name == "avx512" ? twinlm::QIsa::Avx512
                             : name == "avx2" ? twinlm::QIsa::Avx2 : name == "portable" ? twinlm::QIsa::Scalar
                             : throw std::invalid_argument("isa: auto, avx512, avx2 or portable");
          twinlm::set_quant_isa(isa);
        }, "isa"_a, "tests and benchmarks only: force the quantized GEMV's loops (auto, avx512, avx2, portable)");
  m.def("cross_entropy_rows", &twinlm::cross_entropy_rows, "logits"_a, "targets"_a, nb::kw_only(),
        "stream"_a = nb::none());

  // ---- lowp: the linear layer over bfloat16 / float16 weights (issue #21) ----
  m.def("linear_lowp", [](const mx::array& x, const mx::array& w, const std::optional<mx::array>& b,
                          mx::StreamOrDevice s) { return twinlm::linear_lowp(x, w, b, 0, s); },
        "x"_a, "weight"_a, "bias"_a.none(), nb::kw_only(), "stream"_a = nb::none(),
        "x @ weight + bias for a bfloat16/float16 weight (x float32 or the weight's dtype, bias in either), "
        "accumulated in float32, the result in x's dtype, with its VJP");
  m.def("_linear_lowp_faulty", &twinlm::linear_lowp, "x"_a, "weight"_a, "bias"_a.none(), "fault"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "tests only: a deliberately wrong linear_lowp (1: bf16 from the low half, 2: f16 read as bf16, 3: no db)");
  m.def("_lowp_isa", &twinlm::lowp_isa, "level"_a = -1,
        "linear_lowp's vector code (0 portable, 1 AVX2+FMA+F16C, 2 AVX-512F); level >= 0 caps it (tests)");
  m.def("matmul_t_lowp", [](const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
          return twinlm::matmul_t_lowp(x, w, 0, s);
        }, "x"_a, "weight"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x @ weight.T for a bfloat16/float16/float32 weight (N, K) (x float32 or the weight's dtype), summed in "
        "float32, the result in x's dtype, with its VJP (dx and dw)");
  m.def("_matmul_t_lowp_faulty", &twinlm::matmul_t_lowp, "x"_a, "weight"_a, "fault"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "tests only: a deliberately wrong matmul_t_lowp (1: bf16 from the low half, 2: f16 read as bf16, "
        "4: each row of the weight read at its neighbour's offset)");
  m.attr("LOWP_GEMV_ROWS") = twinlm::LOWP_GEMV_ROWS;
  m.attr("LOWP_GEMV_MAX_ROWS") = twinlm::LOWP_GEMV_MAX_ROWS;

  // ---- fused residual add + norm (issue #23) ----
  m.def("add_layer_norm", [](const mx::array& x, const mx::array& y, const mx::array& w,
                             const std::optional<mx::array>& b, float eps, mx::StreamOrDevice s) {
          return twinlm::add_layer_norm(x, y, w, b, eps, 0, s);
        }, "x"_a, "y"_a, "weight"_a, "bias"_a.none(), "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "(x + y, layer_norm(x + y)) in one pass, with its VJP in one primitive");
  m.def("add_rms_norm", [](const mx::array& x, const mx::array& y, const mx::array& w, float eps,
                           mx::StreamOrDevice s) { return twinlm::add_rms_norm(x, y, w, eps, 0, s); },
        "x"_a, "y"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "(x + y, rms_norm(x + y)) in one pass, with its VJP in one primitive");
  m.def("_add_layer_norm_faulty", &twinlm::add_layer_norm, "x"_a, "y"_a, "weight"_a, "bias"_a.none(), "eps"_a,
        "fault"_a, nb::kw_only(), "stream"_a = nb::none(),
        "tests only: a deliberately wrong add_layer_norm (1: no residual gradient, 2: the norm forgets y)");
  m.def("_add_rms_norm_faulty", &twinlm::add_rms_norm, "x"_a, "y"_a, "weight"_a, "eps"_a, "fault"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "tests only: a deliberately wrong add_rms_norm (1: no residual gradient, 2: the norm forgets y)");

  // ---- fused attention at short sequences (issue #23) ----
  m.def("attention", [](const mx::array& q, const mx::array& k, const mx::array& v,
                        const std::optional<mx::array>& mask, float scale, mx::StreamOrDevice s) {
          return twinlm::attention(q, k, v, mask, scale, 0, s);
        }, "q"_a, "k"_a, "v"_a, "mask"_a.none(), "scale"_a, nb::kw_only(), "stream"_a = nb::none(),
        "softmax(scale q k^T, mask) v for float32 (N, H, T, D) q, k, v read through their strides (a boolean "
        "mask broadcast to (N, H, Tq, Tk); rows with no key give zeros), per head in cache, with its VJP; the "
        "result (and the gradients) laid out as (N, T, H, D), so the heads' merge is a view");
  m.def("_attention_faulty", &twinlm::attention, "q"_a, "k"_a, "v"_a, "mask"_a.none(), "scale"_a, "fault"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "tests only: a deliberately wrong attention (1: the forward drops the scale, 2: the backward drops the "
        "softmax's row-sum term)");
  m.attr("ATTENTION_MAX_KEYS") = twinlm::ATTENTION_MAX_KEYS;
  m.def("split_heads", [](const mx::array& qkv, int n_head, int n_kv_head, int head_dim, mx::StreamOrDevice s) {
          return twinlm::split_heads(qkv, n_head, n_kv_head, head_dim, 0, s);
        }, "qkv"_a, "n_head"_a, "n_kv_head"_a, "head_dim"_a, nb::kw_only(), "stream"_a = nb::none(),
        "(N, T, (H + 2 Hkv) D) -> [q (N, H, T, D), k, v (N, Hkv, T, D)] as views of qkv; the VJP gathers the "
        "three gradients into one in a single pass");
  m.def("_split_heads_faulty", &twinlm::split_heads, "qkv"_a, "n_head"_a, "n_kv_head"_a, "head_dim"_a, "fault"_a,
        nb::kw_only(), "stream"_a = nb::none(), "tests only: a deliberately wrong split_heads (1: k, v swapped)");

  // ---- the optimizer's elementwise work (issue #23) ----
  m.def("adamw", [](const std::vector<mx::array>& ps, const std::vector<mx::array>& gs,
                    const std::vector<mx::array>& ms, const std::vector<mx::array>& vs, const mx::array& lr,
                    const mx::array& bc1, const mx::array& bc2, const mx::array& scale, const mx::array& keep,
                    double beta1, double beta2, double eps, const std::vector<double>& decay, mx::StreamOrDevice s) {
          return twinlm::adamw(ps, gs, ms, vs, lr, bc1, bc2, scale, keep, beta1, beta2, eps, decay, 0, s);
        }, "params"_a, "grads"_a, "m"_a, "v"_a, "lr"_a, "bc1"_a, "bc2"_a, "scale"_a, "keep"_a, "beta1"_a, "beta2"_a,
        "eps"_a, "decay"_a, nb::kw_only(), "stream"_a = nb::none(),
        "AdamW (core.optim) over every tensor in one primitive, g multiplied by `scale` first, the old state "
        "kept where `keep` is False; returns the new params, then the m's, then the v's");
  m.def("_adamw_faulty", &twinlm::adamw, "params"_a, "grads"_a, "m"_a, "v"_a, "lr"_a, "bc1"_a, "bc2"_a, "scale"_a,
        "keep"_a, "beta1"_a, "beta2"_a, "eps"_a, "decay"_a, "fault"_a, nb::kw_only(), "stream"_a = nb::none(),
        "tests only: a deliberately wrong adamw (1: no bias correction, 2: no weight decay)");
  m.def("sum_squares", [](const std::vector<mx::array>& xs, mx::StreamOrDevice s) {
          return twinlm::sum_squares(xs, 0, s);
        }, "xs"_a, nb::kw_only(), "stream"_a = nb::none(),
        "the sum of every float32 tensor's squared elements (blocks in order, then tensors in order), with its VJP");
  m.def("_sum_squares_faulty", &twinlm::sum_squares, "xs"_a, "fault"_a, nb::kw_only(), "stream"_a = nb::none(),
        "tests only: a deliberately wrong sum_squares (1: the last tensor left out)");

  // ---- same-host shared-memory all-reduce for data-parallel ranks (issue #23; Linux only) ----
#ifdef TWINLM_SHM_ALLREDUCE
  m.def("shm_all_sum", &twinlm::shm_all_sum, "x"_a, "name"_a, "rank"_a, "size"_a, "slot_floats"_a, "timeout_s"_a,
        "fault"_a = 0, nb::kw_only(), "stream"_a = nb::none(),
        "the sum of float32 x over the ranks attached to shared-memory segment `name`, in rank order (the same "
        "bits on every rank), waiting on a futex; fault (tests only): 1 = no wait, 2 = reverse rank order");
  m.def("shm_unlink", &twinlm::shm_unlink_segment, "name"_a, "remove a segment's name; False if already gone");
#endif
}
