#include "primitives.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "loops.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"
#include "quant.h"
#include "stream.h"

// CBLAS's sgemm, left undefined here and bound when the module loads, exactly as libmlx binds its own:
// to the system OpenBLAS that twinlm.backends.mlx_native loads with RTLD_GLOBAL (the global scope is
// searched first), else to the reference BLAS the mlx wheel ships (libmlx's dependency, so in this
// module's own scope). No link-time BLAS and no dlsym: the products run in the BLAS MLX runs.
extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace twinlm {

namespace {

void allocate(mx::array& a) { a.set_data(mx::allocator::malloc(a.nbytes())); }

template <class F>
void launch(const mx::Stream& s, F&& f) {
  mx::cpu::get_command_encoder(s).dispatch(std::forward<F>(f));
}

int64_t last_dim(const mx::array& x) { return x.ndim() ? x.shape(-1) : 1; }

}  // namespace

void CpuPrimitive::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(std::string(name()) + " has no GPU implementation");
}

// ---- GELU -----------------------------------------------------------------------------------------
mx::array gelu(const mx::array& x, bool tanh_form, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  auto xc = prepared(x, stream, "gelu");
  return mx::array(xc.shape(), mx::float32, std::make_shared<Gelu>(stream, tanh_form), {xc});
}

void Gelu::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  launch(stream(), [x = in[0].data<float>(), y = out[0].data<float>(), n = out[0].size(), t = tanh_] {
    parallel_rows(n, 1, [&](int, size_t b, size_t e) { t ? gelu_tanh_fwd(x, y, b, e) : gelu_fwd(x, y, b, e); });
  });
}

std::vector<mx::array> Gelu::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                 const std::vector<int>& argnums, const std::vector<mx::array>&) {
  auto g = prepared(cot[0], stream(), "gelu vjp");
  return {mx::array(primals[0].shape(), mx::float32, std::make_shared<GeluGrad>(stream(), tanh_),
                    {primals[0], g})};
}

bool Gelu::is_equivalent(const mx::Primitive& other) const {
  return tanh_ == static_cast<const Gelu&>(other).tanh_;
}

void GeluGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  launch(stream(), [x = in[0].data<float>(), g = in[1].data<float>(), dx = out[0].data<float>(),
                    n = out[0].size(), t = tanh_] {
    parallel_rows(n, 1, [&](int, size_t b, size_t e) {
      t ? gelu_tanh_bwd(x, g, dx, b, e) : gelu_bwd(x, g, dx, b, e);
    });
  });
}

bool GeluGrad::is_equivalent(const mx::Primitive& other) const {
  return tanh_ == static_cast<const GeluGrad&>(other).tanh_;
}

// ---- LayerNorm --------------------------------------------------------------------------------------
mx::array layer_norm(const mx::array& x, const mx::array& w, const std::optional<mx::array>& b, float eps,
                     mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  int64_t C = last_dim(x);
  if (w.ndim() != 1 || w.shape(0) != C || (b && (b->ndim() != 1 || b->shape(0) != C))) {
    throw std::invalid_argument("layer_norm: weight and bias must have shape (C,)");
  }
  std::vector<mx::array> inputs = {prepared(x, stream, "layer_norm"), prepared(w, stream, "layer_norm")};
  if (b) inputs.push_back(prepared(*b, stream, "layer_norm"));
  mx::Shape rows(x.shape().begin(), x.shape().end() - 1);
  auto outs = mx::array::make_arrays({x.shape(), rows, rows}, {mx::float32, mx::float32, mx::float32},
                                     std::make_shared<LayerNorm>(stream, eps, b.has_value()), inputs);
  return outs[0];
}

void LayerNorm::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  size_t C = last_dim(in[0]), N = C ? in[0].size() / C : 0;
  launch(stream(), [x = in[0].data<float>(), w = in[1].data<float>(),
                    b = bias_ ? in[2].data<float>() : nullptr, y = out[0].data<float>(),
                    mean = out[1].data<float>(), rstd = out[2].data<float>(), N, C, eps = eps_] {
    parallel_rows(N, C, [&](int, size_t r0, size_t r1) { layer_norm_fwd(x, w, b, y, mean, rstd, C, eps, r0, r1); });
  });
}

std::vector<mx::array> LayerNorm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                      const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  const auto& x = primals[0];
  const auto& w = primals[1];
  auto gy = prepared(cot[0], stream(), "layer_norm vjp");
  auto grads = mx::array::make_arrays({x.shape(), w.shape(), w.shape()}, {mx::float32, mx::float32, mx::float32},
                                      std::make_shared<LayerNormGrad>(stream()),
                                      {x, w, outputs[1], outputs[2], gy});
  std::vector<mx::array> result;
  for (int a : argnums) result.push_back(grads[a]);
  return result;
}

bool LayerNorm::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const LayerNorm&>(other);
  return eps_ == o.eps_ && bias_ == o.bias_;
}

// Partial dw/db per chunk of rows, summed in chunk order (the same result for the same thread count).
void LayerNormGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  size_t C = last_dim(in[0]), N = C ? in[0].size() / C : 0;
  launch(stream(), [x = in[0].data<float>(), w = in[1].data<float>(), mean = in[2].data<float>(),
                    rstd = in[3].data<float>(), gy = in[4].data<float>(), dx = out[0].data<float>(),
                    dw = out[1].data<float>(), db = out[2].data<float>(), N, C] {
    int chunks = row_chunks(N, C);
    std::vector<float> part(2 * C * chunks, 0.0f);
    parallel_rows(N, C, [&](int c, size_t r0, size_t r1) {
      layer_norm_bwd(x, w, mean, rstd, gy, dx, &part[2 * C * c], &part[2 * C * c + C], C, r0, r1);
    });
    for (size_t j = 0; j < C; j++) dw[j] = db[j] = 0.0f;
    for (int c = 0; c < chunks; c++) {
      for (size_t j = 0; j < C; j++) {
        dw[j] += part[2 * C * c + j];
        db[j] += part[2 * C * c + C + j];
      }
    }
  });
}

// ---- RMSNorm ----------------------------------------------------------------------------------------
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (w.ndim() != 1 || w.shape(0) != last_dim(x)) throw std::invalid_argument("rms_norm: weight must be (C,)");
  mx::Shape rows(x.shape().begin(), x.shape().end() - 1);
  auto outs = mx::array::make_arrays({x.shape(), rows}, {mx::float32, mx::float32},
                                     std::make_shared<RMSNorm>(stream, eps),
                                     {prepared(x, stream, "rms_norm"), prepared(w, stream, "rms_norm")});
  return outs[0];
}

void RMSNorm::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  size_t C = last_dim(in[0]), N = C ? in[0].size() / C : 0;
  launch(stream(), [x = in[0].data<float>(), w = in[1].data<float>(), y = out[0].data<float>(),
                    rstd = out[1].data<float>(), N, C, eps = eps_] {
    parallel_rows(N, C, [&](int, size_t r0, size_t r1) { rms_norm_fwd(x, w, y, rstd, C, eps, r0, r1); });
  });
}

std::vector<mx::array> RMSNorm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                    const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  const auto& x = primals[0];
  const auto& w = primals[1];
  auto gy = prepared(cot[0], stream(), "rms_norm vjp");
  auto grads = mx::array::make_arrays({x.shape(), w.shape()}, {mx::float32, mx::float32},
                                      std::make_shared<RMSNormGrad>(stream()), {x, w, outputs[1], gy});
  std::vector<mx::array> result;
  for (int a : argnums) result.push_back(grads[a]);
  return result;
}

bool RMSNorm::is_equivalent(const mx::Primitive& other) const {
  return eps_ == static_cast<const RMSNorm&>(other).eps_;
}

void RMSNormGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  size_t C = last_dim(in[0]), N = C ? in[0].size() / C : 0;
  launch(stream(), [x = in[0].data<float>(), w = in[1].data<float>(), rstd = in[2].data<float>(),
                    gy = in[3].data<float>(), dx = out[0].data<float>(), dw = out[1].data<float>(), N, C] {
    int chunks = row_chunks(N, C);
    std::vector<float> part(C * chunks, 0.0f);
    parallel_rows(N, C, [&](int c, size_t r0, size_t r1) {
      rms_norm_bwd(x, w, rstd, gy, dx, &part[C * c], C, r0, r1);
    });
    for (size_t j = 0; j < C; j++) dw[j] = 0.0f;
    for (int c = 0; c < chunks; c++) {
      for (size_t j = 0; j < C; j++) dw[j] += part[C * c + j];
    }
  });
}

// ---- masked, scaled softmax ---------------------------------------------------------------------------
mx::array masked_softmax(const mx::array& scores, const std::optional<mx::array>& mask, float scale,
                         mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  std::vector<mx::array> inputs = {prepared(scores, stream, "masked_softmax")};
  if (mask) {
    auto m = mx::astype(*mask, mx::bool_, stream);
    bool keys_broadcast = m.ndim() == 0 || m.shape(-1) != scores.shape(-1);
    m = mx::broadcast_to(mx::contiguous(m, false, stream), scores.shape(), stream);  // a strided view
    if (keys_broadcast) m = mx::contiguous(m, false, stream);  // the key axis must have stride 1
    inputs.push_back(m);
  }
  return mx::array(scores.shape(), mx::float32, std::make_shared<MaskedSoftmax>(stream, scale, mask.has_value()),
                   inputs);
}

void MaskedSoftmax::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  size_t T = last_dim(in[0]), N = T ? in[0].size() / T : 0;
  const uint8_t* mask = nullptr;
  std::vector<int64_t> rows;
  if (mask_) {
    const auto& m = in[1];
    mask = reinterpret_cast<const uint8_t*>(m.data<bool>());
    // Offset of each row's mask in the (possibly broadcast, stride-0) mask view.
    const auto& shape = m.shape();
    const auto& strides = m.strides();
    int nd = (int)m.ndim() - 1;
    rows.resize(N);
    for (size_t r = 0; r < N; r++) {
      size_t rem = r;
      int64_t off = 0;
      for (int d = nd - 1; d >= 0; d--) {
        off += (int64_t)(rem % shape[d]) * strides[d];
        rem /= shape[d];
      }
      rows[r] = off;
    }
  }
  launch(stream(), [s = in[0].data<float>(), p = out[0].data<float>(), mask, rows = std::move(rows), N, T,
                    scale = scale_] {
    parallel_rows(N, T, [&](int, size_t r0, size_t r1) {
      masked_softmax_fwd(s, mask, rows.data(), p, T, scale, r0, r1);
    });
  });
}

std::vector<mx::array> MaskedSoftmax::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                          const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  std::vector<mx::array> result;
  for (int a : argnums) {
    if (a == 0) {
      auto g = prepared(cot[0], stream(), "masked_softmax vjp");
      result.push_back(mx::array(outputs[0].shape(), mx::float32, std::make_shared<SoftmaxGrad>(stream(), scale_),
                                 {outputs[0], g}));
    } else {
      result.push_back(mx::zeros_like(primals[a], stream()));
    }
  }
  return result;
}

bool MaskedSoftmax::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const MaskedSoftmax&>(other);
  return scale_ == o.scale_ && mask_ == o.mask_;
}

void SoftmaxGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  size_t T = last_dim(in[0]), N = T ? in[0].size() / T : 0;
  launch(stream(), [p = in[0].data<float>(), g = in[1].data<float>(), ds = out[0].data<float>(), N, T,
                    scale = scale_] {
    parallel_rows(N, T, [&](int, size_t r0, size_t r1) { softmax_bwd(p, g, ds, T, scale, r0, r1); });
  });
}

bool SoftmaxGrad::is_equivalent(const mx::Primitive& other) const {
  return scale_ == static_cast<const SoftmaxGrad&>(other).scale_;
}

// ---- cross-entropy ---------------------------------------------------------------------------------------
mx::array cross_entropy_rows(const mx::array& logits, const mx::array& targets, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (logits.ndim() != 2 || targets.ndim() != 1 || targets.shape(0) != logits.shape(0)) {
    throw std::invalid_argument("cross_entropy_rows: logits (N, V) and targets (N,)");
  }
  auto t = mx::contiguous(mx::astype(targets, mx::int32, stream), false, stream);
  mx::Shape rows = {logits.shape(0)};
  auto outs = mx::array::make_arrays({rows, rows}, {mx::float32, mx::float32},
                                     std::make_shared<CrossEntropy>(stream),
                                     {prepared(logits, stream, "cross_entropy"), t});
  return outs[0];
}

void CrossEntropy::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  size_t N = in[0].shape(0), V = in[0].shape(1);
  launch(stream(), [l = in[0].data<float>(), t = in[1].data<int32_t>(), nll = out[0].data<float>(),
                    lse = out[1].data<float>(), N, V] {
    parallel_rows(N, V, [&](int, size_t r0, size_t r1) { cross_entropy_fwd(l, t, nll, lse, V, r0, r1); });
  });
}

std::vector<mx::array> CrossEntropy::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                         const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  std::vector<mx::array> result;
  for (int a : argnums) {
    if (a == 0) {
      auto g = prepared(cot[0], stream(), "cross_entropy vjp");
      result.push_back(mx::array(primals[0].shape(), mx::float32, std::make_shared<CrossEntropyGrad>(stream()),
                                 {primals[0], primals[1], outputs[1], g}));
    } else {
      result.push_back(mx::zeros_like(primals[a], stream()));
    }
  }
  return result;
}

void CrossEntropyGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  size_t N = in[0].shape(0), V = in[0].shape(1);
  launch(stream(), [l = in[0].data<float>(), t = in[1].data<int32_t>(), lse = in[2].data<float>(),
                    g = in[3].data<float>(), dl = out[0].data<float>(), N, V] {
    parallel_rows(N, V, [&](int, size_t r0, size_t r1) { cross_entropy_bwd(l, t, lse, g, dl, V, r0, r1); });
  });
}

// ---- SwiGLU ------------------------------------------------------------------------------------------------
mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (gate.shape() != up.shape()) throw std::invalid_argument("swiglu: gate and up must have one shape");
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGLU>(stream),
                   {prepared(gate, stream, "swiglu"), prepared(up, stream, "swiglu")});
}

void SwiGLU::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  launch(stream(), [g = in[0].data<float>(), u = in[1].data<float>(), y = out[0].data<float>(),
                    n = out[0].size()] {
    parallel_rows(n, 1, [&](int, size_t b, size_t e) { swiglu_fwd(g, u, y, b, e); });
  });
}

std::vector<mx::array> SwiGLU::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                   const std::vector<int>& argnums, const std::vector<mx::array>&) {
  auto dy = prepared(cot[0], stream(), "swiglu vjp");
  const auto& g = primals[0];
  auto grads = mx::array::make_arrays({g.shape(), g.shape()}, {mx::float32, mx::float32},
                                      std::make_shared<SwiGLUGrad>(stream()), {g, primals[1], dy});
  std::vector<mx::array> result;
  for (int a : argnums) result.push_back(grads[a]);
  return result;
}

void SwiGLUGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  launch(stream(), [g = in[0].data<float>(), u = in[1].data<float>(), dy = in[2].data<float>(),
                    dg = out[0].data<float>(), du = out[1].data<float>(), n = out[0].size()] {
    parallel_rows(n, 1, [&](int, size_t b, size_t e) { swiglu_bwd(g, u, dy, dg, du, b, e); });
  });
}

// ---- RoPE --------------------------------------------------------------------------------------------------
mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (x.ndim() < 2 || x.shape(-1) % 2 != 0 || cos.ndim() != 2 || cos.shape() != sin.shape() ||
      cos.shape(0) != x.shape(-2) || 2 * cos.shape(1) != x.shape(-1)) {
    throw std::invalid_argument("rope: x (..., T, hs) with cos and sin (T, hs/2)");
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(stream, false),
                   {prepared(x, stream, "rope"), prepared(cos, stream, "rope"), prepared(sin, stream, "rope")});
}

void Rope::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  size_t hs = last_dim(in[0]), T = in[1].shape(0), N = hs ? in[0].size() / hs : 0;
  launch(stream(), [x = in[0].data<float>(), c = in[1].data<float>(), sn = in[2].data<float>(),
                    y = out[0].data<float>(), N, T, half = hs / 2, sign = inverse_ ? -1.0f : 1.0f] {
    parallel_rows(N, 2 * half, [&](int, size_t r0, size_t r1) { rope_rows(x, c, sn, y, T, half, sign, r0, r1); });
  });
}

// dx is the rotation back (sin negated); cos/sin get sums over the leading axes, from MLX ops.
std::vector<mx::array> Rope::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                 const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const auto& x = primals[0];
  auto dy = prepared(cot[0], stream(), "rope vjp");
  std::vector<mx::array> result;
  int half = x.shape(-1) / 2;
  auto split = [&](const mx::array& a) {
    return std::make_pair(mx::slice(a, mx::Shape(a.ndim(), 0), [&] { auto e = a.shape(); e.back() = half; return e; }(),
                                    stream()),
                          mx::slice(a, [&] { mx::Shape b(a.ndim(), 0); b.back() = half; return b; }(), a.shape(),
                                    stream()));
  };
  for (int a : argnums) {
    if (a == 0) {
      result.push_back(mx::array(x.shape(), mx::float32, std::make_shared<Rope>(stream(), !inverse_),
                                 {dy, primals[1], primals[2]}));
      continue;
    }
    auto [x1, x2] = split(x);
    auto [d1, d2] = split(dy);
    float sign = inverse_ ? -1.0f : 1.0f;
    mx::array per_elem = a == 1 ? mx::add(mx::multiply(d1, x1, stream()), mx::multiply(d2, x2, stream()), stream())
                                : mx::multiply(mx::subtract(mx::multiply(d2, x1, stream()), mx::multiply(d1, x2, stream()),
                                                            stream()),
                                               mx::array(sign), stream());
    std::vector<int> axes;
    for (int d = 0; d < (int)x.ndim() - 2; d++) axes.push_back(d);
    result.push_back(axes.empty() ? per_elem : mx::sum(per_elem, axes, false, stream()));
  }
  return result;
}

bool Rope::is_equivalent(const mx::Primitive& other) const {
  return inverse_ == static_cast<const Rope&>(other).inverse_;
}

// ---- linear layer ------------------------------------------------------------------------------------------
namespace {
constexpr int ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112;  // CBLAS's enum values

// C (m, n) = op(A) op(B) + beta C, row-major, contiguous operands.
void sgemm(bool ta, bool tb, size_t m, size_t n, size_t k, const float* a, const float* b, float beta, float* c) {
  cblas_sgemm(ROW_MAJOR, ta ? TRANS : NO_TRANS, tb ? TRANS : NO_TRANS, (int)m, (int)n, (int)k, 1.0f, a,
              (int)(ta ? m : k), b, (int)(tb ? k : n), beta, c, (int)n);
}
}  // namespace

mx::array linear(const mx::array& x, const mx::array& w, const std::optional<mx::array>& b, int fault,
                 mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (x.ndim() < 1 || w.ndim() != 2 || x.shape(-1) != w.shape(0) ||
      (b && (b->ndim() != 1 || b->shape(0) != w.shape(1)))) {
    throw std::invalid_argument("linear: x (..., K), weight (K, N) and bias (N,)");
  }
  // BLAS takes int sizes (LP64 OpenBLAS).
  if (x.size() >= (size_t)INT32_MAX || w.size() >= (size_t)INT32_MAX) {
    throw std::invalid_argument("linear: too large for 32-bit BLAS sizes");
  }
  std::vector<mx::array> inputs = {prepared(x, stream, "linear"), prepared(w, stream, "linear")};
  if (b) inputs.push_back(prepared(*b, stream, "linear"));
  auto shape = x.shape();
  shape.back() = w.shape(1);
  return mx::array(shape, mx::float32, std::make_shared<Linear>(stream, b.has_value(), fault), inputs);
}

void Linear::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  size_t K = in[1].shape(0), N = in[1].shape(1);
  size_t M = K ? in[0].size() / K : out[0].size() / std::max<size_t>(N, 1);
  launch(stream(), [x = in[0].data<float>(), w = in[1].data<float>(), b = bias_ ? in[2].data<float>() : nullptr,
                    y = out[0].data<float>(), M, K, N, fault = fault_] {
    if (M == 0 || N == 0) return;
    if (b) parallel_rows(M, N, [&](int, size_t r0, size_t r1) { fill_rows(b, y, N, r0, r1); });
    if (K == 0) {  // an empty sum: the bias, or zeros
      if (!b) std::memset(y, 0, M * N * sizeof(float));
      return;
    }
    // beta = 1: accumulate onto the bias already in y (no zeroing pass, no separate add).
    sgemm(false, false, M, N, K, x, w, b && fault != 1 ? 1.0f : 0.0f, y);
  });
}

std::vector<mx::array> Linear::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                   const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const auto& x = primals[0];
  const auto& w = primals[1];
  auto g = prepared(cot[0], stream(), "linear vjp");
  bool want[3] = {false, false, false};
  for (int a : argnums) want[a] = true;
  std::vector<mx::Shape> shapes;
  for (int i = 0; i < 3; i++) {
    if (want[i]) shapes.push_back(primals[i].shape());
  }
  auto grads = mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                      std::make_shared<LinearGrad>(stream(), want[0], want[1], want[2], fault_),
                                      {x, w, g});
  std::vector<mx::array> result;
  for (int a : argnums) {
    int slot = 0;
    for (int i = 0; i < a; i++) slot += want[i];
    result.push_back(grads[slot]);
  }
  return result;
}

bool Linear::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const Linear&>(other);
  return bias_ == o.bias_ && fault_ == o.fault_;
}

// dx = g w^T and dw = x^T g as sgemm (beta = 0); db as partial column sums per chunk of rows, added in
// chunk order (the same result for the same thread count), like the norms' weight gradients.
void LinearGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) allocate(o);
  size_t K = in[1].shape(0), N = in[1].shape(1), M = N ? in[2].size() / N : 0;
  int slot = 0;
  float* dx = dx_ ? out[slot++].data<float>() : nullptr;
  float* dw = dw_ ? out[slot++].data<float>() : nullptr;
  float* db = db_ ? out[slot++].data<float>() : nullptr;
  launch(stream(), [x = in[0].data<float>(), w = in[1].data<float>(), g = in[2].data<float>(), dx, dw, db, M, K,
                    N, fault = fault_] {
    bool empty = M == 0 || N == 0 || K == 0;
    if (dx && !empty) sgemm(false, true, M, K, N, g, w, 0.0f, dx);
    else if (dx) std::memset(dx, 0, M * K * sizeof(float));
    if (dw && !empty) sgemm(true, false, K, N, M, x, g, 0.0f, dw);
    else if (dw) std::memset(dw, 0, K * N * sizeof(float));
    if (db) {
      std::memset(db, 0, N * sizeof(float));
      if (M == 0 || N == 0 || fault == 2) return;
      int chunks = row_chunks(M, N);
      if (chunks <= 1) {
        col_sum(g, db, N, 0, M);
        return;
      }
      std::vector<float> part(N * chunks, 0.0f);
      parallel_rows(M, N, [&](int c, size_t r0, size_t r1) { col_sum(g, &part[N * c], N, r0, r1); });
      for (int c = 0; c < chunks; c++) {
        for (size_t j = 0; j < N; j++) db[j] += part[N * c + j];
      }
    }
  });
}

bool LinearGrad::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const LinearGrad&>(other);
  return dx_ == o.dx_ && dw_ == o.dw_ && db_ == o.db_ && fault_ == o.fault_;
}

// ---- embedding: row gather, and its scatter-add split over columns ------------------------------------------
mx::array embedding(const mx::array& table, const mx::array& ids, int fault, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (table.ndim() != 2 || !mx::issubdtype(ids.dtype(), mx::integer)) {
    throw std::invalid_argument("embedding: table (V, C) and integer ids");
  }
  auto i32 = mx::contiguous(mx::astype(ids, mx::int32, stream), false, stream);
  auto shape = ids.shape();
  shape.push_back(table.shape(1));
  return mx::array(shape, mx::float32, std::make_shared<Embedding>(stream, fault),
                   {prepared(table, stream, "embedding"), i32});
}

namespace {
// The row of id (negative: from the end, as mx.take), or -1 when out of range.
inline int64_t row_of(int32_t id, int64_t V) {
  int64_t r = id < 0 ? id + V : id;
  return r >= 0 && r < V ? r : -1;
}
}  // namespace

void Embedding::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  size_t V = in[0].shape(0), C = in[0].shape(1), N = in[1].size();
  launch(stream(), [t = in[0].data<float>(), ids = in[1].data<int32_t>(), y = out[0].data<float>(), V, C, N] {
    parallel_rows(N, C, [&](int, size_t r0, size_t r1) {
      for (size_t i = r0; i < r1; i++) {
        int64_t r = row_of(ids[i], (int64_t)V);
        if (r >= 0) std::memcpy(y + i * C, t + r * C, C * sizeof(float));
        else std::fill(y + i * C, y + (i + 1) * C, std::numeric_limits<float>::quiet_NaN());
      }
    });
  });
}

std::vector<mx::array> Embedding::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                                      const std::vector<int>& argnums, const std::vector<mx::array>&) {
  std::vector<mx::array> result;
  for (int a : argnums) {
    if (a == 0) {
      auto g = prepared(cot[0], stream(), "embedding vjp");
      result.push_back(mx::array(primals[0].shape(), mx::float32, std::make_shared<EmbeddingGrad>(stream(), fault_),
                                 {primals[1], g}));
    } else {
      result.push_back(mx::zeros_like(primals[a], stream()));
    }
  }
  return result;
}

bool Embedding::is_equivalent(const mx::Primitive& other) const {
  return fault_ == static_cast<const Embedding&>(other).fault_;
}

// Each pool chunk owns a block of columns and adds every id's gradient row into it, ids in order: no two
// threads write one float, and the sums are the sequential ones whatever the thread count.
void EmbeddingGrad::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  size_t V = out[0].shape(0), C = out[0].shape(1), N = in[0].size();
  launch(stream(), [ids = in[0].data<int32_t>(), g = in[1].data<float>(), dt = out[0].data<float>(), V, C, N,
                    fault = fault_] {
    std::memset(dt, 0, V * C * sizeof(float));
    parallel_rows(C, N, [&](int, size_t c0, size_t c1) {
      for (size_t i = 0; i < N; i++) {
        int64_t r = row_of(ids[i], (int64_t)V);
        if (r < 0) continue;
        float* d = dt + r * C;
        const float* gi = g + i * C;
        if (fault == 1) {
          for (size_t j = c0; j < c1; j++) d[j] = gi[j];
        } else {
#pragma omp simd
          for (size_t j = c0; j < c1; j++) d[j] += gi[j];
        }
      }
    });
  });
}

bool EmbeddingGrad::is_equivalent(const mx::Primitive& other) const {
  return fault_ == static_cast<const EmbeddingGrad&>(other).fault_;
}

// ---- quantized matmul (int8/int4 weights, MLX's affine layout; loops in quant.cpp) --------------------------
namespace {
// Floats of dequantized weight rows per sgemm call on the larger-M path: big enough for BLAS to run at
// speed, small enough that a quantized 128k-row head never needs its float copy.
constexpr size_t QTILE_FLOATS = size_t(2) << 20;

[[noreturn]] void qmm_error(const std::string& what) { throw std::invalid_argument("quantized_matmul: " + what); }

std::string shape_str(const mx::array& a) {
  std::string s = "(";
  for (int i = 0; i < (int)a.ndim(); i++) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}
}  // namespace

mx::array quantized_matmul(const mx::array& x, const mx::array& qweight, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, bool transpose,
                           mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (bits != 4 && bits != 8) qmm_error("bits must be 4 or 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    qmm_error("group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  }
  if (qweight.dtype() != mx::uint32 || qweight.ndim() != 2) {
    qmm_error("qweight must be a 2-D uint32 array (n_out, n_in * bits / 32), got " + shape_str(qweight));
  }
  const int64_t N = qweight.shape(0), K = qweight.shape(1) * 32 / bits;
  if (K % group_size != 0) qmm_error("n_in = " + std::to_string(K) + " is not a multiple of group_size");
  for (const auto* a : {&scales, &biases}) {
    if (a->dtype() != mx::float32 || a->ndim() != 2 || a->shape(0) != N || a->shape(1) != K / group_size) {
      qmm_error(std::string(a == &scales ? "scales" : "biases") + " must be float32 (" + std::to_string(N) + ", " +
                std::to_string(K / group_size) + ") for qweight " + shape_str(qweight) + ", bits " +
                std::to_string(bits) + " and group_size " + std::to_string(group_size) + ", got " + shape_str(*a));
    }
  }
  if (x.dtype() != mx::float32) qmm_error("x must be float32");
  const int64_t in_dim = transpose ? K : N;
  if (x.ndim() < 1 || x.shape(-1) != in_dim) {
    qmm_error("x " + shape_str(x) + " does not end in " + std::to_string(in_dim) + " (qweight " +
              shape_str(qweight) + ", bits " + std::to_string(bits) + ")");
  }
  if (x.size() >= (size_t)INT32_MAX || (size_t)N * (size_t)K >= (size_t)INT32_MAX) {
    qmm_error("too large for 32-bit BLAS sizes");
  }
  auto shape = x.shape();
  shape.back() = (int)(transpose ? N : K);
  return mx::array(shape, mx::float32, std::make_shared<QuantizedMatmul>(stream, group_size, bits, transpose),
                   {row_contiguous(x, stream), row_contiguous(qweight, stream),
                    row_contiguous(scales, stream), row_contiguous(biases, stream)});
}

// Up to QGEMV_MAX_ROWS rows (decoding, short prompts): the GEMV loops, split over output rows, 8 rows of x
// per pass over a block of weight rows. More rows (prefill, training): tiles of dequantized weight rows,
// each one sgemm. The gradient for x
// (transpose = false) always takes the tiles: its rows are the training batch.
void QuantizedMatmul::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  allocate(out[0]);
  const size_t N = in[1].shape(0), K = in[1].shape(1) * 32 / bits_;
  const size_t M = in[0].size() / std::max<size_t>(transpose_ ? K : N, 1);
  launch(stream(), [x = in[0].data<float>(), w = in[1].data<uint32_t>(), sc = in[2].data<float>(),
                    bi = in[3].data<float>(), y = out[0].data<float>(), M, N, K, G = (size_t)group_, bits = bits_,
                    tr = transpose_] {
    const size_t out_dim = tr ? N : K;
    if (M == 0 || out_dim == 0) return;
    if (K == 0 || N == 0) {  // an empty sum
      std::memset(y, 0, M * out_dim * sizeof(float));
      return;
    }
    if (tr && M <= QGEMV_MAX_ROWS) {
      const QIsa isa = quant_isa();
      std::vector<float> xp(M * K);
      qgemv_prepare_x(isa, x, xp.data(), M, K, bits);
      // Blocks of output rows whose packed weights stay in L2 (64 KB) while every 8 rows of x pass over them.
      const size_t ob = std::max<size_t>(1, (size_t(64) << 10) / (K * bits / 8));
      parallel_rows(N, K * M, [&](int, size_t o0, size_t o1) {
        for (size_t b0 = o0; b0 < o1; b0 += ob) {
          for (size_t m0 = 0; m0 < M; m0 += QGEMV_ROWS) {
            qgemv_rows(isa, xp.data() + m0 * K, w, sc, bi, y + m0 * N, std::min(QGEMV_ROWS, M - m0), K, N, G, bits,
                       b0, std::min(o1, b0 + ob));
          }
        }
      });
      return;
    }
    const size_t rows = std::min(N, std::max<size_t>(16, QTILE_FLOATS / K));
    std::vector<float> tile(rows * K);
    for (size_t o0 = 0; o0 < N; o0 += rows) {
      const size_t r = std::min(rows, N - o0);
      parallel_rows(r, K, [&](int, size_t a, size_t e) {
        qdequant_rows(w, sc, bi, tile.data() + a * K, K, G, bits, o0 + a, o0 + e);
      });
      if (tr) {  // y[:, o0:o0+r] = x (M, K) @ tile (r, K)^T
        cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, (int)M, (int)r, (int)K, 1.0f, x, (int)K, tile.data(), (int)K, 0.0f,
                    y + o0, (int)N);
      } else {  // y (M, K) += x[:, o0:o0+r] @ tile (r, K)
        cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, (int)M, (int)K, (int)r, 1.0f, x + o0, (int)N, tile.data(),
                    (int)K, o0 ? 1.0f : 0.0f, y, (int)K);
      }
    }
  });
}

std::vector<mx::array> QuantizedMatmul::vjp(const std::vector<mx::array>& primals,
                                            const std::vector<mx::array>& cot, const std::vector<int>& argnums,
                                            const std::vector<mx::array>&) {
  for (int a : argnums) {
    if (a != 0) {
      qmm_error("no gradient for the quantized weight, its scales or biases: they are a frozen base "
                "(train float adapters beside them, e.g. LoRA)");
    }
  }
  auto g = prepared(cot[0], stream(), "quantized_matmul vjp");
  // d/dx (x Wt^T) = g Wt, and d/dx (x Wt) = g Wt^T: the same primitive, the other way round.
  return {mx::array(primals[0].shape(), mx::float32,
                    std::make_shared<QuantizedMatmul>(stream(), group_, bits_, !transpose_),
                    {g, primals[1], primals[2], primals[3]})};
}

bool QuantizedMatmul::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const QuantizedMatmul&>(other);
  return group_ == o.group_ && bits_ == o.bits_ && transpose_ == o.transpose_;
}

std::vector<mx::Shape> QuantizedMatmul::output_shapes(const std::vector<mx::array>& in) {
  auto shape = in[0].shape();
  shape.back() = transpose_ ? in[1].shape(0) : in[1].shape(1) * 32 / bits_;
  return {shape};
}

}  // namespace twinlm
